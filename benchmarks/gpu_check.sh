#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with an NVIDIA GPU and no network (uses what is installed:
# CuPy, NumPy, regex, PyTorch if present). Runs, each under its own time limit, in under 8 minutes:
#   1. the GPU tests (tests/gpu: every kernel against its NumPy reference, a training step against the CPU)
#   2. the kernel benchmarks (benchmarks/kernels.py: fused vs unfused CuPy vs PyTorch, % of copy bandwidth)
#   3. a short training-throughput run (benchmarks/train_gpu.py --quick: ours vs PyTorch eager/compile)
#   4. a 1-rank data-parallel run through NCCL (mpiexec -n 1 python train.py --device=cuda; skipped
#      without mpi4py / mpiexec: pip install -e '.[dist-gpu]')
# Everything is tee'd to $OUT (default ./gpu_check_out); the summary table is printed last.
# Exit status: non-zero when a GPU test failed (or the tests could not run).
#
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}    # the device image's python3 holds CuPy and PyTorch
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__)" 2>&1 | tail -1
} | tee "$OUT/device.txt"

echo "== 1. GPU tests"
if ! "$PY" -c "from nanogpt_np import backend; backend.use_device('cuda')" 2>&1 | tee -a "$OUT/device.txt"; then :; fi
if "$PY" -c "from nanogpt_np import backend; backend.use_device('cuda')" >/dev/null 2>&1; then
  timeout 240 "$PY" -m pytest -q -rs tests/gpu tests/test_kernels_compile.py 2>&1 | tee "$OUT/gpu_tests.txt"
  rc_tests=${PIPESTATUS[0]}
else
  echo "no usable GPU through CuPy: the GPU tests cannot run (this counts as a failure here)" | tee "$OUT/gpu_tests.txt"
  rc_tests=3
fi
echo "(tests: exit $rc_tests, $(elapsed) s so far)"

echo "== 2. kernel benchmarks"
timeout 110 "$PY" benchmarks/kernels.py --B 8 --iters 10 --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
rc_kernels=${PIPESTATUS[0]}
echo "(kernels: exit $rc_kernels, $(elapsed) s so far)"

LEFT=$(( 420 - $(elapsed) ))
[ "$LEFT" -lt 60 ] && LEFT=60
echo "== 3. training throughput (--quick, $LEFT s budget)"
timeout "$LEFT" "$PY" benchmarks/train_gpu.py --quick --graph --budget-s "$LEFT" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"
rc_train=${PIPESTATUS[0]}

echo "== 4. one data-parallel rank through NCCL"
MPIEXEC=$(dirname "$PY")/mpiexec; [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)
if [ -n "$MPIEXEC" ] && "$PY" -c "import mpi4py" 2>/dev/null; then
  timeout 45 "$MPIEXEC" -n 1 "$PY" train.py --device=cuda --model=tiny --block_size=32 --batch_size=8 \
    --max_iters=3 --eval_interval=3 --eval_iters=1 --log_interval=1 --out_dir="$OUT/nccl_run" 2>&1 | tee "$OUT/nccl.txt"
  rc_nccl=${PIPESTATUS[0]}
else
  echo "skipped: no mpi4py / mpiexec (pip install -e '.[dist-gpu]')" | tee "$OUT/nccl.txt"
  rc_nccl=skipped
fi

{
  echo
  echo "## GPU check summary ($(elapsed) s)"
  head -3 "$OUT/device.txt"
  echo
  echo "tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.txt" | tail -1) (exit $rc_tests)"
  grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests.txt" | head -20
  echo
  sed -n '/^Kernels on /,$p' "$OUT/kernels.txt"
  [ "$rc_kernels" -ne 0 ] && echo "kernel benchmark exit $rc_kernels (see kernels.txt)"
  echo
  sed -n '/^Training throughput on /,$p' "$OUT/train.txt"
  [ "$rc_train" -ne 0 ] && echo "training benchmark exit $rc_train (see train.txt)"
  echo
  echo "1-rank NCCL training run: exit $rc_nccl; $(grep -E '^(data parallel|done|error)' "$OUT/nccl.txt" | tr '\n' ' ')"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[ "$rc_tests" -eq 0 ] || exit 1
exit 0
