"""bf16 matmuls for the linear layers and the tied output head (mixed precision, --dtype=bfloat16).

Registered as "linear" and "lm_head" only while registry.set_precision("bfloat16") is on (float32 training
keeps CuPy's cuBLAS float32/TF32 matmuls). Same contracts as ops/linear.py:
    linear:  forward(x (N, Cin), w (Cin, Cout), b or None) -> y (N, Cout);  backward(dy) -> dx, dw, db
    lm_head: forward(x (N, C), wte (V, C)) -> logits (N, V);                backward(dlogits) -> dx, dwte
Weights stay float32 (the master copy the optimizer updates); each call rounds what it multiplies to bf16
(round to nearest even, bf16.cu), cuBLAS multiplies with float32 accumulation and writes float32. The saved
activation is the bf16 copy of x: half the memory of the float32 one. Bias add and bias gradient stay float32.
"""
from . import precision


def linear_forward(x, w, b):
    import cupy as cp
    xb, wb = precision.as_bf16(x), precision.as_bf16(w)
    y = precision.matmul_bf16(xb, wb)                        # (N, Cout) float32
    if b is not None:
        y += b
    return y, (xb, wb, b is not None)


def linear_backward(dy, saved):
    xb, wb, has_bias = saved
    dyb = precision.as_bf16(dy)
    dx = precision.matmul_bf16(dyb, wb, trans_b=True)        # (N, Cout) @ (Cout, Cin)
    dw = precision.matmul_bf16(xb, dyb, trans_a=True)        # (Cin, N) @ (N, Cout)
    db = dy.sum(axis=0) if has_bias else None
    return dx, dw, db


def lm_head_forward(x, wte):
    xb, wteb = precision.as_bf16(x), precision.as_bf16(wte)
    return precision.matmul_bf16(xb, wteb, trans_b=True), (xb, wteb)   # (N, C) @ (C, V)


def lm_head_backward(dlogits, saved):
    xb, wteb = saved
    db = precision.as_bf16(dlogits)
    dx = precision.matmul_bf16(db, wteb)                     # (N, V) @ (V, C)
    dwte = precision.matmul_bf16(db, xb, trans_a=True)       # (V, N) @ (N, C)
    return dx, dwte
