"""The data/ scripts run end to end on small inputs (no download), and train.py's loader reads the result."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from nanogpt_np.data.datasets import load_prepared
from nanogpt_np.data.loader import BatchLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "data", name), *args, "--quiet", "--processes", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stderr


def speeches(n=300):
    rng = np.random.default_rng(0)
    names = ["ROMEO", "JULIET", "NURSE"]
    words = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
    return "\n\n".join(f"{names[i % 3]}:\n" + " ".join(rng.choice(words, size=12)) + "." for i in range(n)) + "\n"


def test_shakespeare_char_and_bpe_scripts(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(speeches())
    report = run_script("prepare_shakespeare_char.py", "--input", str(src), "--out", str(tmp_path / "sc"))
    assert re.search(r"exact_dup +removed +0 documents", report)  # de-duplication is off for the play
    ds = load_prepared(str(tmp_path / "sc"))
    assert ds.tokenizer.eot_id is None and ds.manifest["tokenizer"]["type"] == "char"
    assert ds.manifest["train"]["documents"] + ds.manifest["val"]["documents"] == 300
    x, y = BatchLoader(ds.train, 2, 16).next_batch()
    assert x.shape == (2, 16)
    run_script("prepare_shakespeare_bpe.py", "--input", str(src), "--out", str(tmp_path / "sb"), "--vocab_size", "300")
    ds = load_prepared(str(tmp_path / "sb"))
    assert ds.manifest["tokenizer"]["type"] == "bpe" and ds.tokenizer.vocab_size <= 300


def test_generic_script_and_pydocs(tmp_path):
    src = tmp_path / "docs.csv"
    src.write_text("id,body\n" + "".join(f'{i},"document number {i} says hello {i * i}"\n' for i in range(100)))
    run_script("prepare.py", "--input", str(src), "--column", "body", "--tokenizer", "char",
               "--out", str(tmp_path / "g"))
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["report"]["input"]["documents"] == 100
    run_script("prepare_pydocs.py", "--out", str(tmp_path / "pd"))
    ds = load_prepared(str(tmp_path / "pd"))
    assert ds.train_tokens > 100_000 and ds.val_tokens > 1000


def run_failing(name, *args, env=None):
    out = subprocess.run([sys.executable, os.path.join(REPO, "data", name), *args], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


def test_options_without_a_value_are_one_error_line(tmp_path):
    for name in ("prepare_shakespeare_char.py", "prepare_shakespeare_bpe.py"):
        assert "argument --input: expected one argument" in run_failing(name, "--input")
        assert "argument --out: expected one argument" in run_failing(name, "--input", "x.txt", "--out")
    assert "argument --out: expected one argument" in run_failing("prepare_pydocs.py", "--out")


def test_failed_download_is_one_error_line(tmp_path, monkeypatch, capsys):
    import urllib.request

    import pytest
    sys.path.insert(0, os.path.join(REPO, "data"))
    try:
        import prepare_shakespeare_char as script
    finally:
        sys.path.remove(os.path.join(REPO, "data"))

    def offline(*args, **kwargs):  # as on a machine without internet
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(script, "REPO", str(tmp_path))  # no ../shared copy next to it
    with pytest.raises(SystemExit) as e:
        script.run(["--out", str(tmp_path / "o")], "shakespeare_char", ["--tokenizer", "char"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot download" in err and "--input PATH" in err and "Traceback" not in err


def test_pydocs_help_does_not_require_input_or_out():
    out = subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare_pydocs.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    usage = out.stdout.split("\n\n", 1)[0]
    assert "--input INPUT" not in usage.replace("[--input INPUT", "") and "--out OUT" not in usage.replace("[--out OUT", "")
