"""GPU GELU: gelu.cu behind the `gelu` op contract, plus the fused `bias_gelu`.

bias_gelu (references.bias_gelu_forward/backward give the NumPy meaning):
    forward(x (N, C), b (C,)) -> (gelu(x + b), saved)
    backward(dout, saved) -> (dx, db)        db = dx summed over rows, fused into the same pass

With bf16 activations (registry.bf16_activations()) the forward output and bias_gelu's dx are written as bf16
bits (uint16): each only feeds a bf16 matmul (c_proj; c_fc's backward, whose bias gradient db is summed here
in float32). The unbiased gelu_backward stays float32.
"""
import numpy as np

from . import registry
from .compile import launch, num_sms
from .launch import NULL, column_chunks, elementwise


def _fwd(x, b):
    import cupy as cp
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    bf16 = registry.bf16_activations()
    out = cp.empty(x.shape, dtype=cp.uint16 if bf16 else cp.float32)
    outs = (NULL, out) if bf16 else (out, NULL)         # (float32 out, bf16 out): the kernel writes one
    n = x.size
    C = x.shape[-1] if b is not None else 1            # the bias index is i % C (unused without a bias)
    aligned = x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0 and (b is None or b.data.ptr % 16 == 0)
    if n % 4 == 0 and (b is None or C % 4 == 0) and aligned:   # float4 loads need 16-byte alignment
        C4 = C // 4 if b is not None else 1
        grid, block = elementwise(n // 4)
        launch("gelu", "gelu_forward_f4", grid, block, (*outs, x, NULL if b is None else b, np.int64(n // 4), np.int32(C4)))
    else:
        grid, block = elementwise(n)
        launch("gelu", "gelu_forward", grid, block, (*outs, x, NULL if b is None else b, np.int64(n), np.int32(C)))
    return out, x


def gelu_forward(x):
    """x (any shape) -> y (same shape)."""
    out, x = _fwd(x, None)
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
    """x (N, C), b (C,) -> gelu(x + b) (N, C)."""
    out, x = _fwd(x, b)
    return out, (x, b, out.dtype == np.uint16)      # the backward writes dx in the same dtype as the forward


def bias_gelu_backward(dy, saved):
    """dy (N, C) -> (dx (N, C), db (C,))."""
    import cupy as cp
    x, b, bf16 = saved
    N, C = x.shape
    dy = cp.ascontiguousarray(dy, dtype=cp.float32)
    dx = cp.empty(x.shape, dtype=cp.uint16 if bf16 else cp.float32)
    grid, block, rows_per_chunk = column_chunks(N, C, num_sms())
    partial = cp.empty((grid[1], C), dtype=cp.float32)
    launch("gelu", "bias_gelu_backward", grid, block,
           ((NULL, dx) if bf16 else (dx, NULL)) + (partial, dy, x, b, np.int32(N), np.int32(C), np.int32(rows_per_chunk)))
    db = cp.empty((C,), dtype=cp.float32)
    g2, b2 = elementwise(C)
    launch("gelu", "column_sum_finish", g2, b2, (db, partial, np.int32(grid[1]), np.int32(C)))
    return dx, db
