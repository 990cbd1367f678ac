"""The output layer and the cross-entropy loss in one op, a chunk of rows at a time: the training loss without
ever holding the full (N, V) logits (N = B*T rows, V = 50257 for GPT-2: 1.65 GB of float32 at B=8, T=1024).

Same math as ops.lm_head followed by ops.cross_entropy (the mean over the targets that are not ignore_index):
    logits = x @ wte.T                              x (N, C), wte (V, C)  ->  (N, V)
    loss   = sum over kept rows n of (logsumexp(logits[n]) - logits[n, y_n]) / n_kept
Backward, for d loss = 1 (cross_entropy.py and linear.py give the two halves):
    dlogits[n] = (softmax(logits[n]) - onehot(y_n)) / n_kept   for kept rows, 0 for ignored rows
    dx         = dlogits @ wte          row n of dx needs row n of dlogits only
    dwte       = dlogits.T @ x = sum over rows n of outer(dlogits[n], x[n])
Both are sums over rows, so the rows can be taken in chunks: each chunk's logits are made, turned into the
chunk's dlogits, used for its rows of dx and added into dwte, and dropped before the next chunk. The only
(., V)-sized arrays alive are one chunk's, and dwte (V, C) itself.

So the forward computes the gradients too (when one is wanted), and saves dx and dwte instead of activations;
the backward only multiplies them by the incoming d loss (a scalar: both are linear in it). Under no_grad()
(evaluation), or when neither input needs a gradient, only the loss is computed. (On the GPU, when the trainer
has declared d loss = 1, dwte is added straight into wte's gradient buffer in the forward: kernels/lm_head_loss.py.)
"""
from .. import backend
from ..tensor import Tensor, grad_enabled, record
from .dispatch import implementation

# Rows per chunk. At GPT-2 sizes a chunk of float32 logits is 4096 * 50257 * 4 bytes = 823 MB (the GPU path in
# bf16 keeps them, and then their gradient in their place, as bf16: 412 MB), against 1.65 GB of logits (+ their
# gradient) for the whole (8*1024, V) batch. Each chunk re-reads wte and reads and writes the (V, C) float32 dwte
# once (~0.4 GB), so smaller chunks cost traffic, larger ones memory: benchmarks/gpu_model.py (bf16 + flash, B=8,
# T=1024) predicts 2048 rows: 32.2 GB written per step, 6.07 GB peak; 4096: 31.3 GB, 6.27 GB; 8192 (no chunking
# at this batch): 30.9 GB, 6.68 GB; the same 16.83 ms each (the matmuls' FLOPs do not change).
CHUNK_ROWS = 4096


def chunks(n_rows, chunk_rows):
    """(first, end) row ranges covering 0..n_rows in order, chunk_rows at a time (the last may be shorter)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [(r0, min(n_rows, r0 + chunk_rows)) for r0 in range(0, n_rows, chunk_rows)]


def lm_head_cross_entropy_forward(x, wte, targets, ignore_index=-1, *, with_grad=True, chunk_rows=CHUNK_ROWS,
                                  wte_bf16=None, round_logits=None, dwte_into=None):
    """x (N, C), wte (V, C), targets (N,) -> mean loss over kept rows (0-d), saved (dx, dwte) for d loss = 1
    (both None when with_grad is false). wte_bf16 (the model's bf16 copy, for the GPU kernel) and dwte_into (wte's
    gradient buffer: the GPU kernel adds dwte into it already in the forward when the trainer has declared
    d loss = 1, and then saves None for it) are not used here.

    round_logits: None (everything at x's precision), or a function applied once to each chunk's logits right
    after the matmul; everything after it stays at x's precision. It models a path that stores the logits in a
    narrower type: the GPU's bf16 path rounds its float32 accumulator to bf16, which is round_logits=
    kernels.bf16.round_to_bf16 (it goes through float32 too). That path also rounds the gradient dlogits to bf16
    before the two matmuls that read it; that rounding is not modelled here (the GPU tests allow for it)."""
    xp = backend.xp_of(x)
    N = x.shape[0]
    kept = targets != ignore_index                                    # (N,) bool
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise ValueError("cross_entropy: every target is masked (ignore_index); nothing to learn from")
    loss_sum = xp.zeros((), dtype=x.dtype)
    dx = xp.empty_like(x) if with_grad else None                      # (N, C)
    dwte = xp.zeros_like(wte) if with_grad else None                  # (V, C), summed over the chunks
    for r0, r1 in chunks(N, chunk_rows):
        xc, kc = x[r0:r1], kept[r0:r1]                                # (n, C), (n,)
        yc = xp.where(kc, targets[r0:r1], 0)                          # any valid index for ignored rows
        rows = xp.arange(r1 - r0)
        logits = xc @ wte.T                                           # (n, V)
        if round_logits is not None:
            logits = round_logits(logits).astype(logits.dtype)        # e.g. to bf16 values, kept at x's dtype
        shifted = logits - logits.max(axis=-1, keepdims=True)         # max 0 per row: exp cannot overflow
        e = xp.exp(shifted)
        sum_e = e.sum(axis=-1)                                        # (n,)
        losses = xp.log(sum_e) - shifted[rows, yc]                    # (n,)
        loss_sum += xp.where(kc, losses, 0.0).sum()                   # not losses * kc: an ignored row may be inf
        if with_grad:
            dlogits = e / sum_e[:, None]                              # softmax (n, V) ...
            dlogits[rows, yc] -= 1.0                                  # ... - onehot
            dlogits *= (kc / n_kept)[:, None].astype(x.dtype)         # / n_kept, 0 for ignored rows
            dx[r0:r1] = dlogits @ wte                                 # (n, V) @ (V, C)
            dwte += dlogits.T @ xc                                    # (V, n) @ (n, C)
    return loss_sum / n_kept, (dx, dwte)


def lm_head_cross_entropy_backward(dloss, saved):
    """dloss (0-d) -> dx (N, C), dwte (V, C): the saved gradients for d loss = 1, times dloss."""
    dx, dwte = saved
    if dx is None:
        raise RuntimeError("lm_head_cross_entropy: the forward ran without gradients (with_grad=False)")
    return dx * dloss, dwte * dloss


def lm_head_cross_entropy(x: Tensor, wte: Tensor, targets, ignore_index: int = -1, chunk_rows: int = None) -> Tensor:
    """Mean cross-entropy of the tied output layer's logits x (..., C) @ wte.T against targets (...), without
    materialising the (..., V) logits. Returns the loss (0-d Tensor); same value as
    cross_entropy(lm_head(x, wte), targets, ignore_index)."""
    C, V = x.shape[-1], wte.shape[0]
    if not backend.is_gpu_array(targets):        # (skipped on the GPU to avoid a host sync)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bad.any():
            raise ValueError(f"targets must be in 0..{V - 1} or ignore_index={ignore_index}, "
                             f"got {targets[bad].reshape(-1)[0]}")
    with_grad = grad_enabled() and (x.requires_grad or wte.requires_grad)
    forward, backward = implementation("lm_head_cross_entropy", x.data, lm_head_cross_entropy_forward,
                                       lm_head_cross_entropy_backward)
    loss, saved = forward(x.data.reshape(-1, C), wte.data, targets.reshape(-1), ignore_index,
                          with_grad=with_grad, chunk_rows=CHUNK_ROWS if chunk_rows is None else chunk_rows,
                          wte_bf16=wte.data_bf16, dwte_into=wte.grad_buffer() if with_grad else None)

    def backward_fn(dloss):
        dx, dwte = backward(dloss, saved)     # dwte None: the GPU kernel added it into wte's buffer in the forward
        return dx.reshape(x.shape), dwte

    return record(Tensor(loss), (x, wte), backward_fn)
