"""load_tokenizer(path): open any tokenizer this project knows, whatever file it was saved to.

Accepted:
  * a JSON file with a "type" field: "bpe" -> BPETokenizer, "char" -> CharTokenizer;
  * a directory holding tokenizer.json (read as above), or GPT-2's encoder.json + vocab.bpe,
    or the same format under Hugging Face's names, vocab.json + merges.txt;
  * GPT-2's encoder.json (or vocab.json) itself, when its merges file lies beside it.
Not accepted: Hugging Face's own tokenizer.json layout (it has no top-level "type"; in a GPT-2 folder the
vocab.json + merges.txt beside it are read instead), SentencePiece models.
Every failure is a TokenizerFileError (a ValueError) naming the path.
"""
from __future__ import annotations

import os
from pathlib import Path

from .bpe import BPETokenizer, TokenizerFileError, _read_json

GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def load_tokenizer(path):
    """Return the tokenizer stored at path (a file or a directory; see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        # Our own tokenizer.json first, unless it is Hugging Face's (no string "type") and GPT-2's vocab.json +
        # merges.txt lie beside it, as in every downloaded GPT-2 folder: then those are the tokenizer.
        if (path / "tokenizer.json").is_file() and not _is_hf_tokenizer_json_with_pair(path):
            return load_tokenizer(path / "tokenizer.json")
        for vocab_name, merges_name in GPT2_FILE_PAIRS:
            if (path / vocab_name).is_file() and (path / merges_name).is_file():
                return BPETokenizer.from_gpt2_files(path / vocab_name, path / merges_name)
        raise TokenizerFileError(f"{path}: directory holds no tokenizer.json, encoder.json + vocab.bpe, "
                                 f"or vocab.json + merges.txt")
    description = _read_json(path)
    # a string "type" marks this project's files (GPT-2's encoder.json has a token "type" -> 4906)
    if isinstance(description, dict) and isinstance(description.get("type"), str):
        kind = description["type"]
        if kind == "bpe":
            return BPETokenizer.from_dict(description, where=str(path))
        if kind == "char":
            from .char import CharTokenizer  # imported here: only needed for char files
            return CharTokenizer.load(os.fspath(path))
        raise TokenizerFileError(f"{path}: unknown tokenizer type {kind!r} (expected \"bpe\" or \"char\")")
    for vocab_name, merges_name in GPT2_FILE_PAIRS:
        if path.name == vocab_name and (path.parent / merges_name).is_file():
            return BPETokenizer.from_gpt2_files(path, path.parent / merges_name)
    raise TokenizerFileError(f"{path}: not a tokenizer file (no \"type\" field, and not a GPT-2 "
                             f"encoder.json with its vocab.bpe beside it)")


def _is_hf_tokenizer_json_with_pair(directory: Path) -> bool:
    if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        return False
    try:
        description = _read_json(directory / "tokenizer.json")
    except TokenizerFileError:
        return True
    return not (isinstance(description, dict) and isinstance(description.get("type"), str))
