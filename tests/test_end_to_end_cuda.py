"""End to end with --device=cuda on the CPU: training, resume, sampling, evaluation and the server run through
the fake CuPy with the REAL .cu kernels executed by the CUDA emulator (tests/emulation/cuda), and must agree
with --device=cpu.

Everything runs in-process: the fake `cupy` is put into sys.modules (fake_cupy.install(kernels="cuda"), an
H200's 132 SMs so grids are sized as on the device), then the same entry points the command lines call
(trainer.train, sample.main, eval.evaluate.run_evaluation, serve.make_server) run with device "cuda". One
test runs the command lines `train.py` and `sample.py` themselves in a fresh process (run_on_fake.py).
The model is tiny but real for the kernels: n_embd=128, n_head=2 (head size 64, which flash attention needs),
one layer, block 16, batch 2, a few steps; the whole module takes ~22 s (2 cores).

What is compared, and how closely:
- float32 (matmul attention; cuBLAS is NumPy float32 matmuls in the fake, so TF32 on or off gives the same
  numbers here; it is off, as a GPU comparison would need): every logged train loss and the validation loss
  within 1e-6 relative of the CPU run. Only summation order differs (the kernels reduce in their own order).
- bf16 matmuls, and flash attention in either dtype (flash's matmuls are bf16 mma on tensor cores): 2e-4
  relative. This cannot be held to 1e-4 against a float32 CPU run for a principled reason: bf16 operands carry
  8 significant bits (unit roundoff u = 2^-8 = 3.9e-3), so every logit is perturbed by ~u of its size, in
  effect independently per target. The loss is a mean over the N targets of a step (32 here, 64 with two
  micro-batches), so its relative error is of order u * rms(logit) / (loss * sqrt(N)), ~1e-4 at this size, and
  the weights of later steps differ by as much again. Measured: up to 1.30e-4 (bf16, two micro-batches; the
  MLP on cuBLASLt's epilogues rounds its pre-activation to bf16 too, and the residual stream and its gradient
  are bf16, rounded once per block boundary; with seeds 1, 2, 3: 4.2e-5, 1.1e-4, 8.4e-5, against 5.5e-5, 6.0e-5,
  8.5e-5 (and 1.25e-4 at this seed) with a float32 stream), 1.56e-4 (bf16 with the matmul attention, one
  micro-batch; 1.43e-4 with a float32 stream), 5.6e-5 (flash, float32); with 4x the
  targets per step (B=4, T=32) 4e-5, as 1/sqrt(N) says. 2e-4 is that noise floor (~1e-4) with a factor 2 of room
  (pytest -s prints each run's worst); the float32 runs (1.2e-7 here) show that the rest of the path adds
  nothing. A gross kernel bug still stands out: flash's causal mask off by one (each query sees the next key)
  moves the loss by 4.8e-3. Small numeric slips hide under 2e-4 and are for the float32 runs (GELU's 0.5 as
  0.49: 1.3e-4 in the evaluation loss; its 0.044715 as 0.05: 4.5e-5 in training; both caught at 1e-6) and for
  the kernel tests in tests/gpu.
- --resume on the fake: an interrupted run continued with --resume logs the same losses, bit for bit, and
  ends with the same weights as the uninterrupted run (bf16, flash, gradient accumulation and dropout, whose
  masks come from the fake's cuRAND stand-in).
- sample.py, evaluate and the server: loading a float32 checkpoint on "cuda": the same text as on the CPU
  (seeded sampling and greedy decoding), the same evaluation and task losses to 1e-6.

Skipped without a C++ compiler (the emulator needs g++), like tests/gpu.
"""
import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import backend
from nanogpt_np.config import parse_args
from nanogpt_np.kernels import cross_entropy as ce_kernel
from nanogpt_np.kernels import registry
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
F32_RTOL = 1e-6
BF16_RTOL = 2e-4

TINY = ["--model=tiny", "--n_layer=1", "--n_head=2", "--n_embd=128", "--block_size=16", "--batch_size=2",
        "--eval_iters=1", "--log_interval=1", "--max_iters=3", "--lr_decay_iters=4", "--warmup_iters=1",
        "--eval_interval=3", "--tf32=false"]      # exact float32 matmuls: the runs are compared with the CPU's


def _compiler_reason():
    from emulation.cuda import emulator
    return None if emulator.compiler() else "no C++ compiler (g++) for the CUDA emulator"


pytestmark = pytest.mark.skipif(_compiler_reason() is not None, reason=str(_compiler_reason()))


def _reset_gpu_options():
    backend.use_device("cpu")
    registry.set_attention("matmul")
    registry.set_precision("float32")
    ce_kernel.set_inplace(False)
    ce_kernel.set_assume_unit_dloss(False)


@pytest.fixture(scope="module")
def fake_gpu():
    """The fake CuPy with the real kernels on the emulator, for this module; the GPU options reset after."""
    from emulation import fake_cupy
    from nanogpt_np.kernels import precision
    mp = pytest.MonkeyPatch()
    fake_cupy.install(mp, kernels="cuda", sms=132)
    backend.use_device("cuda")
    precision.set_tf32(False)
    backend.use_device("cpu")
    try:
        yield
    finally:
        _reset_gpu_options()
        mp.undo()


def _train(out_dir, device, *extra, attention="matmul"):
    """Train with TINY + extra on `device`; returns log.jsonl's records."""
    registry.set_attention(attention)              # the trainer sets dtype; attention is ours to choose here
    cfg = parse_args(TINY + [f"--device={device}", f"--out_dir={out_dir}", *extra])
    try:
        train(cfg, echo=lambda *a: None)
    finally:
        _reset_gpu_options()
    with open(out_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _losses(log):
    """{("train"|"eval", step): loss} from a run's log."""
    out = {}
    for e in log:
        if e["type"] == "train":
            out[("train", e["step"])] = e["loss"]
        elif "val_loss" in e:
            out[("eval", e["step"])] = e["val_loss"]
    return out


def _assert_close(got, want, rtol):
    assert got.keys() == want.keys() and len(want) >= 4, (sorted(got), sorted(want))
    worst = max(abs(got[k] - want[k]) / abs(want[k]) for k in want)
    print(f"worst relative loss difference {worst:.3g} (tolerance {rtol:g})")      # shown with pytest -s
    assert worst < rtol, {k: (got[k], want[k]) for k in want}


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_cpu")
    return {accum: (root / f"accum{accum}", _losses(_train(root / f"accum{accum}", "cpu",
                                                           f"--grad_accum_steps={accum}")))
            for accum in (1, 2)}


@pytest.mark.parametrize("attention,dtype,accum,rtol", [
    ("matmul", "float32", 1, F32_RTOL),
    ("matmul", "float32", 2, F32_RTOL),           # accumulation: the loss gradient is scaled, not 1
    ("flash", "float32", 1, BF16_RTOL),           # flash's matmuls are bf16 whatever --dtype says
    ("matmul", "bfloat16", 1, BF16_RTOL),         # bf16 linear layers and residual stream, matmul attention
    ("flash", "bfloat16", 2, BF16_RTOL),
])
def test_train_on_cuda_matches_cpu(fake_gpu, cpu_runs, tmp_path, attention, dtype, accum, rtol):
    got = _losses(_train(tmp_path / "run", "cuda", f"--dtype={dtype}", f"--grad_accum_steps={accum}",
                         attention=attention))
    _assert_close(got, cpu_runs[accum][1], rtol)


def test_resume_on_cuda_equals_the_uninterrupted_run(fake_gpu, tmp_path):
    from nanogpt_np.io.checkpoint import load_model
    extra = ["--dtype=bfloat16", "--grad_accum_steps=2", "--dropout=0.1", "--max_iters=4", "--eval_interval=2"]
    full = _losses(_train(tmp_path / "full", "cuda", *extra))
    _train(tmp_path / "cut", "cuda", *extra[:-2], "--max_iters=2", "--eval_interval=2")   # "interrupted" at 2
    resumed = _losses(_train(tmp_path / "cut", "cuda", *extra, "--resume"))
    assert resumed == full and len(full) == 6            # 4 train losses + 2 evaluations, bit for bit
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "cut").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _on(device, fn):
    """fn() with the backend on `device` (models loaded inside live there)."""
    backend.use_device(device)
    try:
        return fn()
    finally:
        _reset_gpu_options()


def test_sample_py_on_cuda_matches_cpu(fake_gpu, cpu_runs, capsys):
    from nanogpt_np import sample
    run_dir = cpu_runs[1][0]
    texts = {}
    for device in ("cpu", "cuda"):
        for temperature in ("0", "1.0"):
            args = [f"--out_dir={run_dir}", f"--device={device}", "--prompt=def ", "--max_new_tokens=12",
                    "--num_samples=2", f"--temperature={temperature}", "--seed=3"]
            assert _on(device, lambda: sample.main(args)) == 0
            out, err = capsys.readouterr()
            assert err.rstrip().endswith(device), err
            texts[device, temperature] = out
    for temperature in ("0", "1.0"):
        assert texts["cuda", temperature] == texts["cpu", temperature]
        assert len(texts["cpu", temperature]) > 2 * len("def " + "x" * 12)


def test_evaluate_on_cuda_matches_cpu(fake_gpu, cpu_runs, tmp_path):
    from nanogpt_np.data.corpus import default_corpus_text
    from nanogpt_np.eval.evaluate import run_evaluation
    run_dir = cpu_runs[1][0]
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(default_corpus_text()[-300:], encoding="utf-8")
    task_file = tmp_path / "task.jsonl"                     # generation (batched, KV cache) and the task loss
    task_file.write_text("".join(json.dumps(dict(prompt=p, completion=c)) + "\n" for p, c in
                                 [("def f", " yes"), ("class A", " no"), ("import", " yes"), ("x = ", " no")]))
    results = {device: _on(device, lambda: run_evaluation(run_dir, file=str(text_file), task=str(task_file),
                                                          metric="text", max_new_tokens=4, batch_size=4,
                                                          out=str(tmp_path / f"{device}.json"), device=device,
                                                          log=lambda *a: None))
               for device in ("cpu", "cuda")}
    cpu, gpu = results["cpu"]["file"], results["cuda"]["file"]
    assert gpu["tokens"] == cpu["tokens"] > 100
    assert abs(gpu["loss"] - cpu["loss"]) / cpu["loss"] < F32_RTOL
    cpu, gpu = results["cpu"]["task"], results["cuda"]["task"]
    assert gpu["samples"] == cpu["samples"] and gpu["task_tokens"] == cpu["task_tokens"] > 0
    assert abs(gpu["task_loss"] - cpu["task_loss"]) / cpu["task_loss"] < F32_RTOL


def _serve(run_dir, device, jobs):
    """Start the server on `device` (port 0), send each job to /v1/completions, stop it; the texts."""
    from nanogpt_np.serve.server import build_parser, make_server
    server = make_server(build_parser().parse_args([f"--out_dir={run_dir}", "--port=0", f"--device={device}",
                                                    "--max_batch=4"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        texts = []
        for job in jobs:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
            conn.request("POST", "/v1/completions", body=json.dumps(job),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            assert resp.status == 200, body
            texts.append([c["text"] for c in body["choices"]])
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        assert health["device"] == device
        return texts
    finally:
        server.stop_gracefully()
        thread.join(30)
        _reset_gpu_options()


def test_server_on_cuda_matches_cpu(fake_gpu, cpu_runs):
    run_dir = cpu_runs[1][0]
    jobs = [dict(prompt="def ", max_tokens=10, temperature=0),
            dict(prompt=["class ", "import "], max_tokens=8, temperature=1.0, seed=5)]   # two decoded together
    assert _serve(run_dir, "cuda", jobs) == _serve(run_dir, "cpu", jobs)


def test_train_py_and_sample_py_command_lines_on_cuda(fake_gpu, cpu_runs, tmp_path):
    """The command lines themselves, `python train.py --device=cuda` and `python sample.py --device=cuda`, in
    a fresh process on the fake CuPy with the emulated kernels (tests/emulation/run_on_fake.py): the same
    losses as the in-process CPU run, and the trainer says which GPU kernels it chose."""
    env = dict(os.environ, PYTHONPATH=str(REPO), NANOGPT_FAKE_KERNELS="cuda")
    env.pop("NANOGPT_ATTENTION", None)
    launcher = [sys.executable, str(REPO / "tests" / "emulation" / "run_on_fake.py")]
    out = tmp_path / "cli"
    proc = subprocess.run(launcher + [str(REPO / "train.py"), *TINY, "--device=cuda", f"--out_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "kernels=cuda" in proc.stderr and "GPU kernels: attention matmul" in proc.stdout
    with open(out / "log.jsonl") as f:
        _assert_close(_losses([json.loads(line) for line in f]), cpu_runs[1][1], F32_RTOL)
    proc = subprocess.run(launcher + [str(REPO / "sample.py"), f"--out_dir={out}", "--device=cuda", "--prompt=def ",
                                      "--max_new_tokens=8", "--temperature=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith(", cuda") and proc.stdout.startswith("def ") and len(proc.stdout) == 13
