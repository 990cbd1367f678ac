"""Every CUDA source in nanogpt_np/kernels compiles for sm_80 and sm_90 without a GPU, with no register spills.

Uses nvcc (`nvcc -cubin -arch=sm_XX -Xptxas -v`) and parses ptxas's report; skips only when no nvcc is found.
A second check compiles the sources with NVRTC (what CuPy uses at run time) when CuPy's NVRTC library loads.
Print the table with: python -m nanogpt_np.kernels.compile
"""
import pytest

from nanogpt_np.kernels import compile as kc

NVCC = kc.find_nvcc()
CASES = [(name, arch) for name in kc.SOURCES for arch in (80, 90) if arch >= kc.MIN_ARCH.get(name, 0)]


def test_sources_exist():
    for name in kc.SOURCES:
        assert kc.source(name).strip(), name


def test_parse_ptxas_report():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'foo' for 'sm_90'
ptxas info    : Function properties for foo
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'bar' for 'sm_90'
ptxas info    : Function properties for bar
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]
"""
    r = kc.parse_ptxas(text)
    assert r["foo"] == {"registers": 40, "spill_stores": 4, "spill_loads": 12, "stack": 8, "smem": 1024}
    assert r["bar"] == {"registers": 12, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-sm_{a}" for n, a in CASES])
def test_compiles_without_spills(name, arch):
    res, text = kc.nvcc_report(name, arch, NVCC)
    assert res, f"no kernels found in the ptxas report of {name}.cu:\n{text}"
    for kernel, r in sorted(res.items()):
        print(f"{name}.cu {kernel} sm_{arch}: {r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']}"
              f" bytes, stack {r['stack']}, smem {r['smem']}")
        assert r["registers"] is not None and r["registers"] <= 255, (kernel, r)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{kernel} spills registers on sm_{arch}: {r}"
        assert r["smem"] <= 48 * 1024, f"{kernel} uses more than 48 KB of static shared memory"


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.parametrize("name", kc.SOURCES)
def test_nvrtc_compiles(name):
    """The run-time compiler (NVRTC, no host headers) accepts every source as CuPy would pass it."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("CuPy's NVRTC is not loadable here")
    arch = max(80, kc.MIN_ARCH.get(name, 0))
    try:
        prog = nvrtc.createProgram(kc.source(name), name + ".cu", (), ())
    except (TypeError, AttributeError) as e:           # another CuPy version's binding
        pytest.skip(f"this CuPy's NVRTC binding differs: {e}")
    try:
        nvrtc.compileProgram(prog, list(kc.NVRTC_OPTIONS) + [f"-arch=compute_{arch}"])
    except Exception as e:
        pytest.fail(f"NVRTC rejected {name}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
