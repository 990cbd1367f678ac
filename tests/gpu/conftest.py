"""GPU tests: every test in this folder needs CuPy and a CUDA device; without them all are skipped cleanly.

Run on a GPU machine with:  python -m pytest -q tests/gpu     (benchmarks/gpu_check.sh does this)
"""
import pytest


def _gpu_reason():
    try:
        import cupy
    except Exception as e:                       # not installed, or broken install
        return f"CuPy not importable ({type(e).__name__})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as e:
        return f"no usable CUDA device ({type(e).__name__})"
    return None


_REASON = _gpu_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu" in str(getattr(item, "path", None) or item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if _REASON:
                item.add_marker(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="session")
def cp():
    """The cupy module, with the backend switched to the GPU and exact float32 matmuls (no TF32)."""
    import cupy
    from nanogpt_np import backend
    from nanogpt_np.kernels import precision
    backend.use_device("cuda")
    precision.set_tf32(False)
    yield cupy
    backend.use_device("cpu")


@pytest.fixture
def poison(cp):
    """Call poison() before a kernel: the memory pool then hands out NaN-filled memory (0xFF bytes), so an
    output element a kernel forgets to write shows up as NaN."""
    def _poison(nbytes=1 << 30):
        if getattr(cp, "ALLOCATIONS_POISONED", False):     # the fake CuPy: every empty() is NaN-filled already
            return
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()
        junk = cp.full((nbytes // 4,), 0xFFFFFFFF, dtype=cp.uint32)   # NaN as float32, NaN as bf16
        cp.cuda.get_current_stream().synchronize()
        del junk                                                       # back to the pool, still NaN
    return _poison
