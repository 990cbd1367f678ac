"""GPU tests: on a machine with CuPy and a CUDA device they run on the GPU.

Without a GPU they run through the fake CuPy (tests/emulation/fake_cupy.py) with the real kernels executed by
the CPU emulator of the CUDA execution model (tests/emulation/cuda/): same wrappers, same .cu code. That needs
a C++ compiler (g++); without one every test here is skipped with that reason. Shapes too large for the
emulator's speed are marked slow and skipped unless NANOGPT_EMU_LARGE=1.

Run on a GPU machine with:  python -m pytest -q tests/gpu     (benchmarks/gpu_check.sh does this)
"""
import math
import os

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


def _emulator_reason():
    from emulation.cuda import emulator
    return None if emulator.compiler() else "no C++ compiler (g++) for the CUDA emulator"


_NO_GPU = _gpu_reason()
EMULATED = _NO_GPU is not None and _emulator_reason() is None
_REASON = None if (_NO_GPU is None or EMULATED) else f"{_NO_GPU}; {_emulator_reason()}"

# Emulated runs: roughly how many CUDA threads (x work per thread) a test launches, from its parameters.
# Above EMU_BUDGET the test is slow (5-20 s on the emulator) and skipped unless NANOGPT_EMU_LARGE=1.
EMU_BUDGET = 7_000_000
_COST = {
    "test_embedding": lambda p: p["B"] * p["T"] * p["C"] + p["V"] * p["C"],
    "test_layernorm": lambda p: p["N"] * p["C"],
    "test_residual_layernorm": lambda p: p["N"] * p["C"],
    "test_residual_layernorm_without_residual": lambda p: p["N"] * p["C"],
    "test_residual_layernorm_bf16_residual": lambda p: p["N"] * p["C"],
    "test_residual_layernorm_bf16_stream": lambda p: p["N"] * p["C"],
    "test_gelu": lambda p: math.prod(p["shape"]),
    "test_bias_gelu": lambda p: p["N"] * p["C"],
    "test_bias_gelu_bf16_inputs": lambda p: p["N"] * p["C"],
    "test_cross_entropy": lambda p: p["N"] * p["V"],
    "test_adamw": lambda p: p["n"],
    "test_global_norm_deterministic": lambda p: 5_000_001,
    "test_attention_matmul": lambda p: p["B"] * p["T"] * p["T"] * p["NH"],
    "test_attention_flash": lambda p: p["B"] * p["C"] // 64 * math.ceil(p["T"] / 64) ** 2 * 4000,
    "test_bias_attention_flash": lambda p: p["B"] * p["C"] // 64 * math.ceil(p["T"] / 64) ** 2 * 4000,
    "test_bias_attention_flash_bf16_in": lambda p: p["B"] * p["C"] // 64 * math.ceil(p["T"] / 64) ** 2 * 4000,
    "test_bf16_device_conversions_match_numpy": lambda p: 1_000_003,
    "test_matmul_bf16": lambda p: p["M"] * p["K"] + p["K"] * p["N"],
    "test_linear": lambda p: p["N"] * p["Cin"] + p["Cin"] * p["Cout"] + p["N"] * p["Cout"],
    "test_weight_grad_into_a_fresh_buffer_equals_adding_into_zeros": lambda p: p["N"] * p["Cin"] * p["Cout"] // 8,
}

def pytest_collection_modifyitems(config, items):
    large = os.environ.get("NANOGPT_EMU_LARGE") == "1"
    for item in items:
        if "tests/gpu" not in str(getattr(item, "path", None) or item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        if _REASON:
            item.add_marker(pytest.mark.skip(reason=_REASON))
            continue
        if not EMULATED:
            continue
        name = item.originalname if hasattr(item, "originalname") else item.name
        params = getattr(getattr(item, "callspec", None), "params", {})
        cost = _COST.get(name, lambda p: 0)(params)
        if cost > EMU_BUDGET:
            item.add_marker(pytest.mark.slow)
            if not large:
                item.add_marker(pytest.mark.skip(reason="large shape for the CPU emulator (NANOGPT_EMU_LARGE=1 "
                                                        "runs it; a GPU runs it always)"))


def _where_cupy_runs():
    """'on the GPU', or what the fake CuPy a launcher installed runs (tests/emulation/run_on_fake.py)."""
    import cupy
    if not str(getattr(cupy, "__version__", "")).startswith("fake"):
        return "on the GPU"
    from nanogpt_np.kernels import compile as kc
    real = getattr(kc.emulator, "__module__", "").endswith("cuda.emulator")
    return "on the fake CuPy, no GPU (" + ("the real kernels on the CPU CUDA emulator)" if real
                                          else "NumPy emulations of the kernels)")


def pytest_terminal_summary(terminalreporter):
    """One line: how many GPU tests ran, and where (so a summary with all of them skipped stands out)."""
    counts = {}
    for outcome in ("passed", "failed", "xfailed", "xpassed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "tests/gpu/" in getattr(rep, "nodeid", "") and rep.when in ("call", "setup"):
                if outcome == "skipped" or rep.when == "call" or outcome == "error":
                    counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        where = "on the CPU CUDA emulator (no GPU)" if EMULATED else ("skipped" if _REASON else _where_cupy_runs())
        ran = sum(v for k, v in counts.items() if k != "skipped")
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        terminalreporter.write_line(f"tests/gpu: {ran} executed {where} ({detail})")


def pytest_report_header(config):
    if EMULATED:
        return "tests/gpu: no GPU, kernels run on the CPU CUDA emulator (tests/emulation/cuda)"
    return None


@pytest.fixture(scope="package")
def cp():
    """The cupy module (the fake one with emulated kernels when there is no GPU), with the backend switched
    to the GPU and exact float32 matmuls (no TF32)."""
    mp = pytest.MonkeyPatch()
    if EMULATED:
        from emulation import fake_cupy
        fake_cupy.install(mp, kernels="cuda", sms=132)        # an H200's SM count: grids sized as on the device
    import cupy
    from nanogpt_np import backend
    from nanogpt_np.kernels import precision
    backend.use_device("cuda")
    precision.set_tf32(False)
    yield cupy
    backend.use_device("cpu")
    mp.undo()


@pytest.fixture
def poison(cp):
    """Call poison() before a kernel: the memory pool then hands out NaN-filled memory (0xFF bytes), so an
    output element a kernel forgets to write shows up as NaN. (The fake CuPy's arrays always start as NaN.)"""
    def _poison(nbytes=1 << 30):
        if EMULATED or getattr(cp, "ALLOCATIONS_POISONED", False):   # the fake: every empty() is NaN already
            return
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()
        junk = cp.full((nbytes // 4,), 0xFFFFFFFF, dtype=cp.uint32)   # NaN as float32, NaN as bf16
        cp.cuda.get_current_stream().synchronize()
        del junk                                                       # back to the pool, still NaN
    return _poison
