"""AdamW against a plain float64 transcription of the algorithm; clipping by global norm."""
import numpy as np

from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.optim import AdamW, adamw_update, clip_grad_norm


def reference_adamw(p, g, m, v, lr, b1, b2, eps, wd, t, decay_mask):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * decay_mask * p)
    return p, m, v


def test_adamw_matches_reference_over_steps(rng):
    n, n_decay = 50, 30
    p = rng.standard_normal(n)
    m, v = np.zeros(n), np.zeros(n)
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    mask = (np.arange(n) < n_decay).astype(float)
    for t in range(1, 6):
        g = rng.standard_normal(n)
        adamw_update(p, g, m, v, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=t, n_decay=n_decay)
        rp, rm, rv = reference_adamw(rp, g, rm, rv, 0.01, 0.9, 0.99, 1e-8, 0.1, t, mask)
    np.testing.assert_allclose(p, rp, rtol=1e-12)
    np.testing.assert_allclose(m, rm, rtol=1e-12)
    np.testing.assert_allclose(v, rv, rtol=1e-12)


def test_no_decay_on_biases_and_layernorms(rng):
    model = GPT(GPTConfig(block_size=4, vocab_size=5, n_layer=1, n_head=1, n_embd=4), seed=0, dtype="float64")
    before = model.state_dict()
    opt = AdamW(model, lr=0.1, weight_decay=0.5)
    model.zero_grad()                                    # zero gradients: only the decay can move anything
    opt.step()
    after = model.state_dict()
    for name in before:
        moved = not np.array_equal(before[name], after[name])
        assert moved == (before[name].ndim == 2 and np.any(before[name] != 0)), name


def test_clip_grad_norm(rng):
    g = rng.standard_normal(100)
    norm = np.linalg.norm(g)
    out = g.copy()
    assert abs(clip_grad_norm(out, norm / 2) - norm) < 1e-9
    assert abs(np.linalg.norm(out) - norm / 2) < 1e-6
    out = g.copy()
    clip_grad_norm(out, norm * 2)
    np.testing.assert_array_equal(out, g)
