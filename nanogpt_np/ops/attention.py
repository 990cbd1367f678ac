"""Causal multi-head self-attention (the part between c_attn and c_proj).

Shapes: B batch, T time, C channels, NH heads, HS = C / NH head size.
Forward:
    q, k, v = split(qkv)                     # (B, T, 3C) -> 3 x (B, NH, T, HS)
    s   = (q @ k^T) / sqrt(HS)               # (B, NH, T, T) scores
    s[..., i, j] = -inf for j > i            # causal mask: position i sees positions 0..i only
    att = softmax(s, axis=-1)                # (B, NH, T, T), each row sums to 1
    y   = att @ v                            # (B, NH, T, HS)
    out = merge_heads(y)                     # (B, T, C)
Backward (from the bottom up):
    dy   = split_heads(dout)
    datt = dy @ v^T,  dv = att^T @ dy        # matmul rule, as in linear.py
    ds   = att * (datt - sum_j(datt * att))  # softmax rule: d att_i / d s_j = att_i (delta_ij - att_j)
                                             # masked entries have att = 0, so ds = 0 there: no extra mask
    dq   = ds @ k / sqrt(HS),  dk = ds^T @ q / sqrt(HS)
    dqkv = concat(merge(dq), merge(dk), merge(dv))
(Dropout on the attention weights is not applied: this GPT drops out after c_proj only.)

Bias + attention: out = attention(x + b) for the qkv matmul's output x (B, T, 3C) and its bias b (3C,), so the
GPU adds the bias as its kernels load q, k, v instead of in a pass of its own:
    dx = dqkv (an add passes its gradient through),  db = dqkv summed over all (b, t) rows
(on the GPU with bf16 matmuls, x and dout may arrive as bf16 bits, uint16: the reference converts them)
"""
import math

import numpy as np

from .. import backend
from ..kernels.bf16 import widen_bf16
from ..tensor import Tensor, record
from .dispatch import implementation
from .reductions import add_into, sum_last, sum_rows


def split_heads(x, n_head):
    """(B, T, C) -> (B, NH, T, HS)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, HS) -> (B, T, C)."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


_mask_cache = {}


def causal_mask(T, xp, dtype):
    """(T, T) additive mask: 0 where position i may see j (j <= i), -inf above the diagonal. Cached."""
    key = (T, xp.__name__, str(dtype))
    if key not in _mask_cache:
        future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
        _mask_cache[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
    return _mask_cache[key]


def causal_softmax(scores):
    """Softmax over the last axis of (..., T, T) scores with positions j > i masked out. Works in place."""
    xp = backend.xp_of(scores)
    scores += causal_mask(scores.shape[-1], xp, scores.dtype)
    scores -= scores.max(axis=-1, keepdims=True)           # the diagonal is never masked: max is finite
    xp.exp(scores, out=scores)
    scores /= sum_last(scores)
    return scores


def attention_forward(qkv, n_head):
    """qkv (B, T, 3C) -> out (B, T, C)."""
    qkv = widen_bf16(qkv)
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))
    q = q * (1.0 / math.sqrt(C // n_head))                         # scale q (T x HS) rather than s (T x T)
    scores = q @ k.transpose(0, 1, 3, 2)                           # (B, NH, T, T)
    att = causal_softmax(scores)
    y = att @ v                                                    # (B, NH, T, HS)
    return merge_heads(y), (q, k, v, att)


def attention_backward(dout, saved):
    """dout (B, T, C) -> dqkv (B, T, 3C). q in `saved` is already scaled by 1/sqrt(HS)."""
    q, k, v, att = saved
    dout = widen_bf16(dout)
    xp = backend.xp_of(dout)
    B, NH, T, HS = q.shape
    dy = split_heads(dout, NH)                                     # (B, NH, T, HS)
    datt = dy @ v.transpose(0, 1, 3, 2)                            # (B, NH, T, T)
    ds = datt                                                      # reuse datt's memory for ds
    ds -= sum_last(datt * att)
    ds *= att                                                      # (B, NH, T, T)
    # write dq, dk, dv straight into their thirds of dqkv (B, T, 3, NH, HS): one copy each
    dqkv = xp.empty((B, T, 3, NH, HS), dtype=dout.dtype)
    dq = ds @ k
    dq *= 1.0 / math.sqrt(HS)                                      # s = (q / sqrt(HS)) k^T
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dqkv[:, :, 1] = (ds.transpose(0, 1, 3, 2) @ q).transpose(0, 2, 1, 3)   # q is the scaled q
    dqkv[:, :, 2] = (att.transpose(0, 1, 3, 2) @ dy).transpose(0, 2, 1, 3)
    return (dqkv.reshape(B, T, 3 * NH * HS),)


def attention(qkv: Tensor, n_head: int) -> Tensor:
    """Causal self-attention over qkv (B, T, 3C) with n_head heads -> (B, T, C)."""
    if qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"qkv width {qkv.shape[-1]} is not 3 * n_head * head_size for n_head={n_head}")
    forward, backward = implementation("attention", qkv.data, attention_forward, attention_backward)
    out, saved = forward(qkv.data, n_head)
    return record(Tensor(out), (qkv,), lambda dout: backward(dout, saved))


def bias_attention_forward(x, b, n_head):
    """x (B, T, 3C), b (3C,) -> attention(x + b) (B, T, C)."""
    return attention_forward(widen_bf16(x) + b, n_head)


def bias_attention_backward(dout, saved, db_into=None):
    """dout (B, T, C) -> dx (B, T, 3C), db (3C,); given db_into (the bias's gradient buffer), db is added
    into it and returned as None (docs/CONTRACTS.md, `*_into`)."""
    (dqkv,) = attention_backward(dout, saved)
    return dqkv, add_into(db_into, sum_rows(dqkv.reshape(-1, dqkv.shape[-1])))


def bias_attention(x: Tensor, b: Tensor, n_head: int) -> Tensor:
    """Causal self-attention over x + b: x (B, T, 3C) the qkv matmul's output, b (3C,) its bias -> (B, T, C)."""
    if x.shape[-1] % (3 * n_head):
        raise ValueError(f"qkv width {x.shape[-1]} is not 3 * n_head * head_size for n_head={n_head}")
    forward, backward = implementation("bias_attention", x.data, bias_attention_forward, bias_attention_backward)
    out, saved = forward(x.data, b.data, n_head)
    return record(Tensor(out), (x, b), lambda dout: backward(dout, saved, db_into=b.grad_buffer()))


def attention_with_cache(qkv, n_head, k_cache, v_cache, lengths, positions=None):
    """Attention for new tokens against a KV cache (inference only, nothing recorded for backward).

    qkv (B, Tn, 3C): the new tokens of every sequence; k_cache, v_cache (B, NH, Tmax, HS); lengths (B,) how
    many positions each sequence already holds. The new keys and values are written at positions
    lengths[b] .. lengths[b] + Tn - 1, then new token i of sequence b attends to positions 0 .. lengths[b] + i:
    the causal rule, and also a guard against the unused (padding) end of shorter sequences in the batch.
    Each new token costs one position of work per layer instead of recomputing the whole context.
    lengths live on the host (a NumPy array, as generate.KVCache keeps them), so the size of the filled part
    is known without asking the device; positions (B, Tn), lengths[:, None] + arange(Tn), may be passed
    already on the device (the model computes it once for all layers).
    """
    xp = backend.xp_of(qkv)
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))   # (B, NH, Tn, HS)
    host_lengths = backend.to_numpy(lengths)
    pos = positions if positions is not None else \
        xp.asarray(host_lengths[:, None] + np.arange(Tn)[None, :])    # (B, Tn) where the new tokens go
    rows = xp.arange(B)[:, None]
    k_cache[rows, :, pos] = k.transpose(0, 2, 1, 3)                   # (B, Tn, NH, HS) into (B, NH, Tmax, HS)
    v_cache[rows, :, pos] = v.transpose(0, 2, 1, 3)
    L = int(host_lengths.max()) + Tn          # only the filled part of the cache (host arithmetic: no sync)
    keys, values = k_cache[:, :, :L], v_cache[:, :, :L]
    scores = (q @ keys.transpose(0, 1, 3, 2)) / math.sqrt(C // n_head)    # (B, NH, Tn, L)
    allowed = xp.arange(L)[None, None, :] <= pos[:, :, None]         # (B, Tn, L)
    scores = xp.where(allowed[:, None], scores, -xp.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = xp.exp(scores)
    att = e / e.sum(axis=-1, keepdims=True)
    return merge_heads(att @ values)                                  # (B, Tn, C)
