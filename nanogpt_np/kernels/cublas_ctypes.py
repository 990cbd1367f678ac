"""The five cuBLAS functions precision.gemm needs, called through ctypes rather than through CuPy's wrapper.

Why: CuPy's wrapper refuses every cuBLAS call made while the current stream captures a CUDA graph. Each of its
functions first binds the handle to the current stream with setStream, which raises
    NotImplementedError('calling cuBLAS API during stream capture is currently unsupported')
when runtime.streamIsCapturing(stream) (cupy_backends/cuda/libs/cublas.pyx, setStream; CuPy 14). cuBLAS itself
can be captured (cuBLAS docs, "CUDA Graphs Support": in pointer mode HOST alpha and beta are read at capture
and kept in the graph), so --cuda_graph calls the library directly, through this file.

The library is the one CuPy already loaded into the process: ctypes.CDLL with its soname finds it
(libcublas.so.13 for cupy-cuda13x, .12 for cupy-cuda12x, .11 for cupy-cuda11x). load() returns None when none
loads; precision.gemm then stays on CuPy's wrapper (and a capture is refused, see cuda_graph.py).

    handle = create()                          cublasCreate_v2
    set_pointer_mode(handle, 0)                cublasSetPointerMode_v2 (0 = HOST: alpha, beta on the host)
    set_stream(handle, stream_ptr)             cublasSetStream_v2 (also resets the workspace to cuBLAS's own)
    set_workspace(handle, ptr, nbytes)         cublasSetWorkspace_v2 (a buffer we own, see precision.py)
    gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
            computeType, algo)                 cublasGemmEx, arguments in the order of CuPy's gemmEx
Every function raises RuntimeError with the cuBLAS status when the call does not return CUBLAS_STATUS_SUCCESS.
"""
import ctypes
import importlib

SONAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11")

_P, _I, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {                                  # name -> argument types (every one returns cublasStatus_t)
    "cublasCreate_v2": [ctypes.POINTER(_P)],
    "cublasSetPointerMode_v2": [_P, _I],
    "cublasSetStream_v2": [_P, _P],
    "cublasSetWorkspace_v2": [_P, _P, _SIZE],
    "cublasGemmEx": [_P, _I, _I, _I, _I, _I,     # handle, transa, transb, m, n, k
                     _P, _P, _I, _I,             # alpha (host pointer), A, Atype, lda
                     _P, _I, _I,                 # B, Btype, ldb
                     _P, _P, _I, _I,             # beta (host pointer), C, Ctype, ldc
                     _I, _I],                    # computeType, algo
}

_lib = None            # the loaded library; False once no soname loaded


def load():
    """The cuBLAS library as a ctypes object with the functions above declared, or None when none loads."""
    global _lib
    if _lib is None:
        _lib = load_first(SONAMES, _SIGNATURES) or False
    return _lib or None


def load_first(names, signatures):
    """The first library in `names` that ctypes loads, with `signatures` ({function: argument types}) declared,
    each returning a status int; None when none loads. (Also cublaslt_ctypes.py's loader.)"""
    try:            # CuPy loads its libcublas (also from a wheel's own folder) when its cublas module is
        importlib.import_module("cupy_backends.cuda.libs.cublas")   # imported; the soname then finds it
    except ImportError:
        pass
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        for fn, argtypes in signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = _I
        return lib
    return None


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed: cuBLAS status {status}")


def create():
    handle = _P()
    _check(load().cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
    return handle.value


def set_pointer_mode(handle, mode):
    _check(load().cublasSetPointerMode_v2(handle, mode), "cublasSetPointerMode_v2")


def set_stream(handle, stream_ptr):
    _check(load().cublasSetStream_v2(handle, stream_ptr), "cublasSetStream_v2")


def set_workspace(handle, ptr, nbytes):
    _check(load().cublasSetWorkspace_v2(handle, ptr, nbytes), "cublasSetWorkspace_v2")


def gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
            computeType, algo):
    _check(load().cublasGemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
                               Ctype, ldc, computeType, algo), "cublasGemmEx")
