"""Sampling text from a trained model: a KV cache, temperature, top-k, top-p, and streaming.

Generating token t+1 only needs the keys and values of tokens 0..t, which do not change once computed. The
KV cache keeps them per layer, so after the prompt has been run once ("prefill"), each new token is a forward
pass over one position ("decode"), not over the whole context.

Sampling turns the last position's logits into a token:
    logits / temperature             (temperature 0 means greedy: always the most likely token)
    keep the top_k largest           (others get probability 0)
    keep the smallest set whose probability reaches top_p   (nucleus sampling)
    draw from the softmax of what is left, with a seeded generator (same seed, same text)
"""
import numpy as np

from . import backend
from .tensor import no_grad


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of up to `max_len` positions.

    k[layer], v[layer]: (B, NH, max_len, HS) on the model's device; lengths (B,) on the host: how many
    positions each sequence holds. Sequences in one batch may have different lengths (batched serving)."""

    def __init__(self, config, batch_size=1, max_len=None, dtype="float32"):
        xp = backend.xp()
        max_len = max_len or config.block_size
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self.max_len = max_len

    def reset(self, rows=None):
        """Forget the sequences in `rows` (all when None); their slots can be reused."""
        if rows is None:
            self.lengths[:] = 0
        else:
            self.lengths[rows] = 0

    def row(self, b) -> "KVCache":
        """A one-sequence view of row b that shares memory with this cache (prefill one request of a batch)."""
        view = KVCache.__new__(KVCache)
        view.k = [k[b:b + 1] for k in self.k]
        view.v = [v[b:b + 1] for v in self.v]
        view.lengths = self.lengths[b:b + 1]          # a view: advancing it advances this cache's row b
        view.max_len = self.max_len
        return view


def sample_from_logits(logits, rng: np.random.Generator, temperature=1.0, top_k=None, top_p=None) -> int:
    """One token id from a (V,) vector of logits (host numpy, float64 math for stable probabilities)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size:
        kth_largest = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth_largest, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")                  # most likely first
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < top_p                    # tokens needed to reach top_p
        kept = order[keep]
        probs_kept = probs[kept] / probs[kept].sum()
        return int(kept[rng.choice(kept.size, p=probs_kept)])
    return int(rng.choice(probs.size, p=probs))


def check_sampling_args(temperature, top_k, top_p) -> None:
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             stop_ids=()):
    """Yield new token ids one at a time (streaming). The prompt must hold at least one token.

    When the context fills up (block_size positions), the cache is rebuilt from the last half of the
    context and generation continues: older tokens are forgotten, as with any fixed-context model."""
    check_sampling_args(temperature, top_k, top_p)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt must contain at least one token")
    vocab = model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"prompt holds token ids outside the vocabulary (0..{vocab - 1})")
    block = model.config.block_size
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(model.config, batch_size=1, dtype=model.dtype)
    try:
        with no_grad():
            pending = ids[-block:]                           # tokens not yet in the cache
            for _ in range(max_new_tokens):
                if cache.lengths[0] + len(pending) > block:  # context full: keep the last half
                    cache.reset()
                    pending = ids[-max(1, block // 2):]
                idx = backend.to_device(np.array([pending], dtype=np.int64))
                logits, _ = model(idx, kv_cache=cache)                       # (1, len(pending), V)
                next_id = sample_from_logits(backend.to_numpy(logits.data[0, -1]), rng, temperature, top_k, top_p)
                ids.append(next_id)
                pending = [next_id]
                yield next_id
                if next_id in stop_ids:
                    return
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, prompt, max_new_tokens, **sampling) -> str:
    """The prompt's continuation as text (decoded once at the end, so multi-byte characters stay whole)."""
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else _start_ids(tokenizer)
    new = list(generate(model, ids, max_new_tokens, **sampling))
    return tokenizer.decode(new)


def _start_ids(tokenizer):
    """What to condition on for an empty prompt: <|endoftext|> when the tokenizer has one, else a newline."""
    if getattr(tokenizer, "eot_id", None) is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n")


def stream_text(model, tokenizer, prompt, max_new_tokens, **sampling):
    """Yield the continuation as text pieces while it is generated. Bytes of a character split across tokens
    are held back until the character is complete (an incremental UTF-8 decoder)."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else _start_ids(tokenizer)
    for token in generate(model, ids, max_new_tokens, **sampling):
        piece = decoder.decode(tokenizer.decode_bytes([token]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
