"""Run a Python script or module with the fake CuPy installed, as if on a GPU (no GPU needed).

    python tests/emulation/run_on_fake.py benchmarks/kernels.py --small --iters 1
    python tests/emulation/run_on_fake.py -m pytest -q tests/gpu -k "..."
    python tests/emulation/run_on_fake.py -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())"

fake_cupy.install() puts the fake `cupy` into sys.modules and routes every kernel launch to an emulation,
then the target runs unchanged (runpy, as `python script.py` / `python -m module` would). Which emulation:

    NANOGPT_FAKE_KERNELS=cuda    the real .cu kernels on the CUDA emulator (tests/emulation/cuda; needs g++)
    NANOGPT_FAKE_KERNELS=numpy   the fake's NumPy emulations (our reading of each kernel; fast, no compiler)
    unset                        cuda when g++ is there, else numpy

One line on stderr says which was chosen. The fake reports an H200's properties (132 SMs), so launch
arithmetic takes the real card's sizes. benchmarks/gpu_check.sh uses this for GPU_CHECK_DRY_RUN=1: the whole
device check, rehearsed on the CPU. Times measured this way are not GPU times (nor kernel speed of any kind).
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def choose_kernels(environ=os.environ):
    """'cuda' (the real kernels, emulated) or 'numpy', and why; see the module docstring."""
    from emulation.cuda import emulator
    asked = environ.get("NANOGPT_FAKE_KERNELS", "")
    if asked not in ("", "cuda", "numpy"):
        raise SystemExit(f"NANOGPT_FAKE_KERNELS must be 'cuda' or 'numpy', got {asked!r}")
    if asked == "numpy":
        return "numpy", "NANOGPT_FAKE_KERNELS=numpy"
    if emulator.compiler():
        return "cuda", "the real .cu kernels on the CPU CUDA emulator"
    if asked == "cuda":
        raise SystemExit("NANOGPT_FAKE_KERNELS=cuda: no C++ compiler (g++) for the CUDA emulator")
    return "numpy", "no C++ compiler (g++) for the CUDA emulator: NumPy emulations of the kernels instead"


def main(argv):
    if not argv or (argv[0] in ("-m", "-c") and len(argv) < 2):
        print(__doc__)
        return 2
    sys.path[:0] = [REPO, os.path.dirname(HERE)]          # nanogpt_np, and `emulation` as the tests import it
    import pytest
    from emulation import fake_cupy
    kernels, why = choose_kernels()
    print(f"run_on_fake: fake CuPy, kernels={kernels} ({why})", file=sys.stderr, flush=True)
    fake_cupy.install(pytest.MonkeyPatch(), kernels=kernels)      # kept for the life of the process
    what = "emulated .cu" if kernels == "cuda" else "NumPy"
    fake_cupy.set_device(dict(fake_cupy.H200, name=f"NVIDIA H200 (fake, {what})"))
    if argv[0] == "-c":
        sys.argv = ["-c"] + argv[2:]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    elif argv[0] == "-m":
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
