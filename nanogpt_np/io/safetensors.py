"""Read and write the safetensors format with NumPy only (no torch, no pickle).

The format (https://huggingface.co/docs/safetensors) is three parts, one after the other:

    [ 8 bytes ]  N, the header length, an unsigned 64-bit little-endian integer
    [ N bytes ]  a UTF-8 JSON object:
                   {"__metadata__": {"key": "value", ...},                  (optional, str -> str)
                    "wte.weight": {"dtype": "F32", "shape": [V, C], "data_offsets": [begin, end]},
                    ...}
                 padded at the end with spaces so that 8 + N is a multiple of 8
    [ rest   ]   the data buffer: every tensor's raw little-endian bytes in row-major (C) order;
                 data_offsets are byte offsets relative to the start of this buffer

What this module handles:
  * dtypes F64 F32 F16 BF16 I64 I32 I16 I8 U8 U16 U32 U64 BOOL.
    NumPy has no bfloat16, so BF16 tensors load as their raw bits (uint16) by default, or as float32 with
    `bf16_as="float32"` (exact: a bfloat16 is the top half of a float32). To write BF16, pass the raw uint16
    bits and name the dtype: `save_file({"w": bits}, path, dtypes={"w": "BF16"})`; `float32_to_bf16_bits`
    rounds float32 values to bfloat16 bits (round to nearest even).
  * cupy arrays on save (copied to the host first).
  * strict validation on load: every problem raises SafetensorsError (a ValueError) that names the file and
    says what is wrong; a file cut short says "truncated".

What it does not handle: the float8 dtypes and other exotic ones (a clear error), memory-mapping (tensors are
read into fresh NumPy arrays), big-endian hosts beyond a byte swap on load.

Writing is atomic: the bytes go to a temporary file in the same directory, which is flushed, fsync'ed and then
renamed over the target with os.replace, so a crash never leaves a half-written file under the final name.
The output is deterministic: the same tensors (same order), dtypes and metadata give byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from .files import atomic_open

__all__ = ["SafetensorsError", "save_file", "load_file", "load_metadata", "read_header",
           "float32_to_bf16_bits", "bf16_bits_to_float32", "DTYPES"]


class SafetensorsError(ValueError):
    """A safetensors file (or the tensors given to save_file) is malformed; the message says where and why."""


# safetensors dtype name -> little-endian NumPy dtype. BF16 is stored as its raw 16 bits.
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype kind+size -> safetensors name (the reverse map used when saving; uint16 means U16, not BF16)
_NUMPY_TO_ST = {
    ("f", 8): "F64", ("f", 4): "F32", ("f", 2): "F16",
    ("i", 8): "I64", ("i", 4): "I32", ("i", 2): "I16", ("i", 1): "I8",
    ("u", 8): "U64", ("u", 4): "U32", ("u", 2): "U16", ("u", 1): "U8",
    ("b", 1): "BOOL",
}
_MAX_HEADER = 100 * 1024 * 1024   # same limit as the reference implementation: a larger header is corrupt


# ----------------------------------------------------------------------------------------------- bfloat16

def float32_to_bf16_bits(a) -> np.ndarray:
    """float32 array -> uint16 bfloat16 bits, rounding to nearest, ties to even (NaN stays NaN)."""
    a = np.asarray(a, dtype=np.float32, order="C")
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16          # round half to even on the dropped 16 bits
    out = rounded.astype(np.uint16)
    nan = np.isnan(a)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)         # keep a NaN a (quiet) NaN
    return out


def bf16_bits_to_float32(bits) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact: the bits become the top half of a float32)."""
    bits = np.asarray(bits, dtype=np.uint16, order="C")
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------------- writing

def _to_host(array) -> np.ndarray:
    """numpy or cupy array (or anything array-like) -> numpy array."""
    try:
        from ..backend import to_numpy
    except ImportError:  # used as a stand-alone module
        return np.asarray(array)
    return to_numpy(array)


def _dtype_name(name: str, a: np.ndarray, forced: Optional[str]) -> str:
    if forced is not None:
        if forced not in DTYPES:
            raise SafetensorsError(f"tensor {name!r}: unknown dtype {forced!r} (supported: {', '.join(DTYPES)})")
        if a.dtype.itemsize != DTYPES[forced].itemsize or (forced == "BF16" and a.dtype.kind != "u"):
            raise SafetensorsError(f"tensor {name!r}: cannot store a {a.dtype} array as {forced}"
                                   + (" (pass the raw uint16 bits, e.g. from float32_to_bf16_bits)"
                                      if forced == "BF16" else ""))
        return forced
    key = (a.dtype.kind, a.dtype.itemsize)
    if key not in _NUMPY_TO_ST:
        raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors "
                               f"(supported: float64/32/16, int64/32/16/8, uint64/32/16/8, bool)")
    return _NUMPY_TO_ST[key]


def _header_bytes(header: dict) -> bytes:
    """JSON header, compact and deterministic, padded with spaces to a multiple of 8 bytes."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def save_file(tensors: Mapping[str, object], path, metadata: Optional[Mapping[str, str]] = None,
              dtypes: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` (name -> numpy/cupy array) to `path` in safetensors format, atomically.

    Tensors are laid out in the order of the mapping. `metadata` must map str to str. `dtypes` optionally
    forces the stored dtype of some tensors (only needed for BF16, whose bits are passed as uint16).
    """
    path = os.fspath(path)
    dtypes = dict(dtypes or {})
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in metadata.items()):
            raise SafetensorsError(f"{path}: metadata must be a dict of str -> str, got {metadata!r}")
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise SafetensorsError(f"{path}: dtypes given for tensors that are not saved: {sorted(unknown)}")

    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    arrays = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__" or name == "":
            raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
        a = _to_host(value)
        st = _dtype_name(name, a, dtypes.get(name))
        a = np.asarray(a, dtype=DTYPES[st], order="C")            # row-major, little-endian
        header[name] = {"dtype": st, "shape": [int(d) for d in a.shape],
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)

    head = _header_bytes(header)
    with atomic_open(path, "wb") as f:          # temp file + fsync + rename: never half a file
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for a in arrays:
            if a.nbytes:
                f.write(memoryview(a.reshape(-1)).cast("B"))


# ----------------------------------------------------------------------------------------------- reading

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _parse(path: str, f) -> Tuple[dict, dict, int, int]:
    """Read and validate the header of an open file.

    Returns (entries, metadata, data_start, file_size) where entries maps name -> (dtype, shape, begin, end),
    in data (= header) order.
    """
    file_size = os.fstat(f.fileno()).st_size
    first = f.read(8)
    if len(first) < 8:
        raise SafetensorsError(f"{path}: file is truncated: {file_size} bytes, too short for the 8-byte "
                               f"header length")
    (n,) = struct.unpack("<Q", first)
    if n > _MAX_HEADER:
        raise SafetensorsError(f"{path}: header length {n} is larger than the {_MAX_HEADER}-byte limit "
                               f"(not a safetensors file, or corrupt)")
    if 8 + n > file_size:
        raise SafetensorsError(f"{path}: file is truncated: the header says it is {n} bytes but only "
                               f"{file_size - 8} bytes follow the length field")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of string -> string")

    data_start = 8 + n
    data_size = file_size - data_start
    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: entry must be an object with exactly 'dtype', 'shape' and "
                                   f"'data_offsets', got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                   f"got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{where}: data_offsets {offsets} span {end - begin} bytes but "
                                   f"{dtype} {shape} needs {expected}")
        entries[name] = (dtype, tuple(shape), begin, end)

    # tensors must tile the buffer exactly: sorted by offset, each starts where the previous ended
    ordered = sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3]))
    pos = 0
    prev = None
    for name, (_, _, begin, end) in ordered:
        if begin != pos:
            what = (f"overlaps {prev!r}" if begin < pos else f"leaves a gap of {begin - pos} bytes before it")
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {what} "
                                   f"(tensors must be contiguous and non-overlapping)")
        pos, prev = end, name
    if pos > data_size:
        raise SafetensorsError(f"{path}: file is truncated: the tensors need {pos} bytes of data but only "
                               f"{data_size} bytes follow the header")
    if pos < data_size:
        raise SafetensorsError(f"{path}: {data_size - pos} unexpected bytes after the last tensor "
                               f"(the data buffer should be {pos} bytes)")
    return dict(ordered), metadata, data_start, file_size


def read_header(path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (dtype name, shape) for every tensor, in storage order, without reading the data.

    The header is fully validated (including that the file is long enough to hold all the data).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        entries, _, _, _ = _parse(path, f)
    return {name: (dt, shape) for name, (dt, shape, _, _) in entries.items()}


def load_metadata(path) -> Dict[str, str]:
    """The file's __metadata__ dict (empty if it has none)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        _, metadata, _, _ = _parse(path, f)
    return metadata


def load_file(path, names: Optional[Iterable[str]] = None, bf16_as: str = "uint16") -> Dict[str, np.ndarray]:
    """Load tensors (all of them, or only `names`) as fresh, writable NumPy arrays, in storage order.

    bf16_as: "uint16" (default) returns BF16 tensors as their raw bits; "float32" converts them exactly.
    """
    path = os.fspath(path)
    if bf16_as not in ("uint16", "float32"):
        raise ValueError(f"bf16_as must be 'uint16' or 'float32', got {bf16_as!r}")
    with open(path, "rb") as f:
        entries, _, data_start, _ = _parse(path, f)
        if names is None:
            wanted = list(entries)
        else:
            wanted = list(names)
            missing = [n for n in wanted if n not in entries]
            if missing:
                raise SafetensorsError(f"{path}: no tensor named {missing} (the file holds {len(entries)} "
                                       f"tensors, e.g. {list(entries)[:5]})")
        wanted = set(wanted)
        out = {}
        for name in entries:                       # storage order keeps reads sequential
            if name not in wanted:
                continue
            dt, shape, begin, end = entries[name]
            a = np.empty(shape, dtype=DTYPES[dt])
            if end > begin:
                f.seek(data_start + begin)
                got = f.readinto(memoryview(a.reshape(-1)).cast("B"))
                if got != end - begin:             # the file shrank under us
                    raise SafetensorsError(f"{path}: file is truncated while reading tensor {name!r}")
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            if dt == "BF16" and bf16_as == "float32":
                a = bf16_bits_to_float32(a).reshape(shape)
            out[name] = a
    return out


if __name__ == "__main__":  # tiny inspector: python -m nanogpt_np.io.safetensors FILE
    for p in sys.argv[1:]:
        print(p, load_metadata(p))
        for k, (dt, shp) in read_header(p).items():
            print(f"  {k:50s} {dt:5s} {list(shp)}")
