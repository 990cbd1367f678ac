"""GPU layernorm: layernorm.cu behind the `layernorm` op contract, plus the fused `residual_layernorm`.

residual_layernorm (references.residual_layernorm_forward/backward give the NumPy meaning):
    forward(x, residual, residual_bias, w, b, eps) -> ((h, y), saved)
        h = x + residual + residual_bias (the bias of the matmul that made `residual`; may be None),
        y = layernorm(h)
    backward((dh, dy), saved) -> (dx, dresidual, dresidual_bias, dw, db)
        dx = dresidual = dh + layernorm_backward(dy) (the same array twice; dh may be None),
        dresidual_bias = dx summed over rows (None without a bias)

residual_add (ops/residual.py gives the NumPy meaning): forward(x, r, bias) -> (x + r + bias, saved) in one
pass; backward(dout, saved) -> (dout, dout, dbias = dout summed over rows).

With bf16 activations (registry.bf16_activations(): the matmuls read bf16) y is written as bf16 bits (uint16)
for the next matmul; h, the saved statistics and the whole backward stay float32.
"""
import numpy as np

from . import registry
from .compile import launch, num_sms
from .launch import NULL, elementwise, layernorm_backward_config, rows_per_warp


def _forward(x, residual, residual_bias, w, b, eps):
    import cupy as cp
    N, C = x.shape
    bf16 = registry.bf16_activations()
    out = cp.empty((N, C), dtype=cp.uint16 if bf16 else cp.float32)
    mean = cp.empty((N,), dtype=cp.float32)
    rstd = cp.empty((N,), dtype=cp.float32)
    h = cp.empty((N, C), dtype=cp.float32) if residual is not None else None
    grid, block = rows_per_warp(N, 8)
    launch("layernorm", "layernorm_forward", grid, block,
           (NULL if bf16 else out, out if bf16 else NULL, mean, rstd, NULL if h is None else h, x,
            NULL if residual is None else residual, NULL if residual_bias is None else residual_bias, w, b,
            np.int32(N), np.int32(C), np.float32(eps)))
    return out, h, (x if h is None else h, w, mean, rstd)


def _backward(dout, saved, dres):
    import cupy as cp
    h, w, mean, rstd = saved
    N, C = h.shape
    dout = cp.ascontiguousarray(dout, dtype=cp.float32)
    nw, rows_per_block, nblocks, smem = layernorm_backward_config(N, C, num_sms())
    dw_partial = cp.empty((nblocks, C), dtype=cp.float32)
    db_partial = cp.empty((nblocks, C), dtype=cp.float32)
    dh = cp.empty((N, C), dtype=cp.float32)
    launch("layernorm", "layernorm_backward", (nblocks,), (32 * nw,),
           (dh, dw_partial, db_partial, dout, h, mean, rstd, w,
            NULL if dres is None else cp.ascontiguousarray(dres, dtype=cp.float32),
            np.int32(N), np.int32(C), np.int32(rows_per_block)), shared_mem=smem)
    dw = cp.empty((C,), dtype=cp.float32)
    db = cp.empty((C,), dtype=cp.float32)
    grid, block = elementwise(C)
    launch("layernorm", "layernorm_param_reduce", grid, block,
           (dw, db, dw_partial, db_partial, np.int32(nblocks), np.int32(C)))
    return dh, dw, db


def layernorm_forward(x, w, b, eps=1e-5):
    """x (N, C), w (C,), b (C,) -> y (N, C)."""
    import cupy as cp
    out, _, saved = _forward(cp.ascontiguousarray(x, dtype=cp.float32), None, None, w, b, eps)
    return out, saved


def layernorm_backward(dy, saved):
    """dy (N, C) -> dx (N, C), dw (C,), db (C,)."""
    return _backward(dy, saved, None)


def residual_layernorm_forward(x, residual, residual_bias, w, b, eps=1e-5):
    """x, residual (N, C), residual_bias (C,) or None -> ((h = x + residual + bias, y = layernorm(h)), saved),
    one pass."""
    import cupy as cp
    out, h, saved = _forward(cp.ascontiguousarray(x, dtype=cp.float32),
                             cp.ascontiguousarray(residual, dtype=cp.float32), residual_bias, w, b, eps)
    return (h, out), (saved, residual_bias is not None)


def residual_layernorm_backward(douts, saved):
    """(dh or None, dy) -> (dx, dresidual, dresidual_bias or None, dw, db); dx is dresidual (one array:
    dh + d layernorm); the bias gradient is its column sum (a matrix-vector product, as linear's db was)."""
    from ..ops.reductions import sum_rows
    saved, has_bias = saved
    dh_in, dy = douts
    dh, dw, db = _backward(dy, saved, dh_in)
    return dh, dh, (sum_rows(dh) if has_bias else None), dw, db


def residual_add_forward(x, r, bias):
    """x, r (N, C) float32, bias (C,) -> h = x + (r + bias) (N, C), one pass."""
    import cupy as cp
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    r = cp.ascontiguousarray(r, dtype=cp.float32)
    h = cp.empty_like(x)
    grid, block = elementwise(x.size)
    launch("layernorm", "residual_bias_add", grid, block, (h, x, r, bias, np.int64(x.size), np.int32(x.shape[-1])))
    return h, None


def residual_add_backward(dout, saved):
    """dout (N, C) -> (dx, dr, dbias): an add passes dout to both summands; the bias gets its column sums."""
    from ..ops.reductions import sum_rows
    return dout, dout, sum_rows(dout)
