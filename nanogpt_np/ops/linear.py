"""Linear layers: y = x @ w + b, and the output head tied to the token embedding.

Weights are stored (in, out), as in GPT-2's published checkpoints, so y = x @ w needs no transpose.

Forward:   y = x @ w + b            x (N, Cin), w (Cin, Cout), b (Cout,)  ->  y (N, Cout)
Backward:  from y[n, j] = sum_i x[n, i] w[i, j] + b[j]:
           dx = dy @ w.T            (N, Cout) @ (Cout, Cin)
           dw = x.T @ dy            (Cin, N)  @ (N, Cout)   summed over the N rows
           db = dy.sum(axis=0)      each row adds b once

Tied head: logits = x @ wte.T reuses the (V, C) token embedding as the output layer (GPT-2 does this), so
           dx = dlogits @ wte and dwte = dlogits.T @ x; the embedding op adds its own part to dwte.

Weight gradients go straight into the parameters' gradient buffers: when a weight (or bias) has one
(Tensor.grad_buffer(), the model's flat_grads), the backward is handed it as `dw_into` and adds its gradient
there (`dw_into += x.T @ dy`; on the GPU one gemm with beta = 1, no temporary, or with beta = 0 as the step's
first write of a matrix's fresh buffer: tensor.fresh_grads), and returns None for that input, so the tape has
nothing left to add. Without a buffer (a plain Tensor) the gradient is returned as usual.
`w_bf16` is a bf16 copy of w for kernels that multiply in bf16 (model.py keeps one); the reference ignores it.
`bf16_out` / `bf16_dx` let a GPU kernel that multiplies in bf16 write y / dx as bf16 (uint16 bits), for a next
op that reads bf16 (kernels/linear.py); they are hints about storage, not math, and the reference ignores them.
"""
from ..tensor import Tensor, record
from .dispatch import implementation
from .reductions import add_into, sum_rows


def linear_forward(x, w, b, w_bf16=None, bf16_out=False):
    """x (N, Cin), w (Cin, Cout), b (Cout,) or None -> y (N, Cout)."""
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy, saved, dw_into=None, db_into=None, bf16_dx=False):
    """dy (N, Cout) -> dx (N, Cin), dw (Cin, Cout), db (Cout,) or None.
    dw_into / db_into: buffers to add dw / db into; the gradient is then returned as None."""
    x, w, has_bias = saved
    dx = dy @ w.T
    dw = add_into(dw_into, x.T @ dy)
    db = add_into(db_into, sum_rows(dy)) if has_bias else None
    return dx, dw, db


def linear(x: Tensor, w: Tensor, b: Tensor = None, *, bf16_out=False, bf16_dx=False) -> Tensor:
    """x (..., Cin) @ w (Cin, Cout) + b -> (..., Cout). Leading dimensions are flattened for the matmul.
    bf16_out / bf16_dx: the next op reads y / the previous op reads dx as bf16 (a hint for bf16 kernels)."""
    lead, c_in = x.shape[:-1], x.shape[-1]
    forward, backward = implementation("linear", x.data, linear_forward, linear_backward)
    y, saved = forward(x.data.reshape(-1, c_in), w.data, None if b is None else b.data, w_bf16=w.data_bf16,
                       bf16_out=bf16_out)
    out = Tensor(y.reshape(*lead, w.shape[1]))

    def backward_fn(dout):
        dx, dw, db = backward(dout.reshape(-1, w.shape[1]), saved, dw_into=w.grad_buffer(),
                              db_into=None if b is None else b.grad_buffer(), bf16_dx=bf16_dx)
        return (dx.reshape(x.shape), dw) + ((db,) if b is not None else ())      # None: already in the buffer

    inputs = (x, w) if b is None else (x, w, b)
    return record(out, inputs, backward_fn)


def lm_head_forward(x, wte, wte_bf16=None):
    """x (N, C), wte (V, C) -> logits (N, V)."""
    return x @ wte.T, (x, wte)


def lm_head_backward(dlogits, saved, dwte_into=None):
    """dlogits (N, V) -> dx (N, C), dwte (V, C) (None after adding it into dwte_into)."""
    x, wte = saved
    return dlogits @ wte, add_into(dwte_into, dlogits.T @ x)


def lm_head(x: Tensor, wte: Tensor) -> Tensor:
    """The output layer tied to the token embedding: (..., C) -> (..., V) logits."""
    lead, C = x.shape[:-1], x.shape[-1]
    forward, backward = implementation("lm_head", x.data, lm_head_forward, lm_head_backward)
    logits, saved = forward(x.data.reshape(-1, C), wte.data, wte_bf16=wte.data_bf16)
    out = Tensor(logits.reshape(*lead, wte.shape[0]))

    def backward_fn(dout):
        dx, dwte = backward(dout.reshape(-1, wte.shape[0]), saved, dwte_into=wte.grad_buffer())
        return dx.reshape(x.shape), dwte

    return record(out, (x, wte), backward_fn)
