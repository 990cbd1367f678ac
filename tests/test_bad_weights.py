"""Weights holding NaN or inf are refused where they are loaded, with the tensor named: a run's checkpoint
(sampling, --resume), --init_from, and Hugging Face GPT-2 folders."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np.config import parse_args
from nanogpt_np.io import run_dir, safetensors
from nanogpt_np.io.checkpoint import CheckpointError, load_model, save_checkpoint
from nanogpt_np.io.hf_gpt2 import export_gpt2_dir
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.tokenizers.char import CharTokenizer
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog. " * 100


def spoil(path, rng):
    """Put a NaN or an inf at a random place of a random tensor of a safetensors file; returns its name."""
    tensors = safetensors.load_file(path)
    meta = safetensors.load_metadata(path)
    name = sorted(tensors)[int(rng.integers(len(tensors)))]
    flat = tensors[name].reshape(-1)
    flat[int(rng.integers(flat.size))] = rng.choice([np.nan, np.inf, -np.inf])
    safetensors.save_file(tensors, path, metadata=meta)
    return name


def tiny_run(tmp_path, name, *extra):
    (tmp_path / "data.txt").write_text(TEXT)
    args = [f"--dataset={tmp_path / 'data.txt'}", f"--out_dir={tmp_path / name}", "--n_layer=1", "--n_head=2",
            "--n_embd=8", "--block_size=8", "--batch_size=2", "--max_iters=2", "--eval_interval=2",
            "--eval_iters=1", "--device=cpu", *extra]
    return train(parse_args(args), echo=lambda *a: None)


def test_a_run_with_nan_weights_is_refused_naming_the_tensor(tmp_path, rng):
    tiny_run(tmp_path, "r")
    folder = Path(run_dir.latest_checkpoint(tmp_path / "r"))
    name = spoil(folder / "model.safetensors", rng)
    with pytest.raises(CheckpointError, match=f"tensor {name} holds"):
        load_model(tmp_path / "r")
    with pytest.raises(CheckpointError, match=f"tensor {name} holds"):
        tiny_run(tmp_path, "r", "--resume", "--max_iters=4")
    with pytest.raises(CheckpointError, match=f"tensor {name} holds"):
        tiny_run(tmp_path, "ft", f"--init_from={tmp_path / 'r'}")
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={tmp_path / 'r'}", "--device=cpu",
                        "--max_new_tokens=5"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_nan_in_the_optimizer_state_is_refused_on_resume(tmp_path, rng):
    tiny_run(tmp_path, "r")
    name = spoil(Path(run_dir.latest_checkpoint(tmp_path / "r")) / "optimizer.safetensors", rng)
    with pytest.raises(CheckpointError, match=f"optimizer.safetensors: tensor {name} holds"):
        tiny_run(tmp_path, "r", "--resume", "--max_iters=4")


def test_a_gpt2_folder_with_inf_weights_is_refused(tmp_path, rng):
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8), seed=1)
    export_gpt2_dir(model, None, tmp_path / "hf")
    name = spoil(tmp_path / "hf" / "model.safetensors", rng)
    with pytest.raises(ValueError, match=f"tensor {name.removeprefix('transformer.')} holds"):
        load_model(tmp_path / "hf")
    from nanogpt_np.io.hf_gpt2 import main
    with pytest.raises(SystemExit, match=f"error: .*{name.removeprefix('transformer.')} holds"):
        main(["check", str(tmp_path / "hf")])


def test_finite_weights_still_load(tmp_path, rng):
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8),
                seed=int(rng.integers(1000)))
    save_checkpoint(tmp_path / "ok", model, None, {}, {"step": 0}, tok)
    loaded = load_model(tmp_path / "ok").state_dict()
    assert all(np.array_equal(loaded[k], v) for k, v in model.state_dict().items())
