"""GPU GELU: gelu.cu behind the `gelu` op contract, plus the fused `bias_gelu`.

bias_gelu (references.bias_gelu_forward/backward give the NumPy meaning):
    forward(x (N, C), b (C,)) -> (gelu(x + b), saved)
    backward(dout, saved, db_into=None) -> (dx, db)   db = dx summed over rows, fused into the same pass;
        given db_into (the bias's slice of the flat gradient buffer) db is ADDED into it and returned as None
        (docs/CONTRACTS.md)

With bf16 activations (registry.bf16_activations()) the forward output and bias_gelu's dx are written as bf16
bits (uint16): each only feeds a bf16 matmul (c_proj; c_fc's backward, whose bias gradient db is summed here
in float32). The unbiased gelu_backward stays float32.

bf16 inputs: bias_gelu also reads x as bf16 bits (c_fc's gemm wrote it, linear(..., bf16_out=True)) and keeps
that bf16 x for the backward, which then reads dout as bf16 bits too (mlp.c_proj's gemm, bf16_dx=True): the
*_bf16x / *_bf16 kernels of gelu.cu, the same float32 arithmetic on exactly widened inputs.
"""
import numpy as np

from . import registry
from .compile import launch, num_sms
from .launch import NULL, column_chunks, elementwise


def _fwd(x, b):
    """x float32 or bf16 bits (uint16) -> (out, the contiguous x the kernel read)."""
    import cupy as cp
    bf16_in = x.dtype == cp.uint16
    x = cp.ascontiguousarray(x) if bf16_in else cp.ascontiguousarray(x, dtype=cp.float32)
    bf16 = registry.bf16_activations()
    out = cp.empty(x.shape, dtype=cp.uint16 if bf16 else cp.float32)
    outs = (NULL, out) if bf16 else (out, NULL)         # (float32 out, bf16 out): the kernel writes one
    n = x.size
    C = x.shape[-1] if b is not None else 1            # the bias index is i % C (unused without a bias)
    aligned = x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0 and (b is None or b.data.ptr % 16 == 0)
    if n % 4 == 0 and (b is None or C % 4 == 0) and aligned:   # float4 loads need 16-byte alignment
        C4 = C // 4 if b is not None else 1
        grid, block = elementwise(n // 4)
        launch("gelu", "gelu_forward_bf16x4" if bf16_in else "gelu_forward_f4", grid, block,
               (*outs, x, NULL if b is None else b, np.int64(n // 4), np.int32(C4)))
    else:
        grid, block = elementwise(n)
        launch("gelu", "gelu_forward_bf16x" if bf16_in else "gelu_forward", grid, block,
               (*outs, x, NULL if b is None else b, np.int64(n), np.int32(C)))
    return out, x


def gelu_forward(x):
    """x (any shape) -> y (same shape). The unbiased backward reads float32: a bf16 x is widened here."""
    from .precision import as_float32
    out, x = _fwd(as_float32(x), None)
    return out, (x,)


def gelu_backward(dy, saved):
    """dy -> (dx,)."""
    import cupy as cp
    (x,) = saved
    dy = cp.ascontiguousarray(dy, dtype=cp.float32)
    dx = cp.empty_like(x)
    grid, block = elementwise(x.size)
    launch("gelu", "gelu_backward", grid, block, (dx, dy, x, np.int64(x.size)))
    return (dx,)


def bias_gelu_forward(x, b):
    """x (N, C) float32 or bf16 bits, b (C,) -> gelu(x + b) (N, C)."""
    out, x = _fwd(x, b)
    return out, (x, b, out.dtype == np.uint16)      # the backward writes dx in the same dtype as the forward


def bias_gelu_backward(dy, saved, db_into=None):
    """dy (N, C) -> (dx (N, C), db (C,), or None after adding it into db_into).
    With a bf16 x (saved by the forward) dy is read as bf16 too: a bf16 dy as it is, a float32 one rounded
    (precision.as_bf16); with a float32 x, dy is read as float32 (a bf16 dy widened)."""
    import cupy as cp
    from . import precision
    x, b, bf16_out = saved
    N, C = x.shape
    if x.dtype == cp.uint16:
        dy, kernel = cp.ascontiguousarray(precision.as_bf16(dy)), "bias_gelu_backward_bf16"
    else:
        dy = cp.ascontiguousarray(precision.as_float32(dy), dtype=cp.float32)
        kernel = "bias_gelu_backward"
    dx = cp.empty(x.shape, dtype=cp.uint16 if bf16_out else cp.float32)
    grid, block, rows_per_chunk = column_chunks(N, C, num_sms())
    partial = cp.empty((grid[1], C), dtype=cp.float32)
    launch("gelu", kernel, grid, block,
           ((NULL, dx) if bf16_out else (dx, NULL))
           + (partial, dy, x, b, np.int32(N), np.int32(C), np.int32(rows_per_chunk)))
    if db_into is not None:
        assert db_into.shape == (C,) and db_into.dtype == cp.float32 and db_into.flags.c_contiguous
    db = cp.empty((C,), dtype=cp.float32) if db_into is None else db_into
    g2, b2 = elementwise(C)
    launch("gelu", "column_sum_finish", g2, b2,
           (db, partial, np.int32(grid[1]), np.int32(C), np.int32(db_into is not None)))   # add_into: 1 or 0
    return dx, (db if db_into is None else None)
