"""sample.py: one line on stderr about what it loaded, then each sample as prompt + continuation on stdout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_np.config import parse_args
from nanogpt_np.generate import generate_text
from nanogpt_np.io.checkpoint import load_model, load_tokenizer_of_run, read_training_state
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def sample_py(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), "--device=cpu", *args], capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    train(parse_args(["--model=tiny", "--block_size=16", "--batch_size=4", "--eval_iters=2", "--device=cpu",
                      "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5",
                      "--log_interval=5", f"--out_dir={out}"]), echo=lambda *a: None)
    return out


def test_stderr_line_names_what_was_loaded(run_dir):
    state = read_training_state(run_dir)
    r = sample_py(f"--out_dir={run_dir}", "--prompt=def ", "--max_new_tokens=5")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.splitlines()
    tokenizer = load_tokenizer_of_run(run_dir)
    assert line == (f"sampling from {run_dir}: step {state['step']}, best val loss {state['best_val_loss']:.4f}, "
                    f"char tokenizer ({tokenizer.vocab_size} tokens), cpu")
    assert state["step"] == 10                              # the trained run's last step, read from state.json


def test_each_sample_is_the_prompt_then_its_continuation(run_dir, tmp_path):
    model, tokenizer = load_model(run_dir), load_tokenizer_of_run(run_dir)
    for prompt in ("def ", "class A:\n"):
        r = sample_py(f"--out_dir={run_dir}", f"--prompt={prompt}", "--max_new_tokens=12", "--num_samples=2",
                      "--seed=5", "--temperature=1.0")
        assert r.returncode == 0, r.stderr
        samples = r.stdout.split("\n---------------\n")[:2]
        want = [generate_text(model, tokenizer, prompt, 12, temperature=1.0, top_k=200, seed=5 + i) for i in (0, 1)]
        assert samples == [prompt + w for w in want]
    (tmp_path / "prompt.txt").write_text("import ")           # --prompt_file is echoed too
    r = sample_py(f"--out_dir={run_dir}", f"--prompt_file={tmp_path / 'prompt.txt'}", "--max_new_tokens=3")
    assert r.returncode == 0 and r.stdout.startswith("import ") and len(r.stdout) == len("import ") + 3 + 1


def test_a_run_without_training_state_still_samples(run_dir, tmp_path):
    """state.json missing or unusable: the line says so, sampling goes on."""
    import shutil
    bare = tmp_path / "bare"
    from nanogpt_np.io.run_dir import latest_checkpoint
    shutil.copytree(run_dir, bare)
    state = Path(latest_checkpoint(bare)) / "state.json"      # the newest checkpoint's step folder
    state.unlink()
    r = sample_py(f"--out_dir={bare}", "--prompt=a", "--max_new_tokens=2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"sampling from {bare}: no training state (") and r.stderr.count("\n") == 1
    state.write_text(json.dumps({"step": 3, "loader": {}, "best_val_loss": None}))
    r = sample_py(f"--out_dir={bare}", "--prompt=a", "--max_new_tokens=2")
    assert r.returncode == 0 and "step 3, no validation loss yet, char tokenizer" in r.stderr


def test_errors_stay_one_line(tmp_path):
    r = sample_py(f"--out_dir={tmp_path / 'nothing'}")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and r.stdout == ""
