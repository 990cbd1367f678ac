"""kernels/cublaslt_ctypes.py against the real cuBLASLt library, host-side only (no GPU needed).

The descriptor, layout and preference functions of cuBLASLt run on the host: they check each attribute's id and
the size of its value, so creating the exact descriptions kernels/cublaslt.py builds, and seeing every call
return CUBLAS_STATUS_SUCCESS, checks the enum values and C types copied from cublasLt.h. The heuristic and the
matmul need a GPU and are not called here (tests/gpu covers them where a GPU is).

The library: NANOGPT_CUBLASLT_LIB (a path), else the nvidia-cublas wheel's (nvidia/cu13/lib or nvidia/cublas/lib
on sys.path); the test is skipped when neither is there (CI has no cuBLAS).
"""
import ctypes
import glob
import os
import sys

import pytest

from nanogpt_np.kernels import cublaslt, cublaslt_ctypes as lt


def _library_path():
    path = os.environ.get("NANOGPT_CUBLASLT_LIB")
    if path:
        return path
    for root in sys.path:
        for pattern in ("nvidia/cu13/lib/libcublasLt.so.*", "nvidia/cublas/lib/libcublasLt.so.*"):
            found = sorted(glob.glob(os.path.join(root, pattern)))
            if found:
                return found[0]
    return None


@pytest.fixture
def real_lt(monkeypatch):
    path = _library_path()
    if path is None:
        pytest.skip("no cuBLASLt library here (set NANOGPT_CUBLASLT_LIB to a libcublasLt.so)")
    try:
        ctypes.CDLL(path)
    except OSError as e:
        pytest.skip(f"{path} does not load: {e}")
    monkeypatch.setenv("NANOGPT_CUBLASLT_LIB", path)
    monkeypatch.setattr(lt, "_lib", None)
    assert lt.load() is not None
    yield lt
    monkeypatch.setattr(lt, "_lib", None)


def _descriptions():
    """The (epilogue, opa, opb, m, n, k, lda, ldb, ldd) kernels/cublaslt.py builds for the MLP of GPT-2 (C = 768,
    N = 8192 rows) and an odd small one: c_fc forward (x @ W_fc) and mlp.c_proj's dx (dy @ W_proj.T)."""
    from nanogpt_np.kernels.precision import gemm_args
    out = []
    for N, C, H in ((8192, 768, 3072), (7, 24, 40)):
        opa, opb, m, n, k, lda, ldb, ldd = gemm_args(N, C, H)
        out.append((lt.EPILOGUE_GELU_AUX_BIAS, opa, opb, m, n, k, lda, ldb, ldd))
        out.append((lt.EPILOGUE_GELU_AUX, opa, opb, m, n, k, lda, ldb, ldd))
        opa, opb, m, n, k, lda, ldb, ldd = gemm_args(N, C, H, trans_b=True)
        out.append((lt.EPILOGUE_DGELU_BGRAD, opa, opb, m, n, k, lda, ldb, ldd))
        out.append((lt.EPILOGUE_DGELU, opa, opb, m, n, k, lda, ldb, ldd))
    return out


def test_the_descriptions_the_project_builds_are_accepted(real_lt, monkeypatch):
    """cublaslt._plan's calls up to the heuristic, on the real library: every one returns success."""
    calls = []

    def heuristic(handle, desc, a, b, c, d, pref):      # needs a GPU: record what it was given instead
        calls.append((desc, a, b, c, d, pref))
        return None
    monkeypatch.setattr(lt, "algo_get_heuristic", heuristic)
    s = type("State", (), {"handle": None, "plans": {}})()
    for i, (epilogue, opa, opb, m, n, k, lda, ldb, ldd) in enumerate(_descriptions()):
        plan = cublaslt._plan(s, i, epilogue, opa, opb, m, n, k, lda, ldb, ldd)
        assert plan is None and len(calls) == i + 1            # refused only because the fake heuristic said so
    # the attributes set per call as well
    desc = lt.matmul_desc_create(lt.CUBLAS_COMPUTE_32F, lt.CUDA_R_32F)
    lt.matmul_desc_set(desc, lt.DESC_BIAS_POINTER, 0x7f0000002000)
    lt.matmul_desc_set(desc, lt.DESC_EPILOGUE_AUX_POINTER, 0x7f0000003000)
    lt.matmul_desc_destroy(desc)


def test_a_wrong_attribute_size_is_refused(real_lt):
    """Negative control: the library does check sizes, so the test above can fail (TRANSA is an int32_t: an
    8-byte value is refused, CUBLAS_STATUS_INVALID_VALUE = 7)."""
    desc = lt.matmul_desc_create(lt.CUBLAS_COMPUTE_32F, lt.CUDA_R_32F)
    wide = ctypes.c_int64(1)
    status = lt.load().cublasLtMatmulDescSetAttribute(desc, lt.DESC_TRANSA, ctypes.byref(wide), 8)
    assert status != 0
    with pytest.raises(RuntimeError, match="cuBLAS status"):       # and matmul_desc_set reports it
        _set_raw(desc, lt.DESC_EPILOGUE, ctypes.c_uint8(1))
    lt.matmul_desc_destroy(desc)


def _set_raw(desc, attribute, value):
    lt._check(lt.load().cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), ctypes.sizeof(value)),
              "cublasLtMatmulDescSetAttribute")


def test_the_fake_binding_takes_the_same_arguments():
    """tests/emulation/fake_cupy.py replaces each function above with an emulation: same parameters, so the code
    that runs on the fake calls the real binding the same way."""
    import inspect
    import types
    from emulation import fake_cupy
    from nanogpt_np.kernels import cublaslt_ctypes

    real = {name: getattr(cublaslt_ctypes, name) for name in dir(cublaslt_ctypes)
            if isinstance(getattr(cublaslt_ctypes, name), types.FunctionType) and not name.startswith("_")}
    patched = {}

    class Recorder:
        def setattr(self, module, name, value):
            assert module is cublaslt_ctypes
            patched[name] = value
    fake_cupy._lt_binding(Recorder())
    assert set(patched) == set(real)                          # every function faked
    for name, fn in patched.items():
        assert len(inspect.signature(fn).parameters) == len(inspect.signature(real[name]).parameters), name

