"""Continuous batching: many sequences share one batched KV cache and one forward pass per new token.

Serving one request at a time wastes the machine: decoding a single sequence is a forward pass over one
position, too little work to keep a CPU's vector units (let alone a GPU) busy. Decoding 8 or 32 sequences in
one forward pass costs little more than decoding one, so the server runs them together:

    a FIFO queue of waiting sequences                  (fair: first come, first served)
    one worker thread that owns the model and a KVCache with `max_batch` rows ("slots")
    loop:
        admit:   while a slot is free and a sequence waits, prefill its prompt into that row of the cache
                 (a forward pass over the prompt, shape (1, P)) and sample its first token
        decode:  one forward pass over the last token of every active row, shape (n, 1), each row at its
                 own position (the cache keeps per-row lengths); sample one token per row with that
                 sequence's own random generator
        finish:  a sequence leaves when it samples a stop token, reaches max_tokens, fills the context,
                 passes its deadline, or is cancelled (its client went away); its slot is free at once

This is "continuous" batching: sequences join and leave between any two decode steps, instead of the batch
waiting for its slowest member. Active sequences always occupy rows 0..n-1 of the cache: when one finishes,
the last active row is copied into its place, so a decode step works on exactly the rows in use.

Exactness. Each sequence has its own `np.random.default_rng(seed)` and is sampled with
`generate.sample_from_logits`, exactly as `generate.generate` (and sample.py) does. The prompt is prefilled
alone, with the same shapes as `generate`; a sequence that decodes alone (n == 1) runs the very same
computation as `generate`, so its tokens are bit for bit those of sample.py with the same seed. When several
rows decode together the matrix shapes differ, which may change the last bits of float32 logits (a different
order of summation); the sampled token changes only if a random draw lands within that rounding of a boundary
between two tokens (about 1e-7 in probability per token in float32, 1e-16 in float64).

Context. Generation stops (finish reason "length") when the row's cache is full (block_size positions):
unlike `generate`, serving never rebuilds the cache from the last half of the context, so a completion is
at most block_size - prompt_length + 1 tokens long.

Threads. Only the worker thread touches the model (the autograd "no_grad" switch is a process-wide flag, so
the worker holds it for its whole life). Other threads talk to it through `submit`, `Sequence.cancel` and
each sequence's event queue.
"""
import collections
import queue
import threading
import time

import numpy as np

from .. import backend
from ..generate import KVCache, check_sampling_args, sample_from_logits
from ..tensor import no_grad


class QueueFull(RuntimeError):
    """More sequences are waiting than the scheduler accepts (the server answers 503)."""


class Sequence:
    """One sequence to generate (one "choice" of a request).

    Events are put on `events` (a queue shared by all choices of one request) as tuples:
        (index, "token", token_id)      one per sampled token, in order
        (index, "done", reason)          last: "stop", "length", "cancelled" or "error"
    """

    def __init__(self, prompt_ids, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 stop_ids=(), deadline=None, events=None, index=0):
        check_sampling_args(temperature, top_k, top_p)
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.max_tokens = int(max_tokens)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.stop_ids = frozenset(stop_ids)
        self.deadline = deadline                      # time.monotonic() value, or None
        self.events = events if events is not None else queue.Queue()
        self.index = index
        self.generated = 0                            # tokens sampled so far
        self.last_token = None
        self.finish_reason = None                     # set once, by the worker
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to drop this sequence (client gone, stop string seen); safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """The worker thread and its batched KV cache. `start()` it, `submit()` sequences, `stop()` it."""

    def __init__(self, model, max_batch=8, max_queue=256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.block_size = model.config.block_size
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache = KVCache(model.config, batch_size=max_batch, dtype=model.dtype)
        self.waiting = collections.deque()            # sequences not yet admitted, oldest first
        self.active = []                              # active[i] lives in row i of the cache
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batching-worker", daemon=True)
        # counters for /health and benchmarks
        self.steps = 0                                # decode steps run
        self.tokens = 0                               # tokens sampled
        self.max_active_seen = 0                      # the largest batch decoded together

    # ----- the interface for other threads -----
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout=5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, sequences) -> None:
        """Queue sequences (all or none; raises QueueFull). They are admitted in the order given."""
        sequences = list(sequences)
        for s in sequences:
            if len(s.prompt_ids) > self.block_size:
                raise ValueError(f"a prompt of {len(s.prompt_ids)} tokens does not fit the context "
                                 f"({self.block_size})")
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (limit {self.max_queue})")
            self.waiting.extend(sequences)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "slots": self.max_batch,
                    "decode_steps": self.steps, "tokens": self.tokens, "max_batch_seen": self.max_active_seen,
                    "worker_alive": self._thread.is_alive()}

    # ----- the worker -----
    def _run(self) -> None:
        with no_grad():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.active:
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = []
                    while self.waiting and len(self.active) + len(admitted) < self.max_batch:
                        admitted.append(self.waiting.popleft())
                try:
                    for seq in admitted:
                        self._prefill(seq)
                    self._drop_finished()
                    if self.active:
                        self._decode_step()
                        self._drop_finished()
                except Exception as e:        # a bug or a device error: fail these requests, keep serving
                    for seq in self.active + [s for s in admitted if not s.done]:
                        self._finish(seq, "error")
                    self.active = []
                    self.cache.reset()
                    print(f"serve: generation failed: {type(e).__name__}: {e}", flush=True)
        for seq in self.active + list(self.waiting):
            self._finish(seq, "cancelled")

    def _prefill(self, seq: Sequence) -> None:
        """Run the prompt into a free row and sample the first token (shapes as in generate.generate)."""
        if self._should_drop(seq):
            return
        slot = len(self.active)
        self.cache.lengths[slot] = 0
        idx = backend.to_device(np.array([seq.prompt_ids], dtype=np.int64))
        logits, _ = self.model(idx, kv_cache=self.cache.row(slot))           # (1, P, V)
        self.active.append(seq)
        self.max_active_seen = max(self.max_active_seen, len(self.active))
        self._take_token(seq, slot, backend.to_numpy(logits.data[0, -1]))

    def _decode_step(self) -> None:
        """One forward pass over the last token of every active row."""
        n = len(self.active)
        idx = backend.to_device(np.array([[s.last_token] for s in self.active], dtype=np.int64))
        logits, _ = self.model(idx, kv_cache=_first_rows(self.cache, n))      # (n, 1, V)
        host = backend.to_numpy(logits.data[:, -1])                          # one device->host copy
        self.steps += 1
        self.max_active_seen = max(self.max_active_seen, n)
        for row, seq in enumerate(self.active):
            self._take_token(seq, row, host[row])

    def _take_token(self, seq: Sequence, row: int, logits) -> None:
        """Sample one token for `seq` from its logits, hand it out, and decide whether the sequence ends."""
        token = sample_from_logits(logits, seq.rng, seq.temperature, seq.top_k, seq.top_p)
        seq.generated += 1
        seq.last_token = token
        self.tokens += 1
        seq.events.put((seq.index, "token", token))
        if token in seq.stop_ids:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")
        elif self.cache.lengths[row] >= self.block_size:      # no room to feed this token back in
            self._finish(seq, "length")

    def _should_drop(self, seq: Sequence) -> bool:
        """Finish a sequence that was cancelled or ran out of time; True if it was."""
        if seq.done:
            return True
        if seq.cancelled:
            self._finish(seq, "cancelled")
        elif seq.deadline is not None and time.monotonic() > seq.deadline:
            self._finish(seq, "length")                        # the time limit cuts like max_tokens
        return seq.done

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.events.put((seq.index, "done", reason))

    def _drop_finished(self) -> None:
        """Free the rows of finished sequences, keeping the active ones in rows 0..n-1."""
        with self._cond:
            row = 0
            while row < len(self.active):
                if not self._should_drop(self.active[row]):
                    row += 1
                    continue
                last = len(self.active) - 1
                if row != last:                                # move the last row into the hole
                    _copy_row(self.cache, last, row)
                    self.active[row] = self.active[last]
                self.active.pop()
                self.cache.lengths[last] = 0
            # waiting sequences that were cancelled or timed out leave the queue now, not when admitted
            if any(s.cancelled or s.deadline is not None for s in self.waiting):
                keep = collections.deque(s for s in self.waiting if not self._should_drop(s))
                self.waiting = keep


def _first_rows(cache: KVCache, n: int) -> KVCache:
    """A view of rows 0..n-1 of `cache` that shares its memory (and advances its lengths)."""
    view = KVCache.__new__(KVCache)
    view.k = [k[:n] for k in cache.k]
    view.v = [v[:n] for v in cache.v]
    view.lengths = cache.lengths[:n]
    view.max_len = cache.max_len
    return view


def _copy_row(cache: KVCache, src: int, dst: int) -> None:
    length = int(cache.lengths[src])
    for k in cache.k:
        k[dst, :, :length] = k[src, :, :length]
    for v in cache.v:
        v[dst, :, :length] = v[src, :, :length]
    cache.lengths[dst] = length
