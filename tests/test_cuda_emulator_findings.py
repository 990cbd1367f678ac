"""Kernel bugs the CUDA emulator found (issue 12, items 1 and 2), each as a small test of the real .cu code.
Each failed on the kernels before their fixes and passes now: they guard against the bug coming back."""
import numpy as np
import pytest

from emulation.cuda import emulator as emu
from nanogpt_np.kernels.bf16 import float32_to_bf16

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler (g++) for the CUDA emulator")


def cross_entropy(logits, targets, schedule="inorder"):
    """cross_entropy_fused on the emulator: (per-row losses, dlogits) with n_kept = number of kept rows."""
    N, V = logits.shape
    losses = np.full(N, np.nan, np.float32)
    d = np.full((N, V), np.nan, np.float32)
    n_kept = np.array([max(1, int((targets != -1).sum()))], np.float32)
    emu.load("cross_entropy").launch("cross_entropy_fused", (N,), (256,),
                                     (losses, d, logits, targets.astype(np.int64), n_kept, np.int32(V), np.int64(-1)),
                                     schedule=schedule)
    return losses, d


def reference_losses(logits, targets):
    z = logits.astype(np.float64)
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(z)), targets]


def test_cross_entropy_kernel_on_ordinary_logits():
    """The control: the kernel is right on ordinary inputs (so the failures below are about the edge cases)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 1000)).astype(np.float32)
    targets = np.array([0, 999, 417])
    losses, _ = cross_entropy(logits, targets)
    np.testing.assert_allclose(losses, reference_losses(logits, targets), rtol=1e-5)


def test_cross_entropy_small_loss_next_to_large_logits():
    logits = np.full((1, 300), -30.0, np.float32)
    logits[0, 7] = 100.0                     # the target: loss = log(1 + 299 e^-130) ~ 0 ...
    logits[0, 8] = 88.0                      # ... + e^-12 ~ 6.1e-6, far below one ulp of 100 (7.6e-6)
    losses, _ = cross_entropy(logits, np.array([7]))
    ref = reference_losses(logits, np.array([7]))
    assert abs(losses[0] - ref[0]) <= 1e-5 * abs(ref[0]), (losses[0], ref[0])


def test_cross_entropy_minus_infinity_logit():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 300)).astype(np.float32)
    logits[0, 5] = -np.inf                   # thread 5's first element (masked-out vocabulary entries do this)
    losses, d = cross_entropy(logits, np.array([2]))
    assert np.isfinite(losses).all() and np.isfinite(d).all()
    np.testing.assert_allclose(losses, reference_losses(logits, np.array([2])), rtol=1e-5)


def test_cross_entropy_target_out_of_range_is_not_read():
    logits = np.random.default_rng(2).standard_normal((1, 300)).astype(np.float32)
    losses, _ = cross_entropy(logits, np.array([300]))
    assert not np.isfinite(losses[0]) or losses[0] == 0     # any defined answer, as long as nothing is read


NAN_BITS = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA12345, 0xFFFFFFFF, 0x7FBFFFFF], np.uint32)


def test_bf16_kernel_nan_conversion_matches_the_reference():
    x = NAN_BITS.view(np.float32)
    out = np.zeros(x.size, np.uint16)
    emu.load("bf16").launch("f32_to_bf16", (1,), (32,), (out, x, np.int64(x.size)))
    np.testing.assert_array_equal(out, float32_to_bf16(x))


def test_adamw_bf16_copy_of_nan_matches_the_reference():
    n = NAN_BITS.size
    p = NAN_BITS.view(np.float32).copy()
    g, m, v = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    p_bf16 = np.zeros(n, np.uint16)
    f = np.float32
    emu.load("adamw").launch("adamw_update", (1,), (32,),
                             (p, g, m, v, p_bf16, emu.NULL, np.int64(n), np.int64(0),
                              np.array([0, 1, 1], np.float32), f(0.9), f(0.95), f(1e-8), f(0)))   # [lr, bc1, bc2]
    np.testing.assert_array_equal(p_bf16, float32_to_bf16(p))
