"""NumPy-generic references for the fused kernels that go beyond the op contract.

Each composes the plain ops of nanogpt_np/ops (or restates optim's AdamW), so the fused GPU version has an
independent meaning to be tested against. They run on numpy and on cupy arrays alike.
"""
from .. import backend


def residual_layernorm_forward(x, residual, residual_bias, w, b, eps=1e-5, *, round_h=None):
    """h = x + residual + residual_bias (the new residual stream; the bias (C,) of the matmul that made
    `residual`, or None), y = layernorm(h); residual None: h is x. -> ((h, y), saved).
    x and residual may be bf16 bits (uint16), widened exactly. round_h: None (h at the inputs' precision), or a
    function applied once to h before the layernorm reads it: the GPU in bf16 precision stores the residual stream
    as bf16 and normalises that rounded h, which is round_h=bf16.round_to_bf16 (a reference-only keyword, for
    tests; residual None too: there the GPU stores a float32 x as bf16, the stream's start)."""
    from ..ops.layernorm import layernorm_forward
    from .bf16 import widen_bf16
    x = widen_bf16(x)
    if residual is None:
        h = x
    else:
        residual = widen_bf16(residual)
        h = x + residual if residual_bias is None else x + (residual + residual_bias)
    if round_h is not None:
        h = round_h(h).astype(h.dtype)                      # e.g. to bf16 values, kept at x's dtype
    y, saved = layernorm_forward(h, w, b, eps)
    return (h, y), (saved, residual_bias is not None)


def residual_layernorm_backward(douts, saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False, *,
                                round_dx=None):
    """(dh or None, dy) -> (dx, dresidual, dresidual_bias, dw, db): both summands of h get dh + d layernorm(dy);
    the bias, added to every row, gets that summed over the rows (None without a bias). dw, db, dresidual_bias
    are added into the *_into buffers when given (then None); bf16_dr (a storage hint) is ignored here. dh and dy
    may be bf16 bits (widened exactly). round_dx: None, or a function applied once to the stored dx = dresidual
    (the GPU's bf16 residual-stream gradient: round_dx=bf16.round_to_bf16, reference-only); the bias gradient is
    the sum of the unrounded values, as on the GPU."""
    from ..ops.layernorm import layernorm_backward
    from ..ops.reductions import add_into
    from .bf16 import widen_bf16
    saved, has_bias = saved
    dh, dy = douts
    dx, dw, db = layernorm_backward(widen_bf16(dy), saved, dw_into, db_into)
    if dh is not None:
        dx = dx + widen_bf16(dh)
    drb = add_into(drb_into, dx.sum(axis=0)) if has_bias else None
    if round_dx is not None:
        dx = round_dx(dx).astype(dx.dtype)
    return dx, dx, drb, dw, db


def bias_gelu_forward(x, b):
    """gelu(x + b) for x (N, C), b (C,).
    x may be bf16 bits (uint16): in bf16 precision the GPU's c_fc gemm rounds its float32 accumulator to bf16
    once and writes those bits; they are widened here exactly. bf16 rounding on that path happens only there,
    in the gemm that makes dy (mlp.c_proj's backward), and once when the kernel stores y / dx as bf16: the bias
    add, gelu, gelu' and db are float32 on the GPU (this reference: the input's precision, float64 in tests)."""
    from ..ops.gelu import gelu_forward
    from .bf16 import widen_bf16
    y, saved = gelu_forward(widen_bf16(x) + b)
    return y, saved


def bias_gelu_backward(dy, saved, db_into=None):
    """-> (dx, db): dx = dy * gelu'(x + b), db = dx (unrounded) summed over rows. dy may be bf16 bits (widened
    exactly). Given db_into, db is added into it and returned as None (the *_into contract)."""
    from ..ops.gelu import gelu_backward
    from .bf16 import widen_bf16
    (dx,) = gelu_backward(widen_bf16(dy), saved)
    db = dx.reshape(-1, dx.shape[-1]).sum(axis=0)
    if db_into is None:
        return dx, db
    db_into += db
    return dx, None


def global_grad_norm(grads, max_norm=0.0):
    """[sqrt(sum g^2), clip scale] with scale = min(1, max_norm / (norm + 1e-6)), 1 when max_norm <= 0."""
    xp = backend.xp_of(grads)
    norm = xp.sqrt((grads.astype(xp.float64) ** 2).sum())
    scale = min(1.0, max_norm / (float(norm) + 1e-6)) if max_norm > 0 else 1.0
    return xp.asarray([float(norm), scale], dtype=xp.float64)


def adamw_flat_reference(params, grads, m, v, *, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_clip=0.0):
    """What kernels/adamw.adamw_step does, in array code: clip by the global norm, then AdamW (decoupled decay
    on the first n_decay elements only). Updates params, m, v in place; returns [norm, scale]."""
    ns = global_grad_norm(grads, grad_clip)
    g = grads * float(ns[1])
    wd = backend.xp_of(params).zeros_like(params)
    wd[:n_decay] = weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    mhat = m / (1 - beta1 ** step)
    vhat = v / (1 - beta2 ** step)
    params -= lr * (mhat / (backend.xp_of(params).sqrt(vhat) + eps) + wd * params)
    return ns
