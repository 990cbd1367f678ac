"""GPU causal attention, fused flash form: flash_attention.cu (bf16 tensor cores, no T x T matrix).

Same contract as ops/attention.py: forward(qkv, n_head) -> (out, saved), backward(dout, saved) -> (dqkv,).
Inputs and outputs are in the model's layouts. The kernels read q, k, v in place from a bf16 qkv (B, T, 3C):
the qkv matmul's own bf16 output (bf16 matmuls), or a bf16 copy made by qkv_to_bf16 from a float32 qkv. dout
(B, T, C) is read in place too when it arrives as bf16 (c_proj's bf16 dx), else rounded into a bf16 copy of
the same layout by the backward's prep kernel. Matmuls run in bf16 with float32 accumulation, so results match
the float32 reference to about 1e-2 relative, not 1e-5. Head size must be 64; other head sizes fall back to the
cuBLAS form (softmax_attention), with one logged warning per model shape.

bias_attention (ops/attention.py gives the NumPy meaning): attention(x + b) for the qkv matmul's output x and
its bias b (3C,): the kernels add the bias as they load each tile of q, k, v (no pass of its own; for a float32
qkv, in qkv_to_bf16), and the backward also makes db, the column sums of dqkv, added into the bias's gradient
buffer when given one (db_into, docs/CONTRACTS.md).
With bf16 activations (registry.bf16_activations(): the matmuls read bf16) out is written as bf16 bits for the
c_proj matmul, and bias_attention's dqkv as bf16 for the qkv matmul's backward (db is then summed from the
bf16 values, in float32: the backward kernels sum each 64-row tile's columns as they write them (a block of
128 rows writes two partial rows), and one gemm adds those partial sums into db). Plain attention's dqkv stays
float32: a matmul before it may add its own bias.
"""
import logging
import math

import numpy as np

from . import precision, registry
from .compile import launch
from .launch import NULL
from .launch import elementwise, flash_launch, flash_padded_T, rows_per_warp

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
    """qkv (B, T, 3C) float32 or bf16 bits -> out (B, T, C) float32 (or bf16 bits, see above)."""
    return _forward(qkv, None, n_head)


def bias_attention_forward(x, b, n_head):
    """attention(x + b): x (B, T, 3C) float32 or bf16 bits, b (3C,) float32 -> out (B, T, C)."""
    return _forward(x, b, n_head)


def _forward(qkv, bias, n_head):
    import cupy as cp
    B, T, C3 = qkv.shape
    C = C3 // 3
    if not supported(C, n_head):
        _log_fallback(C, n_head)
        from . import softmax_attention
        if bias is None:
            out, saved = softmax_attention.attention_forward(qkv, n_head)
        else:
            out, saved = softmax_attention.bias_attention_forward(qkv, bias, n_head)
        return out, ("matmul", saved)
    NH = n_head
    Tp = flash_padded_T(T)
    if qkv.dtype == np.uint16:
        # the qkv matmul wrote bf16 (B, T, 3C): the kernels read it in place and add the bias per tile
        qkv16 = cp.ascontiguousarray(qkv)
        kbias = NULL if bias is None else cp.ascontiguousarray(bias, dtype=cp.float32)
    else:
        # float32 qkv: one pass rounds qkv + bias to bf16 (same layout), the kernels then add nothing
        qkv = cp.ascontiguousarray(qkv, dtype=cp.float32)
        qkv16 = cp.empty(qkv.shape, dtype=cp.uint16)
        grid, block = elementwise(qkv.size // 2)
        launch("flash_attention", "qkv_to_bf16", grid, block,
               (qkv16, qkv, NULL if bias is None else bias, np.int64(qkv.size // 2), np.int32(C3)))
        kbias = NULL
    bf16 = registry.bf16_activations()
    out = cp.empty((B, T, C), dtype=cp.uint16 if bf16 else cp.float32)
    L2 = cp.empty((B * NH, Tp), dtype=cp.float32)
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    # a block per 128 query rows (8 warps of 16 rows): each K, V tile it loads serves 128 rows
    grid, block = flash_launch(Tp, B * NH)
    launch("flash_attention", "flash_attention_forward", grid, block,
           (*_pair(out), L2, qkv16, kbias, np.int32(T), np.int32(Tp), np.int32(NH), np.float32(scale * LOG2E)))
    return out, ("flash", (qkv16, kbias, out, L2, B, T, NH))


def _pair(a):
    """(float32 pointer, bf16 pointer) for a kernel output or input that may be either: one of them NULL."""
    return (NULL, a) if a.dtype == np.uint16 else (a, NULL)


def attention_backward(dout, saved):
    """dout (B, T, C) float32 or bf16 -> (dqkv (B, T, 3C),) float32."""
    kind, saved = saved
    if kind == "matmul":
        from . import softmax_attention
        return softmax_attention.attention_backward(dout, saved)
    return (_backward(dout, saved, bf16=False),)


def bias_attention_backward(dout, saved, db_into=None):
    """dout (B, T, C) float32 or bf16 -> (dx (B, T, 3C), db (3C,)); dx is bf16 bits with bf16 activations.
    db_into: the bias's slice of the flat gradient buffer; db is added into it and returned as None."""
    kind, saved = saved
    if kind == "matmul":
        from . import softmax_attention
        return softmax_attention.bias_attention_backward(dout, saved, db_into=db_into)
    import cupy as cp
    _, _, out, L2, B, _, NH = saved
    if out.dtype == np.uint16:                # bf16 activations (as the forward chose): dqkv written as bf16
        # the backward kernels also sum the columns of the dqkv they write, per 64-row tile (the values as
        # written, bf16): db = the sum of those (B * Tp/64, 3C) partial rows, one gemm into the buffer
        partial = cp.empty((B * (L2.shape[1] // 64), 3 * NH * HEAD_SIZE), dtype=cp.float32)
        dqkv = _backward(dout, saved, bf16=True, db_partial=partial)
        return dqkv, precision.sum_rows(partial, into=db_into)
    from ..ops.reductions import add_into, sum_rows
    dqkv = _backward(dout, saved, bf16=False)
    return dqkv, add_into(db_into, sum_rows(dqkv.reshape(-1, dqkv.shape[-1])))   # float32: sum, then add


def _backward(dout, saved, bf16, db_partial=None):
    import cupy as cp
    qkv16, kbias, out, L2, B, T, NH = saved
    Tp = L2.shape[1]
    C = NH * HEAD_SIZE
    if dout.dtype == np.uint16:               # bf16 already (c_proj's bf16 dx): the kernels read it in place
        dO = cp.ascontiguousarray(dout)
        dO16 = NULL
    else:                                     # float32: prep writes the bf16 copy the kernels read
        dout = cp.ascontiguousarray(dout, dtype=cp.float32)
        dO = dO16 = cp.empty(dout.shape, dtype=cp.uint16)
    D = cp.empty((B * NH, Tp), dtype=cp.float32)
    grid, block = rows_per_warp(B * NH * Tp, 8)
    launch("flash_attention", "flash_attention_backward_prep", grid, block,
           (dO16, D, *_pair(dout), *_pair(out), np.int32(B), np.int32(T), np.int32(Tp), np.int32(NH)))
    dqkv = cp.empty((B, T, 3 * C), dtype=cp.uint16 if bf16 else cp.float32)
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    args = (*_pair(dqkv), qkv16, kbias, dO, L2, D, np.int32(T), np.int32(Tp), np.int32(NH),
            np.float32(scale * LOG2E), np.float32(scale), NULL if db_partial is None else db_partial)
    # as the forward, 8 warps of 16 rows per block: dkdv's block owns 128 keys, dq's 128 query rows
    grid, block = flash_launch(Tp, B * NH)
    launch("flash_attention", "flash_attention_backward_dkdv", grid, block, args)
    launch("flash_attention", "flash_attention_backward_dq", grid, block, args)
    return dqkv
