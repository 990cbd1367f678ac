"""python -m nanogpt_np.eval.evaluate: LM metrics against independent computations, greedy completion, the CLI."""
import json
import math

import numpy as np
import pytest

from nanogpt_np.tokenizers.char import CharTokenizer
from nanogpt_np.io.checkpoint import save_checkpoint
from nanogpt_np.eval.evaluate import greedy_complete, lm_metrics, load_for_eval, main, task_metrics
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.data.task_data import Example

TEXT = "the cat sat on the mat. the dog sat on the log.\n"
TOK = CharTokenizer.from_text(TEXT + "pn:ositve")


def make_run(path, zero_wte=False, seed=0, block_size=16):
    model = GPT(GPTConfig(block_size=block_size, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16),
                seed=seed)
    if zero_wte:
        model.params["wte.weight"].data[...] = 0.0          # every logit is 0: the uniform distribution
    save_checkpoint(path, model, None, {}, {"step": 3}, TOK)
    return model


def reference_nll(model, ids):
    """Sum of -log p(next token) with the full text in one window, computed in float64 from the logits."""
    logits = np.asarray(model.forward(np.array([ids[:-1]]))[0].data, dtype=np.float64)[0]   # (L-1, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]].sum()


def test_uniform_model_has_known_metrics(tmp_path):
    make_run(tmp_path / "run", zero_wte=True)
    model, tok, kind = load_for_eval(tmp_path / "run")
    assert kind == "run" and not model.training
    r = lm_metrics(model, tok, TEXT)
    V = tok.vocab_size
    assert r["tokens"] == len(TEXT) - 1 and r["bytes"] == len(TEXT) - 1      # ASCII: one byte per char
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(math.log2(V), rel=1e-6)


def test_lm_metrics_match_a_direct_computation(tmp_path):
    make_run(tmp_path / "run", block_size=64)                  # the whole text fits in one window
    model, tok, _ = load_for_eval(tmp_path / "run")
    ids = np.array(tok.encode(TEXT))
    total = reference_nll(model, ids)
    r = lm_metrics(model, tok, TEXT)
    assert r["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(total / (math.log(2) * (len(TEXT) - 1)), rel=1e-5)
    # with a short block the text is windowed; each token is still predicted exactly once
    make_run(tmp_path / "short", block_size=8)
    model, tok, _ = load_for_eval(tmp_path / "short")
    ids = np.array(tok.encode(TEXT))
    windows = [ids[s:s + 9] for s in range(0, len(ids) - 1, 8)]
    total = sum(reference_nll(model, w) for w in windows)
    r = lm_metrics(model, tok, TEXT, batch_size=2)
    assert r["tokens"] == len(ids) - 1
    assert r["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_greedy_complete_matches_a_manual_argmax_loop(tmp_path):
    model = make_run(tmp_path / "run")
    model.eval()
    prompts = [TOK.encode("the c"), TOK.encode("on th"), TOK.encode("a")]
    out = greedy_complete(model, prompts, max_new_tokens=4, batch_size=2)
    for p, o in zip(prompts, out):
        ctx = list(p)
        for _ in range(4):
            logits = np.asarray(model.forward(np.array([ctx[-16:]]))[0].data)
            ctx.append(int(logits[0, -1].argmax()))
        assert o == ctx[len(p):]
    first = out[0][0]
    stopped = greedy_complete(model, prompts[:1], max_new_tokens=4, stop_id=first)
    assert stopped == [[]]                                     # the stop token ends it and is not returned


def test_task_metrics_wiring(tmp_path):
    model = make_run(tmp_path / "run")
    model.eval()
    examples = [Example("the cat:", " positive", "t:1"), Example("the dog:", " negative", "t:2")] * 3
    r = task_metrics(model, TOK, examples)
    assert r["kind"] == "labels" and r["examples"] == 6
    assert r["max_new_tokens"] == len(" positive") + 1
    outputs = [s["output"] for s in r["samples"]]
    from nanogpt_np.eval.metrics import accuracy, normalize_label
    assert r["accuracy"] == accuracy([normalize_label(o) for o in outputs[:5]] + [normalize_label(outputs[1])],
                                     ["positive", "negative"] * 3)
    assert r["task_loss"] > 0 and r["task_tokens"] == 6 * len(" positive")
    r = task_metrics(model, TOK, examples, kind="text")
    assert 0.0 <= r["bleu"] <= 1.0 and "bleu_add1" in r and "exact_match" in r


def test_command_line_writes_eval_json(tmp_path, capsys):
    make_run(tmp_path / "run")
    (tmp_path / "held.txt").write_text(TEXT * 3)
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in
                              [("the cat:", " positive"), ("the dog:", " negative")] * 2) + "\n")
    assert main([f"--out_dir={tmp_path / 'run'}", f"--file={tmp_path / 'held.txt'}", f"--task={task}"]) == 0
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert res["step"] == 3 and res["source"] == "run"
    assert set(res["file"]) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "path"}
    assert set(res["task"]) >= {"accuracy", "macro_f1", "f1_per_label", "task_loss", "samples"}
    assert "bits/byte" in capsys.readouterr().out
    assert main([f"--out_dir={tmp_path / 'run'}", f"--task={task}", f"--out={tmp_path / 'other.json'}"]) == 0
    assert "task" in json.loads((tmp_path / "other.json").read_text())


def test_command_line_errors(tmp_path, capsys):
    assert main([f"--out_dir={tmp_path / 'nope'}", "--file=x.txt"]) == 2
    assert "no run directory" in capsys.readouterr().err
    make_run(tmp_path / "run")
    assert main([f"--out_dir={tmp_path / 'run'}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat:", "completion": " positive"}\n{"prompt": "x"}\n')
    assert main([f"--out_dir={tmp_path / 'run'}", f"--task={bad}"]) == 2
    assert "bad.jsonl:2: missing field 'completion'" in capsys.readouterr().err
    assert main([f"--out_dir={tmp_path / 'run'}", f"--file={tmp_path / 'missing.txt'}"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_gpt2_directory_can_be_evaluated(tmp_path):
    pytest.importorskip("nanogpt_np.tokenizers.bpe")
    from nanogpt_np.tokenizers.bpe import BPETokenizer
    from nanogpt_np.io.hf_gpt2 import export_gpt2_dir
    tok = BPETokenizer.train(TEXT * 5, 260, special_tokens=["<|endoftext|>"]) if _has_specials() else None
    if tok is None or tok.eot_id is None:
        pytest.skip("BPETokenizer.train cannot add <|endoftext|> here")
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    export_gpt2_dir(model, tok, tmp_path / "hf")
    m2, tok2, kind = load_for_eval(tmp_path / "hf")
    assert kind == "gpt2-dir"
    r = lm_metrics(m2, tok2, TEXT)
    model.eval()
    assert r["loss"] == pytest.approx(lm_metrics(model, tok, TEXT)["loss"], rel=1e-6)


def _has_specials():
    import inspect
    from nanogpt_np.tokenizers.bpe import BPETokenizer
    return "special_tokens" in inspect.signature(BPETokenizer.train).parameters


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--max_tokens", "1"), ("--max_examples", "0"),
                                        ("--max_new_tokens", "0")])
def test_command_line_range_checks(tmp_path, capsys, flag, value):
    make_run(tmp_path / "run")
    (tmp_path / "t.txt").write_text(TEXT)
    assert main([f"--out_dir={tmp_path / 'run'}", f"--file={tmp_path / 't.txt'}", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} must be >= ") and err.count("\n") == 1


def test_unknown_character_error_names_the_file(tmp_path, capsys):
    make_run(tmp_path / "run")
    (tmp_path / "t.txt").write_text("the cat Z")
    assert main([f"--out_dir={tmp_path / 'run'}", f"--file={tmp_path / 't.txt'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 't.txt'}: ") and "'Z'" in err
