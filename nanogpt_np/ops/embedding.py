"""Token + position embedding: the first layer of GPT.

Forward:   out[b, t, :] = wte[idx[b, t], :] + wpe[t, :]                       # (B, T, C)

Backward:  out is a sum, so d(out) flows unchanged to both tables, each row to where it was read from:
           dwte[v, :] = sum over all (b, t) with idx[b, t] == v of dout[b, t, :]  (a scatter-add)
           dwpe[t, :] = sum over b of dout[b, t, :]                               (rows t >= T stay zero)

Both tables usually have gradient buffers (model.py's flat_grads; wte's also receives the tied output head's
part): the backward then adds its sums into them (`dwte_into`, `dwpe_into`, see tensor.py) and returns None for
them, instead of a fresh (V, C) array of mostly zeros that the tape would add in a second pass.
"""
from .. import backend
from ..tensor import Tensor, fresh_grads, record
from .dispatch import implementation


def embedding_forward(wte, wpe, idx):
    """wte (V, C), wpe (Tmax, C), idx (B, T) integer -> out (B, T, C)."""
    B, T = idx.shape
    out = wte[idx] + wpe[:T]                   # (B, T, C) + (T, C) broadcast over B
    return out, (idx, wte.shape, wpe.shape)


def embedding_backward(dout, saved, dwte_into=None, dwpe_into=None):
    """dout (B, T, C) -> dwte (V, C), dwpe (Tmax, C); each None when it was added into its `*_into` buffer."""
    idx, wte_shape, wpe_shape = saved
    xp = backend.xp_of(dout)
    B, T, C = dout.shape
    # both add into part of their buffer: one still fresh on the GPU is zeroed first (tensor.fresh_grads)
    dwte = xp.zeros(wte_shape, dtype=dout.dtype) if dwte_into is None else fresh_grads.ready_to_add(dwte_into)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(B * T, C))   # repeated ids add up, unlike dwte[idx] += ...
    dwpe = xp.zeros(wpe_shape, dtype=dout.dtype) if dwpe_into is None else fresh_grads.ready_to_add(dwpe_into)
    dwpe[:T] += dout.sum(axis=0)
    return (None if dwte_into is not None else dwte), (None if dwpe_into is not None else dwpe)


def embedding_at_positions(wte, wpe, idx, positions):
    """Like embedding_forward but with explicit positions (B, T), used when decoding with a KV cache where
    each sequence of the batch may be at a different position. Inference only: nothing is saved."""
    return wte[idx] + wpe[positions]


def embedding(wte: Tensor, wpe: Tensor, idx, positions=None) -> Tensor:
    """Token plus position embeddings for the integer array idx (B, T). Returns (B, T, C).
    With `positions` (B, T) the rows of wpe are taken from there (inference only, not recorded)."""
    if positions is not None:
        return Tensor(embedding_at_positions(wte.data, wpe.data, idx, positions))
    if idx.shape[1] > wpe.shape[0]:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's block_size {wpe.shape[0]}")
    if not backend.is_gpu_array(idx) and idx.size and (idx.min() < 0 or idx.max() >= wte.shape[0]):
        raise ValueError(f"token ids must be in 0..{wte.shape[0] - 1}, got {idx.min()}..{idx.max()}")  # (negative
        # ids would silently wrap around to the last rows; the check is skipped on the GPU to avoid a sync)
    forward, backward = implementation("embedding", wte.data, embedding_forward, embedding_backward)
    out, saved = forward(wte.data, wpe.data, idx)
    return record(Tensor(out), (wte, wpe),
                  lambda dout: backward(dout, saved, dwte_into=wte.grad_buffer(), dwpe_into=wpe.grad_buffer()))
