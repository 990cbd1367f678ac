"""GPU softmax cross-entropy: cross_entropy.cu behind the `cross_entropy` op contract.

The forward launch already writes the gradient (for d loss = 1) in the same pass over the logits, so the
backward only hands it out. Two switches for the trainer:
  set_inplace(True)            the gradient overwrites the logits buffer (no second (N, V) array; the logits
                               returned by the model's forward are then gone - fine in a training step)
  set_assume_unit_dloss(True)  the backward skips multiplying by d loss (the tape seeds the root with ones;
                               a device 0-d array cannot be compared with 1 without a host sync)
Without the second switch a d loss held on the device costs one extra scaling pass (read + write N*V).
The number of kept targets is counted on the device; when every target is masked the loss is NaN instead
of the reference's ValueError (raising would need a host sync). Likewise a target outside [0, V) that is not
ignore_index makes the loss NaN (and that row's gradient) where the CPU op raises (ops/cross_entropy.py still
raises for targets that are on the host, where the check costs no sync).
"""
import numpy as np

from .compile import device_array, launch
from .launch import NULL, elementwise

_inplace = False
_assume_unit_dloss = False


def set_inplace(flag: bool) -> None:
    global _inplace
    _inplace = bool(flag)


def set_assume_unit_dloss(flag: bool) -> None:
    global _assume_unit_dloss
    _assume_unit_dloss = bool(flag)


def assume_unit_dloss() -> bool:
    """Whether backward passes may take d loss = 1 (also read by kernels/lm_head_loss.py)."""
    return _assume_unit_dloss


def cross_entropy_forward(logits, targets, ignore_index=-1, *, with_grad=None):
    """logits (N, V), targets (N,) -> mean loss over kept rows (0-d float32 cupy array).

    with_grad (default: whether the tape records, tensor.grad_enabled()) decides whether the same pass also
    writes the gradient; evaluation under no_grad() only reads the logits."""
    import cupy as cp
    if with_grad is None:
        from ..tensor import grad_enabled
        with_grad = grad_enabled()
    N, V = logits.shape
    logits = cp.ascontiguousarray(logits, dtype=cp.float32)
    targets = device_array(targets, cp.int64)
    n_kept = (targets != ignore_index).sum(dtype=cp.float32)       # stays on the device
    losses = cp.empty((N,), dtype=cp.float32)
    dlogits = None
    if with_grad:
        dlogits = logits if _inplace else cp.empty_like(logits)
    block = 1024 if V >= 8192 else 256
    launch("cross_entropy", "cross_entropy_fused", (N,), (block,),
           (losses, NULL if dlogits is None else dlogits, logits, targets, n_kept, np.int32(V), np.int64(ignore_index)))
    loss = losses.sum() / n_kept
    return loss, (dlogits,)


def cross_entropy_backward(dloss, saved):
    """dloss (0-d, Python number or device array) -> (dlogits (N, V),)."""
    import cupy as cp
    (dlogits,) = saved
    if dlogits is None:
        raise RuntimeError("cross_entropy: forward ran with with_grad=False")
    if dloss is None or _assume_unit_dloss:
        return (dlogits,)
    if isinstance(dloss, (int, float, np.floating, np.integer)):
        if float(dloss) != 1.0:
            dlogits *= np.float32(dloss)
        return (dlogits,)
    s = cp.ascontiguousarray(cp.asarray(dloss, dtype=cp.float32).reshape(()))
    grid, block = elementwise(dlogits.size)
    launch("cross_entropy", "scale_by_device_scalar", grid, block, (dlogits, s, np.int64(dlogits.size)))
    return (dlogits,)
