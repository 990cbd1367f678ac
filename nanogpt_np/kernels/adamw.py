"""GPU AdamW over the flat parameter buffer: adamw.cu. Three launches per step whatever the model size.

    norm = global_grad_norm(grads)                       # (2,) device array: [norm, clip scale]
    adamw_step(params, grads, m, v, n_decay=..., lr=..., ..., step=..., grad_clip=1.0)

params, grads, m, v are flat float32 arrays of equal length; the first n_decay elements get weight decay.
Semantics = references.adamw_flat_reference: the gradient is multiplied by min(1, clip / (norm + 1e-6)) on
the fly (the gradient buffer itself is left as it is), then optim.adamw_update's bias-corrected Adam with
decoupled decay.

The scalars that change every step (lr and the bias corrections 1 - beta^step) reach the kernel through a
small device array, step_scalars() = [lr, bc1, bc2], refreshed by one 12-byte host->device copy per step; the
kernel's launch arguments are then the same every step (what a CUDA graph needs: it replays the arguments it
captured). The constants (betas, eps, weight decay) are plain launch scalars.
"""
import numpy as np

from .compile import launch, num_sms
from .launch import NORM_BLOCKS, NULL, adamw_bias_corrections

_scratch = {}


def _buffer(name, shape):
    import cupy as cp
    buf = _scratch.get(name)
    if buf is None or buf.shape != shape:
        buf = cp.empty(shape, dtype=cp.float32)
        _scratch[name] = buf
    return buf


def global_grad_norm(grads, max_norm=0.0, out=None):
    """grads (n,) -> (2,) device array [sqrt(sum g^2), clip scale]; scale = 1 when max_norm <= 0."""
    import cupy as cp
    partial = _buffer("partial", (NORM_BLOCKS,))
    out = cp.empty((2,), dtype=cp.float32) if out is None else out
    launch("adamw", "sumsq_partial", (NORM_BLOCKS,), (256,), (partial, grads, np.int64(grads.size)))
    launch("adamw", "norm_and_scale", (1,), (1024,), (out, partial, np.int32(NORM_BLOCKS), np.float32(max_norm)))
    return out


def step_scalars(lr, beta1, beta2, step):
    """The per-step scalars [lr, 1 - beta1^step, 1 - beta2^step] in one persistent (3,) float32 device array.

    Written by ndarray.set: one asynchronous host->device copy on the current stream (ordered after the previous
    step's update, which read the old values). The bias corrections are computed in float64 on the host and
    rounded to float32 once, exactly as when they were launch scalars."""
    bc1, bc2 = adamw_bias_corrections(beta1, beta2, step)
    buf = _buffer("step_scalars", (3,))
    buf.set(np.array([lr, bc1, bc2], dtype=np.float32))
    return buf


def adamw_step(params, grads, m, v, *, n_decay=None, lr=None, beta1, beta2, eps, weight_decay, step=None,
               grad_clip=0.0, params_bf16=None, scratch=None, scalars=None):
    """Update params, m, v in place (and params_bf16, a uint16 copy, when given). Returns [norm, scale] (2,),
    a persistent device buffer: valid until the next call (read it before the next step).

    Called by optim.AdamW.step on the GPU (same keywords as optim.adamw_update; n_decay=None decays all;
    `scratch` is accepted for that signature and only used by the non-float32 fallback).
    lr and step are written to the device by step_scalars() here; or pass `scalars`, a (3,) device array that
    already holds them (a CUDA-graph capture writes it before each replay: no host->device copy inside).
    Falls back to optim.adamw_update (after clipping in array code) when the buffers are not float32."""
    if params.dtype.itemsize != 4 or params.dtype.kind != "f":
        from ..optim import adamw_update
        from .references import global_grad_norm as ref_norm
        ns = ref_norm(grads, grad_clip)
        g = grads * float(ns[1]) if grad_clip and grad_clip > 0 else grads
        adamw_update(params, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     step=step, n_decay=n_decay, scratch=scratch)
        return ns
    n = params.size
    n_decay = n if n_decay is None else n_decay
    for a in (grads, m, v):
        if a.size != n:
            raise ValueError("adamw_step: params, grads, m and v must have the same length")
    if scalars is None:
        scalars = step_scalars(lr, beta1, beta2, step)
    norm = global_grad_norm(grads, grad_clip, out=_buffer("norm", (2,)))     # the same buffer every step
    grid = min(-(-n // 256), num_sms() * 16)      # grid-stride loop inside: a few waves of resident blocks
    clip_ptr = np.uint64(norm.data.ptr + 4) if grad_clip and grad_clip > 0 else NULL
    launch("adamw", "adamw_update", (max(1, grid),), (256,),
           (params, grads, m, v, NULL if params_bf16 is None else params_bf16, clip_ptr,
            np.int64(n), np.int64(n_decay), scalars, np.float32(beta1), np.float32(beta2), np.float32(eps),
            np.float32(weight_decay)))
    return norm
