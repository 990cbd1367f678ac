"""GPU causal attention, cuBLAS form: batched matmuls (CuPy -> cuBLAS) around the fused softmax in
softmax_attention.cu. Same contract as ops/attention.py: forward(qkv, n_head) -> (out, saved),
backward(dout, saved) -> (dqkv,). Stores the (B, NH, T, T) probability matrix, like the reference.
bias_attention (attention(x + b), ops/attention.py) adds the bias with CuPy first: this form reads the
heads through CuPy copies anyway; everything it returns is float32.
"""
import math

import numpy as np

from .compile import launch
from .launch import rows_per_warp


def _heads(x, B, T, NH, HS):
    import cupy as cp
    return cp.ascontiguousarray(x.reshape(B, T, NH, HS).transpose(0, 2, 1, 3))     # (B, NH, T, HS)


def attention_forward(qkv, n_head):
    """qkv (B, T, 3C) -> out (B, T, C)."""
    import cupy as cp
    B, T, C3 = qkv.shape
    C = C3 // 3
    NH, HS = n_head, C // n_head
    q, k, v = (_heads(qkv[..., i * C:(i + 1) * C], B, T, NH, HS) for i in range(3))
    scale = 1.0 / math.sqrt(HS)
    att = cp.matmul(q, k.transpose(0, 1, 3, 2))                                   # (B, NH, T, T) raw scores
    grid, block = rows_per_warp(B * NH * T, 8)
    launch("softmax_attention", "causal_softmax_forward", grid, block,
           (att, att, np.int32(B * NH), np.int32(T), np.float32(scale)))           # in place -> probabilities
    y = cp.matmul(att, v)                                                         # (B, NH, T, HS)
    out = cp.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(B, T, C)
    return out, (q, k, v, att, scale)


def attention_backward(dout, saved):
    """dout (B, T, C) -> (dqkv (B, T, 3C),)."""
    import cupy as cp
    q, k, v, att, scale = saved
    B, NH, T, HS = q.shape
    C = NH * HS
    dy = _heads(dout, B, T, NH, HS)
    datt = cp.matmul(dy, v.transpose(0, 1, 3, 2))                                 # (B, NH, T, T)
    dv = cp.matmul(att.transpose(0, 1, 3, 2), dy)
    grid, block = rows_per_warp(B * NH * T, 8)
    launch("softmax_attention", "causal_softmax_backward", grid, block,
           (datt, att, datt, np.int32(B * NH), np.int32(T), np.float32(scale)))   # in place -> scaled dS
    dq = cp.matmul(datt, k)
    dk = cp.matmul(datt.transpose(0, 1, 3, 2), q)
    dqkv = cp.empty((B, T, 3 * C), dtype=cp.float32)
    for i, d in enumerate((dq, dk, dv)):
        dqkv[..., i * C:(i + 1) * C] = d.transpose(0, 2, 1, 3).reshape(B, T, C)
    return (dqkv,)


def bias_attention_forward(x, b, n_head):
    """attention(x + b): x (B, T, 3C), b (3C,) -> out (B, T, C)."""
    return attention_forward(x + b, n_head)


def bias_attention_backward(dout, saved):
    """dout (B, T, C) -> (dx (B, T, 3C), db (3C,) = dx summed over all rows)."""
    from ..ops.reductions import sum_rows
    (dqkv,) = attention_backward(dout, saved)
    return dqkv, sum_rows(dqkv.reshape(-1, dqkv.shape[-1]))
