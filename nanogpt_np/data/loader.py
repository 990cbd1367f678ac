"""BatchLoader: random (B, T+1) windows from 1-D token arrays, with a saveable RNG state.

A language model is trained on windows of T+1 consecutive tokens: the first T are the input `x`
and the last T (the same window shifted by one) are the targets `y`.

What it handles:
  * one 1-D integer array, or a list of them ("shards"): np.ndarray or np.memmap, any integer dtype
    (uint16, uint32, int32, int64, ...). A memmap is only ever sliced, never read whole, so the
    data can be far larger than memory.
  * random batches from numpy.random.Generator(PCG64(seed)). With several shards every possible
    window start is equally likely, which is the same as picking a shard with probability
    proportional to its number of windows and then a uniform offset inside it.
  * state_dict() / load_state_dict(): the generator state as plain JSON (ints as strings), so a
    resumed run continues with exactly the batches the interrupted run would have drawn.
  * iter_sequential(): non-overlapping windows in order (deterministic, no RNG); iter_spread(n): n batches
    of windows spread evenly over all the data, for a validation loss that samples the whole split.
  * data-parallel ranks (rank, world_size): every rank draws the same B window starts of the global
    batch and reads only its rows, [rank * B/N, (rank+1) * B/N). The generator, and so the saved state,
    is that of the global batch stream: the same on every rank, whatever the number of ranks.

What it does not handle: windows never cross a shard boundary (a shard shorter than T+1 tokens
contributes nothing), and there is no shuffling "without replacement" (random batches may repeat
windows, as in nanoGPT).
"""
from __future__ import annotations

import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

ArrayLike = Union[np.ndarray, Sequence[np.ndarray]]


def spread(count: int, wanted: int) -> np.ndarray:
    """`wanted` of the indices 0 .. count-1, evenly spaced from the first one on (all of them when
    wanted >= count): [0, count/n, 2 count/n, ...] rounded down, for n = min(wanted, count)."""
    n = min(wanted, count)
    return np.arange(n, dtype=np.int64) * count // n


def _as_shards(tokens) -> List[np.ndarray]:
    """Turn the `tokens` argument into a list of 1-D integer arrays (memmaps are kept as memmaps)."""
    if isinstance(tokens, np.ndarray):
        shards = [tokens]
    elif isinstance(tokens, (list, tuple)) and len(tokens) > 0 and all(
        isinstance(t, np.ndarray) for t in tokens
    ):
        shards = list(tokens)
    elif isinstance(tokens, (list, tuple)):
        # a plain list of ints: one small in-memory array
        shards = [np.asarray(tokens, dtype=np.int64)]
    else:
        raise TypeError(
            f"tokens must be a 1-D integer numpy array or a list of them, got {type(tokens).__name__}"
        )
    for i, s in enumerate(shards):
        if s.ndim != 1:
            raise ValueError(f"shard {i} must be 1-D, got shape {s.shape}")
        if not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"shard {i} must hold integers, got dtype {s.dtype}")
    return shards


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that data-parallel rank `rank` of `world_size` trains on."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {world_size} ranks")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


class BatchLoader:
    """Random (B, T+1) windows from a 1-D token array, reproducible from a saved state."""

    def __init__(self, tokens: ArrayLike, batch_size: int, block_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        self.rows = rank_rows(batch_size, rank, world_size)      # this rank's rows of every global batch
        self.shards = _as_shards(tokens)
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)

        T = self.block_size
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)  # (n_shards,)
        # number of valid window starts per shard: start i needs tokens i .. i+T (T+1 of them)
        self.windows = np.maximum(lengths - T, 0)  # (n_shards,)
        self.n_tokens = int(lengths.sum())
        if self.windows.sum() == 0:
            where = "" if len(self.shards) == 1 else f" (longest of {len(self.shards)} shards: {int(lengths.max())})"
            raise ValueError(
                f"data has {self.n_tokens} tokens{where}, fewer than block_size+1 = {T + 1}; "
                f"use a smaller block_size or more data"
            )
        # cumulative window counts: global window index g lives in shard searchsorted(ends, g, 'right')
        self._ends = np.cumsum(self.windows)  # (n_shards,)
        self._starts = self._ends - self.windows  # (n_shards,)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.batches_drawn = 0

    # ------------------------------------------------------------------ random batches
    def _gather(self, shard_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Read the (B, T+1) windows starting at the given (shard, offset) pairs, as int64."""
        T1 = self.block_size + 1
        out = np.empty((len(offsets), T1), dtype=np.int64)  # (B, T+1)
        for row, (k, off) in enumerate(zip(shard_ids.tolist(), offsets.tolist())):
            out[row] = self.shards[k][off : off + T1]  # slicing a memmap reads just these pages
        return out

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray]:
        """Return x, y: int64 arrays of shape (B/N, T) (N ranks); y[:, t] is the token after x[:, t]."""
        total = int(self._ends[-1])
        g = self.rng.integers(0, total, size=self.batch_size)  # (B,) global window index, whole global batch
        g = g[self.rows]  # (B/N,) this rank's share (all B with one rank)
        shard_ids = np.searchsorted(self._ends, g, side="right")  # (B,)
        offsets = g - self._starts[shard_ids]  # (B,) start inside the shard
        win = self._gather(shard_ids, offsets)  # (B, T+1)
        self.batches_drawn += 1
        return win[:, :-1], win[:, 1:]

    # ------------------------------------------------------------------ saving / resuming
    def state_dict(self) -> dict:
        """Everything needed to continue the random batch stream, as JSON-serialisable values.

        The PCG64 state holds 128-bit integers; they are stored as decimal strings so that any
        JSON reader (not only Python's) keeps them exact.
        """
        st = self.rng.bit_generator.state
        return {
            "version": 1,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "n_tokens": self.n_tokens,
            "n_shards": len(self.shards),
            "batches_drawn": self.batches_drawn,
            "bit_generator": st["bit_generator"],
            "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]),
            "has_uint32": int(st["has_uint32"]),
            "uinteger": int(st["uinteger"]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from state_dict(); next_batch() then continues as the saved loader would.

        The continuation is exact only on the same data with the same batch_size and block_size; a
        mismatch gives a warning (the stream is still valid, just different).
        """
        if state.get("bit_generator", "PCG64") != "PCG64":
            raise ValueError(f"loader state uses bit generator {state.get('bit_generator')!r}, expected 'PCG64'")
        for key, mine in (("batch_size", self.batch_size), ("block_size", self.block_size),
                          ("n_tokens", self.n_tokens), ("n_shards", len(self.shards))):
            if key in state and int(state[key]) != mine:
                warnings.warn(
                    f"loader state was saved with {key}={state[key]}, this loader has {mine}; "
                    f"batches after resume will differ from the original run",
                    stacklevel=2,
                )
        self.rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state.get("has_uint32", 0)),
            "uinteger": int(state.get("uinteger", 0)),
        }
        self.seed = int(state.get("seed", self.seed))
        self.batches_drawn = int(state.get("batches_drawn", 0))

    # ------------------------------------------------------------------ evaluation pass
    def _sequential_starts(self) -> Iterator[Tuple[int, int]]:
        """(shard, offset) of the non-overlapping windows: offsets 0, T, 2T, ... inside each shard."""
        T = self.block_size
        for k, s in enumerate(self.shards):
            for off in range(0, len(s) - T, T):  # need off + T + 1 <= len(s)
                yield k, off

    def num_sequential_windows(self) -> int:
        T = self.block_size
        return int(sum((len(s) - 1) // T for s in self.shards if len(s) > T))

    def __len__(self) -> int:
        """Number of batches iter_sequential() yields with no max_batches (last one may be short)."""
        return -(-self.num_sequential_windows() // self.batch_size)

    def iter_spread(self, max_batches: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """max_batches batches of (x, y) windows whose starts are spread evenly over all the data (every
        shard, first to last), in order. The validation loss measured on them samples the whole split, not
        just its beginning, and is measured on the same windows every time, so evaluations compare. With
        no more non-overlapping windows in the data than that, this is iter_sequential(): all of them."""
        B = self.batch_size
        if max_batches * B >= self.num_sequential_windows():
            yield from self.iter_sequential()
            return
        g = spread(int(self._ends[-1]), max_batches * B)  # (n,) global window indices, as in next_batch
        shard_ids = np.searchsorted(self._ends, g, side="right")
        offsets = g - self._starts[shard_ids]
        for i in range(0, len(g), B):
            win = self._gather(shard_ids[i : i + B], offsets[i : i + B])  # (B, T+1)
            yield win[:, :-1], win[:, 1:]

    def iter_sequential(self, max_batches: Optional[int] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) int64 (b, T) over non-overlapping windows in order, shard by shard.

        Deterministic and independent of the random stream (it does not touch the RNG). Every
        batch has batch_size rows except possibly the last, which holds the leftover windows.
        The tail of each shard that does not fill a whole window is skipped.
        """
        B = self.batch_size
        ks: List[int] = []
        offs: List[int] = []
        done = 0
        for k, off in self._sequential_starts():
            ks.append(k)
            offs.append(off)
            if len(ks) == B:
                win = self._gather(np.array(ks), np.array(offs))  # (B, T+1)
                yield win[:, :-1], win[:, 1:]
                ks, offs = [], []
                done += 1
                if max_batches is not None and done >= max_batches:
                    return
        if ks and (max_batches is None or done < max_batches):
            win = self._gather(np.array(ks), np.array(offs))  # (b, T+1), b < B
            yield win[:, :-1], win[:, 1:]
