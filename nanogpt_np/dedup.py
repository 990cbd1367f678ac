"""De-duplication: exact (hash of the normalised text) and near-duplicate (MinHash + LSH, in numpy).

Both keep the FIRST document of a group and drop the later ones, so the result depends on input order
(which is deterministic in this pipeline).

Exact: the key is a 16-byte BLAKE2b digest of the text after casefolding and collapsing all whitespace
to single spaces ("Hello  World\n" and "hello world" are the same document). Memory: about 100 bytes
per distinct document (a Python set of digests).

Near: two documents are near duplicates when the Jaccard similarity of their sets of character
k-grams ("shingles", k=5 by default, over the same normalised UTF-8 bytes) is at least `threshold`.
  1. shingles are hashed to 64-bit ints with a rolling polynomial hash, vectorised in numpy;
  2. a MinHash signature keeps, for each of `num_perm` random hash functions h(x) = (a*x + b) mod 2**64
     (top 32 bits), the smallest value over the shingles. For two documents the fraction of equal
     signature entries estimates their Jaccard similarity;
  3. locality-sensitive hashing: the signature is cut into `bands` bands of rows = num_perm/bands
     values; documents sharing any whole band are candidates, and a candidate counts as a duplicate
     when its estimated similarity is >= threshold. With 16 bands x 8 rows a pair at similarity 0.8
     becomes a candidate with probability 1-(1-0.8**8)**16 = 0.95, at 0.9: 0.9999, at 0.5: 0.06.
Memory: num_perm*4 bytes per kept document (512 B at 128) plus the band tables, so tens of millions of
documents need a machine with matching RAM. Not handled: substring-level (paragraph) duplicates, and
distributing the tables over several machines.
"""
from __future__ import annotations

import hashlib
import re
from typing import Dict, List, Optional

import numpy as np

_WS = re.compile(r"\s+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalize_for_dedup(text: str) -> str:
    """Casefold and collapse every run of whitespace to one space."""
    return _WS.sub(" ", text.casefold()).strip()


def exact_key(text: str) -> bytes:
    """16-byte digest of the normalised text."""
    return hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers keys; is_duplicate(key) is True for a key seen before (and records new ones)."""

    def __init__(self):
        self.seen = set()

    def is_duplicate(self, key: bytes) -> bool:
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of each uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the k-byte shingles of the normalised text. Shape (S,), uint64."""
    data = np.frombuffer(normalize_for_dedup(text).encode("utf-8"), dtype=np.uint8).astype(np.uint64)  # (n,)
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(k, n)  # a text shorter than k is one shingle
    m = n - width + 1  # number of shingles
    h = np.zeros(m, dtype=np.uint64)  # (m,)
    with np.errstate(over="ignore"):
        for j in range(width):  # h = sum_j byte[i+j] * 257**(width-1-j)  (mod 2**64)
            h = h * np.uint64(257) + data[j : j + m]
        h = _mix64(h)
    return np.unique(h)


class MinHasher:
    """MinHash signatures of shape (num_perm,) uint32 (see the module docstring)."""

    def __init__(self, num_perm: int = 128, k: int = 5, seed: int = 0, chunk: int = 4096):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm, self.k, self.chunk = num_perm, k, chunk
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        h = shingle_hashes(text, self.k)  # (S,)
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)  # (P,)
        with np.errstate(over="ignore"):
            for s in range(0, len(h), self.chunk):  # bounded memory: (P, chunk) at a time
                part = h[None, s : s + self.chunk]  # (1, c)
                vals = (self.a[:, None] * part + self.b[:, None]) >> np.uint64(32)  # (P, c)
                np.minimum(sig, vals.min(axis=1), out=sig)
        return sig.astype(np.uint32)


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and explanations)."""
    x, y = shingle_hashes(a, k), shingle_hashes(b, k)
    union = len(np.union1d(x, y))
    return len(np.intersect1d(x, y)) / union if union else 1.0


class NearDedup:
    """LSH index over the signatures of kept documents.

    add(sig) returns the index (in order of adding) of an earlier kept document that `sig` nearly
    duplicates, or None, in which case the document is kept and indexed.
    """

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.num_perm, self.bands, self.rows = num_perm, bands, num_perm // bands
        self.threshold = threshold
        self.tables: List[Dict[bytes, List[int]]] = [dict() for _ in range(bands)]
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # (capacity, P), grows by doubling
        self.n = 0

    def add(self, sig: np.ndarray) -> Optional[int]:
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = set()
        for table, key in zip(self.tables, keys):
            candidates.update(table.get(key, ()))
        if candidates:
            cand = np.fromiter(sorted(candidates), dtype=np.int64)  # (c,)
            similarity = (self._sigs[cand] == sig[None, :]).mean(axis=1)  # (c,) estimated Jaccard
            best = int(np.argmax(similarity))
            if similarity[best] >= self.threshold:
                return int(cand[best])
        if self.n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self.n] = sig
        for table, key in zip(self.tables, keys):
            table.setdefault(key, []).append(self.n)
        self.n += 1
        return None
