"""GPU layernorm: layernorm.cu behind the `layernorm` op contract, plus the fused `residual_layernorm`.

residual_layernorm (references.residual_layernorm_forward/backward give the NumPy meaning):
    forward(x, residual, residual_bias, w, b, eps) -> ((h, y), saved)
        h = x + residual + residual_bias (the bias of the matmul that made `residual`; may be None),
        y = layernorm(h)
    backward((dh, dy), saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False)
            -> (dx, dresidual, dresidual_bias, dw, db)
        dx = dresidual = dh + layernorm_backward(dy) (the same array twice; dh may be None),
        dresidual_bias = dx summed over rows (None without a bias), in the same pass (per-block partial sums)
        dw, db, dresidual_bias are ADDED into the *_into buffers when given (the model's flat gradient buffer,
        docs/CONTRACTS.md) and then returned as None
        bf16_dr (a hint, like linear's bf16_dx): when the matmuls run in bf16, dresidual is a bf16 copy of dx
        (uint16 bits, written in the same pass) for the c_proj gemm that made the residual and reads it as dy

With bf16 activations (registry.bf16_activations(): the matmuls read bf16) y is written as bf16 bits (uint16)
for the next matmul; h, the saved statistics and the backward's float32 results stay float32 (the bf16 dresidual
is an extra copy). The forward reads the residual, and the backward dy, as float32 or as bf16 bits (uint16, from a
bf16 matmul's bf16_out / bf16_dx).
"""
import numpy as np

from . import precision, registry
from .compile import launch, num_sms
from .launch import NULL, SMEM_DEFAULT, elementwise, layernorm_backward_config, rows_per_warp


def _forward(x, residual, residual_bias, w, b, eps):
    import cupy as cp
    N, C = x.shape
    bf16 = registry.bf16_activations()
    out = cp.empty((N, C), dtype=cp.uint16 if bf16 else cp.float32)
    mean = cp.empty((N,), dtype=cp.float32)
    rstd = cp.empty((N,), dtype=cp.float32)
    h = cp.empty((N, C), dtype=cp.float32) if residual is not None else None
    residual_is_bf16 = residual is not None and residual.dtype == cp.uint16     # bits a bf16 matmul wrote
    grid, block = rows_per_warp(N, 8)
    launch("layernorm", "layernorm_forward", grid, block,
           (NULL if bf16 else out, out if bf16 else NULL, mean, rstd, NULL if h is None else h, x,
            NULL if residual is None or residual_is_bf16 else residual, residual if residual_is_bf16 else NULL,
            NULL if residual_bias is None else residual_bias, w, b, np.int32(N), np.int32(C), np.float32(eps)))
    return out, h, (x if h is None else h, w, mean, rstd)


def _backward(dout, saved, dres, dw_into=None, db_into=None, column_sum=False, dsum_into=None, bf16_copy=False):
    """-> (dh, dh_bf16 or None, [dw, db, dsum]): dh = layernorm backward of dout (+ dres), dh_bf16 its bf16 copy
    when bf16_copy, and the column sums dw, db (and dsum = sum_rows dh when column_sum). A sum with a buffer
    (`*_into`) is ADDED into it and comes back as None; without one it comes back as a new array."""
    import cupy as cp
    h, w, mean, rstd = saved
    N, C = h.shape
    dout = cp.ascontiguousarray(dout)                  # float32, or bf16 bits a bf16 matmul wrote
    bf16_dout = dout.dtype == cp.uint16
    if not bf16_dout:
        dout = dout.astype(cp.float32, copy=False)
    # the column sum of dh in the same pass needs a third shared-memory row per warp: up to C = 4096 in 48 KB;
    # above that it is one gemm afterwards
    fused_sum = column_sum and 4 * 3 * C <= SMEM_DEFAULT
    n_sums = 3 if fused_sum else 2
    nw, rows_per_block, nblocks, smem = layernorm_backward_config(N, C, num_sms(), n_sums=n_sums)
    partial = cp.empty((n_sums, nblocks, C), dtype=cp.float32)
    dh = cp.empty((N, C), dtype=cp.float32)
    dh_bf16 = cp.empty((N, C), dtype=cp.uint16) if bf16_copy else None
    launch("layernorm", "layernorm_backward", (nblocks,), (32 * nw,),
           (dh, NULL if dh_bf16 is None else dh_bf16, partial, NULL if bf16_dout else dout,
            dout if bf16_dout else NULL, h, mean, rstd, w,
            NULL if dres is None else cp.ascontiguousarray(dres, dtype=cp.float32),
            np.int32(n_sums), np.int32(N), np.int32(C), np.int32(rows_per_block)), shared_mem=smem)
    intos = [dw_into, db_into] + ([dsum_into] if fused_sum else [])
    outs = [cp.zeros((C,), dtype=cp.float32) if into is None else into for into in intos]   # the kernel adds
    grid, block = elementwise(C)
    launch("layernorm", "layernorm_param_reduce", grid, block,
           (outs[0], outs[1], outs[2] if fused_sum else NULL, partial, np.int32(nblocks), np.int32(C)))
    sums = [None if into is not None else out for into, out in zip(intos, outs)]
    if column_sum and not fused_sum:
        sums.append(precision.sum_rows(dh, into=dsum_into))
    return dh, dh_bf16, sums


def layernorm_forward(x, w, b, eps=1e-5):
    """x (N, C), w (C,), b (C,) -> y (N, C)."""
    import cupy as cp
    out, _, saved = _forward(cp.ascontiguousarray(x, dtype=cp.float32), None, None, w, b, eps)
    return out, saved


def layernorm_backward(dy, saved, dw_into=None, db_into=None):
    """dy (N, C) -> dx (N, C), dw (C,), db (C,); dw / db are added into dw_into / db_into when given (then None)."""
    dx, _, (dw, db) = _backward(dy, saved, None, dw_into, db_into)
    return dx, dw, db


def residual_layernorm_forward(x, residual, residual_bias, w, b, eps=1e-5):
    """x, residual (N, C), residual_bias (C,) or None -> ((h = x + residual + bias, y = layernorm(h)), saved),
    one pass. residual None: h is x (not copied), y = layernorm(x)."""
    import cupy as cp
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    if residual is None:
        out, _, saved = _forward(x, None, None, w, b, eps)
        return (x, out), (saved, False)
    residual = cp.ascontiguousarray(residual)          # float32, or bf16 bits (uint16) from a bf16 matmul
    if residual.dtype != cp.uint16:
        residual = residual.astype(cp.float32, copy=False)
    out, h, saved = _forward(x, residual, residual_bias, w, b, eps)
    return (h, out), (saved, residual_bias is not None)


def residual_layernorm_backward(douts, saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False):
    """(dh or None, dy) -> (dx, dresidual, dresidual_bias or None, dw, db), one pass: dx = dh + d layernorm(dy)
    (float32, the residual stream), dresidual the same array, or its bf16 copy with bf16_dr when the matmuls run
    in bf16 (the c_proj that made the residual reads it as its dy), and the bias gradient its column sum. dw, db,
    dresidual_bias are added into the *_into buffers when given (then None)."""
    saved, has_bias = saved
    dh_in, dy = douts
    dx, dx_bf16, sums = _backward(dy, saved, dh_in, dw_into, db_into, column_sum=has_bias, dsum_into=drb_into,
                                  bf16_copy=bf16_dr and registry.bf16_activations())
    dw, db, drb = sums if has_bias else sums + [None]
    return dx, (dx if dx_bf16 is None else dx_bf16), drb, dw, db
