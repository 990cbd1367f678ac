"""Token shard files: llm.c's format (write + read) and nanoGPT's raw uint16 format (read).

llm.c shard layout (little-endian):
    bytes 0 .. 1023   header, 256 int32: [0] magic 20240520, [1] version, [2] number of tokens, rest 0
    bytes 1024 ..     the tokens: uint16 (version 1) or uint32 (version 2, this project's choice for
                      vocabularies above 65536; llm.c's llama-3 files, magic 20240801 version 7, are
                      uint32 too and are read as well)
nanoGPT raw layout: no header, just uint16 tokens (train.bin / val.bin of nanoGPT's prepare.py).

What it handles:
  * `ShardWriter`: append token chunks of any size; the header's token count is filled in on close;
    written to a temporary name and renamed, so a crash never leaves a half shard under the real name.
    Optionally rolls over to a new file every `max_tokens` tokens (train_000000.bin, train_000001.bin ...).
  * `read_shard(path)`: strict llm.c reader returning a read-only np.memmap (not read into memory);
    a wrong magic, an unknown version or a body shorter/longer than the header says is a `ShardError`
    naming the file and the byte offset.
  * `read_tokens(path)`: auto-detects llm.c (magic present) vs nanoGPT raw uint16 (no magic).
What it does not handle: big-endian machines, compression, more than 2**31-1 tokens per shard (llm.c's limit).
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional

import numpy as np

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_UINT16 = 1
VERSION_UINT32 = 2
LLAMA3_MAGIC, LLAMA3_VERSION = 20240801, 7  # llm.c's uint32 variant, read-only support
MAX_TOKENS_PER_SHARD = 2**31 - 1


class ShardError(ValueError):
    """A token file that is not what it claims to be (message names the file and the offset)."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def make_header(n_tokens: int, dtype) -> np.ndarray:
    """The 256-int32 llm.c header for n_tokens tokens of the given dtype."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, got {dtype}")
    if n_tokens > MAX_TOKENS_PER_SHARD:
        raise ValueError(f"{n_tokens} tokens do not fit one llm.c shard (max {MAX_TOKENS_PER_SHARD})")
    header = np.zeros(HEADER_INTS, dtype="<i4")  # (256,)
    header[0] = MAGIC
    header[1] = VERSION_UINT16 if dtype == np.uint16 else VERSION_UINT32
    header[2] = n_tokens
    return header


def _check_range(tokens: np.ndarray, dtype: np.dtype, where: str) -> None:
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ValueError(
            f"{where}: token ids in [{int(tokens.min())}, {int(tokens.max())}] do not fit {dtype}"
        )


def write_shard(path: str, tokens, dtype=None) -> str:
    """Write one llm.c shard holding `tokens` (any integer array-like). Returns the path."""
    tokens = np.asarray(tokens)
    if dtype is None:
        dtype = np.uint16 if tokens.size == 0 or int(tokens.max()) < 2**16 else np.uint32
    with ShardWriter(path, dtype=dtype) as w:
        w.write(tokens)
    return path


class ShardWriter:
    """Stream tokens into one or more llm.c shard files.

    With max_tokens=None everything goes to `path`. With max_tokens=N the files are named from
    `path` as a pattern holding "{index}" (e.g. "out/train_{index:06d}.bin") and a new file starts
    every N tokens. `paths` lists the finished files, `n_tokens` the total written.
    """

    def __init__(self, path: str, dtype=np.uint16, max_tokens: Optional[int] = None):
        self.pattern = path
        self.dtype = np.dtype(dtype)
        make_header(0, self.dtype)  # validates the dtype
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                       or max_tokens < 1):
            # 0 or less would leave no room in any file: write() would open new files forever
            raise ValueError(f"max_tokens must be an integer >= 1 (tokens per shard file), got {max_tokens!r}")
        self.max_tokens = min(max_tokens or MAX_TOKENS_PER_SHARD, MAX_TOKENS_PER_SHARD)
        if max_tokens is not None and "{index" not in path:
            raise ValueError("with max_tokens, path must be a pattern holding '{index}', e.g. train_{index:06d}.bin")
        self.paths: List[str] = []
        self.n_tokens = 0
        self._f = None
        self._in_file = 0  # tokens in the open file

    # -- one file at a time --------------------------------------------------
    def _open(self) -> None:
        name = self.pattern.format(index=len(self.paths)) if "{index" in self.pattern else self.pattern
        os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
        self._name = name
        self._tmp = name + ".tmp"
        self._f = open(self._tmp, "wb")
        self._f.write(make_header(0, self.dtype).tobytes())  # placeholder, count fixed on close
        self._in_file = 0

    def _close_file(self) -> None:
        f = self._f
        f.seek(0)
        f.write(make_header(self._in_file, self.dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self._tmp, self._name)
        self.paths.append(self._name)
        self._f = None

    def write(self, tokens) -> None:
        """Append a chunk of token ids (1-D, any integer dtype; checked to fit the shard dtype)."""
        tokens = np.asarray(tokens).reshape(-1)
        _check_range(tokens, self.dtype, self.pattern)
        tokens = tokens.astype(self.dtype.newbyteorder("<"), copy=False)
        while True:
            if self._f is None:
                self._open()
            room = self.max_tokens - self._in_file
            part, tokens = tokens[:room], tokens[room:]
            self._f.write(part.tobytes())
            self._in_file += len(part)
            self.n_tokens += len(part)
            if len(tokens) == 0:
                break
            self._close_file()  # this file is full; the loop opens the next

    def close(self) -> List[str]:
        if self._f is None and not self.paths:
            self._open()  # no tokens at all: still leave one (empty) valid shard
        if self._f is not None:
            self._close_file()
        return self.paths

    def abort(self) -> None:
        """Drop the file being written (used when the pipeline fails)."""
        if self._f is not None:
            self._f.close()
            os.remove(self._tmp)
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_header(path: str) -> np.ndarray:
    """The 256-int32 header of an llm.c shard (raises ShardError if the file is too short)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: file has {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte llm.c header")
    return np.frombuffer(raw, dtype="<i4")


def read_shard(path: str) -> np.memmap:
    """Memory-map the tokens of an llm.c shard (strict: magic, version and size are checked)."""
    header = read_header(path)
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic == MAGIC and version == VERSION_UINT16:
        dtype = np.dtype("<u2")
    elif (magic, version) in ((MAGIC, VERSION_UINT32), (LLAMA3_MAGIC, LLAMA3_VERSION)):
        dtype = np.dtype("<u4")
    elif magic in (MAGIC, LLAMA3_MAGIC):
        raise ShardError(f"{path}: unknown llm.c shard version {version} at byte offset 4 (expected 1 or 2)")
    else:
        raise ShardError(
            f"{path}: bad magic number {magic} at byte offset 0, expected {MAGIC} (llm.c shard); "
            f"for a nanoGPT raw uint16 file use read_tokens(path, fmt='raw')"
        )
    if n < 0:
        raise ShardError(f"{path}: negative token count {n} in the header at byte offset 8")
    size = os.path.getsize(path)
    expected = HEADER_BYTES + n * dtype.itemsize
    if size < expected:
        raise ShardError(
            f"{path}: truncated: header says {n} tokens ({expected} bytes in all) but the file has "
            f"{size} bytes; the body ends at byte offset {size}, "
            f"{(size - HEADER_BYTES) // dtype.itemsize} whole tokens present"
        )
    if size > expected:
        raise ShardError(
            f"{path}: {size - expected} unexpected bytes after the last token at byte offset {expected} "
            f"(header says {n} tokens)"
        )
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def read_raw(path: str, dtype=np.uint16) -> np.memmap:
    """Memory-map a headerless token file (nanoGPT's train.bin/val.bin are raw uint16)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ShardError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (truncated?)")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def is_llmc_shard(path: str) -> bool:
    """True when the file starts with an llm.c magic number."""
    with open(path, "rb") as f:
        raw = f.read(4)
    return len(raw) == 4 and int(np.frombuffer(raw, dtype="<i4")[0]) in (MAGIC, LLAMA3_MAGIC)


def read_tokens(path: str, fmt: str = "auto") -> np.memmap:
    """Memory-map a token file: fmt "llmc", "raw" (nanoGPT uint16), or "auto" (llm.c if the magic is there)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    if fmt == "auto":
        fmt = "llmc" if is_llmc_shard(path) else "raw"
    if fmt == "llmc":
        return read_shard(path)
    if fmt == "raw":
        return read_raw(path)
    raise ValueError(f"unknown token file format {fmt!r} (use 'auto', 'llmc' or 'raw')")


def total_tokens(paths: Iterable[str]) -> int:
    return sum(len(read_tokens(p)) for p in paths)


def describe(path: str, show: int = 16) -> str:
    """One line about a token file: its format, dtype, token count and first ids."""
    fmt = "llm.c" if is_llmc_shard(path) else "raw uint16 (nanoGPT)"
    tokens = read_tokens(path)
    version = f" version {int(read_header(path)[1])}" if fmt == "llm.c" else ""
    head = " ".join(str(int(t)) for t in tokens[:show])
    return f"{path}: {fmt}{version}, {tokens.dtype.name}, {len(tokens):,} tokens; first: {head}"


if __name__ == "__main__":  # python -m nanogpt_np.data.shards FILE...
    import sys

    for p in sys.argv[1:] or ["--help"]:
        if p in ("-h", "--help"):
            print("usage: python -m nanogpt_np.data.shards FILE...  (describe llm.c shards / nanoGPT .bin files)")
            break
        try:
            print(describe(p))
        except (ShardError, OSError) as e:
            print(f"error: {e}")
            sys.exit(1)
