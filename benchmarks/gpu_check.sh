#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with an NVIDIA GPU and no network (uses what is installed:
# CuPy, NumPy, regex, PyTorch if present). Built to end within 5 minutes on an H100/H200: each part runs under
# its own time limit, and each part's results are in $OUT the moment it ends (its output is written there as
# it runs, and summary.md grows part by part), so a run cut short still says what it measured.
#   1. the GPU tests (tests/gpu: every kernel against its NumPy reference, a training step against the CPU),
#      one line per test as it finishes                                              (GPU_CHECK_TESTS_S, 130 s)
#   2. the kernel benchmarks (benchmarks/kernels.py: fused vs unfused CuPy vs PyTorch, % of copy bandwidth),
#      one row per kernel as it is measured                                          (GPU_CHECK_KERNELS_S, 55 s)
#   3. training throughput (benchmarks/train_gpu.py --quick: ours in three configurations, PyTorch eager, a
#      CUDA-graph step), one row per configuration as it is measured                 (GPU_CHECK_TRAIN_S, 70 s)
#   4. one data-parallel rank through NCCL (mpiexec -n 1 python train.py --device=cuda; skipped without mpi4py
#      and mpiexec: pip install -e '.[dist-gpu]')                                     (GPU_CHECK_NCCL_S, 30 s)
#   5. measured against predicted (benchmarks/gpu_model_compare.py: the traced model of benchmarks/gpu_model.py
#      beside parts 2 and 3, per configuration and per kernel category)              (GPU_CHECK_MODEL_S, 20 s)
# $OUT defaults to ./gpu_check_out. Exit status: non-zero when a GPU test failed (or the tests could not run).
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh     # rehearsal on the CPU: the fake CuPy running the real
#                                                        # .cu kernels on the CUDA emulator (with g++; without
#                                                        # one, NumPy emulations of the kernels), tiny shapes, a
#                                                        # full summary; times printed are not GPU times
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}    # the device image's python3 holds CuPy and PyTorch
DRY=${GPU_CHECK_DRY_RUN:-0}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if [ "$DRY" = "1" ]; then
  # everything that would touch the GPU runs on the fake CuPy instead
  RUN=("$PY" tests/emulation/run_on_fake.py)
  TESTS_S=${GPU_CHECK_TESTS_S:-60}; KERNELS_S=${GPU_CHECK_KERNELS_S:-30}; TRAIN_S=${GPU_CHECK_TRAIN_S:-60}
  G=tests/gpu/test_kernels_gpu.py
  TEST_ARGS=("$G::test_embedding[2-7-11-33-9]" "$G::test_layernorm[bfloat16-7-33]"
             "$G::test_residual_layernorm[bfloat16-True-True-True-7-33]"
             "$G::test_gelu[bfloat16-shape1]" "$G::test_bias_gelu[bfloat16-5-7-db_into]"
             "$G::test_bias_gelu_bf16_inputs[9-64-db_into]" "$G::test_cross_entropy[True-5-11]"
             "$G::test_cross_entropy_edge_cases" "$G::test_adamw[1.0-1000-999]" "$G::test_attention_matmul[2-17-48-3]"
             "$G::test_attention_flash[bfloat16-1-1-64-1]" "$G::test_attention_flash[float32-2-100-128-2]"
             "$G::test_bias_attention_flash[bfloat16-2-100-128-2]"
             "$G::test_attention_flash_falls_back_for_other_head_sizes" "$G::test_bf16_conversion_matches_the_hardware_instruction"
             "$G::test_matmul_bf16[False-True-7-33-5]" "$G::test_registry_falls_back_for_float64"
             "$G::test_gemm[1.0-1.0-tf32-True-True]" "$G::test_gemm[1.0-1.0-bf16_out-False-True]"
             "$G::test_linear[bfloat16-True-5-7-3-True]" "$G::test_lm_head[bfloat16-True]"
             "tests/gpu/test_train_step_gpu.py::test_training_step_matches_cpu[flash-bfloat16-0.05]"
             "tests/gpu/test_mlp_gpu.py::test_the_epilogue_gelu_is_the_tanh_form"
             "tests/gpu/test_mlp_gpu.py::test_dgelu_epilogue_output_and_negative_controls")
  KERNEL_ARGS=(--small --iters 1 --warmup 1 --no-torch)
  TRAIN_ARGS=(--small --quick --steps 1 --batch 2 --no-torch --graph)
else
  RUN=("$PY")
  TESTS_S=${GPU_CHECK_TESTS_S:-125}; KERNELS_S=${GPU_CHECK_KERNELS_S:-55}; TRAIN_S=${GPU_CHECK_TRAIN_S:-70}
  TEST_ARGS=(tests/gpu tests/test_kernels_compile.py tests/test_cublaslt_ctypes.py)
  KERNEL_ARGS=(--B 8 --iters 5 --warmup 2)
  TRAIN_ARGS=(--quick --graph)
fi
NCCL_S=${GPU_CHECK_NCCL_S:-30}; MODEL_S=${GPU_CHECK_MODEL_S:-20}
SUMMARY="$OUT/summary.md"

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ "$DRY" = "1" ]; then
    echo "DRY RUN on the CPU through the fake CuPy: no GPU was used; times are not GPU times"
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from emulation.run_on_fake import choose_kernels; print('kernels: %s (%s)' % choose_kernels())" 2>&1 | tail -1
  fi
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  else
    echo "nvidia-smi not available"
  fi
  "${RUN[@]}" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())" 2>&1 | tail -1
  [ "$DRY" = "1" ] || "$PY" -c "import torch; print('torch', torch.__version__)" 2>&1 | tail -1
} | tee "$OUT/device.txt"
{ cat "$OUT/device.txt"; echo; } > "$SUMMARY"

# ------------------------------------------------------------------------------------------- 1. GPU tests
echo "== 1. GPU tests ($TESTS_S s limit)"
if "${RUN[@]}" -c "from nanogpt_np import backend; backend.use_device('cuda')" > "$OUT/use_device.txt" 2>&1; then
  timeout "$TESTS_S" "${RUN[@]}" -m pytest -v -rs -p no:cacheprovider --durations=10 "${TEST_ARGS[@]}" 2>&1 \
    | tee "$OUT/gpu_tests.txt"
  rc_tests=${PIPESTATUS[0]}
else
  cat "$OUT/use_device.txt"
  echo "no usable GPU through CuPy: the GPU tests cannot run (this counts as a failure here)" | tee "$OUT/gpu_tests.txt"
  rc_tests=3
fi
{
  echo "## 1. GPU tests (exit $rc_tests$([ "$rc_tests" -eq 124 ] && echo ": cut at the $TESTS_S s limit"), $(elapsed) s so far)"
  echo "$(grep -cE ' PASSED' "$OUT/gpu_tests.txt") passed, $(grep -cE ' (FAILED|ERROR)' "$OUT/gpu_tests.txt") failed/error," \
       "$(grep -cE ' SKIPPED' "$OUT/gpu_tests.txt") skipped (counted from the per-test lines)"
  grep -E '(passed|failed|error).* in [0-9.]+s' "$OUT/gpu_tests.txt" | tail -1
  grep -E '^(FAILED|ERROR) ' "$OUT/gpu_tests.txt" | head -20
  echo
} >> "$SUMMARY"
echo "(tests: exit $rc_tests, $(elapsed) s so far)"

# ------------------------------------------------------------------------------------- 2. kernel benchmarks
echo "== 2. kernel benchmarks ($KERNELS_S s limit)"
timeout "$KERNELS_S" "${RUN[@]}" benchmarks/kernels.py "${KERNEL_ARGS[@]}" --json "$OUT/kernels.json" 2>&1 \
  | tee "$OUT/kernels.txt"
rc_kernels=${PIPESTATUS[0]}
{
  echo "## 2. kernel benchmarks (exit $rc_kernels$([ "$rc_kernels" -eq 124 ] && echo ": cut at the $KERNELS_S s limit"), $(elapsed) s so far)"
  if grep -q '^Kernels on ' "$OUT/kernels.txt"; then
    sed -n '/^Kernels on /,$p' "$OUT/kernels.txt"
  else
    grep -E '^(device:|\| )' "$OUT/kernels.txt"        # the rows measured before the run stopped
  fi
  echo
} >> "$SUMMARY"
echo "(kernels: exit $rc_kernels, $(elapsed) s so far)"

# ------------------------------------------------------------------------------------ 3. training throughput
echo "== 3. training throughput ($TRAIN_S s limit)"
rm -f "$OUT/train.jsonl"
timeout "$TRAIN_S" "${RUN[@]}" benchmarks/train_gpu.py "${TRAIN_ARGS[@]}" --budget-s "$TRAIN_S" \
  --json "$OUT/train.jsonl" 2>&1 | tee "$OUT/train.txt"
rc_train=${PIPESTATUS[0]}
{
  echo "## 3. training throughput (exit $rc_train$([ "$rc_train" -eq 124 ] && echo ": cut at the $TRAIN_S s limit"), $(elapsed) s so far)"
  last=$(grep -n '^Training throughput on ' "$OUT/train.txt" | tail -1 | cut -d: -f1)
  if [ -n "$last" ]; then tail -n "+$last" "$OUT/train.txt"; else tail -5 "$OUT/train.txt"; fi
  echo
} >> "$SUMMARY"

# ------------------------------------------------------------------------------- 4. one data-parallel rank
echo "== 4. one data-parallel rank through NCCL ($NCCL_S s limit)"
MPIEXEC=$(dirname "$PY")/mpiexec; [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec || true)
if [ "$DRY" = "1" ]; then
  echo "skipped in the dry run (the NCCL path runs on the fake CuPy in tests/test_distributed.py)" | tee "$OUT/nccl.txt"
  rc_nccl=skipped
elif [ -n "$MPIEXEC" ] && "$PY" -c "import mpi4py" 2>/dev/null; then
  timeout "$NCCL_S" "$MPIEXEC" -n 1 "$PY" train.py --device=cuda --model=tiny --block_size=32 --batch_size=8 \
    --max_iters=3 --eval_interval=3 --eval_iters=1 --log_interval=1 --out_dir="$OUT/nccl_run" --overwrite 2>&1 \
    | tee "$OUT/nccl.txt"
  rc_nccl=${PIPESTATUS[0]}
else
  echo "skipped: no mpi4py / mpiexec (pip install -e '.[dist-gpu]')" | tee "$OUT/nccl.txt"
  rc_nccl=skipped
fi
{
  echo "## 4. one data-parallel rank through NCCL (exit $rc_nccl, $(elapsed) s so far)"
  grep -E '^(data parallel|done|error|skipped)' "$OUT/nccl.txt" | head -5
  echo
} >> "$SUMMARY"

# ------------------------------------------------------------------------------ 5. measured vs predicted
echo "== 5. measured against the traced model's prediction ($MODEL_S s limit)"
if [ -s "$OUT/train.jsonl" ] || [ -s "$OUT/kernels.json" ]; then
  CMP_ARGS=()
  [ -s "$OUT/train.jsonl" ] && CMP_ARGS+=(--measured "$OUT/train.jsonl")
  [ -s "$OUT/kernels.json" ] && CMP_ARGS+=(--kernels "$OUT/kernels.json")
  timeout "$MODEL_S" "$PY" benchmarks/gpu_model_compare.py "${CMP_ARGS[@]}" --out "$OUT/model_vs_measured.json" 2>&1 \
    | tee "$OUT/model_vs_measured.txt"
  rc_model=${PIPESTATUS[0]}
else
  echo "nothing measured to compare" | tee "$OUT/model_vs_measured.txt"
  rc_model=skipped
fi
{
  echo "## 5. measured / predicted (exit $rc_model, $(elapsed) s so far; predictions are the model's, not measurements)"
  grep -E 'per category, measured / predicted|^nanogpt_np' "$OUT/model_vs_measured.txt" | head -10
  echo
  echo "total: $(elapsed) s"
} >> "$SUMMARY"

echo
cat "$SUMMARY"
[ "$rc_tests" -eq 0 ] || exit 1
exit 0
