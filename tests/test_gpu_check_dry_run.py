"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DRY_RUN=1: the fake CuPy, tiny shapes), so the
script's own machinery (the three parts, their time limits, results written to $OUT part by part, the
summary) is known to work before device minutes are spent on it."""
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
    assert "## 1. GPU tests (exit 0" in summary and " passed" in summary and "0 failed/error" in summary
    assert "## 2. kernel benchmarks (exit 0" in summary and "| attention fwd+bwd, flash (bf16 mma) |" in summary
    assert "## 3. training throughput (exit 0" in summary
    assert "| nanogpt_np (bf16 matmuls, flash attention) |" in summary and "total:" in summary
    assert "cut at the" not in summary
    for name in ("device.txt", "gpu_tests.txt", "kernels.txt", "kernels.json", "train.txt", "train.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary.strip() in proc.stdout                       # printed at the end as well
