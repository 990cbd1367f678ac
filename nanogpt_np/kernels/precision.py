"""Matmul precision on the GPU: bf16 conversions (bf16.cu) and the one cuBLAS gemm of the linear layers.

gemm(a, b, ...) below multiplies float32 or bf16 matrices with cublasGemmEx on the project's own cuBLAS handle:
    float32 inputs:  exact float32, or TF32 tensor cores after set_tf32(True) (the trainer's default)
    bf16 inputs:     bf16 tensor cores, float32 accumulation
    result:          float32, or bf16 (out_dtype=uint16); beta = 1 adds the product into `out` in place

Policy for --dtype=bfloat16 (for the model/trainer to follow):
  * master weights, gradients and AdamW state stay float32 in the flat buffers; the model keeps a bf16 copy of
    the weights (model.flat_params_bf16), which adamw_step(params_bf16=...) refreshes in the pass that updates them;
  * matmul inputs (activations, weights) are bf16 (uint16 arrays: CuPy has no bfloat16 dtype), cuBLAS
    multiplies them with float32 accumulation and returns float32 (gemm above);
  * layernorm, softmax, cross-entropy and the other kernels read float32 and reduce in float32; an output that
    only feeds a bf16 matmul (layernorm's y, GELU's out, flash attention's out, and the GELU / attention input
    gradients) is written as bf16 by its kernel (registry.bf16_activations()), so as_bf16 finds it converted;
  * attention uses the flash kernel, which already runs its matmuls in bf16.

bf16 values are stored as uint16 with the bit layout of kernels/bf16.py (round to nearest even).
"""
import threading
from types import SimpleNamespace

import numpy as np

from .compile import launch
from .launch import elementwise

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h; CuPy's cublas module has the same numbers)
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_COMPUTE_32F = 68               # float32 arithmetic (exact float32 for float32 inputs)
CUBLAS_COMPUTE_32F_FAST_TF32 = 77     # float32 inputs rounded to TF32 on the tensor cores, float32 accumulation
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST = 0          # alpha and beta are read from host memory

_tf32 = False            # float32 gemms on TF32 tensor cores (set_tf32: the same switch as CuPy's matmuls)
_local = threading.local()            # per thread: {device id: the project's cuBLAS handle}


def to_bf16(x, out=None):
    """float32 cupy array -> uint16 cupy array of bf16 bits (round to nearest even)."""
    import cupy as cp
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    out = cp.empty(x.shape, dtype=cp.uint16) if out is None else out
    grid, block = elementwise(x.size)
    launch("bf16", "f32_to_bf16", grid, block, (out, x, np.int64(x.size)))
    return out


def as_bf16(x):
    """x as bf16 bits: a uint16 array (already bf16, made by a kernel that writes bf16) is returned as it is,
    a float32 array is rounded by to_bf16. Matmul inputs go through this, so producers may write either."""
    import cupy as cp
    return x if x.dtype == cp.uint16 else to_bf16(x)


def as_float32(x):
    """The twin of as_bf16: bf16 bits (a uint16 array, a bf16 matmul's output or input gradient) widened to float32
    by to_float32 (exact); any other array is returned as it is."""
    import cupy as cp
    return to_float32(x) if x.dtype == cp.uint16 else x


def dense(a):
    """a with C-contiguous rows, as cuBLAS and our kernels read it: a itself when it already is (the usual case:
    no CuPy call, which would cost the host ~1 us), else a contiguous copy."""
    import cupy as cp
    return a if a.flags.c_contiguous else cp.ascontiguousarray(a)


def to_float32(h, out=None):
    """uint16 cupy array of bf16 bits -> float32 cupy array (exact)."""
    import cupy as cp
    h = cp.ascontiguousarray(h, dtype=cp.uint16)
    out = cp.empty(h.shape, dtype=cp.float32) if out is None else out
    grid, block = elementwise(h.size)
    launch("bf16", "bf16_to_f32", grid, block, (out, h, np.int64(h.size)))
    return out


def column_sum_bf16(x):
    """(N, C) bf16 bits -> (C,) float32 column sums (a bias gradient from a gradient written in bf16).
    bf16.cu sums row chunks in parallel; the (nchunks, C) partials are added by a matrix-vector product."""
    import cupy as cp
    from .compile import num_sms
    from .launch import column_chunks
    N, C = x.shape
    grid, block, rows_per_chunk = column_chunks(N, C, num_sms())
    partial = cp.empty((grid[1], C), dtype=cp.float32)
    launch("bf16", "bf16_column_sum_partial", grid, block,
           (partial, cp.ascontiguousarray(x), np.int32(N), np.int32(C), np.int32(rows_per_chunk)))
    return sum_rows(partial)


_ones = {}               # n -> a cached (1, n) float32 row of ones on the GPU (do not write into it)


def sum_rows(x, into=None):
    """(N, C) float32 -> (C,) float32: the column sums as one exact-float32 gemm, (1, N) ones @ (N, C)
    (ops/reductions.sum_rows on the GPU: bias gradients). The project's gemm, not CuPy's matmul, so that a CUDA
    graph can capture it (cublas_ctypes.py). With `into` (C,), the sums are added into it (beta = 1): None."""
    import cupy as cp
    n = x.shape[0]
    if n not in _ones:
        _ones[n] = cp.ones((1, n), dtype=cp.float32)
    if into is None:
        return gemm(_ones[n], x, tf32=False).reshape(-1)
    gemm(_ones[n], x, out=into.reshape(1, -1), beta=1.0, tf32=False)
    return None


def gemm_args(M, K, N, trans_a=False, trans_b=False):
    """cuBLAS (column-major) arguments for the row-major product C (M, N) = op(A) @ op(B).

    Row-major X is column-major X^T, so C^T = op(B)^T op(A)^T: cuBLAS gets B first, then A. Returns
    (opB, opA, m, n, k, ldb, lda, ldc) in the order cublasGemmEx takes them. Pure arithmetic (CPU-tested).
    A is (M, K) or, with trans_a, stored (K, M); B is (K, N) or, with trans_b, stored (N, K).
    """
    lda = M if trans_a else K
    ldb = K if trans_b else N
    return (CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
            N, M, K, ldb, lda, N)


WORKSPACE_BYTES = 32 << 20           # the handle's cuBLAS workspace (cuBLAS's own default on Hopper is 32 MiB)
_wrapper_noted = []                  # the one-time note that gemm uses CuPy's wrapper (no cuBLAS library loaded)


def per_device(local, make):
    """This thread's value for the current CUDA device in `local` (a threading.local), made by make() on first
    use. Library handles are per device, and one must not be used by two threads at once."""
    import cupy as cp
    device = cp.cuda.runtime.getDevice()
    values = getattr(local, "per_device", None)
    if values is None:
        values = local.per_device = {}
    if device not in values:
        values[device] = make()
    return values[device]


def cublas_handle():
    """The project's own cuBLAS handle for the current device and thread, created on first use: a namespace
    with .ptr (the cublasHandle_t), .blas (kernels/cublas_ctypes, or None: CuPy's wrapper), .stream (the
    stream it is bound to) and .workspace (the device buffer it works in, kept alive with it).

    Its pointer mode is set once, to HOST (alpha and beta are host floats), so no call reads or changes CuPy's
    handle and its pointer mode. gemm goes through cublas_ctypes, which CUDA-graph capture does not stop (CuPy's
    wrapper refuses every call during a capture: cublas_ctypes' docstring); if no cuBLAS library loads, through
    CuPy's wrapper, noted once. One handle per thread, like CuPy's own, because a cuBLAS handle must not be used
    by two threads at once (a server thread may sample while another trains)."""
    return per_device(_local, _new_cublas_handle)


def _new_cublas_handle():
    import cupy as cp
    from . import cublas_ctypes
    blas = cublas_ctypes if cublas_ctypes.load() is not None else None
    if blas is None:
        from cupy_backends.cuda.libs import cublas as blas_wrapper
        if not _wrapper_noted:
            _wrapper_noted.append(True)
            print(f"note: none of {', '.join(cublas_ctypes.SONAMES)} loads; matmuls use CuPy's cuBLAS "
                  "wrapper, which refuses CUDA-graph capture")
        ptr = blas_wrapper.create()
        blas_wrapper.setPointerMode(ptr, CUBLAS_POINTER_MODE_HOST)
        workspace = None
    else:
        ptr = blas.create()
        blas.set_pointer_mode(ptr, CUBLAS_POINTER_MODE_HOST)
        workspace = cp.empty((WORKSPACE_BYTES,), dtype=cp.uint8)    # from CuPy's pool, alive with the handle
    return SimpleNamespace(ptr=ptr, blas=blas, stream=None, workspace=workspace)


def bind_stream(h=None):
    """Bind the handle to the current stream when it is bound to another one (cublasSetStream, then the
    workspace again: cublasSetStream resets it to cuBLAS's own). cuda_graph.py calls this before a capture,
    so that no cuBLAS setting changes while the stream captures."""
    import cupy as cp
    h = cublas_handle() if h is None else h
    stream = cp.cuda.get_current_stream().ptr
    if h.blas is not None and h.stream != stream:
        h.blas.set_stream(h.ptr, stream)
        h.blas.set_workspace(h.ptr, h.workspace.data.ptr, WORKSPACE_BYTES)
        h.stream = stream
    return h


_CUDA_TYPE = {np.dtype(np.float32): CUDA_R_32F, np.dtype(np.uint16): CUDA_R_16BF}     # uint16 holds bf16 bits
_scalars = {}            # (alpha, beta) -> (host float32 array [alpha, beta], its address): made once each


def _host_scalars(alpha, beta):
    """Addresses of alpha and beta as host float32 values (pointer mode HOST: cuBLAS reads them at the call)."""
    entry = _scalars.get((alpha, beta))
    if entry is None:
        values = np.array([alpha, beta], dtype=np.float32)
        entry = _scalars[(alpha, beta)] = (values, values.ctypes.data)
    return entry[1], entry[1] + 4


def gemm(a, b, trans_a=False, trans_b=False, out=None, *, alpha=1.0, beta=0.0, out_dtype=None, tf32=None):
    """C = alpha * op(a) @ op(b) + beta * C, for 2-D cupy arrays, with one cuBLAS call (cublasGemmEx).

    a, b: both float32, or both bf16 (uint16 bits). op(x) is x.T when trans_x, read by cuBLAS in place.
    Arithmetic: bf16 inputs are multiplied with float32 accumulation; float32 inputs in exact float32, or on TF32
    tensor cores when set_tf32(True) is on (tf32=False forces exact float32, say for a sum that must not round).
    C: `out` when given (beta = 1 adds into it: a gradient buffer), else a new (M, N) array of out_dtype:
    float32 (default), or uint16 for a bf16 result (cuBLAS rounds the float32 accumulator to bf16).
    """
    import cupy as cp
    M, K = a.shape[::-1] if trans_a else a.shape
    Kb, N = b.shape[::-1] if trans_b else b.shape
    in_type = _CUDA_TYPE.get(a.dtype)
    if Kb != K:
        raise ValueError(f"gemm: inner sizes differ: {a.shape} x {b.shape}")
    if in_type is None or b.dtype != a.dtype:
        raise TypeError(f"gemm: operands must both be float32 or both bf16 (uint16), got {a.dtype} and {b.dtype}")
    a, b = dense(a), dense(b)         # cuBLAS reads dense rows (a transpose goes as trans_a)
    if out is None:
        if beta != 0:
            raise ValueError("gemm: beta != 0 adds into C, so C must be given (out=...)")
        out = cp.empty((M, N), dtype=np.float32 if out_dtype is None else out_dtype)
    out_type = _CUDA_TYPE.get(out.dtype)
    if out_type is None or out.shape != (M, N) or not out.flags.c_contiguous:
        raise ValueError(f"gemm: out must be a contiguous float32 or uint16 ({M}, {N}) array, got {out.dtype} {out.shape}")
    fast = _tf32 if tf32 is None else tf32
    compute = CUBLAS_COMPUTE_32F_FAST_TF32 if (fast and in_type == CUDA_R_32F) else CUBLAS_COMPUTE_32F
    opb, opa, m, n, k, ldb, lda, ldc = gemm_args(M, K, N, trans_a, trans_b)
    p_alpha, p_beta = _host_scalars(alpha, beta)
    args = (opb, opa, m, n, k, p_alpha, b.data.ptr, in_type, ldb, a.data.ptr, in_type, lda, p_beta, out.data.ptr,
            out_type, ldc, compute, CUBLAS_GEMM_DEFAULT)
    h = bind_stream()
    if h.blas is not None:
        h.blas.gemm_ex(h.ptr, *args)                   # cuBLAS itself (capturable)
    else:
        from cupy_backends.cuda.libs import cublas     # CuPy's wrapper: sets the stream itself, refuses capture
        cublas.gemmEx(h.ptr, *args)
    return out


def matmul_bf16(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """C = op(a) @ op(b) for bf16 (uint16) 2-D cupy arrays, float32 accumulation and float32 result.

    With accumulate=True, C += op(a) @ op(b) into `out` (a gradient buffer, say; zeros when not given)."""
    import cupy as cp
    if accumulate and out is None:
        M = a.shape[1] if trans_a else a.shape[0]
        N = b.shape[0] if trans_b else b.shape[1]
        out = cp.zeros((M, N), dtype=cp.float32)
    return gemm(a, b, trans_a, trans_b, out, beta=1.0 if accumulate else 0.0)


def set_tf32(flag: bool) -> None:
    """Allow TF32 tensor cores for float32 matmuls (CuPy's and gemm's), or go back to exact float32.

    CuPy keeps one compute type per dtype: set_compute_type(dtype, compute_type) (CuPy 11-14; the constants
    are CuPy's own, not cuBLAS's: COMPUTE_TYPE_DEFAULT = 1, COMPUTE_TYPE_TF32 = 7 in CuPy 14)."""
    global _tf32
    from cupy._core import _routines_linalg as lin
    _tf32 = bool(flag)                   # gemm() below follows the same switch
    lin.set_compute_type(np.dtype(np.float32), lin.COMPUTE_TYPE_TF32 if flag else lin.COMPUTE_TYPE_DEFAULT)
