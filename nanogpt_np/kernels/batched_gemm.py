"""A batch of float32 matrix products read in place: cuBLAS's strided batched gemm (cublasGemmStridedBatchedEx).

    out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i]        for every batch index i

a, b and out are CuPy arrays of shape (..., rows, cols), often *views*: the heads of attention sliced out of
the (B, T, 3C) qkv buffer, a transposed operand, a head's slot in the (B, T, C) output. cupy.matmul copies
every operand of a batched product that is not contiguous (cupy/_core/_routines_linalg.pyx: matmul ->
ascontiguousarray); cuBLAS does not need that. It reads a matrix in place from three numbers:
    its first element (a pointer), the distance between its rows (the "leading dimension", in elements), and
    the distance from one matrix of the batch to the next (the "batch stride").
So the only requirement is that each matrix's last axis is contiguous (stride 1); its rows may be far apart.

A transposed operand (op(x) = x^T) is a flag to cuBLAS, not a copy: pass trans_a / trans_b and the array as
it is stored. Row-major versus column-major: cuBLAS is column-major, so the call computes out^T = op(b)^T
op(a)^T, exactly as precision.gemm does (precision.gemm_args gives the operation flags and m, n, k).

One cuBLAS call covers every batch index when the batch axes of all three arrays flatten to one uniform
stride; otherwise (the heads of qkv: batch b and head h are T*3C and HS apart, no single stride) the first
batch axis is looped over, one call per index, and the remaining axes must flatten.
"""
import numpy as np

from . import precision

CUDA_R_32F = precision.CUDA_R_32F


def _merged_stride(shape, strides):
    """The one stride (in elements) that walks the batch axes `shape` in order, or None if there is none.
    Axes of size 1 do not matter; no batch axes (or a batch of one) give stride 0."""
    axes = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not axes:
        return 0
    for (n0, s0), (n1, s1) in zip(axes, axes[1:]):
        if s0 != s1 * n1:
            return None
    return axes[-1][1]


def _layout(x, name):
    """(row stride, batch strides) of a float32 array (..., rows, cols), in elements; checks cols are contiguous."""
    if x.dtype != np.float32:
        raise TypeError(f"batched_gemm: {name} must be float32, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"batched_gemm: {name} must be (..., rows, cols), got shape {x.shape}")
    item = x.itemsize
    if any(s % item for s in x.strides) or any(s < 0 for s in x.strides):
        raise ValueError(f"batched_gemm: {name} has strides cuBLAS cannot take: {x.strides}")
    rows, cols = x.shape[-2:]
    row_stride = x.strides[-2] // item
    if x.strides[-1] != item and cols > 1:
        raise ValueError(f"batched_gemm: {name}'s last axis must be contiguous, strides {x.strides}")
    if rows > 1 and row_stride < cols:
        raise ValueError(f"batched_gemm: {name}'s rows overlap (row stride {row_stride} < {cols} columns)")
    return max(row_stride, cols, 1), [s // item for s in x.strides[:-2]]


def batched_gemm(a, b, out, trans_a=False, trans_b=False, *, alpha=1.0, beta=0.0, tf32=None):
    """out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i], float32, for arrays (..., rows, cols) with the same
    batch axes. op(x) = x's last two axes swapped when trans_x (read in place, like every operand here).

    out must exist (a view into a bigger buffer is fine: the result is written there, nothing is returned).
    Float32 arithmetic, or TF32 tensor cores when precision.set_tf32(True) is on, like precision.gemm
    (tf32=False forces exact float32)."""
    from cupy_backends.cuda.libs import cublas
    M, K = a.shape[-1:-3:-1] if trans_a else a.shape[-2:]          # op(a) is (M, K)
    Kb, N = b.shape[-1:-3:-1] if trans_b else b.shape[-2:]         # op(b) is (K, N)
    batch = a.shape[:-2]
    if Kb != K or b.shape[:-2] != batch or out.shape != batch + (M, N):
        raise ValueError(f"batched_gemm: shapes do not fit: {a.shape}{' (T)' if trans_a else ''} x "
                         f"{b.shape}{' (T)' if trans_b else ''} -> {out.shape}")
    (lda, sa), (ldb, sb), (ldc, sc) = _layout(a, "a"), _layout(b, "b"), _layout(out, "out")
    # one call if every array's batch axes flatten to one stride, else one call per index of the first axis
    merged = [_merged_stride(batch, s) for s in (sa, sb, sc)]
    if None not in merged:
        calls, count, outer = 1, int(np.prod(batch, dtype=np.int64)), (0, 0, 0)
    else:
        merged = [_merged_stride(batch[1:], s[1:]) for s in (sa, sb, sc)]
        if None in merged:
            raise ValueError("batched_gemm: the batch axes after the first must flatten to one stride")
        calls, count, outer = batch[0], int(np.prod(batch[1:], dtype=np.int64)), (sa[0], sb[0], sc[0])
    if count == 0 or M == 0 or N == 0:
        return out
    fast = precision._tf32 if tf32 is None else tf32
    compute = precision.CUBLAS_COMPUTE_32F_FAST_TF32 if fast else precision.CUBLAS_COMPUTE_32F
    opb, opa, m, n, k = precision.gemm_args(M, K, N, trans_a, trans_b)[:5]   # out^T = op(b)^T op(a)^T
    p_alpha, p_beta = precision._host_scalars(alpha, beta)
    handle = precision.cublas_handle().ptr        # the project's handle (pointer mode HOST); CuPy binds its stream
    pa, pb, pc = a.data.ptr, b.data.ptr, out.data.ptr
    stride_a, stride_b, stride_c = merged
    ja, jb, jc = (4 * s for s in outer)                    # bytes from one index of the first axis to the next
    for i in range(calls):
        cublas.gemmStridedBatchedEx(handle, opb, opa, m, n, k, p_alpha,
                                    pb + i * jb, CUDA_R_32F, ldb, stride_b,
                                    pa + i * ja, CUDA_R_32F, lda, stride_a, p_beta,
                                    pc + i * jc, CUDA_R_32F, ldc, stride_c,
                                    count, compute, precision.CUBLAS_GEMM_DEFAULT)
    return out
