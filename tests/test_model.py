"""The whole GPT: gradients against finite differences (float64), GPT-2 layout, overfitting one batch."""
import numpy as np
import pytest

from gradcheck import numerical_grad, relative_error
from nanogpt_np.model import GPT, GPTConfig, MODEL_PRESETS, parameter_shapes
from nanogpt_np.tensor import backward, clear_tape


def small_config(**kw):
    return GPTConfig(**{**dict(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8), **kw})


@pytest.mark.parametrize("bias", [True, False])
def test_whole_model_gradient(rng, bias):
    """Every parameter tensor, including the tied wte (embedding + output head), with masked targets."""
    cfg = small_config(bias=bias)
    model = GPT(cfg, seed=int(rng.integers(1 << 30)), dtype="float64")
    # larger-than-init weights so the check exercises real curvature, not a near-linear regime
    model.flat_params[...] = rng.standard_normal(model.flat_params.shape) * 0.3
    B, T = 2, 7
    idx = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets[0, :3] = -1                                    # masked targets (e.g. a prompt)
    model.zero_grad()
    _, loss = model(idx, targets)
    backward(loss)

    def f():
        clear_tape()
        return model.loss_on(idx, targets)

    for name, p in model.params.items():
        # eps 1e-5: the truncation error (~eps^2) stays far below 1e-6 while the round-off of the loss
        # (~1e-16 / eps) no longer dominates small gradient entries, as it did at eps 1e-6
        ids, num = numerical_grad(f, p.data, eps=1e-5, max_elements=12, rng=rng)
        err = relative_error(p.grad.reshape(-1)[ids], num)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_parameter_names_follow_gpt2():
    cfg = GPTConfig(block_size=1024, vocab_size=50257, **MODEL_PRESETS["gpt2"])
    shapes = parameter_shapes(cfg)
    assert shapes["wte.weight"] == (50257, 768)
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304)         # (in, out) like GPT-2's Conv1D
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808   # GPT-2 small, as published


def test_flat_buffers_are_shared_views(rng):
    model = GPT(small_config(), seed=0)
    model.flat_params[...] = 1.5
    assert all(np.all(p.data == 1.5) for p in model.params.values())
    decayed = [n for n, p in model.params.items() if p.data.ndim == 2]
    assert model.n_decay == sum(model.params[n].data.size for n in decayed)


def test_init_statistics():
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=4, n_head=4, n_embd=128)
    p = GPT(cfg, seed=3).params
    assert abs(p["wte.weight"].data.std() - 0.02) < 0.001
    assert abs(p["h.0.attn.c_proj.weight"].data.std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(p["h.1.ln_1.weight"].data == 1) and np.all(p["h.1.mlp.c_fc.bias"].data == 0)


def test_initial_loss_is_log_vocab(rng):
    """At GPT-2's initialisation the logits are small, so the loss is close to that of a uniform guess."""
    cfg = small_config(vocab_size=50)
    model = GPT(cfg, seed=1)
    idx = rng.integers(0, 50, size=(64, 8))                  # 512 targets: the mean is steady
    assert abs(model.loss_on(idx, idx) - np.log(50)) < 0.1


def test_overfits_one_batch(rng):
    """A model that can memorise one batch drives its loss to ~0. Every row starts with a different token, so
    no two positions share a context with different targets (that would put a floor under the loss)."""
    from nanogpt_np.optim import AdamW
    cfg = small_config(vocab_size=16, n_embd=32, block_size=16)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=1e-2, weight_decay=0.0)
    seq = rng.integers(0, 16, size=(4, 17))
    seq[:, 0] = rng.permutation(16)[:4]
    idx, targets = seq[:, :-1], seq[:, 1:]
    for _ in range(200):
        model.zero_grad()
        _, loss = model(idx, targets)
        backward(loss)
        opt.step()
    assert loss.item() < 0.01


def test_load_params_rejects_mismatch():
    model = GPT(small_config(), seed=0)
    sd = model.state_dict()
    sd["h.0.ln_1.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="h.0.ln_1.weight"):
        model.load_params(sd)
    sd = model.state_dict()
    del sd["wpe.weight"]
    with pytest.raises(ValueError, match="missing"):
        model.load_params(sd)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_load_params_refuses_integer_tensors():
    model = GPT(small_config(), seed=0)
    sd = model.state_dict()
    sd["wte.weight"] = sd["wte.weight"].view(np.uint32)          # e.g. raw bf16/fp32 bits by mistake
    with pytest.raises(ValueError, match="not floating point"):
        model.load_params(sd)
