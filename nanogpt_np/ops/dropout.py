"""Inverted dropout: during training zero each element with probability p, scale the rest by 1/(1-p).

Forward:   mask = (uniform >= p) / (1 - p),   y = x * mask       (expected value of y equals x)
Backward:  dy/dx = mask, so dx = dy * mask.
At p == 0 or outside training the op is the identity and records nothing.
"""
from ..tensor import Tensor, record


def dropout_forward(x, p, rng):
    """x (any shape), p in [0, 1), rng: a numpy or cupy Generator on x's device -> y."""
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) / (1.0 - p)
    return x * mask, (mask,)


def dropout_backward(dy, saved):
    (mask,) = saved
    return (dy * mask,)


def dropout(x: Tensor, p: float, rng, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    y, saved = dropout_forward(x.data, p, rng)
    return record(Tensor(y), (x,), lambda dout: dropout_backward(dout, saved))
