"""GPU layernorm: layernorm.cu behind the `layernorm` op contract, plus the fused `residual_layernorm`.

residual_layernorm (references.residual_layernorm_forward/backward give the NumPy meaning):
    forward(x, residual, residual_bias, w, b, eps) -> ((h, y), saved)
        h = x + residual + residual_bias (the bias of the matmul that made `residual`; may be None),
        y = layernorm(h)
    backward((dh, dy), saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False)
            -> (dx, dresidual, dresidual_bias, dw, db)
        dx = dresidual = dh + layernorm_backward(dy) (dh may be None),
        dresidual_bias = that summed over rows (None without a bias), in the same pass (per-block partial sums)
        dw, db, dresidual_bias are ADDED into the *_into buffers when given (the model's flat gradient buffer,
        docs/CONTRACTS.md) and then returned as None
        bf16_dr (a hint, like linear's bf16_dx): when the matmuls run in bf16, dresidual is bf16 bits for the
        c_proj gemm that made the residual and reads it as dy

The residual stream in bf16. With bf16 activations (registry.bf16_activations(): the matmuls read bf16) y is
written as bf16 bits (uint16) for the next matmul, and so is the residual stream h: one rounding per block
boundary. The kernel adds x + residual + bias in float32, rounds the sum once to bf16, stores it, and normalises
the ROUNDED h (the backward recomputes xhat from the stored h, so both see the same input). The first ln_1
(residual None) stores the embedding's float32 output as bf16 the same way: from there on every block reads and
writes a bf16 stream. Why: the stream is read and written at every block boundary, forward and backward; in bf16
that is half the bytes (~1.8 GB less per GPT-2 step, benchmarks/gpu_model.py), as llm.c does.
The backward follows: dh_total = dh + layernorm_backward(dy) is float32 math, stored once. A gradient's dtype
follows the input it belongs to: a bf16 x (the stream) gets bf16 dx, a float32 x (the embedding's output) float32
dx; dresidual is bf16 with bf16_dr, else float32 (dropout's float32 output). When x and the residual want the
same dtype, dx and dresidual are one array (in bf16: the stream's gradient and c_proj's dy, no copy); otherwise
the kernel writes both in its one pass. The saved statistics and the bias and weight gradients stay float32.
The forward reads x and the residual, and the backward dy, h and the incoming dh, as float32 or as bf16 bits.
In float32 precision everything is float32, as before.
"""
import numpy as np

from . import precision, registry
from .compile import launch, num_sms
from .launch import NULL, SMEM_DEFAULT, elementwise, layernorm_backward_config, rows_per_warp


def _bits_or_float32(a):
    """An activation as the kernels read it: bf16 bits (uint16) as they are, anything else as float32; C-contiguous.
    Usually it already is both: then `a` itself, with no CuPy call (precision.dense)."""
    import cupy as cp
    if a.dtype != cp.uint16 and a.dtype != cp.float32:
        a = a.astype(cp.float32)
    return precision.dense(a)


def _f32_bf16(a):
    """(float32 pointer, bf16 pointer) for a kernel argument pair: the one that matches a's dtype, NULL the other."""
    if a is None:
        return NULL, NULL
    return (a, NULL) if a.dtype != np.uint16 else (NULL, a)


def _forward(x, residual, residual_bias, w, b, eps, h_bf16=False):
    """x (float32 or bf16 bits), residual (float32, bf16 bits or None) -> (y, h or None, saved). With a residual
    and bf16 activations h is stored as bf16 bits (rounded once) and the layernorm normalises that rounded h;
    h_bf16 without a residual: h is x rounded to bf16 (and normalised as such)."""
    import cupy as cp
    N, C = x.shape
    bf16 = registry.bf16_activations()
    out = cp.empty((N, C), dtype=cp.uint16 if bf16 else cp.float32)
    mean = cp.empty((N,), dtype=cp.float32)
    rstd = cp.empty((N,), dtype=cp.float32)
    h = None
    if residual is not None or h_bf16:
        h = cp.empty((N, C), dtype=cp.uint16 if bf16 or h_bf16 else cp.float32)
    grid, block = rows_per_warp(N, 8)
    launch("layernorm", "layernorm_forward", grid, block,
           (*_f32_bf16(out), mean, rstd, *_f32_bf16(h), *_f32_bf16(x), *_f32_bf16(residual),
            NULL if residual_bias is None else residual_bias, w, b, np.int32(N), np.int32(C), np.float32(eps)))
    return out, h, (x if h is None else h, w, mean, rstd)


def _backward(dout, saved, dres, dw_into=None, db_into=None, column_sum=False, dsum_into=None, float32_dh=True,
              bf16_dh=False):
    """-> (dh or None, dh_bf16 or None, [dw, db, dsum]): dh = layernorm backward of dout (+ dres), written as
    float32 (float32_dh) and/or as bf16 bits (bf16_dh), and the column sums dw, db (and dsum = sum_rows dh when
    column_sum). A sum with a buffer (`*_into`) is ADDED into it and comes back as None; without one it comes back
    as a new array. h (saved) and dres may be float32 or bf16 bits."""
    import cupy as cp
    h, w, mean, rstd = saved
    N, C = h.shape
    dout = _bits_or_float32(dout)                      # float32, or bf16 bits a bf16 matmul wrote
    # the column sum of dh in the same pass needs a third shared-memory row per warp: up to C = 4096 in 48 KB;
    # above that it is one gemm afterwards
    fused_sum = column_sum and 4 * 3 * C <= SMEM_DEFAULT
    n_sums = 3 if fused_sum else 2
    float32_dh = float32_dh or (column_sum and not fused_sum)      # that gemm reads float32
    nw, rows_per_block, nblocks, smem = layernorm_backward_config(N, C, num_sms(), n_sums=n_sums)
    partial = cp.empty((n_sums, nblocks, C), dtype=cp.float32)
    dh = cp.empty((N, C), dtype=cp.float32) if float32_dh else None
    dh_bf16 = cp.empty((N, C), dtype=cp.uint16) if bf16_dh else None
    launch("layernorm", "layernorm_backward", (nblocks,), (32 * nw,),
           (NULL if dh is None else dh, NULL if dh_bf16 is None else dh_bf16, partial, *_f32_bf16(dout),
            *_f32_bf16(h), mean, rstd, w, *_f32_bf16(None if dres is None else _bits_or_float32(dres)),
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
    one pass. x and residual may be float32 or bf16 bits; with bf16 activations h is bf16 bits (rounded once,
    and y is the layernorm of that rounded h), else float32. residual None: h is x (not copied), y = layernorm(x);
    with bf16 activations and a float32 x (the embedding's output), h is x rounded to bf16 and y its layernorm."""
    import cupy as cp
    x = _bits_or_float32(x)                            # float32, or bf16 bits: the previous block's h
    if residual is None:                               # the stream starts here: in bf16 precision stored as bf16
        out, h, saved = _forward(x, None, None, w, b, eps,
                                 h_bf16=registry.bf16_activations() and x.dtype != cp.uint16)
        return (x if h is None else h, out), (saved, False, x.dtype, False)
    residual = _bits_or_float32(residual)              # float32, or bf16 bits from a bf16 matmul
    out, h, saved = _forward(x, residual, residual_bias, w, b, eps)
    return (h, out), (saved, residual_bias is not None, x.dtype, True)


def residual_layernorm_backward(douts, saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False):
    """(dh or None, dy) -> (dx, dresidual, dresidual_bias or None, dw, db), one pass: dh_total = dh + d
    layernorm(dy), float32 math, stored once per dtype wanted. A gradient's dtype follows its input: dx is float32
    for a float32 x (the embedding's output) and bf16 bits for a bf16 x (the residual stream h in bf16);
    dresidual is bf16 bits with bf16_dr when the matmuls run in bf16 (the c_proj that made the residual reads it
    as its dy), else float32. When both want the same dtype they are the same array (no copy); otherwise the
    kernel writes both in its one pass. The bias gradient is dh_total's column sum (float32, unrounded). dw, db,
    dresidual_bias are added into the *_into buffers when given (then None). dh may be bf16 bits."""
    import cupy as cp
    saved, has_bias, x_dtype, has_residual = saved
    dh_in, dy = douts
    x_bf16 = x_dtype == cp.uint16
    r_bf16 = has_residual and bf16_dr and registry.bf16_activations()
    dx, dx_bf16, sums = _backward(dy, saved, dh_in, dw_into, db_into, column_sum=has_bias, dsum_into=drb_into,
                                  float32_dh=not x_bf16 or (has_residual and not r_bf16),
                                  bf16_dh=x_bf16 or r_bf16)
    dw, db, drb = sums if has_bias else sums + [None]
    dx, dr = (dx_bf16 if x_bf16 else dx), (dx_bf16 if r_bf16 else dx)
    return dx, (dr if has_residual else dx), drb, dw, db        # without a residual dresidual is just dx
