"""Softmax cross-entropy, averaged over the targets that are not masked out.

Forward, for row n with logits z (V,) and target y:
    loss_n = logsumexp(z) - z[y] = -log softmax(z)[y]
    loss   = sum over kept rows of loss_n / n_kept       (rows whose target == ignore_index are skipped)
Backward: d loss_n / d z_j = softmax(z)_j - [j == y], so
    dlogits[n] = dloss * (probs[n] - onehot(y_n)) / n_kept  for kept rows, and 0 for masked rows.
"""
from .. import backend
from ..tensor import Tensor, record
from .dispatch import implementation


def cross_entropy_forward(logits, targets, ignore_index=-1):
    """logits (N, V), targets (N,) integer -> mean loss over kept rows (0-d array)."""
    xp = backend.xp_of(logits)
    N, V = logits.shape
    kept = targets != ignore_index                          # (N,) bool
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise ValueError("cross_entropy: every target is masked (ignore_index); nothing to learn from")
    safe_targets = xp.where(kept, targets, 0)               # any valid index for masked rows
    shifted = logits - logits.max(axis=-1, keepdims=True)   # (N, V), max 0 per row: exp cannot overflow
    e = xp.exp(shifted)
    sum_e = e.sum(axis=-1)                                  # (N,)
    probs = e / sum_e[:, None]                              # (N, V)
    losses = xp.log(sum_e) - shifted[xp.arange(N), safe_targets]   # (N,)
    loss = xp.where(kept, losses, 0.0).sum() / n_kept         # not losses * kept: a masked row's loss may be inf
    return loss, (probs, safe_targets, kept, n_kept)


def cross_entropy_backward(dloss, saved):
    """dloss (0-d) -> dlogits (N, V)."""
    probs, safe_targets, kept, n_kept = saved
    xp = backend.xp_of(probs)
    dlogits = probs.copy()
    dlogits[xp.arange(probs.shape[0]), safe_targets] -= 1.0
    dlogits *= (kept * (dloss / n_kept))[:, None].astype(probs.dtype)
    return (dlogits,)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy of logits (..., V) against integer targets (...); ignore_index marks masked rows."""
    V = logits.shape[-1]
    if not backend.is_gpu_array(targets):        # (skipped on the GPU to avoid a host sync)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bad.any():
            raise ValueError(f"targets must be in 0..{V - 1} or ignore_index={ignore_index}, "
                             f"got {targets[bad].reshape(-1)[0]}")
    forward, backward = implementation("cross_entropy", logits.data, cross_entropy_forward, cross_entropy_backward)
    loss, saved = forward(logits.data.reshape(-1, V), targets.reshape(-1), ignore_index)

    def backward_fn(dloss):
        (dlogits,) = backward(dloss, saved)
        return (dlogits.reshape(logits.shape),)

    return record(Tensor(loss), (logits,), backward_fn)
