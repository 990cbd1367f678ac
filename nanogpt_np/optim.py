"""AdamW, the learning-rate schedule, and clipping by global gradient norm.

AdamW (Loshchilov & Hutter), for every parameter p with gradient g, at step t = 1, 2, ...:
    m = beta1 * m + (1 - beta1) * g              running mean of gradients
    v = beta2 * v + (1 - beta2) * g^2            running mean of squared gradients
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)      bias correction (m, v start at zero)
    p = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)
The decay is "decoupled": it shrinks p directly instead of being added to g, so Adam's per-parameter scaling
does not weaken it. Only the 2-D matrices (linear weights, embeddings) decay; biases and layernorm scales
do not. The model keeps those first in its flat buffer, so the decay is one slice: p[:n_decay].
"""
import math

from . import backend


def adamw_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, n_decay=None, scratch=None):
    """One AdamW step on flat arrays, in place. Decay applies to param[:n_decay] (all of it when None).
    This is memory-bound, so it works in place with one scratch array instead of allocating temporaries."""
    xp = backend.xp_of(param)
    tmp = scratch if scratch is not None else xp.empty_like(param)
    m *= beta1
    xp.multiply(grad, 1.0 - beta1, out=tmp)
    m += tmp                                              # m = beta1 m + (1 - beta1) g
    v *= beta2
    xp.multiply(grad, grad, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp                                              # v = beta2 v + (1 - beta2) g^2
    if weight_decay:
        decayed = param if n_decay is None else param[:n_decay]
        decayed *= 1.0 - lr * weight_decay                # p -= lr * wd * p
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    xp.sqrt(v, out=tmp)
    tmp *= 1.0 / math.sqrt(bias2)
    tmp += eps                                            # sqrt(v_hat) + eps
    xp.divide(m, tmp, out=tmp)
    tmp *= lr / bias1                                     # lr * m_hat / (sqrt(v_hat) + eps)
    param -= tmp


class AdamW:
    """AdamW over a model's flat parameter buffer. State (m, v, step) is saved with checkpoints."""

    def __init__(self, model, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.model = model
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        xp = backend.xp_of(model.flat_params)
        self.m = xp.zeros(model.flat_params.shape, dtype="float32" if model.dtype.itemsize < 4 else model.dtype)
        self.v = xp.zeros_like(self.m)
        self.scratch = xp.empty_like(self.m)
        self.step_count = 0

    def step(self, lr=None, grad_clip=0.0):
        """Clip the gradients by their global norm (when grad_clip > 0), then update every parameter from
        model.flat_grads. `lr` overrides the base rate (schedules). Returns the norm before clipping: a float
        on the CPU; on the GPU a device array, computed by the fused kernel without a host round trip
        (float() it only when logging, before the next step: the next step overwrites it)."""
        self.step_count += 1
        self.model.finish_gradients()            # (GPU) a matrix nobody wrote this step: zeroed, tensor.fresh_grads
        args = dict(lr=self.lr if lr is None else lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay, step=self.step_count, n_decay=self.model.n_decay,
                    scratch=self.scratch)
        fused = _fused_adamw(self.model.flat_params)
        if fused is not None:     # one kernel clips on the fly and updates everything: returns [norm, scale]
            bf16 = self.model.flat_params_bf16       # the weights' bf16 copy (bf16 matmuls) or None: written too
            norm = fused(self.model.flat_params, self.model.flat_grads, self.m, self.v, grad_clip=grad_clip,
                         params_bf16=bf16, **args)[0]
            self.model.params_written(bf16_copy_refreshed=bf16 is not None)
            return norm
        norm = clip_grad_norm(self.model.flat_grads, grad_clip)
        adamw_update(self.model.flat_params, self.model.flat_grads, self.m, self.v, **args)
        self.model.params_written()
        return norm

    def state_arrays(self) -> dict:
        return {"m": backend.to_numpy(self.m), "v": backend.to_numpy(self.v)}

    def load_state_arrays(self, arrays: dict, step_count: int) -> None:
        for key in ("m", "v"):
            if key not in arrays or arrays[key].shape != self.m.shape:
                raise ValueError(f"optimizer state '{key}' is missing or has the wrong shape for this model")
        self.m[...] = backend.to_device(arrays["m"])
        self.v[...] = backend.to_device(arrays["v"])
        self.step_count = int(step_count)


def _fused_adamw(flat_params):
    """The fused GPU AdamW kernel when running on cupy (None on the CPU or when there is none)."""
    if not backend.is_gpu_array(flat_params):
        return None
    from .ops.dispatch import implementation
    fused, _ = implementation("adamw", flat_params, None, None)
    return fused


def clip_grad_norm(flat_grads, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm (0 or less: no clipping).
    Returns the norm before clipping, as a Python float (the one value that comes back to the host)."""
    norm = math.sqrt(float(flat_grads @ flat_grads))     # a BLAS dot product over the flat buffer
    if max_norm and max_norm > 0 and norm > max_norm:
        flat_grads *= max_norm / (norm + 1e-6)
    return norm


def lr_at(step: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """Linear warmup from lr/warmup_iters to lr over `warmup_iters` steps, then cosine decay to min_lr at
    `decay_iters`, then min_lr. `step` counts from 0."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)     # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
