"""The residual connection: out = a + b.

Backward: d out / d a = d out / d b = identity, so both inputs receive dout unchanged. (The tape never
modifies an intermediate gradient in place, so handing the same array to both is safe.)

The model itself adds its residual branches inside residual_layernorm (ops/layernorm.py: the add and the
layernorm after it, with the bias of the matmul that made the branch, in one op); `add` is the plain sum.
"""
from ..tensor import Tensor, record


def add(a: Tensor, b: Tensor) -> Tensor:
    """a + b for tensors of the same shape, e.g. the residual stream x + attn(ln(x)) (B, T, C)."""
    if a.shape != b.shape:
        raise ValueError(f"add needs equal shapes, got {a.shape} and {b.shape}")
    return record(Tensor(a.data + b.data), (a, b), lambda dout: (dout, dout))
