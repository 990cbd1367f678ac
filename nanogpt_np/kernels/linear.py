"""The linear layers and the tied output head on the GPU: one cuBLAS gemm per product (precision.gemm).

Registered as "linear" and "lm_head" for both precisions; same contracts as ops/linear.py:
    linear:  forward(x (N, Cin), w (Cin, Cout), b or None, w_bf16=None, bf16_out=False) -> y (N, Cout)
             backward(dy, saved, dw_into=None, db_into=None, bf16_dx=False) -> dx, dw, db
    lm_head: forward(x (N, C), wte (V, C), wte_bf16=None) -> logits (N, V)
             backward(dlogits, saved, dwte_into=None) -> dx, dwte
Weight gradients: given `dw_into` (the parameter's slice of the flat gradient buffer), the gemm adds x.T @ dy
into it with beta = 1 (or, as the step's first write of that buffer, writes over it with beta = 0: the model
does not zero the matrices' gradients, tensor.fresh_grads) and the backward returns None for dw, so nothing else
touches the buffer. Bias gradients likewise, as ones(N) @ dy (a gemm with one row, exact float32).

float32 (registry.precision() == "float32"): the gemms read the float32 arrays, TF32 or exact (set_tf32).
bfloat16: the gemms read bf16 copies and accumulate in float32. The weight's copy is `w_bf16`, a view into the
model's bf16 copy of all weights (kept current by model.py, refreshed by the optimizer); without one the weight
is rounded here. Activations are rounded unless a kernel already wrote them as bf16 (uint16). The saved
activation is the bf16 copy of x: half the memory of the float32 one. Bias add and bias gradient stay float32.

bf16 results (bfloat16 precision only, hints from the model, ignored in float32): `bf16_out` asks the forward
gemm to write y as bf16 (cuBLAS rounds its float32 accumulator once), for a layer without a bias whose output
goes to a kernel that reads bf16 (c_attn -> flash attention, c_fc -> GELU): half the bytes written and read.
`bf16_dx` does the same for the input gradient dx, when the op that made x reads a bf16 gradient.
"""
import numpy as np

from . import precision, registry
from ..tensor import fresh_grads


def _matmul_operands(x, w, w_bf16):
    """(x, w) as the gemm reads them in the current precision."""
    if registry.precision() == "bfloat16":
        return precision.as_bf16(x), (w_bf16 if w_bf16 is not None else precision.to_bf16(w))
    return precision.as_float32(x), w


def _like_operands(d, operand):
    """An incoming gradient in the precision of the saved operands (bf16 when they are)."""
    return precision.as_bf16(d) if operand.dtype == np.uint16 else d


def _bias_grad(dy, db_into):
    """db = sum over the rows of dy (N, Cout) = ones(1, N) @ dy, added into db_into when given (then None)."""
    dy = precision.as_float32(dy)                            # a gradient a kernel wrote as bf16: sum it in float32
    return precision.sum_rows(dy, into=db_into)             # ones(1, N) @ dy, one exact-float32 gemm


def _weight_grad(a, d, into):
    """a.T @ d (a (N, Cin), d (N, Cout) -> (Cin, Cout)), or None after adding it into `into` (a gradient buffer)
    with the same gemm: nothing is left for the tape to add. The step's first write of the buffer overwrites it
    (beta = 0: the buffer was never zeroed, tensor.fresh_grads), a later one adds (beta = 1)."""
    if into is None:
        return precision.gemm(a, d, trans_a=True)
    beta = 0.0 if fresh_grads.should_overwrite(into) else 1.0
    precision.gemm(a, d, trans_a=True, out=into, beta=beta)
    return None


def _result_dtype(bf16_wanted):
    """uint16 (bf16 bits) when a bf16 result was asked for and the matmuls run in bf16, else float32."""
    return np.uint16 if (bf16_wanted and registry.precision() == "bfloat16") else np.float32


def linear_forward(x, w, b, w_bf16=None, bf16_out=False):
    xm, wm = _matmul_operands(x, w, w_bf16)
    if b is not None and bf16_out:
        raise ValueError("linear: bf16_out is for a layer whose bias is added by the next op (b=None)")
    y = precision.gemm(xm, wm, out_dtype=_result_dtype(bf16_out))     # (N, Cin) @ (Cin, Cout) -> (N, Cout)
    if b is not None:
        y += b
    return y, (xm, wm, b is not None)


def linear_backward(dy, saved, dw_into=None, db_into=None, bf16_dx=False):
    xm, wm, has_bias = saved
    dym = _like_operands(dy, wm)
    dx = precision.gemm(dym, wm, trans_b=True, out_dtype=_result_dtype(bf16_dx))    # (N, Cout) @ (Cout, Cin)
    dw = _weight_grad(xm, dym, dw_into)                     # (Cin, N) @ (N, Cout), or added into dw_into
    db = _bias_grad(dy, db_into) if has_bias else None     # float32 dy, also with bf16 matmuls
    return dx, dw, db


def lm_head_forward(x, wte, wte_bf16=None):
    xm, wm = _matmul_operands(x, wte, wte_bf16)
    return precision.gemm(xm, wm, trans_b=True), (xm, wm)   # (N, C) @ (C, V) -> (N, V)


def lm_head_backward(dlogits, saved, dwte_into=None):
    xm, wm = saved
    dm = _like_operands(dlogits, wm)
    dx = precision.gemm(dm, wm)                              # (N, V) @ (V, C)
    dwte = _weight_grad(dm, xm, dwte_into)                   # (V, N) @ (N, C), or added into dwte_into
    return dx, dwte
