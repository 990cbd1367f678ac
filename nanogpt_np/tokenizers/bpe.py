"""Byte-level BPE tokenizer in the GPT-2 style, in plain Python (plus the `regex` package).

How it works, in the order this file is written:

1. Byte map. Text is UTF-8 bytes, so 256 base tokens cover every string (nothing is ever "unknown").
   For the human-readable files, every byte is shown as one printable unicode character
   (GPT-2's "bytes_to_unicode" table: a space is shown as "Ġ", a newline as "Ċ").
2. Pre-split. A regex cuts the text into chunks (a word with its leading space, a run of digits,
   punctuation, whitespace). Merges never cross a chunk border, so " the" and "the" can become tokens
   but "e t" cannot. The pattern is stored with the tokenizer; GPT-2's is the default.
3. Training. Count each distinct chunk once, then repeatedly merge the most frequent adjacent pair
   of tokens into a new token. The pair counts are kept up to date incrementally: an index from each
   pair to the chunks that hold it means a merge only touches the chunks where it happens, and a heap
   with lazy invalidation finds the most frequent pair. Ties go to the smallest (left id, right id).
4. Encoding. Each chunk is encoded by applying the learned merges in the order they were learned
   (always the earliest-learned pair present next). Results are cached per chunk, so a corpus costs
   one regex pass plus one dictionary lookup per chunk (and the regex pass has an equivalent, faster
   form for ASCII text). Special tokens such as <|endoftext|> are refused unless the caller allows
   them (tiktoken's safe default).
5. Decoding. Ids -> bytes is a table lookup; bytes -> str uses errors="replace" by default, because a
   cut in the middle of a multi-byte character is normal when decoding a slice of ids.
6. Files. GPT-2's own `encoder.json` + `vocab.bpe` (loading OpenAI's files gives exactly GPT-2's ids),
   and this project's single self-describing JSON file ("type": "bpe"). No pickle anywhere.
7. Every core: texts are cut where the cut cannot change the chunks (see cut_text), and the pieces
   are counted (training) or encoded (`iter_encode_parallel`, `encode_files_parallel`) by a pool of
   worker processes.

Not handled: normalisation (NFC etc.; the text is tokenized as given), BPE dropout, the "byte fallback"
of SentencePiece-style tokenizers, and pre-tokenizers other than one regex.

Compared with tiktoken (tests/test_bpe_gpt2.py compares them on GPT-2's files if tiktoken is installed):
  * Surrogates. A Python str may hold surrogate code points, which have no UTF-8 bytes. As tiktoken does,
    a high + low pair is read as the character it spells and any other surrogate as U+FFFD before encoding
    (fix_surrogates): "\\ud800" is GPT-2's [4210], like "\\ufffd".
  * One known difference: the pre-split runs on the `regex` module, whose Unicode tables are newer than
    tiktoken's. Code points assigned in recent Unicode versions (e.g. U+A7CE; 4,657 letters and digits with
    regex 2026.5.9 against tiktoken 0.14.0) are letters or digits here and not there, so text holding them
    is cut into different chunks ("a\\ua7cea": one chunk here, three in tiktoken). GPT-2's merges never join
    their bytes to a neighbour's in the contexts checked, so GPT-2's ids still agree; a vocabulary trained
    on text full of them can differ.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict, deque
from itertools import chain, repeat
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import regex

from ..io.files import atomic_write_text

ENDOFTEXT = "<|endoftext|>"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """Base class of every tokenizer error (a ValueError, so `except ValueError` catches it)."""


class TokenizerFileError(TokenizerError):
    """A vocabulary file that is unreadable, corrupt, or inconsistent with its partner file."""


class DisallowedSpecialTokenError(TokenizerError):
    """The text holds a special token string that the caller did not allow."""


class UnknownTokenIdError(TokenizerError):
    """decode() was given an id that is not in the vocabulary."""


# ---------------------------------------------------------------------------------------------------
# 1. Byte map: every byte <-> one printable unicode character (only used for the text files)
# ---------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's table from each byte value to a printable character.

    Bytes that are already printable and not whitespace ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves. The other 68 bytes (control characters, space, DEL, NBSP, soft hyphen...) are given the
    characters chr(256), chr(257), ... in byte order, so that byte 0x20 (space) becomes 'Ġ' = chr(288)
    and 0x0A (newline) becomes 'Ċ' = chr(266). The table must be exactly this one to read GPT-2's files.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_free)
            next_free += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def bytes_to_token_str(data: bytes) -> str:
    """Bytes -> their printable form, as written in encoder.json / vocab.bpe ('Ġhello')."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def token_str_to_bytes(token: str, where: str = "") -> bytes:
    """Inverse of bytes_to_token_str; raises TokenizerFileError for a character outside the map."""
    try:
        return bytes(CHAR_TO_BYTE[char] for char in token)
    except KeyError as e:
        raise TokenizerFileError(f"{where}token {token!r} holds {e.args[0]!r}, which is not a byte character") from None


# ---------------------------------------------------------------------------------------------------
# 2. Pre-split
# ---------------------------------------------------------------------------------------------------

#: GPT-2's pre-split pattern: English contractions, a letter run with an optional leading space, a
#: digit run likewise, a run of other symbols likewise, then whitespace. `\s+(?!\S)` leaves the last
#: space of a run for the next word, so "a  b" splits as "a", " ", " b".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_WHITESPACE = regex.compile(r"\s")

# Speed: the `regex` module's \p{L} / \p{N} lookups make findall the slowest step of encoding. On
# pure-ASCII text (most English) \p{L} is exactly [A-Za-z], \p{N} is [0-9] and \s is [\t\n\v\f\r ]
# (checked by the tests over all 128 characters), so this pattern, run by the standard `re` module,
# gives the same chunks as GPT2_PATTERN about 1.7x faster. It is only used when text.isascii().
_WS = r"\t\n\x0b\x0c\r "
_GPT2_ASCII_PATTERN = re.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")
_FAST_PATH_BLOCK = 1 << 14  # characters per block when a mixed text is split block by block


# A surrogate is a code point in U+D800..U+DFFF. UTF-16 uses them in pairs (a high one, then a low one) to
# spell characters above U+FFFF; on their own they are not characters and have no UTF-8 bytes, but a Python
# str can still hold them (json.loads('"\\ud800"'), text cut out of UTF-16 data, os.fsdecode's escapes).
_SURROGATE_PAIR_OR_LONE = re.compile("[\ud800-\udbff][\udc00-\udfff]|[\ud800-\udfff]")


def fix_surrogates(text: str) -> str:
    """Text that has UTF-8 bytes, as tiktoken makes it before encoding: a high surrogate followed by a low
    one becomes the character the pair spells ("\\ud83d\\ude00" -> "\\U0001F600"), and any other surrogate
    becomes U+FFFD, the replacement character (so "\\ud800" encodes as GPT-2's [4210], like "\\ufffd")."""
    if text.isascii() or _SURROGATE_PAIR_OR_LONE.search(text) is None:      # nearly always: nothing to do
        return text

    def fix(match):
        found = match.group()
        if len(found) == 1:
            return "\ufffd"
        high, low = ord(found[0]) - 0xD800, ord(found[1]) - 0xDC00     # 10 bits each
        return chr(0x10000 + (high << 10) + low)

    return _SURROGATE_PAIR_OR_LONE.sub(fix, text)


def split_chunks(text: str, pattern: str = GPT2_PATTERN, compiled=None) -> List[str]:
    """Pre-split text into chunks with the pattern (`compiled` is the pattern compiled with `regex`).

    With GPT-2's pattern, a long text that is not all ASCII is cut (at safe places, see cut_text)
    into blocks of about 16k characters, so that its ASCII blocks still take the fast path."""
    if pattern == GPT2_PATTERN:
        if text.isascii():
            return _GPT2_ASCII_PATTERN.findall(text)
        if len(text) > 2 * _FAST_PATH_BLOCK:
            chunks: List[str] = []
            for block in cut_text(text, _FAST_PATH_BLOCK):
                chunks += _GPT2_ASCII_PATTERN.findall(block) if block.isascii() else _gpt2_regex().findall(block)
            return chunks
    return (compiled or regex.compile(pattern)).findall(text)


def _gpt2_regex():
    return regex.compile(GPT2_PATTERN)  # regex keeps its own cache of compiled patterns


# Where a text can be cut without changing its GPT-2 chunks: between a non-whitespace character and
# a whitespace character. Why: a chunk holds whitespace only as a whole whitespace run or as one
# leading space, so no chunk runs from a non-whitespace character into whitespace, and there is
# always a chunk border there. The pattern has no look-behind, so the chunks after the border do not
# depend on the text before it; its only look-ahead, (?!\S), ends a whitespace run before a
# non-whitespace character, so no chunk before the border looked past it. (After a newline it would
# not be safe: "a\n\n" ends in the chunk "\n\n", but "a\n\nb" has "\n", "\n", "b".)
# Proven for GPT2_PATTERN only; texts for other patterns are never cut.
_SAFE_CUT = regex.compile(r"(?<=\S)(?=\s)")
_SAFE_CUT_BACKWARDS = regex.compile(r"(?r)(?<=\S)(?=\s)")


def cut_text(text: str, piece_chars: int) -> Iterator[str]:
    """Yield consecutive pieces of about piece_chars characters, cut only at safe places (above):
    each piece then splits into exactly the GPT-2 chunks it has inside the whole text.

    Joining the pieces gives back `text`; a text without a safe place is yielded whole.
    """
    start = 0
    while len(text) - start > piece_chars:
        near = start + piece_chars
        # the first safe place at or after `near`, else the last one between start and near
        found = _SAFE_CUT.search(text, near) or _SAFE_CUT_BACKWARDS.search(text, start + 1, near + 1)
        if found is None:
            break
        cut = found.start()
        yield text[start:cut]
        start = cut
    if start < len(text) or not text:
        yield text[start:]


def read_text_pieces(path: Union[str, os.PathLike], piece_chars: int = 1 << 22, cut: bool = True) -> Iterator[str]:
    """Read a UTF-8 file as pieces of about piece_chars characters, cut at safe places (see cut_text).

    Newlines are kept as they are ("\\r\\n" stays "\\r\\n"). With cut=False (for patterns other than
    GPT-2's) the whole file is one piece. A file that is not UTF-8 raises TokenizerError naming it.
    """
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            if not cut:
                yield f.read()
                return
            carry = ""
            while True:
                block = f.read(piece_chars)
                if not block:
                    break
                carry += block
                pieces = list(cut_text(carry, piece_chars))
                # the last piece may continue in the next block: keep it for later
                yield from pieces[:-1]
                carry = pieces[-1]
            if carry:
                yield carry
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _can_cut(pattern: str, special_tokens: Iterable[str]) -> bool:
    """Whether texts may be cut into pieces for this pattern and these special tokens (a special
    token holding whitespace could straddle a cut)."""
    return pattern == GPT2_PATTERN and not any(_WHITESPACE.search(s) for s in special_tokens)


# Work on every core: a pool of processes, each holding one shared object (e.g. the tokenizer).
_worker_shared = None


def _set_worker_shared(shared) -> None:
    global _worker_shared
    _worker_shared = shared


def _call_in_worker(function_and_task):
    function, task = function_and_task
    return function(_worker_shared, task)


def _parallel_map(function: Callable, tasks: Iterable, processes: int, shared=None) -> Iterator:
    """function(shared, task) for every task, results in task order, on `processes` worker
    processes (1 or less: in this process). At most two tasks per worker are in flight, so a corpus
    of any size streams through in bounded memory. Workers are forked where the system can (they
    inherit `shared` as it is, e.g. a tokenizer with a warm cache), otherwise spawned (`shared` is
    then pickled). `function` must be a module-level function."""
    if processes <= 1:
        for task in tasks:
            yield function(shared, task)
        return
    import multiprocessing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(processes, _set_worker_shared, (shared,)) as pool:
        in_flight = deque()
        for task in tasks:
            in_flight.append(pool.apply_async(_call_in_worker, ((function, task),)))
            if len(in_flight) >= 2 * processes:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# ---------------------------------------------------------------------------------------------------
# 3. Training
# ---------------------------------------------------------------------------------------------------

def count_chunks(texts: Iterable[str], pattern: str = GPT2_PATTERN, special_tokens: Sequence[str] = (),
                 processes: int = 1) -> Counter:
    """How often each pre-split chunk occurs in the texts. Special token strings are cut out first,
    so that "<|endoftext|>" between documents is never learned as ordinary text. With processes > 1
    the texts are cut into pieces of about 4M characters, counted by a pool of workers, and the
    counts added up (the same result, faster on large corpora)."""
    if processes > 1:
        cut = _can_cut(pattern, special_tokens)
        pieces = (piece for text in texts for piece in (cut_text(text, 1 << 22) if cut else (text,)))
        tasks = ((piece, pattern, tuple(special_tokens)) for piece in pieces)
        total: Counter = Counter()
        for counts in _parallel_map(_count_piece, tasks, processes):
            total.update(counts)
        return total
    compiled = regex.compile(pattern)
    splitter = _special_splitter(special_tokens) if special_tokens else None
    counts: Counter = Counter()
    for text in texts:
        text = fix_surrogates(text)          # as encode() sees it
        # split() also returns the specials themselves (at odd positions): keep only the text between
        parts = splitter.split(text)[::2] if splitter else (text,)
        for part in parts:
            counts.update(split_chunks(part, pattern, compiled))
    return counts


def _count_piece(_, task) -> Counter:
    piece, pattern, special_tokens = task
    return count_chunks((piece,), pattern, special_tokens)


def learn_merges(
    words: List[List[int]], word_counts: List[int], n_merges: int, first_new_id: int = 256,
    verbose: bool = False, id_to_bytes: Optional[Dict[int, bytes]] = None,
) -> List[Tuple[int, int]]:
    """Learn up to n_merges merges from distinct words (lists of token ids) and their counts.

    Merge k creates token id first_new_id + k. `words` is modified in place (and id_to_bytes, if
    given, gains the new tokens; it is only used for the progress messages of verbose=True). Stops early if no
    adjacent pair is left (every word is a single token). Returns the merged pairs in order.

    Data structures (what makes this fast):
      pair_counts[(a, b)]  total occurrences of the pair, summed over words x word count
      pair_words[(a, b)]   indices of the words that hold the pair (kept exact, so a merge
                           visits only the words where it happens)
      heap                 (-count, a, b) entries; an entry whose count no longer matches
                           pair_counts is stale and skipped when popped (lazy invalidation)
    """
    pair_counts: Dict[Tuple[int, int], int] = {}
    pair_words: Dict[Tuple[int, int], set] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, word_counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + count
            pair_words[pair].add(index)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    merges: List[Tuple[int, int]] = []
    start = last_report = time.perf_counter()
    while len(merges) < n_merges:
        # pop until the top entry is current: highest count, then smallest (a, b)
        while heap:
            neg_count, a, b = heap[0]
            if pair_counts.get((a, b)) == -neg_count:
                break
            heapq.heappop(heap)
        else:
            break  # no pair left anywhere
        heapq.heappop(heap)
        new_id = first_new_id + len(merges)
        merges.append((a, b))
        if id_to_bytes is not None:
            id_to_bytes[new_id] = id_to_bytes[a] + id_to_bytes[b]

        delta = _apply_merge(words, word_counts, a, b, new_id, pair_words)
        del pair_counts[(a, b)]
        for pair, change in delta.items():
            if change == 0 or pair == (a, b):
                continue
            count = pair_counts.get(pair, 0) + change
            if count > 0:
                pair_counts[pair] = count
                heapq.heappush(heap, (-count, pair[0], pair[1]))
            else:  # the pair is gone from every word
                pair_counts.pop(pair, None)
                pair_words.pop(pair, None)

        if verbose and (time.perf_counter() - last_report > 1.0 or len(merges) == n_merges):
            last_report = time.perf_counter()
            shown = repr(id_to_bytes[new_id]) if id_to_bytes is not None else f"({a}, {b})"
            print(f"merge {len(merges)}/{n_merges}: {shown} x{-neg_count} "
                  f"[{last_report - start:.1f}s]", file=sys.stderr, flush=True)
    return merges


def _apply_merge(words, word_counts, a, b, new_id, pair_words) -> Dict[Tuple[int, int], int]:
    """Replace every (a, b) by new_id in the words that hold it, and keep pair_words exact for those
    words. Returns how the count of each neighbouring pair changes: around each replacement,
    (left, a) and (b, right) lose the word's count and (left, new_id) and (new_id, right) gain it.
    Nothing else in the word is counted again."""
    delta: Dict[Tuple[int, int], int] = {}
    delta_get = delta.get
    for index in pair_words.pop((a, b)):
        word = words[index]
        count = word_counts[index]
        n = len(word)
        merged: List[int] = []
        copied = 0  # word[:copied] is done (copied or replaced)
        maybe_gone = []  # pairs that lost an occurrence in this word (it may hold them elsewhere)
        for p in _pair_positions(word, a, b):
            if p > 0:
                # the left neighbour is the new token itself when two replacements touch ("a b a b")
                left = new_id if p == copied else word[p - 1]
                lost, gained = (left, a), (left, new_id)
                delta[lost] = delta_get(lost, 0) - count
                delta[gained] = delta_get(gained, 0) + count
                pair_words[gained].add(index)
                maybe_gone.append(lost)
            if p + 2 < n:
                right = word[p + 2]
                lost, gained = (b, right), (new_id, right)
                delta[lost] = delta_get(lost, 0) - count
                delta[gained] = delta_get(gained, 0) + count
                pair_words[gained].add(index)
                maybe_gone.append(lost)
            merged += word[copied:p]
            merged.append(new_id)
            copied = p + 2
        merged += word[copied:]
        words[index] = merged
        if maybe_gone:
            still_there = set(zip(merged, merged[1:]))
            for pair in maybe_gone:
                if pair not in still_there and pair != (a, b):
                    pair_words[pair].discard(index)
    return delta


def _pair_positions(word: List[int], a: int, b: int) -> List[int]:
    """Start positions of (a, b) in word, left to right, not overlapping ("a a a" holds (a, a) once)."""
    positions = []
    i, last = 0, len(word) - 1
    try:
        while True:
            i = word.index(a, i, last)  # list.index scans in C; a must leave room for b after it
            if word[i + 1] == b:
                positions.append(i)
                i += 2
            else:
                i += 1
    except ValueError:  # no more a
        return positions


# ---------------------------------------------------------------------------------------------------
# 4-6. The tokenizer: encoding, decoding, files
# ---------------------------------------------------------------------------------------------------

def _special_splitter(special_tokens: Iterable[str]):
    """A regex whose split() cuts a text around the given special strings (longest first, so that
    one special that is a prefix of another does not win)."""
    alternatives = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


class _ChunkCache(dict):
    """chunk -> tuple of ids. Looking up a chunk that is not there yet encodes it and keeps the
    result (dict calls __missing__ on a miss), so the lookup loop needs no Python-level branch."""

    def __init__(self, encode_chunk: Callable[[str], Tuple[int, ...]]):
        super().__init__()
        self.encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> Tuple[int, ...]:
        ids = self[chunk] = self.encode_chunk(chunk)
        return ids


class BPETokenizer:
    """A byte-level BPE tokenizer: 256 byte tokens, ranked merges, special tokens, a pre-split pattern.

    Build one with `train`, `from_gpt2_files`, `load`, or the constructor. Ids need not follow the
    merge order (GPT-2's byte tokens are not ids 0..255 in byte order), but they must be 0..N-1.
    """

    GPT2_PATTERN = GPT2_PATTERN
    CACHE_LIMIT = 1_000_000  # distinct chunks cached; the cache is emptied between calls beyond this
    LONG_CHUNK = 256  # bytes; longer chunks use the pass-by-pass loop (see _encode_chunk)

    def __init__(
        self,
        merges: Sequence[Tuple[int, int]],
        special_tokens: Optional[Dict[str, int]] = None,
        pattern: str = GPT2_PATTERN,
        byte_ids: Optional[Sequence[int]] = None,
        merged_ids: Optional[Sequence[int]] = None,
    ):
        """merges[k] = (left id, right id) of the k-th merge, which makes id merged_ids[k]
        (default 256 + k); byte_ids[b] is the id of byte b (default b); special_tokens maps each
        special string to its id. Raises TokenizerError if the ids do not fit together."""
        self.pattern = pattern
        try:
            self._compiled_pattern = regex.compile(pattern)
        except regex.error as e:
            raise TokenizerError(f"invalid pre-split pattern {pattern!r}: {e}") from None
        byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        merges = [(int(a), int(b)) for a, b in merges]
        merged_ids = [256 + k for k in range(len(merges))] if merged_ids is None else [int(i) for i in merged_ids]
        special_tokens = dict(special_tokens or {})
        if len(byte_ids) != 256 or len(set(byte_ids)) != 256:
            raise TokenizerError("byte_ids must give 256 distinct ids, one per byte value")
        if len(merged_ids) != len(merges):
            raise TokenizerError(f"{len(merges)} merges but {len(merged_ids)} merged ids")

        # the bytes of every id: bytes first, then each merge in order, then the specials
        id_to_bytes: Dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        merge_rank: Dict[Tuple[int, int], int] = {}
        for rank, ((left, right), new) in enumerate(zip(merges, merged_ids)):
            if left not in id_to_bytes or right not in id_to_bytes:
                raise TokenizerError(f"merge {rank} ({left}, {right}) uses an id not defined before it")
            if (left, right) in merge_rank:
                raise TokenizerError(f"merge {rank} ({left}, {right}) appears twice")
            data = id_to_bytes[left] + id_to_bytes[right]
            if new in id_to_bytes and id_to_bytes[new] != data:
                raise TokenizerError(f"merge {rank} gives id {new}, which already stands for {id_to_bytes[new]!r}")
            id_to_bytes[new] = data
            merge_rank[(left, right)] = rank
        for text, i in special_tokens.items():
            if not text:
                raise TokenizerError("a special token cannot be the empty string")
            if i in id_to_bytes:
                raise TokenizerError(f"special token {text!r} has id {i}, which is already taken")
            id_to_bytes[i] = text.encode("utf-8")
        if sorted(id_to_bytes) != list(range(len(id_to_bytes))):
            missing = sorted(set(range(max(id_to_bytes) + 1)) - set(id_to_bytes))
            raise TokenizerError(f"ids must be 0..N-1 without gaps; missing {missing[:5]}{'...' if len(missing) > 5 else ''}")

        self.byte_ids = byte_ids
        self.merges = merges
        self.merged_ids = merged_ids
        self.special_tokens = special_tokens
        self._merge_rank = merge_rank
        self._id_to_bytes = id_to_bytes
        self._byte_to_id = tuple(byte_ids)
        self._cache = _ChunkCache(self._encode_chunk)
        self._splitters: Dict[frozenset, object] = {}

    # -- properties ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges (minus any repeated result) + special tokens."""
        return len(self._id_to_bytes)

    @property
    def eot_id(self) -> Optional[int]:
        """Id of <|endoftext|>, or None if this tokenizer has no such special token."""
        return self.special_tokens.get(ENDOFTEXT)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's UTF-8 text for a special id)."""
        try:
            return self._id_to_bytes[token_id]
        except KeyError:
            raise UnknownTokenIdError(f"unknown token id {token_id!r} (vocabulary has ids 0..{self.vocab_size - 1})") from None

    def __reduce__(self):
        # what pickle (used by multiprocessing to send a tokenizer to a spawned worker) transports:
        # the same description as the JSON file, not the internal tables or the cache
        return (BPETokenizer.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={sorted(self.special_tokens)})")

    # -- training -----------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        text_or_iterable_of_texts: Union[str, Iterable[str]],
        vocab_size: int,
        pattern: str = GPT2_PATTERN,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        verbose: bool = False,
        processes: int = 1,
    ) -> "BPETokenizer":
        """Learn a tokenizer with vocab_size ids from a text or an iterable of texts (e.g. the pieces
        of `read_text_pieces(path)`).

        Ids: 0..255 are the bytes, 256 + k is merge k, and the special tokens come right after the
        merges (as GPT-2's 50256 = 256 + 50000 merges). So vocab_size - 256 - len(special_tokens)
        merges are learned. If the text runs out of pairs first, training stops early and the
        tokenizer is smaller (a warning is printed with verbose=True). Raises TokenizerError for a
        vocab_size below 256 + len(special_tokens) or a text with no characters. processes > 1
        counts the pre-split chunks on that many worker processes (the merges are learned in this
        one); the result is the same.
        """
        if isinstance(special_tokens, str):
            special_tokens = [special_tokens]  # one token, not its characters
        special_tokens = list(dict.fromkeys(special_tokens))  # drop repeats, keep order
        if isinstance(vocab_size, (int, np.integer)) and not isinstance(vocab_size, bool):
            vocab_size = int(vocab_size)
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise TokenizerError(
                f"vocab_size must be at least 256 (one id per byte) + {len(special_tokens)} special tokens, got {vocab_size!r}")
        texts = [text_or_iterable_of_texts] if isinstance(text_or_iterable_of_texts, str) else text_or_iterable_of_texts
        start = time.perf_counter()
        counts = count_chunks(texts, pattern, special_tokens, processes)
        if not counts:
            raise TokenizerError("cannot train on an empty text (no characters outside special tokens)")
        if verbose:
            print(f"pre-split: {sum(counts.values())} chunks, {len(counts)} distinct "
                  f"[{time.perf_counter() - start:.1f}s]", file=sys.stderr, flush=True)

        words = [list(chunk.encode("utf-8")) for chunk in counts]
        word_counts = list(counts.values())
        n_merges = vocab_size - 256 - len(special_tokens)
        id_to_bytes = {i: bytes([i]) for i in range(256)}
        merges = learn_merges(words, word_counts, n_merges, verbose=verbose, id_to_bytes=id_to_bytes)
        if verbose and len(merges) < n_merges:
            print(f"warning: the text has no pairs left after {len(merges)} merges; "
                  f"vocab_size is {256 + len(merges) + len(special_tokens)}, not {vocab_size}", file=sys.stderr)
        first_special = 256 + len(merges)
        specials = {text: first_special + k for k, text in enumerate(special_tokens)}
        return cls(merges, specials, pattern)

    @classmethod
    def train_from_files(
        cls,
        paths: Iterable[Union[str, os.PathLike]],
        vocab_size: int,
        pattern: str = GPT2_PATTERN,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        verbose: bool = False,
        processes: int = 1,
    ) -> "BPETokenizer":
        """train() on UTF-8 files, read piece by piece (a file is never held whole in memory when
        the pattern is GPT-2's). Equal to training on the concatenated contents as separate texts."""
        cut = _can_cut(pattern, special_tokens)
        pieces = (piece for path in paths for piece in read_text_pieces(path, cut=cut))
        return cls.train(pieces, vocab_size, pattern, special_tokens, verbose, processes)

    # -- encoding -----------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> Tuple[int, ...]:
        """BPE on one pre-split chunk: start from its bytes, then repeatedly merge the adjacent pair
        that was learned earliest, until no learned pair is left. When that pair occurs several
        times, its occurrences are merged left to right ("a a a" with (a, a) gives "aa a").

        Two equivalent loops. Short chunks (nearly all) merge one occurrence per step and keep a
        list of the ranks of adjacent pairs, updating only the two ranks next to the merge; min()
        and index() then run in C. This is exact because a pair made with the new token always
        ranks after the merge that made it, so the next step picks the next occurrence of the same
        pair, if any. Its cost grows with length squared, so long chunks (a run of 10k spaces) use
        passes that merge every occurrence of the best pair at once."""
        ids = list(map(self._byte_to_id.__getitem__, chunk.encode("utf-8")))
        if len(ids) > self.LONG_CHUNK:
            return self._encode_long_chunk(ids)
        rank_of = self._merge_rank.get
        no_merge = len(self.merges)
        merged_ids = self.merged_ids
        ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(no_merge)))  # ranks[i]: pair (ids[i], ids[i+1])
        while ranks:
            best = min(ranks)
            if best == no_merge:
                break
            i = ranks.index(best)  # the leftmost occurrence
            new = merged_ids[best]
            ids[i:i + 2] = (new,)
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], new), no_merge)
            if i < len(ranks):
                ranks[i] = rank_of((new, ids[i + 1]), no_merge)
        return tuple(ids)

    def _encode_long_chunk(self, ids: List[int]) -> Tuple[int, ...]:
        """The same BPE as _encode_chunk, one pass per merge: each pass merges every occurrence of
        the earliest-learned pair present, left to right."""
        rank_of = self._merge_rank.get
        no_merge = len(self.merges)
        while len(ids) > 1:
            best = min(map(rank_of, zip(ids, ids[1:]), repeat(no_merge)))
            if best == no_merge:
                break
            left, right = self.merges[best]
            new = self.merged_ids[best]
            merged = []
            i, n = 0, len(ids)
            while i < n:
                if ids[i] == left and i + 1 < n and ids[i + 1] == right:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        return tuple(ids)

    def encode_ordinary(self, text: str) -> List[int]:
        """Encode text with no special-token handling: "<|endoftext|>" in the text is plain text."""
        chunks = split_chunks(fix_surrogates(text), self.pattern, self._compiled_pattern)
        cache = self._cache
        if len(cache) > self.CACHE_LIMIT:
            cache.clear()
        # map + chain run in C; only a chunk not seen before calls back into Python (__missing__)
        return list(chain.from_iterable(map(cache.__getitem__, chunks)))

    def _allowed_specials(self, text: str, allowed_special) -> frozenset:
        """Which special strings to treat as special tokens in `text`; raises for a refused one.

        "all": every special. "none": none (specials are encoded as plain text). "none_raise": none,
        and a text that contains one is refused. A set of strings: those; a text holding any other
        special is refused (as tiktoken does)."""
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if allowed_special == "none":
            return frozenset()
        if allowed_special == "none_raise":
            allowed = frozenset()
        elif isinstance(allowed_special, (set, frozenset, list, tuple)):
            allowed = frozenset(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise TokenizerError(f"allowed_special names {sorted(unknown)}, which are not special tokens "
                                     f"of this tokenizer ({sorted(self.special_tokens)})")
        else:
            raise TokenizerError(f"allowed_special must be 'all', 'none', 'none_raise' or a set of strings, "
                                 f"got {allowed_special!r}")
        for special in self.special_tokens:
            if special not in allowed and special in text:
                raise DisallowedSpecialTokenError(
                    f"the text contains the special token {special!r}; pass allowed_special='all' (or "
                    f"{{{special!r}}}) to encode it as a special token, or 'none' to encode it as plain text")
        return allowed

    def encode(self, text: str, allowed_special="none_raise") -> List[int]:
        """Encode a string to ids. allowed_special: "none_raise" (default; refuse text containing a
        special token string), "none" (encode such strings as plain text), "all", or a set of strings.
        Surrogate code points are fixed first, as tiktoken does (see fix_surrogates)."""
        text = fix_surrogates(text)
        allowed = self._allowed_specials(text, allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        splitter = self._splitters.get(allowed)
        if splitter is None:
            splitter = self._splitters[allowed] = _special_splitter(allowed)
        ids: List[int] = []
        # split() with a capturing group alternates: text, special, text, special, ..., text
        for k, part in enumerate(splitter.split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special="none_raise") -> List[List[int]]:
        """encode() each text (in this process, sharing the chunk cache). For many large texts on
        every core, use encode_files_parallel."""
        return [self.encode(text, allowed_special) for text in texts]

    # -- decoding -----------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for. Raises UnknownTokenIdError for an id outside the vocabulary."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()  # plain ints: faster dict lookups, and no numpy scalar surprises
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)  # a generator could not be read twice (the error path reads it again)
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, (int, np.integer)) and int(i) in self._id_to_bytes))
            raise UnknownTokenIdError(
                f"unknown token id {bad!r} (vocabulary has ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text the ids stand for. errors="replace" turns the bytes of a character cut in two
        (when decoding a slice of ids) into U+FFFD; pass "strict" to get an error instead."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- files --------------------------------------------------------------------------------------
    def _vocab_and_merges(self) -> Tuple[Dict[str, int], List[str]]:
        """The printable form: {token string: id} for bytes and merges, and "left right" merge lines."""
        vocab = {}
        for i, data in self._id_to_bytes.items():
            if i not in self.special_tokens.values():
                vocab[bytes_to_token_str(data)] = i
        merge_lines = [f"{bytes_to_token_str(self._id_to_bytes[a])} {bytes_to_token_str(self._id_to_bytes[b])}"
                       for a, b in self.merges]
        return vocab, merge_lines

    @classmethod
    def _from_vocab_and_merges(cls, vocab: Dict[str, int], merge_lines: Sequence[str],
                               special_tokens: Optional[Dict[str, int]], pattern: str, where: str) -> "BPETokenizer":
        """Build from the printable form, checking that the vocabulary and the merges fit together.
        With special_tokens=None, every vocab entry that is neither a byte nor a merge result is a
        special token (that is how <|endoftext|> sits in GPT-2's encoder.json)."""
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerFileError(f"{where}: the vocabulary must map token strings to integer ids")

        def id_of(token: str, line_no: int) -> int:
            if token not in vocab:
                raise TokenizerFileError(f"{where}: merge line {line_no} uses {token!r}, which is not in the vocabulary "
                                         f"(mismatched vocabulary and merges files?)")
            return vocab[token]

        byte_ids = []
        for b in range(256):
            char = BYTE_TO_CHAR[b]
            if char not in vocab:
                raise TokenizerFileError(f"{where}: the vocabulary lacks the byte token {char!r} (byte {b})")
            byte_ids.append(vocab[char])
        merges, merged_ids = [], []
        for line_no, line in enumerate(merge_lines, 1):
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise TokenizerFileError(f"{where}: merge line {line_no} is {line!r}, not two tokens separated by a space")
            left, right = parts
            merges.append((id_of(left, line_no), id_of(right, line_no)))
            merged_ids.append(id_of(left + right, line_no))
        if special_tokens is None:
            known = set(byte_ids) | set(merged_ids)
            special_tokens = {token: i for token, i in vocab.items() if i not in known}
        try:
            tok = cls(merges, special_tokens, pattern, byte_ids, merged_ids)
        except TokenizerFileError:
            raise
        except TokenizerError as e:
            raise TokenizerFileError(f"{where}: {e}") from None
        # every vocabulary entry must name the bytes its id stands for (catches repeated ids)
        for token, i in vocab.items():
            if token not in special_tokens and tok._id_to_bytes[i] != token_str_to_bytes(token, f"{where}: "):
                raise TokenizerFileError(f"{where}: token {token!r} has id {i}, which its merges give to "
                                         f"{bytes_to_token_str(tok._id_to_bytes[i])!r}")
        return tok

    @classmethod
    def from_gpt2_files(cls, encoder_json_path, vocab_bpe_path, pattern: str = GPT2_PATTERN) -> "BPETokenizer":
        """Load GPT-2's files (OpenAI's encoder.json + vocab.bpe, or Hugging Face's vocab.json +
        merges.txt, the same format). Entries of encoder.json that are neither bytes nor merge
        results, like "<|endoftext|>", become special tokens. The pattern is not in these files;
        GPT-2's is assumed."""
        where = f"{encoder_json_path} + {vocab_bpe_path}"
        vocab = _read_json(encoder_json_path)
        try:
            with open(vocab_bpe_path, "r", encoding="utf-8-sig") as f:
                # splitlines also accepts "\r\n" files; no line-break character is a byte character
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise TokenizerFileError(f"{vocab_bpe_path}: not UTF-8 text") from None
        except OSError as e:
            raise TokenizerFileError(f"{vocab_bpe_path}: cannot read ({e.strerror})") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        while lines and lines[-1] == "":
            lines.pop()
        return cls._from_vocab_and_merges(vocab, lines, None, pattern, where)

    def save_gpt2_files(self, directory, encoder_name: str = "encoder.json", merges_name: str = "vocab.bpe") -> None:
        """Write encoder.json + vocab.bpe (GPT-2's format) into directory. The pattern is not saved
        in this format (GPT-2's is assumed on loading); use save() to keep it."""
        os.makedirs(directory, exist_ok=True)
        vocab, merge_lines = self._vocab_and_merges()
        vocab.update(self.special_tokens)
        vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
        atomic_write_text(os.path.join(directory, encoder_name), json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(os.path.join(directory, merges_name), "#version: 0.2\n" + "".join(l + "\n" for l in merge_lines))

    def to_dict(self) -> dict:
        """The JSON-ready description saved by save()."""
        vocab, merge_lines = self._vocab_and_merges()
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "pattern": self.pattern,
            "byte_encoding": "GPT-2 bytes_to_unicode: each character of a token string stands for one byte",
            "special_tokens": self.special_tokens,
            "merges": merge_lines,
            "vocab": vocab,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> "BPETokenizer":
        """Inverse of to_dict(); raises TokenizerFileError naming `where` for a bad or mismatched description."""
        if not isinstance(d, dict) or d.get("type") != "bpe":
            raise TokenizerFileError(f"{where}: not a BPE tokenizer file (its \"type\" is {d.get('type') if isinstance(d, dict) else None!r}, expected \"bpe\")")
        if d.get("version") != FORMAT_VERSION:
            raise TokenizerFileError(f"{where}: format version {d.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        for key, kind in (("pattern", str), ("merges", list), ("vocab", dict), ("special_tokens", dict)):
            if not isinstance(d.get(key), kind):
                raise TokenizerFileError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
        specials = d["special_tokens"]
        if not all(isinstance(v, int) for v in specials.values()):
            raise TokenizerFileError(f"{where}: special token ids must be integers")
        if not all(isinstance(m, str) for m in d["merges"]):
            raise TokenizerFileError(f"{where}: every merge must be a string \"left right\"")
        tok = cls._from_vocab_and_merges(d["vocab"], d["merges"], specials, d["pattern"], where)
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise TokenizerFileError(f"{where}: says vocab_size {d['vocab_size']} but holds {tok.vocab_size} ids")
        return tok

    def save(self, path) -> None:
        """Write the tokenizer as one JSON file (pattern, merges, vocabulary, special tokens),
        atomically: a temporary file in the same directory, fsync, then os.replace."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        """Read a file written by save()."""
        return cls.from_dict(_read_json(path), where=str(path))


def _read_json(path):
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is skipped
            return json.load(f)
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------
# 7. Encoding files and corpora on every core
# ---------------------------------------------------------------------------------------------------

def _encode_piece(tokenizer, task):
    doc_index, text, allowed_special, dtype = task
    return doc_index, np.array(tokenizer.encode(text, allowed_special), dtype=dtype)


def _pieces(tokenizer, inputs, piece_chars):
    """(document index, text piece) for every input, files read lazily; an empty document still
    yields one empty piece so that it is reported. Pieces are cut only where that cannot change
    the ids (see cut_text)."""
    cut = _can_cut(tokenizer.pattern, tokenizer.special_tokens)
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            pieces = cut_text(item, piece_chars) if cut else iter((item,))
        elif isinstance(item, os.PathLike):
            pieces = read_text_pieces(item, piece_chars, cut=cut)
        else:
            raise TypeError(f"input {index} is a {type(item).__name__}; expected a str (text) or a path object")
        empty = True
        for piece in pieces:
            empty = False
            yield index, piece
        if empty:
            yield index, ""


def iter_encode_parallel(
    tokenizer: BPETokenizer,
    paths_or_texts: Iterable[Union[str, os.PathLike]],
    processes: Optional[int] = None,
    allowed_special="none_raise",
    append_eot: bool = False,
    piece_chars: int = 1 << 18,
) -> Iterator[Tuple[int, np.ndarray]]:
    """Encode documents on every core, yielding (document index, ids) in input order.

    Each input is a document: a `str` is the text itself, a path object (pathlib.Path) is a UTF-8
    file read lazily (so a `str` path must be wrapped in Path). Large documents are cut into pieces
    of about piece_chars characters at places where cutting cannot change the ids, and the pieces
    are encoded by a pool of `processes` workers (default: every core; 1 = in this process). At most
    a few pieces per worker are in flight, so memory stays bounded for corpora of any size.

    ids is a 1-D numpy array, uint16 if the vocabulary fits (vocab_size <= 65536) else uint32, with
    tokenizer.eot_id appended if append_eot (an error if the tokenizer has no <|endoftext|>).
    The result equals tokenizer.encode(text, allowed_special) for each document.
    """
    if append_eot and tokenizer.eot_id is None:
        raise TokenizerError("append_eot=True but the tokenizer has no <|endoftext|> token")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    processes = (os.cpu_count() or 1) if processes is None else processes
    tasks = ((index, piece, allowed_special, dtype)
             for index, piece in _pieces(tokenizer, paths_or_texts, piece_chars))

    def documents(results: Iterable[Tuple[int, np.ndarray]]):
        """Join consecutive pieces of the same document."""
        current, parts = None, []
        for index, ids in results:
            if index != current and current is not None:
                yield current, _join(parts, tokenizer, append_eot, dtype)
                parts = []
            current = index
            parts.append(ids)
        if current is not None:
            yield current, _join(parts, tokenizer, append_eot, dtype)

    if processes > 1:
        # Encode the first piece here: it fills this tokenizer's chunk cache with the common chunks,
        # and forked workers start with a copy of that cache instead of each rebuilding it.
        first = next(tasks, None)
        if first is None:
            return
        results = chain((_encode_piece(tokenizer, first),), _parallel_map(_encode_piece, tasks, processes, tokenizer))
    else:
        results = _parallel_map(_encode_piece, tasks, processes, tokenizer)
    yield from documents(results)


def _join(parts, tokenizer, append_eot, dtype):
    if append_eot:
        parts = parts + [np.array([tokenizer.eot_id], dtype=dtype)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def encode_files_parallel(
    tokenizer: BPETokenizer,
    paths_or_texts: Iterable[Union[str, os.PathLike]],
    processes: Optional[int] = None,
    allowed_special="none_raise",
    append_eot: bool = False,
    on_document: Optional[Callable[[int, np.ndarray], None]] = None,
    piece_chars: int = 1 << 18,
) -> Optional[List[np.ndarray]]:
    """Encode documents on every core (see iter_encode_parallel for inputs and options).

    Returns a list with one numpy array of ids per document, in input order. With on_document,
    each (index, ids) is handed to that callback as soon as it is ready (e.g. to append it to a
    shards.ShardWriter) and nothing is kept: the function returns None.
    """
    results = iter_encode_parallel(tokenizer, paths_or_texts, processes, allowed_special, append_eot, piece_chars)
    if on_document is not None:
        for index, ids in results:
            on_document(index, ids)
        return None
    return [ids for _, ids in results]
