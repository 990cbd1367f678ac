"""KV-cache decoding equals full recomputation; sampling filters do what they say."""
import numpy as np
import pytest

from nanogpt_np.generate import KVCache, generate, sample_from_logits
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.tensor import no_grad


def tiny_model(seed=0, **kw):
    cfg = GPTConfig(**{**dict(block_size=16, vocab_size=13, n_layer=2, n_head=2, n_embd=8), **kw})
    model = GPT(cfg, seed=seed, dtype="float64")
    model.flat_params[...] = np.random.default_rng(seed).standard_normal(model.flat_params.shape) * 0.3
    return model.eval()


def test_cached_logits_equal_full_forward(rng):
    model = tiny_model(int(rng.integers(1000)))
    ids = rng.integers(0, 13, size=(1, 12))
    with no_grad():
        full, _ = model(ids)
        cache = KVCache(model.config, 1, dtype="float64")
        first, _ = model(ids[:, :5], kv_cache=cache)                 # prefill 5
        steps = [model(ids[:, t:t + 1], kv_cache=cache)[0].data for t in range(5, 12)]   # then one at a time
    cached = np.concatenate([first.data] + steps, axis=1)
    np.testing.assert_allclose(cached, full.data, rtol=1e-10, atol=1e-12)


def test_batched_cache_with_different_lengths(rng):
    """Two sequences of different lengths decoded together match decoding each alone."""
    model = tiny_model(3)
    a, b = rng.integers(0, 13, size=7), rng.integers(0, 13, size=3)
    with no_grad():
        cache = KVCache(model.config, 2, dtype="float64")
        model(a[None, :6], kv_cache=cache.row(0))
        model(b[None, :2], kv_cache=cache.row(1))
        assert list(cache.lengths) == [6, 2]
        both, _ = model(np.array([[a[6]], [b[2]]]), kv_cache=cache)
        alone_a, _ = model(a[None, :])
        alone_b, _ = model(b[None, :])
    np.testing.assert_allclose(both.data[0, 0], alone_a.data[0, -1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(both.data[1, 0], alone_b.data[0, -1], rtol=1e-10, atol=1e-12)


def test_greedy_generation_matches_argmax_of_full_forward():
    model = tiny_model(5)
    prompt = [1, 2, 3]
    out = list(generate(model, prompt, 8, temperature=0))
    ids = list(prompt)
    with no_grad():
        for _ in range(8):
            logits, _ = model(np.array([ids]))
            ids.append(int(np.argmax(logits.data[0, -1])))
    assert out == ids[3:]


def test_generation_past_the_context_and_seeded():
    model = tiny_model(7)
    a = list(generate(model, [1], 40, temperature=1.0, seed=11))        # block_size is 16
    b = list(generate(model, [1], 40, temperature=1.0, seed=11))
    assert len(a) == 40 and a == b and all(0 <= t < 13 for t in a)


def test_top_k_and_top_p(rng):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = [sample_from_logits(logits, rng, top_k=2) for _ in range(300)]
    assert set(draws) <= {0, 1} and len(set(draws)) == 2
    draws = [sample_from_logits(logits, rng, top_p=0.75) for _ in range(300)]    # 0.5 + 0.3 reaches 0.75
    assert set(draws) == {0, 1}
    draws = [sample_from_logits(logits, rng, top_p=0.5) for _ in range(50)]      # the first alone reaches 0.5
    assert set(draws) == {0}
    counts = np.bincount([sample_from_logits(logits, rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_bad_sampling_arguments():
    model = tiny_model()
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            list(generate(model, [1], 2, **kwargs))
    with pytest.raises(ValueError, match="vocabulary"):
        list(generate(model, [99], 2))


def test_generation_with_a_one_token_context():
    model = tiny_model(2, block_size=1)
    assert len(list(generate(model, [3, 4], 5, temperature=1.0, seed=0))) == 5
