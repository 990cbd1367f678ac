"""GELU in the tanh form GPT-2 was trained with.

Forward:   y = 0.5 * x * (1 + tanh(u)),   u = s * (x + a * x^3),   s = sqrt(2 / pi),  a = 0.044715
Backward:  dy/dx = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx,   du/dx = s * (1 + 3 a x^2)
           (product rule on 0.5 * x * (1 + tanh(u)), and tanh' = 1 - tanh^2)
"""
import math

from .. import backend
from ..tensor import Tensor, record
from .dispatch import implementation

_S = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_forward(x):
    """x (any shape) -> y (same shape)."""
    xp = backend.xp_of(x)
    tanh_u = xp.tanh(_S * (x + _A * x * x * x))
    y = 0.5 * x * (1.0 + tanh_u)
    return y, (x, tanh_u)          # keep tanh(u): backward then needs no second tanh


def gelu_backward(dy, saved):
    """dy -> dx (same shape)."""
    x, tanh_u = saved
    du_dx = _S * (1.0 + 3.0 * _A * x * x)
    local = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx
    return (dy * local,)


def gelu(x: Tensor) -> Tensor:
    forward, backward = implementation("gelu", x.data, gelu_forward, gelu_backward)
    y, saved = forward(x.data)
    return record(Tensor(y), (x,), lambda dout: backward(dout, saved))
