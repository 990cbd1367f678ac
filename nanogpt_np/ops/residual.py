"""The residual connection: out = a + b, and the same with a bias: out = x + r + bias.

Backward: d out / d a = d out / d b = identity, so both inputs receive dout unchanged. (The tape never
modifies an intermediate gradient in place, so handing the same array to both is safe.)

With a bias (residual_add): out = x + (r + bias) where r (N, C) is a matmul's output and bias (C,) that matmul's
bias, moved here so the GPU adds both in one pass (kernels/layernorm.cu, residual_bias_add):
    dx = dr = dout,  dbias = dout summed over the rows  (bias[c] is added to every row)
"""
from ..tensor import Tensor, record
from .dispatch import implementation
from .reductions import sum_rows


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b for tensors of the same shape, e.g. the residual stream x + attn(ln(x)) (B, T, C)."""
    if a.shape != b.shape:
        raise ValueError(f"add needs equal shapes, got {a.shape} and {b.shape}")
    return record(Tensor(a.data + b.data), (a, b), lambda dout: (dout, dout))


def residual_add_forward(x, r, bias):
    """x, r (N, C), bias (C,) -> x + (r + bias) (N, C).  (r + bias first: the order of linear's y += b.)"""
    return x + (r + bias), None


def residual_add_backward(dout, saved):
    """dout (N, C) -> dx, dr (N, C), dbias (C,)."""
    return dout, dout, sum_rows(dout)


def residual_add(x: Tensor, r: Tensor, bias: Tensor) -> Tensor:
    """x + r + bias for x, r (..., C) and bias (C,): the residual add after a matmul whose bias moved here."""
    if x.shape != r.shape:
        raise ValueError(f"residual_add needs equal shapes, got {x.shape} and {r.shape}")
    C = x.shape[-1]
    forward, backward = implementation("residual_add", x.data, residual_add_forward, residual_add_backward)
    out, saved = forward(x.data.reshape(-1, C), r.data.reshape(-1, C), bias.data)

    def backward_fn(dout):
        dx, dr, db = backward(dout.reshape(-1, C), saved)
        return dx.reshape(x.shape), dr.reshape(x.shape), db

    return record(Tensor(out.reshape(x.shape)), (x, r, bias), backward_fn)
