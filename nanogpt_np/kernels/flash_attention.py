"""GPU causal attention, fused flash form: flash_attention.cu (bf16 tensor cores, no T x T matrix).

Same contract as ops/attention.py: forward(qkv, n_head) -> (out, saved), backward(dout, saved) -> (dqkv,).
Inputs and outputs are float32 in the model's layouts; inside, q, k, v (and dO) are bf16 copies in
(B*NH, Tp, 64) head layout with Tp = T rounded up to 64. Matmuls run in bf16 with float32 accumulation, so
results match the float32 reference to about 1e-2 relative, not 1e-5. Head size must be 64; other head sizes
fall back to the cuBLAS form (softmax_attention), with one logged warning per model shape.
"""
import logging
import math

import numpy as np

from .compile import launch
from .launch import elementwise, flash_padded_T, rows_per_warp

HEAD_SIZE = 64
LOG2E = 1.4426950408889634
log = logging.getLogger(__name__)
_fallbacks_logged = set()


def _log_fallback(C, n_head):
    """One line per model shape (not per call) when flash cannot run and the matmul form is used instead."""
    if (C, n_head) not in _fallbacks_logged:
        _fallbacks_logged.add((C, n_head))
        log.warning("flash attention needs head size %d; n_embd %d / n_head %d gives %s: using the matmul "
                    "attention kernels instead", HEAD_SIZE, C, n_head,
                    C // n_head if C % n_head == 0 else f"{C / n_head:.2f}")


def supported(n_embd: int, n_head: int) -> bool:
    return n_embd // n_head == HEAD_SIZE and n_embd % n_head == 0


def attention_forward(qkv, n_head):
    """qkv (B, T, 3C) float32 -> out (B, T, C) float32."""
    import cupy as cp
    B, T, C3 = qkv.shape
    C = C3 // 3
    if not supported(C, n_head):
        _log_fallback(C, n_head)
        from . import softmax_attention
        out, saved = softmax_attention.attention_forward(qkv, n_head)
        return out, ("matmul", saved)
    NH = n_head
    Tp = flash_padded_T(T)
    qkv = cp.ascontiguousarray(qkv, dtype=cp.float32)
    q, k, v = (cp.empty((B * NH, Tp, HEAD_SIZE), dtype=cp.uint16) for _ in range(3))
    grid, block = elementwise(B * NH * Tp * HEAD_SIZE // 2)
    launch("flash_attention", "qkv_to_heads_bf16", grid, block,
           (q, k, v, qkv, np.int32(B), np.int32(T), np.int32(Tp), np.int32(NH)))
    out = cp.empty((B, T, C), dtype=cp.float32)
    L2 = cp.empty((B * NH, Tp), dtype=cp.float32)
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    launch("flash_attention", "flash_attention_forward", (Tp // 64, B * NH), (128,),
           (out, L2, q, k, v, np.int32(T), np.int32(Tp), np.int32(NH), np.float32(scale * LOG2E)))
    return out, ("flash", (q, k, v, out, L2, B, T, NH))


def attention_backward(dout, saved):
    """dout (B, T, C) -> (dqkv (B, T, 3C),)."""
    import cupy as cp
    kind, saved = saved
    if kind == "matmul":
        from . import softmax_attention
        return softmax_attention.attention_backward(dout, saved)
    q, k, v, out, L2, B, T, NH = saved
    Tp = q.shape[1]
    C = NH * HEAD_SIZE
    dout = cp.ascontiguousarray(dout, dtype=cp.float32)
    dO = cp.empty((B * NH, Tp, HEAD_SIZE), dtype=cp.uint16)
    D = cp.empty((B * NH, Tp), dtype=cp.float32)
    grid, block = rows_per_warp(B * NH * Tp, 8)
    launch("flash_attention", "flash_attention_backward_prep", grid, block,
           (dO, D, dout, out, np.int32(B), np.int32(T), np.int32(Tp), np.int32(NH)))
    dqkv = cp.empty((B, T, 3 * C), dtype=cp.float32)
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    args = (dqkv, q, k, v, dO, L2, D, np.int32(T), np.int32(Tp), np.int32(NH),
            np.float32(scale * LOG2E), np.float32(scale))
    launch("flash_attention", "flash_attention_backward_dkdv", (Tp // 64, B * NH), (128,), args)
    launch("flash_attention", "flash_attention_backward_dq", (Tp // 64, B * NH), (128,), args)
    return (dqkv,)
