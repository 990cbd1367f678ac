"""GPU output layer + cross-entropy, chunked (the `lm_head_cross_entropy` op contract, ops/lm_head_loss.py).

Per chunk of rows (ops/lm_head_loss.CHUNK_ROWS, 2048 by default):
    logits_c  = x_c @ wte.T           cuBLAS gemm -> one float32 (rows, V) buffer, reused by every chunk
    loss_c, dlogits_c                 cross_entropy.cu in one pass: the row losses, and the gradient for
                                      d loss = 1 (bf16 bits in bf16 precision, else float32 over the logits)
    dx[rows]  = dlogits_c @ wte       gemm straight into the chunk's rows of dx (N, C)
    dwte     += dlogits_c.T @ x_c     gemm with beta = 1 into one (V, C) float32 array (beta = 0 for the first
                                      chunk, so it needs no zeroing): no per-chunk (V, C) partial is ever made
The loss is summed on the device (no host sync): mean = sum of the row losses / n_kept (counted on the device).

Precision follows registry.precision(): "bfloat16" multiplies bf16 copies of x and wte (made once per call, not
per chunk) with float32 accumulation (precision.matmul_bf16); "float32" multiplies float32 operands through
cublasGemmEx, on TF32 tensor cores when CuPy's float32 matmuls are (precision.set_tf32, the trainer's default).

dx and dwte are new arrays per call (the memory pool hands the same blocks back every step). A module-level
(V, C) buffer would save nothing on the GPU and would be unsafe: a Tensor without a gradient buffer keeps the
returned dwte itself, which the next call would overwrite.
Same edge cases as kernels/cross_entropy.py: every target masked or one out of range -> NaN loss (no sync).
"""
import numpy as np

from . import precision
from .compile import device_array, launch
from .launch import NULL, elementwise

CUBLAS_COMPUTE_32F_FAST_TF32 = 77          # cublas_api.h: float32 operands on TF32 tensor cores


def _tf32_on() -> bool:
    """Whether CuPy's float32 matmuls run on TF32 (precision.set_tf32): the float32 gemms here do the same."""
    from cupy._core import _routines_linalg as lin
    return lin.get_compute_type(np.dtype(np.float32)) == lin.COMPUTE_TYPE_TF32


def matmul_f32(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """C = op(a) @ op(b) (or C += with accumulate) for float32 2-D cupy arrays through cublasGemmEx: the float32
    twin of precision.matmul_bf16 (CuPy's own matmul cannot add into an existing array)."""
    import cupy as cp
    from cupy_backends.cuda.libs import cublas
    M = a.shape[1] if trans_a else a.shape[0]
    K = a.shape[0] if trans_a else a.shape[1]
    N = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != K:
        raise ValueError(f"matmul_f32: inner sizes differ: {a.shape} x {b.shape}")
    a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
    if out is None:
        out = cp.zeros((M, N), dtype=cp.float32) if accumulate else cp.empty((M, N), dtype=cp.float32)
    opb, opa, m, n, k, ldb, lda, ldc = precision.gemm_args(M, K, N, trans_a, trans_b)
    one = np.array(1.0, dtype=np.float32)
    beta = np.array(1.0 if accumulate else 0.0, dtype=np.float32)
    compute = CUBLAS_COMPUTE_32F_FAST_TF32 if _tf32_on() else precision.CUBLAS_COMPUTE_32F
    handle = cp.cuda.device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, opb, opa, m, n, k, one.ctypes.data, b.data.ptr, precision.CUDA_R_32F, ldb,
                      a.data.ptr, precision.CUDA_R_32F, lda, beta.ctypes.data, out.data.ptr, precision.CUDA_R_32F,
                      ldc, compute, precision.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return out


def lm_head_cross_entropy_forward(x, wte, targets, ignore_index=-1, *, with_grad=None, chunk_rows=None):
    """x (N, C) float32 (or bf16 bits), wte (V, C) float32, targets (N,) -> mean loss over kept rows (0-d float32
    cupy array), saved (dx (N, C), dwte (V, C)) for d loss = 1, or (None, None) without gradients."""
    import cupy as cp
    from ..ops.lm_head_loss import CHUNK_ROWS, chunks
    from . import registry
    if with_grad is None:
        from ..tensor import grad_enabled
        with_grad = grad_enabled()
    N, C = x.shape
    V = wte.shape[0]
    bf16 = registry.precision() == "bfloat16"
    if bf16:
        xm, wm, gemm = precision.as_bf16(x), precision.as_bf16(wte), precision.matmul_bf16   # once per call
    else:
        xm, wm, gemm = cp.ascontiguousarray(x), cp.ascontiguousarray(wte), matmul_f32
    targets = device_array(targets, cp.int64)
    n_kept = (targets != ignore_index).sum(dtype=cp.float32)         # stays on the device
    losses = cp.empty((N,), dtype=cp.float32)
    rows = min(N, CHUNK_ROWS if chunk_rows is None else chunk_rows)
    logits = cp.empty((rows, V), dtype=cp.float32)                    # one chunk, reused
    dx = dwte = dlogits = None
    if with_grad:
        dx = cp.empty((N, C), dtype=cp.float32)
        dwte = cp.empty((V, C), dtype=cp.float32)                     # the first chunk writes it (beta = 0)
        dlogits = cp.empty((rows, V), dtype=cp.uint16) if bf16 else logits    # float32: in place over the logits
    block = 1024 if V >= 8192 else 256
    kernel = "cross_entropy_fused_bf16" if bf16 else "cross_entropy_fused"
    for i, (r0, r1) in enumerate(chunks(N, rows)):
        z = logits[:r1 - r0]                                          # (n, V) float32
        gemm(xm[r0:r1], wm, trans_b=True, out=z)                      # (n, C) @ (C, V)
        d = None if dlogits is None else dlogits[:r1 - r0]            # (n, V)
        launch("cross_entropy", kernel, (r1 - r0,), (block,),
               (losses[r0:r1], NULL if d is None else d, z, targets[r0:r1], n_kept, np.int32(V),
                np.int64(ignore_index)))
        if with_grad:
            gemm(d, wm, out=dx[r0:r1])                                # (n, V) @ (V, C)
            gemm(d, xm[r0:r1], trans_a=True, out=dwte, accumulate=i > 0)   # (V, n) @ (n, C), summed
    loss = losses.sum() / n_kept
    return loss, (dx, dwte)


def lm_head_cross_entropy_backward(dloss, saved):
    """dloss (0-d, Python number or device array) -> (dx (N, C), dwte (V, C)), scaled in place by dloss."""
    import cupy as cp
    from . import cross_entropy
    dx, dwte = saved
    if dx is None:
        raise RuntimeError("lm_head_cross_entropy: the forward ran with with_grad=False")
    if dloss is None or cross_entropy.assume_unit_dloss():   # the loss is the root: d loss = 1, nothing to do
        return dx, dwte
    if isinstance(dloss, (int, float, np.floating, np.integer)):
        if float(dloss) != 1.0:
            dx *= np.float32(dloss)
            dwte *= np.float32(dloss)
        return dx, dwte
    s = cp.ascontiguousarray(cp.asarray(dloss, dtype=cp.float32).reshape(()))
    for g in (dx, dwte):
        grid, block = elementwise(g.size)
        launch("cross_entropy", "scale_by_device_scalar", grid, block, (g, s, np.int64(g.size)))
    return dx, dwte
