"""GPU output layer + cross-entropy, chunked (the `lm_head_cross_entropy` op contract, ops/lm_head_loss.py).

Per chunk of rows (ops/lm_head_loss.CHUNK_ROWS, 4096 by default):
    logits_c  = x_c @ wte.T           cuBLAS gemm -> one (rows, V) buffer, reused by every chunk: float32, or in
                                      bf16 precision bf16 (the float32 accumulator rounded once by cuBLAS)
    loss_c, dlogits_c                 cross_entropy.cu in one pass: the row losses (float32 math, also on bf16
                                      logits), and the gradient for d loss = 1, written in place over the
                                      logits at their width (bf16 bits in bf16 precision, else float32)
    dx[rows]  = dlogits_c @ wte       gemm straight into the chunk's rows of dx (N, C)
    dwte     += dlogits_c.T @ x_c     gemm with beta = 1 into one (V, C) float32 array (beta = 0 for the first
                                      chunk, so it needs no zeroing): no per-chunk (V, C) partial is ever made;
                                      when the trainer has declared d loss = 1 (the loss is the root) that
                                      array is wte's gradient buffer itself (dwte_into; beta = 0 for the first
                                      chunk only when it is the step's first write of the buffer, when the
                                      buffer is fresh: tensor.fresh_grads)
The loss is summed on the device (no host sync): mean = sum of the row losses / n_kept (counted on the device).

Precision follows registry.precision(): "bfloat16" multiplies bf16 copies of x and wte (made once per call, not
per chunk) with float32 accumulation (precision.gemm) and keeps a chunk's logits and their gradient as bf16 (no
float32 (rows, V) array at all: 2 bytes per logit instead of 4 + 2); "float32" multiplies float32 operands through
precision.gemm, on TF32 tensor cores when precision.set_tf32 is on (the trainer's default). The NumPy meaning of
the bf16 path is ops/lm_head_loss.py's reference with round_logits=bf16.round_to_bf16 (the logits rounded once),
plus the gradient rounded once to bf16 before the two gemms that read it.

dx and dwte (unless added into the buffer) are new arrays per call (the memory pool hands the same blocks back
every step). A module-level (V, C) buffer would save nothing on the GPU and would be unsafe: a Tensor without a
gradient buffer keeps the returned dwte itself, which the next call would overwrite.
Same edge cases as kernels/cross_entropy.py: every target masked or one out of range -> NaN loss (no sync).
"""
import numpy as np

from . import precision
from ..tensor import fresh_grads
from .compile import device_array, launch
from .launch import NULL, elementwise


def lm_head_cross_entropy_forward(x, wte, targets, ignore_index=-1, *, with_grad=None, chunk_rows=None,
                                  wte_bf16=None, dwte_into=None):
    """x (N, C) float32 (or bf16 bits), wte (V, C) float32, targets (N,) -> mean loss over kept rows (0-d float32
    cupy array), saved (dx (N, C), dwte (V, C)) for d loss = 1, or (None, None) without gradients.
    wte_bf16: the model's bf16 copy of wte (bf16 precision), used instead of rounding wte here.
    dwte_into: wte's gradient buffer. When the trainer has declared d loss = 1 (cross_entropy.assume_unit_dloss:
    the loss is the root and a backward follows), dwte is already the final gradient, so the chunks add it
    straight into the buffer (beta = 1 from the first chunk, or beta = 0 for it when the buffer is fresh,
    tensor.fresh_grads) and saved holds None for it: no (V, C) array and no
    add pass in the backward. Otherwise it is ignored (a d loss still to come must scale dwte first)."""
    import cupy as cp
    from ..ops.lm_head_loss import CHUNK_ROWS, chunks
    from . import registry
    if with_grad is None:
        from ..tensor import grad_enabled
        with_grad = grad_enabled()
    N, C = x.shape
    V = wte.shape[0]
    bf16 = registry.precision() == "bfloat16"
    if bf16:                                                          # bf16 operands, once per call
        xm, wm = precision.as_bf16(x), precision.as_bf16(wte if wte_bf16 is None else wte_bf16)
    else:
        xm, wm = cp.ascontiguousarray(x), cp.ascontiguousarray(wte)
    gemm = precision.gemm                                             # TF32 for float32 when set_tf32 is on
    targets = device_array(targets, cp.int64)
    n_kept = (targets != ignore_index).sum(dtype=cp.float32)         # stays on the device
    losses = cp.empty((N,), dtype=cp.float32)
    rows = min(N, CHUNK_ROWS if chunk_rows is None else chunk_rows)
    logits = cp.empty((rows, V), dtype=cp.uint16 if bf16 else cp.float32)    # one chunk, reused; bf16 as bits
    from .cross_entropy import assume_unit_dloss
    dx = dwte = None
    into = with_grad and dwte_into is not None and assume_unit_dloss()
    if with_grad:
        dx = cp.empty((N, C), dtype=cp.float32)
        if into:                                                      # every chunk adds (beta = 1)
            assert dwte_into.shape == (V, C) and dwte_into.dtype == cp.float32 and dwte_into.flags.c_contiguous
            dwte = dwte_into
        else:                                                         # the first chunk writes it (beta = 0)
            dwte = cp.empty((V, C), dtype=cp.float32)
    block = 1024 if V >= 8192 else 256
    kernel = "cross_entropy_fused_bf16" if bf16 else "cross_entropy_fused"
    for i, (r0, r1) in enumerate(chunks(N, rows)):
        z = logits[:r1 - r0]                                          # (n, V) float32 or bf16
        gemm(xm[r0:r1], wm, trans_b=True, out=z)                      # (n, C) @ (C, V), rounded to z's type
        d = z if with_grad else None                                  # the gradient overwrites the logits
        launch("cross_entropy", kernel, (r1 - r0,), (block,),
               (losses[r0:r1], NULL if d is None else d, z, targets[r0:r1], n_kept, np.int32(V),
                np.int64(ignore_index)))
        if with_grad:
            gemm(d, wm, out=dx[r0:r1])                                # (n, V) @ (V, C)
            # the first chunk writes dwte (beta = 0), the others add; into the buffer, the first chunk writes
            # only as the step's first write of it (tensor.fresh_grads), else it adds to what the buffer holds
            first = i == 0 and (not into or fresh_grads.should_overwrite(dwte))
            gemm(d, xm[r0:r1], trans_a=True, out=dwte, beta=0.0 if first else 1.0)           # (V, n) @ (n, C)
    loss = losses.sum() / n_kept
    return loss, (dx, None if into else dwte)


def lm_head_cross_entropy_backward(dloss, saved):
    """dloss (0-d, Python number or device array) -> (dx (N, C), dwte (V, C)), scaled in place by dloss.
    dwte is None when the forward added it into wte's gradient buffer already (only under d loss = 1)."""
    import cupy as cp
    from . import cross_entropy
    dx, dwte = saved
    if dx is None:
        raise RuntimeError("lm_head_cross_entropy: the forward ran with with_grad=False")
    if dloss is None or cross_entropy.assume_unit_dloss():   # the loss is the root: d loss = 1, nothing to do
        return dx, dwte
    if dwte is None:
        raise RuntimeError("lm_head_cross_entropy: dwte was added into its buffer for d loss = 1, but d loss is "
                           "not taken as 1 any more (set_assume_unit_dloss changed between forward and backward)")
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
