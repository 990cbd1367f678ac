"""GELU in the tanh form GPT-2 was trained with.

Forward:   y = 0.5 * x * (1 + tanh(u)),   u = s * (x + a * x^3),   s = sqrt(2 / pi),  a = 0.044715
Backward:  dy/dx = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx,   du/dx = s * (1 + 3 a x^2)
           (product rule on 0.5 * x * (1 + tanh(u)), and tanh' = 1 - tanh^2)
Bias + GELU: y = gelu(x + b) for the MLP's first layer, whose bias add the GPU fuses into the GELU pass:
           dx = dy * gelu'(x + b),  db = dx summed over the rows; db is added into the bias's gradient buffer
           when it has one (db_into, docs/CONTRACTS.md), as the linear layers do with theirs.
On the GPU in bf16 precision x and dy may arrive as bf16 bits (uint16; c_fc's and mlp.c_proj's gemms write
them, model.py): the kernels read them directly; this reference widens them (exactly) first.
"""
import math

from .. import backend
from ..kernels.bf16 import widen_bf16
from ..tensor import Tensor, record
from .dispatch import implementation
from .reductions import add_into, sum_rows

_S = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_forward(x):
    """x (any shape) -> y (same shape).
    Written with in-place operations (out=, *=): GELU is memory-bound, and every avoided temporary array
    is one less pass over memory."""
    xp = backend.xp_of(x)
    tanh_u = x * x                                  # x^2
    tanh_u *= _A                                    # a x^2
    tanh_u += 1.0                                   # 1 + a x^2
    tanh_u *= x                                     # x + a x^3
    tanh_u *= _S                                    # u
    xp.tanh(tanh_u, out=tanh_u)                     # tanh(u)
    y = tanh_u + 1.0
    y *= x
    y *= 0.5                                        # 0.5 x (1 + tanh(u))
    return y, (x, tanh_u)          # keep tanh(u): backward then needs no second tanh


def gelu_backward(dy, saved):
    """dy -> dx (same shape)."""
    x, tanh_u = saved
    du_dx = x * x
    du_dx *= 3.0 * _A * _S
    du_dx += _S                                     # s (1 + 3 a x^2)
    local = tanh_u * tanh_u
    local -= 1.0
    local *= du_dx
    local *= x                                      # -x (1 - tanh^2) du/dx
    local -= 1.0
    local -= tanh_u                                 # -(1 + tanh) - x (1 - tanh^2) du/dx
    local *= -0.5 * dy                              # dy * (0.5 (1 + tanh) + 0.5 x (1 - tanh^2) du/dx)
    return (local,)


def gelu(x: Tensor) -> Tensor:
    forward, backward = implementation("gelu", x.data, gelu_forward, gelu_backward)
    y, saved = forward(x.data)
    return record(Tensor(y), (x,), lambda dout: backward(dout, saved))


def bias_gelu_forward(x, b):
    """x (N, C), b (C,) -> gelu(x + b)."""
    return gelu_forward(widen_bf16(x) + b)


def bias_gelu_backward(dy, saved, db_into=None):
    """dy (N, C) -> dx (N, C), db (C,) (None after adding it into db_into)."""
    (dx,) = gelu_backward(widen_bf16(dy), saved)
    return dx, add_into(db_into, sum_rows(dx))


def bias_gelu(x: Tensor, b: Tensor) -> Tensor:
    """gelu(x + b) for x (..., C) and a bias b (C,)."""
    C = x.shape[-1]
    forward, backward = implementation("bias_gelu", x.data, bias_gelu_forward, bias_gelu_backward)
    y, saved = forward(x.data.reshape(-1, C), b.data)

    def backward_fn(dout):
        dx, db = backward(dout.reshape(-1, C), saved, db_into=b.grad_buffer())
        return dx.reshape(x.shape), db                  # db None: already in the bias's gradient buffer

    return record(Tensor(y.reshape(x.shape)), (x, b), backward_fn)
