"""Sums written as matrix-vector products with a vector of ones.

    column sums of x (N, C):      ones(N) @ x        -> (C,)
    row sums of x (..., C):       x @ ones(C)        -> (...)

The result is the same as x.sum(axis=...), but BLAS (cuBLAS on the GPU) computes a matrix-vector product
several times faster than NumPy's general-purpose reduction, and the ops sum over rows and columns a lot
(bias gradients, layernorm statistics, softmax denominators). The ones vectors are cached per size.
"""
from .. import backend
from ..tensor import fresh_grads

_ones_cache = {}


def ones(n, like):
    """A cached vector of n ones of like's dtype, on like's device (do not write into it)."""
    xp = backend.xp_of(like)
    key = (n, str(like.dtype), xp.__name__)
    if key not in _ones_cache:
        _ones_cache[key] = xp.ones(n, dtype=like.dtype)
    return _ones_cache[key]


def sum_rows(x):
    """(N, C) -> (C,): the sum over the rows (axis 0), e.g. a bias gradient. On the GPU a float32 x goes through
    precision.gemm (exact float32: tf32=False), the project's own cuBLAS call, which a CUDA graph can capture
    (CuPy's `@` cannot: kernels/cublas_ctypes.py)."""
    if backend.is_gpu_array(x) and x.dtype == "float32" and x.ndim == 2:
        from ..kernels import precision
        return precision.sum_rows(x)                  # (1, N) ones @ (N, C) -> (C,), one gemm
    return ones(x.shape[0], x) @ x


def add_into(buffer, g):
    """g, or None after adding g into buffer (a gradient buffer, docs/CONTRACTS.md `*_into`): buffer += g, or
    buffer[...] = g as the step's first write of a fresh buffer (GPU: tensor.fresh_grads; 0 + g is g).
    (NumPy's matmul cannot accumulate into its output, so on the CPU the add is a second pass.)"""
    if buffer is None:
        return g
    fresh_grads.add(buffer, g)
    return None


def sum_last(x, keepdims=True):
    """(..., C) -> (..., 1): the sum over the last axis."""
    s = x @ ones(x.shape[-1], x)
    return s[..., None] if keepdims else s


def mean_last(x, keepdims=True):
    """(..., C) -> (..., 1): the mean over the last axis."""
    return sum_last(x, keepdims) * (1.0 / x.shape[-1])
