"""GPU causal attention, cuBLAS form: batched matmuls (cuBLAS, batched_gemm.py) around the fused softmax in
softmax_attention.cu. Same contract as ops/attention.py: forward(qkv, n_head) -> (out, saved),
backward(dout, saved) -> (dqkv,). Stores the (B, NH, T, T) probability matrix, like the reference.
bias_attention (attention(x + b), ops/attention.py) adds the bias with CuPy first; everything it returns is float32.
A qkv or dout that a bf16 matmul wrote as bf16 bits (uint16) is converted to float32 first.

Nothing is copied into a head-major layout: the matmuls read q, k, v straight out of the (B, T, 3C) qkv buffer
and write the output (and dq, dk, dv) straight into their places in (B, T, C) / (B, T, 3C) arrays. _heads()
makes the (B, NH, T, HS) *views* that say where head h of batch b lies (row t at x[b, t, h*HS:(h+1)*HS]: rows
one x row apart, heads HS apart); transposed operands (K^T, P^T, dS^T, V^T) are cuBLAS flags, not copies.
The heads of one batch row are a uniform stride apart but the batch rows are not (T*3C vs NH*HS), so
batched_gemm issues one cuBLAS call per batch row b, each a batch of NH products.
"""
import math

import numpy as np

from . import precision
from .batched_gemm import batched_gemm
from .compile import launch
from .launch import rows_per_warp


def _heads(x, NH, C, part=0):
    """Columns [part*C, (part+1)*C) of x (B, T, W) as a (B, NH, T, HS) view (no copy): part 0, 1, 2 of qkv
    (W = 3C) are q, k, v; part 0 of a (B, T, C) array is the whole of it."""
    B, T, _ = x.shape
    return x[..., part * C:(part + 1) * C].reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)    # (B, NH, T, HS)


def attention_forward(qkv, n_head):
    """qkv (B, T, 3C) float32 (or bf16 bits, converted) -> out (B, T, C)."""
    import cupy as cp
    qkv = cp.ascontiguousarray(precision.as_float32(qkv))
    B, T, C3 = qkv.shape
    C = C3 // 3
    NH, HS = n_head, C // n_head
    q, k, v = (_heads(qkv, NH, C, i) for i in range(3))                         # (B, NH, T, HS) views of qkv
    scale = 1.0 / math.sqrt(HS)
    att = cp.empty((B, NH, T, T), dtype=cp.float32)
    batched_gemm(q, k, att, trans_b=True)                                       # S = Q K^T (raw scores)
    grid, block = rows_per_warp(B * NH * T, 8)
    launch("softmax_attention", "causal_softmax_forward", grid, block,
           (att, att, np.int32(B * NH), np.int32(T), np.float32(scale)))           # in place -> probabilities P
    out = cp.empty((B, T, C), dtype=cp.float32)
    batched_gemm(att, v, _heads(out, NH, C))                                    # Y = P V, into out's head slots
    return out, (qkv, att, scale, NH)


def attention_backward(dout, saved):
    """dout (B, T, C) float32 -> (dqkv (B, T, 3C),).

    Y = P V gives dP = dY V^T and dV = P^T dY; the softmax backward turns dP into dS (scaled by 1/sqrt(HS),
    in place); S = Q K^T gives dQ = dS K and dK = dS^T Q."""
    import cupy as cp
    qkv, att, scale, NH = saved
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (_heads(qkv, NH, C, i) for i in range(3))                         # (B, NH, T, HS) views of qkv
    dy = _heads(cp.ascontiguousarray(precision.as_float32(dout)), NH, C)                              # (B, NH, T, HS) view of dout
    dqkv = cp.empty((B, T, 3 * C), dtype=cp.float32)
    dq, dk, dv = (_heads(dqkv, NH, C, i) for i in range(3))                     # where the results go
    datt = cp.empty((B, NH, T, T), dtype=cp.float32)
    batched_gemm(dy, v, datt, trans_b=True)                                     # dP = dY V^T
    batched_gemm(att, dy, dv, trans_a=True)                                     # dV = P^T dY
    grid, block = rows_per_warp(B * NH * T, 8)
    launch("softmax_attention", "causal_softmax_backward", grid, block,
           (datt, att, datt, np.int32(B * NH), np.int32(T), np.float32(scale)))   # in place -> scaled dS
    batched_gemm(datt, k, dq)                                                   # dQ = dS K
    batched_gemm(datt, q, dk, trans_a=True)                                     # dK = dS^T Q
    return (dqkv,)


def bias_attention_forward(x, b, n_head):
    """attention(x + b): x (B, T, 3C), b (3C,) -> out (B, T, C)."""
    return attention_forward(precision.as_float32(x) + b, n_head)


def bias_attention_backward(dout, saved, db_into=None):
    """dout (B, T, C) -> (dx (B, T, 3C), db (3C,) = dx summed over all rows; None after adding it into db_into)."""
    from ..ops.reductions import add_into, sum_rows
    (dqkv,) = attention_backward(dout, saved)
    return dqkv, add_into(db_into, sum_rows(dqkv.reshape(-1, dqkv.shape[-1])))
