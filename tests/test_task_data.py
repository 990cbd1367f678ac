"""Task data: JSONL parsing with file:line errors, loss masks, truncation, plain-text windows, the loader."""
import json

import numpy as np
import pytest

from nanogpt_np.tokenizers.char import CharTokenizer
from nanogpt_np.data.task_data import (Example, TaskDataError, TaskLoader, encode_example, load_task_data,
                                  read_task_file, split_examples)

TOK = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz :\n")))


class EotTokenizer:
    """Characters plus an end-of-text id, like a BPE tokenizer with <|endoftext|>."""
    def __init__(self):
        self.inner = TOK
        self.eot_id = TOK.vocab_size
        self.vocab_size = TOK.vocab_size + 1

    def encode(self, text, allowed_special="none_raise"):
        return self.inner.encode(text)


def write_lines(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


def test_read_task_file(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [{"prompt": "ab:", "completion": " c", "id": 7}, "",
                                           {"text": "plain words"}, "   "])
    ex = read_task_file(p)
    assert [(e.prompt, e.completion, e.plain) for e in ex] == [("ab:", " c", False), ("", "plain words", True)]
    assert ex[0].where == f"{p}:1" and ex[1].where == f"{p}:3"
    txt = tmp_path / "doc.txt"
    txt.write_text("some text\n")
    assert read_task_file(txt)[0].plain


@pytest.mark.parametrize("lines,match", [
    ([{"prompt": "a", "completion": "b"}, "{not json"], r":2: not valid JSON"),
    ([{"prompt": "a"}], r":1: missing field 'completion'"),
    ([{"completion": "a"}], r":1: missing field 'prompt'"),
    ([{"prompt": "a", "completion": 3}], r":1: field 'completion' must be a string"),
    ([{"prompt": "a", "completion": ""}], r":1: field 'completion' is empty"),
    ([{"label": "x"}], r":1: missing fields: need \"prompt\" and \"completion\", or \"text\""),
    (["[1, 2]"], r":1: each line must be a JSON object"),
    ([{"text": ""}], r":1: field 'text' must be a non-empty string"),
    (["", ""], r"no examples"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, match):
    p = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskDataError, match=match) as e:
        read_task_file(p)
    assert str(p) in str(e.value)


def test_evaluation_needs_pairs(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "x"}])
    with pytest.raises(TaskDataError, match=r":2: missing field 'prompt'"):
        read_task_file(p, need_completion=True)
    with pytest.raises(TaskDataError, match="cannot open"):
        read_task_file(tmp_path / "missing.jsonl")


def test_mask_covers_only_the_completion():
    s = TOK.stoi
    ids, learn = encode_example(TOK, Example("ab:", " c", "x:1"))
    assert ids.tolist() == [s["a"], s["b"], s[":"], s[" "], s["c"]]        # char tokenizer: no eot
    assert learn.tolist() == [False, False, False, True, True]
    data = load_task_data([Example("ab:", " c", "x:1")], TOK, block_size=8)
    assert data.x[0, :4].tolist() == ids[:-1].tolist()
    assert data.y[0].tolist() == [-1, -1, s[" "], s["c"], -1, -1, -1, -1]   # predicted at x positions 2, 3
    tok = EotTokenizer()
    data = load_task_data([Example("ab:", " c", "x:1")], tok, block_size=8)
    assert data.y[0].tolist() == [-1, -1, s[" "], s["c"], tok.eot_id, -1, -1, -1]
    assert data.x[0, 5:].tolist() == [tok.eot_id] * 3                      # padded with eot
    assert data.lengths.tolist() == [5] and data.n_target_tokens == 3


def test_truncation_keeps_the_completion():
    s = TOK.stoi
    ex = Example("abcdefghij:", " xy", "x:1")                               # 11 + 3 = 14 tokens
    data = load_task_data([ex], TOK, block_size=6)                          # room for 7
    assert data.n_truncated == 1
    kept = [TOK.chars[i] for i in data.x[0]]
    assert "".join(kept) == "hij: x"                                        # prompt cut from the left
    assert data.y[0].tolist() == [-1, -1, -1, s[" "], s["x"], s["y"]]
    with pytest.raises(TaskDataError, match=r"x:1: no completion token fits"):
        load_task_data([Example("", "a", "x:1")], TOK, block_size=4)      # 1 token: nothing to predict


def test_plain_text_windows_learn_every_token_once():
    text = "the quick brown fox jumps over the lazy dog"
    data = load_task_data([Example("", text, "t:1", plain=True)], TOK, block_size=8)
    ids = TOK.encode(text)
    learned = data.y[data.y >= 0]
    assert learned.tolist() == ids[1:]                                      # every token after the first, once
    assert (data.x[:, 0] == np.array(ids[0:len(ids) - 1:8])).all()


def test_encoding_errors_name_the_line(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [{"prompt": "ok", "completion": " fine"}, {"prompt": "Bad!", "completion": "x"}])
    with pytest.raises(TaskDataError, match=r"t\.jsonl:2: cannot encode"):
        load_task_data(p, TOK, block_size=16)


def test_split_and_loader():
    exs = [Example(f"{c}:", " a", f"f:{i}") for i, c in enumerate("abcdefghijklmnopqrst")]
    train, val = split_examples(exs, 0.2, seed=1)
    assert len(train) == 16 and len(val) == 4
    assert {e.where for e in train} | {e.where for e in val} == {e.where for e in exs}
    assert split_examples(exs, 0.2, seed=1) == (train, val)

    data = load_task_data(train, TOK, block_size=32)
    loader = TaskLoader(data, batch_size=4, seed=5)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 3)                                    # cut to the longest row (3 tokens)
    state = loader.state_dict()
    a = [loader.next_batch() for _ in range(3)]
    loader2 = TaskLoader(data, batch_size=4, seed=99)
    loader2.load_state_dict(json.loads(json.dumps(state)))
    b = [loader2.next_batch() for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    seq = list(loader.iter_sequential())
    assert len(seq) == len(loader) == 4 and sum(len(x) for x, _ in seq) == 16


def test_trainer_glue(tmp_path):
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.data.task_data import is_task_file, task_loaders, task_text, task_val_loss
    p = write_lines(tmp_path / "t.jsonl", [{"prompt": f"{c}b:", "completion": " a"} for c in "abcdefghij"])
    assert is_task_file(p) and not is_task_file(tmp_path / "missing.jsonl")
    assert set(task_text(read_task_file(p))) <= set(TOK.chars)
    train, val = task_loaders(p, TOK, block_size=16, batch_size=3, val_fraction=0.2, seed=0)
    assert len(train.data.x) == 8 and len(val.data.x) == 2
    model = GPT(GPTConfig(block_size=16, vocab_size=TOK.vocab_size, n_layer=1, n_head=1, n_embd=8))
    loss = task_val_loss(model, val)
    assert np.isfinite(loss) and model.training                              # mode restored
    one = write_lines(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(TaskDataError, match="too few"):
        task_loaders(one, TOK, 16, 2)


def test_task_validation_rows_are_spread_over_the_whole_split(tmp_path, rng):
    """task_val_loss(max_batches=k) measures k batches of rows taken evenly from all the rows, not the
    first k batches: rows listed in order (sorted by label, say) are all represented."""
    n = int(rng.integers(40, 120))
    words = [f"{c}{d}" for c in "abcdefghijklmnopqrstuvwxyz" for d in "abcdefghijklmnopqrstuvwxyz"]
    path = write_lines(tmp_path / "t.jsonl", [{"prompt": words[i] + ":", "completion": " x"} for i in range(n)])
    data = load_task_data(path, TOK, block_size=8)
    batch = int(rng.integers(1, 5))
    loader = TaskLoader(data, batch_size=batch, seed=0)
    k = int(rng.integers(2, 5))
    rows = [row.tolist() for x, _ in loader.iter_spread(k) for row in x]
    all_rows = [row.tolist() for x, _ in loader.iter_sequential() for row in x]
    picked = [all_rows.index(r) for r in rows]
    assert len(rows) == k * batch and picked[0] == 0 and picked == sorted(picked)
    assert picked[-1] >= n - n // (k * batch) - 1                       # reaches the last rows
    assert [r.tolist() for x, _ in loader.iter_spread(n) for r in x] == all_rows       # more than there are: all
