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
     (top 32 bits), the smallest value over the shingles (MinHasher.signatures does many documents
     in one vectorised pass, which matters for short documents). For two documents the fraction of equal
     signature entries estimates their Jaccard similarity;
  3. locality-sensitive hashing: the signature is cut into `bands` bands of rows = num_perm/bands
     values, each band hashed to one 64-bit key; documents sharing any band key are candidates,
     and a candidate counts as a duplicate when its estimated similarity is >= threshold. With 16 bands x 8 rows a pair at similarity 0.8
     becomes a candidate with probability 1-(1-0.8**8)**16 = 0.95, at 0.9: 0.9999, at 0.5: 0.06.
Memory: about 2 KB per kept document (the 512-byte signature at num_perm=128, and 16 band keys in a
Python dict), so tens of millions of documents need a machine with matching RAM. Not handled:
substring-level (paragraph) duplicates, and distributing the tables over several machines.
"""
from __future__ import annotations

import hashlib
import re
from typing import Dict, List, Optional, Sequence, Union

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


def _batch_shingle_hashes(texts: List[str], k: int):
    """Shingle hashes of many texts at once: (hashes (S,) uint64, owner (S,) int64 index of the text).

    The normalised texts are joined into one byte array and hashed in one vectorised pass; windows
    that straddle two texts are thrown away. Texts shorter than k bytes go through shingle_hashes()
    one by one (one shingle each), so every text gets exactly the hashes shingle_hashes() would give
    (up to repeats, which do not change a minimum). `owner` is sorted.
    """
    blobs = [normalize_for_dedup(t).encode("utf-8") for t in texts]
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)  # (n,)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint64)  # (N,)
    owner_of_byte = np.repeat(np.arange(len(blobs)), lengths)  # (N,)
    hashes, owners = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    m = len(data) - k + 1  # number of k-byte windows in the joined bytes
    if m > 0:
        h = np.zeros(m, dtype=np.uint64)  # (m,)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * np.uint64(257) + data[j : j + m]
            h = _mix64(h)
        inside = owner_of_byte[:m] == owner_of_byte[k - 1 :]  # (m,) window within one text
        hashes.append(h[inside])
        owners.append(owner_of_byte[:m][inside])
    for i in np.flatnonzero((lengths > 0) & (lengths < k)):  # short texts: one shingle each
        hashes.append(shingle_hashes(texts[i], k))
        owners.append(np.array([i], dtype=np.int64))
    h, owner = np.concatenate(hashes), np.concatenate(owners)
    order = np.argsort(owner, kind="stable")
    return h[order], owner[order]


class MinHasher:
    """MinHash signatures of shape (num_perm,) uint32 (see the module docstring)."""

    def __init__(self, num_perm: int = 128, k: int = 5, seed: int = 0, chunk: int = 1 << 15):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.num_perm, self.k, self.chunk = num_perm, k, chunk
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(P,) uint32 signature of one text (an empty text gets all 0xFFFFFFFF)."""
        return self.signatures([text])[0]

    def signatures(self, texts: List[str]) -> np.ndarray:
        """(n, P) uint32 signatures of many texts, computed together (much faster for short texts)."""
        h, owner = _batch_shingle_hashes(texts, self.k)  # (S,), (S,) sorted
        sig = np.full((len(texts), self.num_perm), 2**64 - 1, dtype=np.uint64)  # (n, P)
        with np.errstate(over="ignore"):
            for s in range(0, len(h), self.chunk):  # bounded memory: (P, chunk) values at a time
                part, who = h[s : s + self.chunk], owner[s : s + self.chunk]  # (c,), (c,)
                vals = self.a[:, None] * part[None, :]  # (P, c)
                vals += self.b[:, None]  # in place: one temporary array, not three
                starts = np.flatnonzero(np.r_[True, who[1:] != who[:-1]])  # first column of each text
                mins = np.minimum.reduceat(vals, starts, axis=1)  # (P, texts in this part)
                rows = who[starts]
                sig[rows] = np.minimum(sig[rows], mins.T)
        # the top 32 bits; taking them after the minimum is the same (x >> 32 is monotone) and cheaper
        return (sig >> np.uint64(32)).astype(np.uint32)


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature (rows = P/bands values per band)."""
    n, p = sigs.shape
    rows = p // bands
    x = sigs.reshape(n, bands, rows).astype(np.uint64)  # (n, bands, rows)
    mult = _mix64(np.arange(1, rows + 1, dtype=np.uint64)) | np.uint64(1)  # (rows,) fixed odd multipliers
    with np.errstate(over="ignore"):
        return _mix64((x * mult).sum(axis=2, dtype=np.uint64) + np.arange(bands, dtype=np.uint64))


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
        # band key -> index of the kept document(s) with that band (keys of different bands differ:
        # band_keys mixes the band number in), so one dict serves all bands
        self.table: Dict[int, Union[int, List[int]]] = {}
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # (capacity, P), grows by doubling
        self.n = 0

    def add(self, sig: np.ndarray, keys: Optional[Sequence[int]] = None) -> Optional[int]:
        """sig: (P,) uint32; keys: its band_keys() row if already computed (in a worker, say)."""
        if keys is None:
            keys = band_keys(sig[None, :], self.bands)[0]
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        table = self.table
        candidates = set()
        for key in keys:
            found = table.get(key)
            if found is None:
                continue
            if isinstance(found, int):
                candidates.add(found)
            else:
                candidates.update(found)
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))  # (c,)
            similarity = np.count_nonzero(self._sigs[cand] == sig, axis=1) / self.num_perm  # (c,) est. Jaccard
            best = int(np.argmax(similarity))
            if similarity[best] >= self.threshold:
                return int(cand[best])
        if self.n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self.n] = sig
        for key in keys:  # a bucket holds one document index (an int) until a second one arrives
            found = table.get(key)
            if found is None:
                table[key] = self.n
            elif isinstance(found, int):
                table[key] = [found, self.n]
            else:
                found.append(self.n)
        self.n += 1
        return None
