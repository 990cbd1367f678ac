"""The transformer block's MLP as one op: y = gelu(x @ W_fc + b_fc) @ W_proj (+ b_proj).

Forward (x (N, C), W_fc (C, H), b_fc (H,) or None, W_proj (H, C), H = 4C in GPT-2):
    pre = x @ W_fc + b_fc          (N, H)   the GELU's input
    h   = gelu(pre)                (N, H)   ops/gelu.py's tanh form
    y   = h @ W_proj (+ b_proj)    (N, C)   b_proj only when no later op adds it (model.py fuses it into
                                            residual_layernorm unless dropout sits in between)
Backward, from the chain rule through the three steps (ops/linear.py and ops/gelu.py derive each):
    dh      = dy @ W_proj.T        dW_proj = h.T @ dy        db_proj = dy summed over the rows
    dpre    = dh * gelu'(pre)      (elementwise)
    db_fc   = dpre summed over the rows
    dW_fc   = x.T @ dpre           dx = dpre @ W_fc.T
Weight and bias gradients are added into the parameters' gradient buffers when they have one (`*_into`,
docs/CONTRACTS.md) and then returned as None.

Why one op: on the GPU in bf16 precision the GELU and c_fc's bias ride on the matmuls' epilogues (cuBLASLt,
kernels/mlp.py): c_fc's matmul writes h and pre directly, and mlp.c_proj's dx matmul writes dpre and db_fc, so
the GELU costs no pass over the (N, H) arrays of its own. This reference composes the separate ops' references
(linear, bias_gelu / gelu, linear) in the same order, so on the CPU the results are bit for bit those of the
three separate ops.
"""
from ..tensor import Tensor, record
from .dispatch import implementation
from .gelu import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward
from .linear import linear_backward, linear_forward


def mlp_forward(x, w_fc, b_fc, w_proj, b_proj=None, w_fc_bf16=None, w_proj_bf16=None, bf16_out=False):
    """x (N, C) -> y (N, C). The bf16 weight copies and bf16_out are hints for GPU kernels (ignored here)."""
    pre, fc_saved = linear_forward(x, w_fc, None)                            # (N, H)
    if b_fc is not None:
        h, gelu_saved = bias_gelu_forward(pre, b_fc)                         # gelu(pre + b_fc)
    else:
        h, gelu_saved = gelu_forward(pre)
    y, proj_saved = linear_forward(h, w_proj, b_proj)                        # (N, C)
    return y, (fc_saved, gelu_saved, proj_saved, b_fc is not None)


def mlp_backward(dy, saved, dw_fc_into=None, db_fc_into=None, dw_proj_into=None, db_proj_into=None):
    """dy (N, C) -> dx (N, C), dw_fc, db_fc, dw_proj, db_proj (each None when added into its buffer, or when the
    op has no such bias)."""
    fc_saved, gelu_saved, proj_saved, has_fc_bias = saved
    dh, dw_proj, db_proj = linear_backward(dy, proj_saved, dw_into=dw_proj_into, db_into=db_proj_into)
    if has_fc_bias:
        dpre, db_fc = bias_gelu_backward(dh, gelu_saved, db_into=db_fc_into)
    else:
        (dpre,), db_fc = gelu_backward(dh, gelu_saved), None
    dx, dw_fc, _ = linear_backward(dpre, fc_saved, dw_into=dw_fc_into)
    return dx, dw_fc, db_fc, dw_proj, db_proj


def mlp(x: Tensor, w_fc: Tensor, b_fc: Tensor, w_proj: Tensor, b_proj: Tensor = None, *, bf16_out=False) -> Tensor:
    """gelu(x @ w_fc + b_fc) @ w_proj (+ b_proj) for x (..., C); b_fc and b_proj may be None.
    bf16_out: the next op reads y as bf16 (a hint for bf16 kernels; refused with b_proj, as in linear)."""
    lead, C = x.shape[:-1], x.shape[-1]
    H = w_fc.shape[-1]
    if (w_fc.shape[0] != C or w_proj.shape[0] != H or (b_fc is not None and b_fc.shape != (H,))
            or (b_proj is not None and b_proj.shape != (w_proj.shape[-1],))):
        raise ValueError(f"mlp: shapes do not chain: x (..., {C}), w_fc {w_fc.shape}, b_fc "
                         f"{None if b_fc is None else b_fc.shape}, w_proj {w_proj.shape}, b_proj "
                         f"{None if b_proj is None else b_proj.shape} (want (C, H), (H,), (H, C'), (C',))")
    forward, backward = implementation("mlp", x.data, mlp_forward, mlp_backward)
    y, saved = forward(x.data.reshape(-1, C), w_fc.data, None if b_fc is None else b_fc.data, w_proj.data,
                       None if b_proj is None else b_proj.data, w_fc_bf16=w_fc.data_bf16,
                       w_proj_bf16=w_proj.data_bf16, bf16_out=bf16_out)
    out = Tensor(y.reshape(*lead, w_proj.shape[1]))

    def backward_fn(dout):
        dx, dw_fc, db_fc, dw_proj, db_proj = backward(
            dout.reshape(-1, w_proj.shape[1]), saved, dw_fc_into=w_fc.grad_buffer(),
            db_fc_into=None if b_fc is None else b_fc.grad_buffer(), dw_proj_into=w_proj.grad_buffer(),
            db_proj_into=None if b_proj is None else b_proj.grad_buffer())
        grads = {"x": dx.reshape(x.shape), "w_fc": dw_fc, "b_fc": db_fc, "w_proj": dw_proj, "b_proj": db_proj}
        return tuple(grads[name] for name, t in named if t is not None)

    named = (("x", x), ("w_fc", w_fc), ("b_fc", b_fc), ("w_proj", w_proj), ("b_proj", b_proj))
    return record(out, tuple(t for _, t in named if t is not None), backward_fn)
