"""GPU layernorm: layernorm.cu behind the `layernorm` op contract, plus the fused `residual_layernorm`.

residual_layernorm (references.residual_layernorm_forward/backward give the NumPy meaning):
    forward(x, residual, w, b, eps) -> ((h, y), saved)      h = x + residual, y = layernorm(h)
    backward((dh, dy), saved) -> (dx, dresidual, dw, db)     dx = dresidual = dh + layernorm_backward(dy)
                                                             (the same array twice; dh may be None)
"""
import numpy as np

from .compile import launch, num_sms
from .launch import NULL, elementwise, layernorm_backward_config, rows_per_warp


def _forward(x, residual, w, b, eps):
    import cupy as cp
    N, C = x.shape
    out = cp.empty((N, C), dtype=cp.float32)
    mean = cp.empty((N,), dtype=cp.float32)
    rstd = cp.empty((N,), dtype=cp.float32)
    h = cp.empty((N, C), dtype=cp.float32) if residual is not None else None
    grid, block = rows_per_warp(N, 8)
    launch("layernorm", "layernorm_forward", grid, block,
           (out, mean, rstd, NULL if h is None else h, x, NULL if residual is None else residual, w, b,
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
    out, _, saved = _forward(cp.ascontiguousarray(x, dtype=cp.float32), None, w, b, eps)
    return out, saved


def layernorm_backward(dy, saved):
    """dy (N, C) -> dx (N, C), dw (C,), db (C,)."""
    return _backward(dy, saved, None)


def residual_layernorm_forward(x, residual, w, b, eps=1e-5):
    """x, residual (N, C) -> ((h = x + residual, y = layernorm(h)), saved), one pass."""
    import cupy as cp
    out, h, saved = _forward(cp.ascontiguousarray(x, dtype=cp.float32),
                             cp.ascontiguousarray(residual, dtype=cp.float32), w, b, eps)
    return (h, out), saved


def residual_layernorm_backward(douts, saved):
    """(dh or None, dy) -> (dx, dresidual, dw, db); dx is dresidual (one array: dh + d layernorm)."""
    dh_in, dy = douts
    dh, dw, db = _backward(dy, saved, dh_in)
    return dh, dh, dw, db
