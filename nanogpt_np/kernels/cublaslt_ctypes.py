"""The cuBLASLt functions kernels/cublaslt.py needs, called through ctypes (CuPy has no cuBLASLt binding).

cuBLASLt is cuBLAS's "lightweight" matmul API: one call, cublasLtMatmul, computes D = alpha op(A) op(B) + beta C
and then runs an *epilogue* on the float32 result before it is stored, for example
    GELU_AUX_BIAS:  D = gelu(acc + bias), and Aux = acc + bias (the GELU's input, kept for the backward)
    DGELU_BGRAD:    D = acc * gelu'(Aux), and bias = the sums of D over its columns (a bias gradient)
so a GELU and its bias cost no extra pass over memory. The operation and its epilogue are described by a
matmul descriptor (attributes set one by one), each matrix by a layout (type, rows, cols, leading dimension;
column-major), and the library picks a kernel ("algo") for that description with a heuristic.

Like cublas_ctypes.py, this calls the library itself, so a CUDA-graph capture can record it (cublasLtMatmul
takes the stream as an argument; alpha and beta are host values in the default pointer mode, read at the call).

Every number below is copied from cublasLt.h / library_types.h / cublas_api.h of cuBLAS 13.1 (the
nvidia-cublas wheel); tests/test_cublaslt_ctypes.py checks the attribute types against the real library.
load() looks for the library as NANOGPT_CUBLASLT_LIB (a path), then by soname (libcublasLt.so.13, .12, .11:
CuPy's cuBLAS wheel or the CUDA toolkit put it on the loader's path); None when none loads (then the MLP uses
the separate kernels, kernels/mlp.py).

    handle = create()                                    cublasLtCreate
    desc = matmul_desc_create(compute, scale)            cublasLtMatmulDescCreate
    matmul_desc_set(desc, attribute, value)              cublasLtMatmulDescSetAttribute (the value's C type
                                                         comes from DESC_ATTRIBUTE_TYPES)
    layout = matrix_layout_create(dtype, rows, cols, ld) cublasLtMatrixLayoutCreate (column-major)
    pref = preference_create(); preference_set(pref, attribute, value)   (workspace size, pointer alignments)
    algo = algo_get_heuristic(handle, desc, a, b, c, d, pref)   cublasLtMatmulAlgoGetHeuristic: the best
                                                         algo (a HeuristicResult), or None when none fits
    matmul(handle, desc, alpha, A, a, B, b, beta, C, c, D, d, algo, workspace, nbytes, stream)   cublasLtMatmul
    matmul_desc_destroy / matrix_layout_destroy / preference_destroy
Every function raises RuntimeError with the cuBLAS status when the call does not return CUBLAS_STATUS_SUCCESS.
"""
import ctypes
import os

from . import cublas_ctypes

SONAMES = ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11")

# cudaDataType_t (library_types.h) and cublasComputeType_t (cublas_api.h)
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1

# cublasLtMatmulDescAttributes_t (cublasLt.h)
DESC_TRANSA = 3                    # int32_t (cublasOperation_t)
DESC_TRANSB = 4                    # int32_t
DESC_EPILOGUE = 7                  # uint32_t (cublasLtEpilogue_t)
DESC_BIAS_POINTER = 8              # void*: the bias (forward) or the bias gradient it writes (BGRAD)
DESC_EPILOGUE_AUX_POINTER = 11     # void*: the GELU input, written by GELU_AUX*, read by DGELU*
DESC_EPILOGUE_AUX_LD = 12          # int64_t: aux leading dimension, >= D's rows and divisible by 8 (for GELU)
DESC_EPILOGUE_AUX_DATA_TYPE = 22   # int32_t (cudaDataType); default -1: D's type
DESC_BIAS_DATA_TYPE = 26           # int32_t (cudaDataType); default -1: D's type

DESC_ATTRIBUTE_TYPES = {DESC_TRANSA: ctypes.c_int32, DESC_TRANSB: ctypes.c_int32, DESC_EPILOGUE: ctypes.c_uint32,
                        DESC_BIAS_POINTER: ctypes.c_void_p, DESC_EPILOGUE_AUX_POINTER: ctypes.c_void_p,
                        DESC_EPILOGUE_AUX_LD: ctypes.c_int64, DESC_EPILOGUE_AUX_DATA_TYPE: ctypes.c_int32,
                        DESC_BIAS_DATA_TYPE: ctypes.c_int32}

# cublasLtEpilogue_t (cublasLt.h): the values are built from bits, two of which cublasLt.h does not name:
EPILOGUE_BGRAD_BIT = 16            # the epilogue writes a bias gradient (column sums of D)
EPILOGUE_AUX_BIT = 128             # the epilogue writes (forward) or reads (backward) the aux matrix
EPILOGUE_DEFAULT = 1
EPILOGUE_BIAS = 4
EPILOGUE_GELU = 32
EPILOGUE_GELU_AUX = EPILOGUE_GELU | EPILOGUE_AUX_BIT            # 160
EPILOGUE_GELU_AUX_BIAS = EPILOGUE_GELU_AUX | EPILOGUE_BIAS      # 164
EPILOGUE_DGELU = 64 | EPILOGUE_AUX_BIT                          # 192
EPILOGUE_DGELU_BGRAD = EPILOGUE_DGELU | EPILOGUE_BGRAD_BIT      # 208

# cublasLtMatmulPreferenceAttributes_t
PREF_MAX_WORKSPACE_BYTES = 1       # uint64_t
PREF_MIN_ALIGNMENT_A_BYTES = 5     # uint32_t, default 256: the heuristic only offers kernels that work with
PREF_MIN_ALIGNMENT_B_BYTES = 6     # pointers this aligned
PREF_MIN_ALIGNMENT_C_BYTES = 7
PREF_MIN_ALIGNMENT_D_BYTES = 8
PREF_ATTRIBUTE_TYPES = {PREF_MAX_WORKSPACE_BYTES: ctypes.c_uint64, PREF_MIN_ALIGNMENT_A_BYTES: ctypes.c_uint32,
                        PREF_MIN_ALIGNMENT_B_BYTES: ctypes.c_uint32, PREF_MIN_ALIGNMENT_C_BYTES: ctypes.c_uint32,
                        PREF_MIN_ALIGNMENT_D_BYTES: ctypes.c_uint32}

class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t; its algo is a cublasLtMatmulAlgo_t, 64 opaque bytes (uint64_t data[8])."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_P, _I, _SIZE, _U64, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int64
_SIGNATURES = {                          # name -> argument types (every one returns cublasStatus_t)
    "cublasLtCreate": [ctypes.POINTER(_P)],
    "cublasLtMatmulDescCreate": [ctypes.POINTER(_P), _I, _I],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _SIZE],
    "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatrixLayoutCreate": [ctypes.POINTER(_P), _I, _U64, _U64, _I64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(_P)],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _SIZE],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, ctypes.POINTER(HeuristicResult),
                                       ctypes.POINTER(_I)],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SIZE, _P],
}

_lib = None            # the loaded library; False once none loaded


def load():
    """The cuBLASLt library as a ctypes object with the functions above declared, or None when none loads."""
    global _lib
    if _lib is None:
        explicit = os.environ.get("NANOGPT_CUBLASLT_LIB")
        _lib = cublas_ctypes.load_first(((explicit,) if explicit else ()) + SONAMES, _SIGNATURES) or False
    return _lib or None


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed: cuBLAS status {status}")


def _new(fn, *args):
    out = _P()
    _check(getattr(load(), fn)(ctypes.byref(out), *args), fn)
    return out.value


def create():
    return _new("cublasLtCreate")


def matmul_desc_create(compute_type, scale_type):
    return _new("cublasLtMatmulDescCreate", compute_type, scale_type)


def matmul_desc_set(desc, attribute, value):
    """Set one matmul-descriptor attribute; the value is passed as the C type the header gives it."""
    v = DESC_ATTRIBUTE_TYPES[attribute](value)
    _check(load().cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(v), ctypes.sizeof(v)),
           f"cublasLtMatmulDescSetAttribute({attribute})")


def matmul_desc_destroy(desc):
    _check(load().cublasLtMatmulDescDestroy(desc), "cublasLtMatmulDescDestroy")


def matrix_layout_create(dtype, rows, cols, ld):
    return _new("cublasLtMatrixLayoutCreate", dtype, rows, cols, ld)


def matrix_layout_destroy(layout):
    _check(load().cublasLtMatrixLayoutDestroy(layout), "cublasLtMatrixLayoutDestroy")


def preference_create():
    return _new("cublasLtMatmulPreferenceCreate")


def preference_set(pref, attribute, value):
    v = PREF_ATTRIBUTE_TYPES[attribute](value)
    _check(load().cublasLtMatmulPreferenceSetAttribute(pref, attribute, ctypes.byref(v), ctypes.sizeof(v)),
           "cublasLtMatmulPreferenceSetAttribute")


def preference_destroy(pref):
    _check(load().cublasLtMatmulPreferenceDestroy(pref), "cublasLtMatmulPreferenceDestroy")


def algo_get_heuristic(handle, desc, a_layout, b_layout, c_layout, d_layout, pref):
    """The heuristic's best algo for this description (a HeuristicResult, kept alive by the caller), or None when
    it finds none (an unsupported combination: the caller then falls back)."""
    result, count = HeuristicResult(), _I(0)
    status = load().cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, c_layout, d_layout, pref, 1,
                                                   ctypes.byref(result), ctypes.byref(count))
    if status != 0 or count.value == 0 or result.state != 0:
        return None
    return result


def matmul(handle, desc, alpha, A, a_layout, B, b_layout, beta, C, c_layout, D, d_layout, algo, workspace,
           workspace_bytes, stream):
    """cublasLtMatmul. alpha, beta: host addresses of float32 values; algo: a HeuristicResult."""
    _check(load().cublasLtMatmul(handle, desc, alpha, A, a_layout, B, b_layout, beta, C, c_layout, D, d_layout,
                                 ctypes.addressof(algo.algo), workspace, workspace_bytes, stream), "cublasLtMatmul")
