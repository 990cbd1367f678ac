"""The tokenizer command line (python -m nanogpt_np.tokenizers.bpe_cli) and load_tokenizer()."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_np.tokenizers.bpe import BPETokenizer, TokenizerFileError
from nanogpt_np.tokenizers.bpe_cli import main
from nanogpt_np.tokenizers.load import load_tokenizer

TEXT = ("First Citizen:\r\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. "
        "It's 2024 — naïve café 日本語 😀\n") * 30


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


def test_train_encode_decode_show(corpus, tmp_path, capfdbinary):
    tok_path = tmp_path / "tok.json"
    assert main(["train", "--input", str(corpus), "--vocab-size", "320", "--output", str(tok_path),
                 "--gpt2-dir", str(tmp_path / "gpt2fmt")]) == 0
    tok = BPETokenizer.load(tok_path)
    assert tok.vocab_size == 320 and tok.encode(TEXT) == BPETokenizer.train(TEXT, 320).encode(TEXT)
    assert b"merge" in capfdbinary.readouterr().err  # progress is shown

    # encode to an llm.c shard, decode it back to the same bytes (also through the GPT-2 format)
    bin_path = tmp_path / "corpus.bin"
    assert main(["encode", "--tokenizer", str(tok_path), "--input", str(corpus), "--output", str(bin_path),
                 "--processes", "2"]) == 0
    out = tmp_path / "decoded.txt"
    assert main(["decode", "--tokenizer", str(tmp_path / "gpt2fmt"), "--input", str(bin_path), "--output", str(out)]) == 0
    assert out.read_bytes() == corpus.read_bytes()

    # ids as text on stdout, then decoded from the command line
    capfdbinary.readouterr()
    assert main(["encode", "--tokenizer", str(tok_path), "--text", "hear me speak"]) == 0
    ids = capfdbinary.readouterr().out.decode().split()
    assert [int(i) for i in ids] == tok.encode("hear me speak")
    assert main(["decode", "--tokenizer", str(tok_path)] + ids) == 0
    assert capfdbinary.readouterr().out == b"hear me speak"

    assert main(["show", "--tokenizer", str(tok_path), "hear me <|endoftext|>"]) == 0
    shown = capfdbinary.readouterr().out.decode()
    assert "|" in shown and str(tok.eot_id) in shown and "'<|endoftext|>'" in shown


@pytest.mark.parametrize("argv, message", [
    (["train", "--input", "{corpus}", "--vocab-size", "100", "--output", "{tmp}/t.json"], "--vocab-size"),
    (["train", "--input", "{tmp}/empty.txt", "--vocab-size", "300", "--output", "{tmp}/t.json"], "empty"),
    (["train", "--input", "{tmp}/missing.txt", "--vocab-size", "300", "--output", "{tmp}/t.json"], "missing.txt"),
    (["encode", "--tokenizer", "{tmp}/bad.json", "--text", "x"], "bad.json"),
    (["encode", "--tokenizer", "{tmp}", "--text", "x"], "directory holds no"),
    (["encode", "--tokenizer", "{tmp}/tok.json", "--text", "x<|endoftext|>"], "--allowed-special all"),
    (["encode", "--tokenizer", "{tmp}/tok.json", "--text", "x", "--processes", "0"], "--processes must be >= 1"),
    (["train", "--input", "{corpus}", "--vocab-size", "300", "--output", "{tmp}/t.json", "--processes", "-1"],
     "--processes must be >= 1"),
    (["train", "--input", "{corpus}", "--vocab-size", "300", "--output", "{tmp}/t.json", "--pattern", "(["],
     "--pattern '([' is not a valid regex"),
    (["train", "--input", "{corpus}", "--vocab-size", "300", "--output", "{tmp}/t.json", "--special", ""],
     "cannot be the empty string"),
    (["decode", "--tokenizer", "{tmp}/tok.json", "1", "99999"], "unknown token id 99999"),
    (["decode", "--tokenizer", "{tmp}/tok.json", "1", "x"], "integers"),
])
def test_errors_are_one_line_and_exit_nonzero(argv, message, corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"type": "bpe", "version": 1, "pattern": "x"', encoding="utf-8")
    BPETokenizer.train(TEXT, 300).save(tmp_path / "tok.json")
    argv = [a.format(corpus=corpus, tmp=tmp_path) for a in argv]
    if argv[2] == str(tmp_path):  # the directory case needs a directory without tokenizer files
        (tmp_path / "emptydir").mkdir()
        argv[2] = str(tmp_path / "emptydir")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_runs_as_a_module(tmp_path):
    BPETokenizer.train(TEXT, 300).save(tmp_path / "tok.json")
    result = subprocess.run([sys.executable, "-m", "nanogpt_np.tokenizers.bpe_cli", "decode", "--tokenizer",
                             str(tmp_path / "tok.json"), "-5"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0 and "unknown token id -5" in result.stderr


def test_load_tokenizer_dispatch(tmp_path):
    tok = BPETokenizer.train(TEXT, 300)
    tok.save(tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").merges == tok.merges
    (tmp_path / "d1").mkdir()
    tok.save(tmp_path / "d1" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "d1").merges == tok.merges
    tok.save_gpt2_files(tmp_path / "d2")
    assert load_tokenizer(tmp_path / "d2").merges == tok.merges
    assert load_tokenizer(tmp_path / "d2" / "encoder.json").merges == tok.merges
    tok.save_gpt2_files(tmp_path / "d3", encoder_name="vocab.json", merges_name="merges.txt")
    assert load_tokenizer(str(tmp_path / "d3")).encode(TEXT) == tok.encode(TEXT)

    (tmp_path / "other.json").write_text(json.dumps({"type": "wordpiece"}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="wordpiece"):
        load_tokenizer(tmp_path / "other.json")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "list.json")


def test_load_tokenizer_char_file(tmp_path):
    char_tokenizer = pytest.importorskip("nanogpt_np.tokenizers.char")
    char = char_tokenizer.CharTokenizer.from_text("hello world")
    char.save(tmp_path / "char.json")
    loaded = load_tokenizer(tmp_path / "char.json")
    assert type(loaded).__name__ == "CharTokenizer" and loaded.decode(loaded.encode("hello")) == "hello"


def test_huge_processes_is_clamped_to_the_cores(corpus, tmp_path):
    """--processes 100000 used to try to start that many workers."""
    assert main(["train", "--input", str(corpus), "--vocab-size", "300", "--output", str(tmp_path / "t.json"),
                 "--processes", "100000", "--quiet"]) == 0
    assert main(["encode", "--tokenizer", str(tmp_path / "t.json"), "--input", str(corpus),
                 "--output", str(tmp_path / "c.bin"), "--processes", "100000"]) == 0
