"""bf16 mixed precision on the GPU: device conversions (bf16.cu) and a bf16 matmul through cuBLAS.

Policy for --dtype=bfloat16 (for the model/trainer to follow):
  * master weights, gradients and AdamW state stay float32 in the flat buffers; adamw_step(params_bf16=...)
    refreshes a bf16 copy of the weights in the same pass that updates them;
  * matmul inputs (activations, weights) are bf16 (uint16 arrays: CuPy has no bfloat16 dtype), cuBLAS
    multiplies them with float32 accumulation and returns float32 (matmul_bf16 below);
  * layernorm, softmax, cross-entropy and the other kernels read float32 and reduce in float32; an output that
    only feeds a bf16 matmul (layernorm's y, GELU's out, flash attention's out, and the GELU / attention input
    gradients) is written as bf16 by its kernel (registry.bf16_activations()), so as_bf16 finds it converted;
  * attention uses the flash kernel, which already runs its matmuls in bf16.

bf16 values are stored as uint16 with the bit layout of kernels/bf16.py (round to nearest even).
"""
import numpy as np

from .compile import launch
from .launch import elementwise

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1


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
    from ..ops.reductions import sum_rows
    from .compile import num_sms
    from .launch import column_chunks
    N, C = x.shape
    grid, block, rows_per_chunk = column_chunks(N, C, num_sms())
    partial = cp.empty((grid[1], C), dtype=cp.float32)
    launch("bf16", "bf16_column_sum_partial", grid, block,
           (partial, cp.ascontiguousarray(x), np.int32(N), np.int32(C), np.int32(rows_per_chunk)))
    return sum_rows(partial)


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


def matmul_bf16(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """C = op(a) @ op(b) for bf16 (uint16) 2-D cupy arrays, float32 accumulation and float32 result.

    With accumulate=True, C += op(a) @ op(b) into `out` (a gradient buffer, say).
    """
    import cupy as cp
    from cupy_backends.cuda.libs import cublas
    M = a.shape[1] if trans_a else a.shape[0]
    K = a.shape[0] if trans_a else a.shape[1]
    N = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != K:
        raise ValueError(f"matmul_bf16: inner sizes differ: {a.shape} x {b.shape}")
    a = cp.ascontiguousarray(a)
    b = cp.ascontiguousarray(b)
    if out is None:
        out = cp.zeros((M, N), dtype=cp.float32) if accumulate else cp.empty((M, N), dtype=cp.float32)
    opb, opa, m, n, k, ldb, lda, ldc = gemm_args(M, K, N, trans_a, trans_b)
    one = np.array(1.0, dtype=np.float32)
    beta = np.array(1.0 if accumulate else 0.0, dtype=np.float32)
    handle = cp.cuda.device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, opb, opa, m, n, k, one.ctypes.data, b.data.ptr, CUDA_R_16BF, ldb,
                      a.data.ptr, CUDA_R_16BF, lda, beta.ctypes.data, out.data.ptr, CUDA_R_32F, ldc,
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return out


def set_tf32(flag: bool) -> None:
    """Allow TF32 tensor cores for CuPy's float32 matmuls (cuBLAS), or go back to exact float32.

    CuPy keeps one compute type per dtype: set_compute_type(dtype, compute_type) (CuPy 11-14; the constants
    are CuPy's own, not cuBLAS's: COMPUTE_TYPE_DEFAULT = 1, COMPUTE_TYPE_TF32 = 7 in CuPy 14)."""
    from cupy._core import _routines_linalg as lin
    lin.set_compute_type(np.dtype(np.float32), lin.COMPUTE_TYPE_TF32 if flag else lin.COMPUTE_TYPE_DEFAULT)
