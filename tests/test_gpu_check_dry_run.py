"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DRY_RUN=1: the fake CuPy, tiny shapes), so the
script's own machinery (the three parts, their time limits, results written to $OUT part by part, the
summary) is known to work before device minutes are spent on it. With g++ the rehearsal runs the real .cu
kernels on the CUDA emulator (~20 s); without one, the fake's NumPy emulations of them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_prints_a_full_summary(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary
    real_kernels = shutil.which(os.environ.get("CXX", "g++")) is not None
    assert ("kernels: cuda (the real .cu kernels" if real_kernels else "kernels: numpy (no C++ compiler") in summary
    assert "tests/gpu: " in (tmp_path / "gpu_tests.txt").read_text() and " executed on the GPU" not in proc.stdout
    if real_kernels:
        assert "Kernels on NVIDIA H200 (fake, emulated .cu)" in summary
    assert "## 1. GPU tests (exit 0" in summary and " passed" in summary and "0 failed/error" in summary
    assert "## 2. kernel benchmarks (exit 0" in summary and "| attention fwd+bwd, flash (bf16 mma) |" in summary
    assert "## 3. training throughput (exit 0" in summary
    assert "| nanogpt_np (bf16 matmuls, flash attention) |" in summary and "total:" in summary
    assert "cut at the" not in summary
    for name in ("device.txt", "gpu_tests.txt", "kernels.txt", "kernels.json", "train.txt", "train.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary.strip() in proc.stdout                       # printed at the end as well


def test_run_on_fake_falls_back_to_numpy_kernels_without_a_compiler(tmp_path):
    """No g++ (CXX names a compiler that is not there): the NumPy emulations, said on stderr; the launch works.
    NANOGPT_FAKE_KERNELS=cuda without a compiler is an error, not a silent fallback."""
    code = ("import numpy as np; from nanogpt_np import backend; backend.use_device('cuda'); import cupy; "
            "from nanogpt_np.kernels.gelu import gelu_forward; "
            "y, _ = gelu_forward(cupy.asarray(np.ones((3, 8), np.float32))); print(float(y.sum()))")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PYTHONPATH=str(REPO))
    env.pop("NANOGPT_FAKE_KERNELS", None)
    run = lambda **extra: subprocess.run([sys.executable, "tests/emulation/run_on_fake.py", "-c", code], cwd=REPO,
                                         env=dict(env, **extra), capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels=numpy (no C++ compiler (g++)" in proc.stderr
    assert abs(float(proc.stdout.split()[-1]) - 24 * 0.841192) < 1e-3          # 24 x GELU(1)
    proc = run(NANOGPT_FAKE_KERNELS="cuda")
    assert proc.returncode != 0 and "no C++ compiler" in proc.stderr
