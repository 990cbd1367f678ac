"""load_prepared(name): the token shards, tokenizer and manifest of a prepared dataset, memory-mapped.

A prepared dataset is a directory data/<name>/ (see docs/CONTRACTS.md) holding
  manifest.json     written by nanogpt_np.data.prepare: lists the shard files of each split
  tokenizer.json    the tokenizer ("type": "char" or "bpe")
  train*.bin, val*.bin   llm.c shards (or nanoGPT raw uint16 files; the reader tells them apart)
With a manifest, tokenizer.json must be there and hold at least the manifest's vocab_size tokens, and
shards are read with the strict llm.c reader when the manifest says "format": "llmc".
Also read: a nanoGPT data directory (train.bin + val.bin, raw uint16, no manifest); its tokenizer is
tokenizer.json if present, else the characters of nanoGPT's meta.pkl (read with an unpickler that
refuses every class, so no code can run), else GPT-2's (found as nanogpt_np.data.prepare.find_gpt2_dir does).

`train` and `val` are one np.memmap when the split has one file, else a list of them, which is what
nanogpt_np.data.loader.BatchLoader takes. Nothing is read into memory here.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import List, Union

import numpy as np

from .shards import read_tokens

PREPARE_COMMANDS = {
    "shakespeare_char": "python data/prepare_shakespeare_char.py",
    "shakespeare_bpe": "python data/prepare_shakespeare_bpe.py",
    "pydocs": "python data/prepare_pydocs.py",
}

Tokens = Union[np.ndarray, List[np.ndarray]]


@dataclass
class PreparedData:
    directory: str
    train: Tokens
    val: Tokens
    tokenizer: object
    manifest: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return count_tokens(self.train)

    @property
    def val_tokens(self) -> int:
        return count_tokens(self.val)


def count_tokens(t: Tokens) -> int:
    """Tokens in one array or a list (or tuple) of shards."""
    return sum(len(s) for s in t) if isinstance(t, (list, tuple)) else len(t)


def prepare_command(name: str, data_root: str = "data") -> str:
    """The command that prepares dataset `name` (a generic one for names this project does not know)."""
    if name in PREPARE_COMMANDS and os.path.normpath(data_root) == "data":
        return PREPARE_COMMANDS[name]
    out = os.path.join(data_root, name)
    if name in PREPARE_COMMANDS:
        return f"{PREPARE_COMMANDS[name]} --out {out}"
    return f"python data/prepare.py --input PATH_TO_YOUR_TEXT --out {out}"


def find_dataset_dir(name_or_dir: str, data_root: str = "data") -> str:
    """data_root/name if it is a directory, else name_or_dir itself; a clear error when neither is."""
    candidates = [os.path.join(data_root, name_or_dir), name_or_dir]
    for c in candidates:
        if os.path.isdir(c):
            return c
    name = os.path.basename(os.path.normpath(name_or_dir))
    raise FileNotFoundError(
        f"prepared dataset {name_or_dir!r} not found: no directory {candidates[0]}/"
        + (f" or {candidates[1]}/" if candidates[1] != candidates[0] else "")
        + f". Prepare it with:\n    {prepare_command(name, data_root)}")


class _NoClassesUnpickler(pickle.Unpickler):
    """Reads pickles of plain dicts, lists, strings and numbers only; any class is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is accepted")


def _load_tokenizer(directory: str, manifest: dict):
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        from ..tokenizers.load import load_tokenizer
        return load_tokenizer(path)
    if manifest:  # written by nanogpt_np.data.prepare with its own tokenizer: GPT-2's would give wrong text
        raise FileNotFoundError(f"{path}: missing; {directory}/manifest.json needs the tokenizer the dataset "
                                f"was prepared with (prepare the dataset again)")
    meta = os.path.join(directory, "meta.pkl")
    if os.path.isfile(meta):  # nanoGPT's character datasets
        try:
            with open(meta, "rb") as f:
                m = _NoClassesUnpickler(f).load()
            itos = m["itos"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}: refused or unreadable ({type(e).__name__}: {e}); "
                             f"expected nanoGPT's meta.pkl, a plain dict with 'itos'") from None
        from ..tokenizers.char import CharTokenizer
        return CharTokenizer([itos[i] for i in range(len(itos))])
    from .prepare import find_gpt2_dir  # nanoGPT's BPE datasets use GPT-2's tokenizer
    from ..tokenizers.bpe import BPETokenizer
    d = find_gpt2_dir()
    return BPETokenizer.from_gpt2_files(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe"))


def _split_files(directory: str, manifest: dict, split: str) -> List[str]:
    if manifest.get(split, {}).get("files"):
        files = [os.path.join(directory, f) for f in manifest[split]["files"]]
    elif os.path.isfile(os.path.join(directory, f"{split}.bin")):
        files = [os.path.join(directory, f"{split}.bin")]
    else:
        files = sorted(glob.glob(os.path.join(directory, f"{split}_*.bin")))
    if not files:
        raise FileNotFoundError(f"{directory}: no {split}.bin or {split}_*.bin shard files")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: listed in {directory}/manifest.json but missing")
    return files


def load_prepared(name_or_dir: str, data_root: str = "data") -> PreparedData:
    """Open a prepared dataset by name (data_root/name) or by directory (see the module docstring)."""
    directory = find_dataset_dir(name_or_dir, data_root)
    manifest = {}
    mpath = os.path.join(directory, "manifest.json")
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath}: not valid JSON ({e}); prepare the dataset again") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    # a manifest that says llm.c: the strict reader, so a corrupted magic is refused, not read as raw tokens
    fmt = "llmc" if manifest.get("format") == "llmc" else "auto"
    splits = {}
    for split in ("train", "val"):
        shards = [read_tokens(p, fmt) for p in _split_files(directory, manifest, split)]
        expected = manifest.get(split, {}).get("tokens")
        if expected is not None and expected != sum(len(s) for s in shards):
            raise ValueError(f"{directory}: manifest.json says {expected} {split} tokens, "
                             f"the shard files hold {sum(len(s) for s in shards)}")
        splits[split] = shards[0] if len(shards) == 1 else shards
    tokenizer = _load_tokenizer(directory, manifest)
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if isinstance(vocab, int) and tokenizer.vocab_size < vocab:  # ids past the vocabulary would fail later
        raise ValueError(f"{directory}/tokenizer.json has {tokenizer.vocab_size} tokens but manifest.json says "
                         f"the data uses a vocabulary of {vocab}; the tokenizer does not belong to this dataset")
    return PreparedData(directory, splits["train"], splits["val"], tokenizer, manifest)
