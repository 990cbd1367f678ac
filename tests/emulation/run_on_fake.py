"""Run a Python script or module with the fake CuPy installed, as if on a GPU (no GPU needed).

    python tests/emulation/run_on_fake.py benchmarks/kernels.py --small --iters 1
    python tests/emulation/run_on_fake.py -m pytest -q tests/gpu -k "..."
    python tests/emulation/run_on_fake.py -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())"

fake_cupy.install() puts the fake `cupy` into sys.modules and routes every kernel launch to its emulation,
then the target runs unchanged (runpy, as `python script.py` / `python -m module` would). The fake reports an
H200's properties (132 SMs), so launch arithmetic takes the real card's sizes. benchmarks/gpu_check.sh uses
this for GPU_CHECK_DRY_RUN=1: the whole device check, rehearsed on the CPU. Times measured this way are
not GPU times.
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def main(argv):
    if not argv or (argv[0] in ("-m", "-c") and len(argv) < 2):
        print(__doc__)
        return 2
    sys.path[:0] = [REPO, os.path.dirname(HERE)]          # nanogpt_np, and `emulation` as the tests import it
    import pytest
    from emulation import fake_cupy
    fake_cupy.install(pytest.MonkeyPatch())             # kept for the life of the process
    fake_cupy.set_device(fake_cupy.H200)
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
