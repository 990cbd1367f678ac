"""Layer normalisation over the last dimension (C), with a learned scale w and shift b.

Forward (per row of C numbers):
    mean = sum(x) / C,  var = sum((x - mean)^2) / C,  rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,  y = xhat * w + b

Backward: dw = sum over rows of dy * xhat,  db = sum over rows of dy.  For dx, write g = dy * w (= dxhat).
    xhat depends on x directly and through mean and rstd. Differentiating xhat_i = (x_i - mean) * rstd:
      d xhat_i / d x_j = rstd * (delta_ij - 1/C) - (x_i - mean) * rstd^3 * (x_j - mean) / C
                       = rstd * (delta_ij - 1/C - xhat_i * xhat_j / C)
    so dx_j = sum_i g_i * d xhat_i / d x_j = rstd * (g_j - mean(g) - xhat_j * mean(g * xhat)).

Residual + layernorm (one op with two outputs, so the GPU can do both in one pass over memory):
    h = x + r + rb (the residual stream goes on; rb (C,) is the bias of the matmul that made r, or none),
    y = layernorm(h)
    dh_total = dh + (layernorm backward of dy),  dx = dr = dh_total   (an add passes its gradient through)
    drb = dh_total summed over the rows            (rb[c] is added to every row n: d h[n, c] / d rb[c] = 1)
The model uses it at every block boundary: the residual add that ends a branch and the layernorm after it.
On the GPU with bf16 matmuls, h and dx are stored as bf16 (one rounding each, float32 math; kernels/layernorm.py):
the residual stream is then bf16 from the first ln_1 on. Here (NumPy, CPU) everything stays at x's precision.

dw, db (and drb) are added straight into the parameters' gradient buffers when they have one (`*_into`, as in
ops/linear.py), so the tape adds nothing for them.
"""
from .. import backend
from ..kernels.bf16 import widen_bf16
from ..tensor import Tensor, record
from .dispatch import implementation
from .reductions import add_into, mean_last, sum_rows


def layernorm_forward(x, w, b, eps=1e-5):
    """x (N, C), w (C,), b (C,) -> y (N, C)."""
    xp = backend.xp_of(x)
    mean = mean_last(x)                                     # (N, 1)
    xhat = x - mean                                         # (N, C), centred; scaled in place below
    var = mean_last(xhat * xhat)                            # (N, 1), biased (divide by C), as GPT-2
    rstd = 1.0 / xp.sqrt(var + eps)                         # (N, 1)
    xhat *= rstd
    y = xhat * w
    y += b
    return y, (xhat, w, rstd)


def layernorm_backward(dy, saved, dw_into=None, db_into=None):
    """dy (N, C) -> dx (N, C), dw (C,), db (C,). dw_into / db_into: buffers (the parameters' slices of the flat
    gradient buffer) to add dw / db into; that gradient is then returned as None (docs/CONTRACTS.md)."""
    xhat, w, rstd = saved
    C = xhat.shape[-1]
    dy_xhat = dy * xhat                                     # (N, C)
    dw = sum_rows(dy_xhat)
    db = sum_rows(dy)
    # with g = dy * w: mean(g) = (dy @ w) / C and mean(g * xhat) = (dy * xhat) @ w / C (matrix-vector products)
    mean_g = (dy @ w)[:, None] / C                          # (N, 1)
    mean_g_xhat = (dy_xhat @ w)[:, None] / C                # (N, 1)
    dx = dy * w                                             # g
    dx -= mean_g
    dx -= xhat * mean_g_xhat
    dx *= rstd
    return dx, add_into(dw_into, dw), add_into(db_into, db)


def layernorm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise x (..., C) over C, then scale by w and shift by b."""
    C = x.shape[-1]
    forward, backward = implementation("layernorm", x.data, layernorm_forward, layernorm_backward)
    y, saved = forward(x.data.reshape(-1, C), w.data, b.data, eps)

    def backward_fn(dout):       # dw, db are added into w's and b's gradient buffers when they have one (then None)
        dx, dw, db = backward(dout.reshape(-1, C), saved, dw_into=w.grad_buffer(), db_into=b.grad_buffer())
        return dx.reshape(x.shape), dw, db

    return record(Tensor(y.reshape(x.shape)), (x, w, b), backward_fn)


def residual_layernorm_forward(x, r, rb, w, b, eps=1e-5):
    """x, r (N, C) (or r None: h is x), rb (C,) or None -> ((h = x + r + rb, y = layernorm(h)), saved)."""
    h = x if r is None else x + (r if rb is None else r + rb)   # r + rb first: the order of linear's y += b
    y, saved = layernorm_forward(h, w, b, eps)
    return (h, y), (saved, rb is not None)


def residual_layernorm_backward(douts, saved, dw_into=None, db_into=None, drb_into=None, bf16_dr=False):
    """(dh or None, dy) -> (dx, dr, drb or None, dw, db); dx and dr are the same array (safe: the tape never
    writes into an intermediate gradient). dw, db, drb are added into the *_into buffers when given (then None).
    bf16_dr is a storage hint for GPU kernels (dr as bf16 for a bf16 matmul); the reference ignores it."""
    saved, has_rb = saved
    dh, dy = douts
    dx, dw, db = layernorm_backward(dy, saved, dw_into, db_into)
    if dh is not None:
        dx += dh
    return dx, dx, (add_into(drb_into, sum_rows(dx)) if has_rb else None), dw, db


def residual_layernorm(x: Tensor, r: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5, r_bias: Tensor = None, *,
                       bf16_dr=False):
    """(h, y) = (x + r + r_bias, layernorm(h)) for x, r (..., C): the residual add that ends a branch (with the
    bias of its last matmul, r_bias (C,) or None) and the layernorm that comes next (ln_2, the next block's ln_1,
    or ln_f), fused. bf16_dr: r comes straight from a matmul that may read its gradient as bf16 (a hint for bf16
    kernels, like linear's bf16_dx: r must then have no other consumer).
    r=None: no branch to add, h is x (the same data) and y = layernorm(x); the stream passes through, so the
    gradients of h and of y reach x summed in the backward's own pass (the first block's ln_1)."""
    if r is None and r_bias is not None:
        raise ValueError("residual_layernorm: r_bias without r")
    if r is not None and x.shape != r.shape:
        raise ValueError(f"residual_layernorm needs equal shapes, got {x.shape} and {r.shape}")
    C = x.shape[-1]
    forward, backward = implementation("residual_layernorm", x.data, residual_layernorm_forward,
                                       residual_layernorm_backward)
    (h, y), saved = forward(x.data.reshape(-1, C), None if r is None else r.data.reshape(-1, C),
                            None if r_bias is None else r_bias.data, w.data, b.data, eps)
    h, y = Tensor(h.reshape(x.shape)), Tensor(y.reshape(x.shape))

    def in_input_order(dx, dr, drb, dw, db):    # one gradient per input: x, r, r_bias, w, b (those given)
        return ((dx,) + (() if r is None else (dr,)) + (() if r_bias is None else (drb,)) + (dw, db))

    def backward_fn(douts):
        dh, dy = douts
        if dy is None:                          # only h led to the loss: a plain residual add
            dh_f32 = widen_bf16(dh)             # (a bf16 h's gradient may be bf16 bits: x takes it as it is)
            drb = None if r_bias is None else sum_rows(dh_f32.reshape(-1, C))
            return in_input_order(dh if dh.dtype == x.data.dtype else dh_f32, dh_f32, drb, None, None)
        dx, dr, drb, dw, db = backward((None if dh is None else dh.reshape(-1, C), dy.reshape(-1, C)), saved,
                                       dw_into=w.grad_buffer(), db_into=b.grad_buffer(),
                                       drb_into=None if r_bias is None else r_bias.grad_buffer(), bf16_dr=bf16_dr)
        dx_full = dx.reshape(x.shape)
        if r is None:                           # no residual input: no dr to pass on
            dr_full = None
        else:                                   # dr is often dx itself (same dtype): then one view serves both
            dr_full = dx_full if dr is dx else dr.reshape(x.shape)
        return in_input_order(dx_full, dr_full, drb, dw, db)

    inputs = in_input_order(x, r, r_bias, w, b)
    record((h, y), inputs, backward_fn)
    return h, y
