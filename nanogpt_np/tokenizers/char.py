"""Character-level tokenizer: one id per distinct character of the training text.

The simplest tokenizer that works, and the one nanoGPT's Shakespeare recipe uses. The vocabulary is the
sorted set of characters seen in the training text; ids are positions in that list. Text with a character
outside the vocabulary cannot be encoded (a clear error, not a silent drop). There are no special tokens:
`eot_id` is None and documents are joined with a blank line instead.
"""
import json

from ..io.files import atomic_write_json


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("character vocabulary has duplicates")
        if not self.chars:
            raise ValueError("character vocabulary is empty")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, allowed_special="none_raise") -> list:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary") from None

    def decode(self, ids, errors="replace") -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.chars)]      # (negative ids would wrap around silently)
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary (0..{len(self.chars) - 1})")
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict:
        return {"type": "char", "version": 1, "chars": "".join(self.chars)}

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if d.get("type") != "char" or not isinstance(d.get("chars"), str):
            raise ValueError("not a character tokenizer file (expected type 'char' and a 'chars' string)")
        return cls(list(d["chars"]))

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
