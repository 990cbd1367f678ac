"""Task data for fine-tuning: prompt/completion pairs (JSON Lines) and plain text, as (x, y) token rows.

A task file is JSON Lines, one example per line:

    {"prompt": "Review: a warm, funny film\\nSentiment:", "completion": " positive"}
    {"text": "Any plain text: the model learns every token of it."}

Blank lines are skipped; other keys are ignored. A file that does not end in .jsonl / .json is read as one
plain-text document. Every problem is a TaskDataError (a ValueError) naming `file:line`.

How an example becomes training data (one example per row, T = block_size):

    ids  = encode(prompt) + encode(completion) + [eot]        (eot only if the tokenizer has one)
    x    = ids[:-1]                                         (B, T) inputs, padded with pad_id
    y[t] = ids[t+1] if token t+1 belongs to the completion   (B, T) targets, -1 = ignored
           else -1

so the loss (cross-entropy with ignore_index=-1) is taken only where the model predicts completion tokens;
the prompt is context only and its positions get exactly zero gradient. Prompt and completion are encoded
separately, so the boundary between them is exact whatever the tokenizer merges. Plain text (a "text" line or
a whole .txt file) is learned on every token, cut into rows of T+1 tokens that overlap by one.

Too-long examples: the prompt is cut from the left (keeping the part next to the completion), then the
completion from the right; `TaskData.n_truncated` counts them. An example left with nothing to learn is an
error. Avoid truncation where you can (a larger block_size, shorter prompts): a cut example is learned with
its tokens at other positions than generation later sees them, which costs accuracy.

Not handled: chat templates, several completions per prompt, packing several examples into one row.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .loader import rank_rows

__all__ = ["TaskDataError", "Example", "read_task_file", "encode_example", "make_rows", "TaskData",
           "load_task_data", "split_examples", "TaskLoader"]


class TaskDataError(ValueError):
    """A task file or example is unusable; the message starts with file:line."""


@dataclass
class Example:
    prompt: str          # context, not learned ("" for plain text)
    completion: str      # learned; for plain text the whole text
    where: str           # "file:line", for error messages
    plain: bool = False  # plain text: learned on every token and cut into windows


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".jsonl.txt"))


def read_task_file(path, need_completion: bool = False) -> List[Example]:
    """Read a .jsonl task file (or a plain-text file as one document) into Examples.

    need_completion: for evaluation, every line must be a prompt/completion pair ("text" lines are refused).
    """
    path = os.fspath(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TaskDataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        try:
            if not _is_jsonl(path):
                text = f.read()
                if not text:
                    raise TaskDataError(f"{path}:1: the file is empty")
                if need_completion:
                    raise TaskDataError(f"{path}: a plain-text file has no prompt/completion pairs to score; "
                                        f"use a .jsonl file with \"prompt\" and \"completion\" on each line")
                return [Example("", text, f"{path}:1", plain=True)]
            lines = list(f)
        except UnicodeDecodeError as e:
            raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None

    examples = []
    for no, line in enumerate(lines, start=1):
        where = f"{path}:{no}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        if "prompt" in obj or "completion" in obj or need_completion:
            for key in ("prompt", "completion"):
                if key not in obj:
                    alt = "" if need_completion else ', or a "text" string'
                    raise TaskDataError(f"{where}: missing field {key!r} (each line needs \"prompt\" and "
                                        f"\"completion\" strings{alt})")
                if not isinstance(obj[key], str):
                    raise TaskDataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj["completion"]:
                raise TaskDataError(f"{where}: field 'completion' is empty (nothing to learn or to score)")
            examples.append(Example(obj["prompt"], obj["completion"], where))
        elif "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"]:
                raise TaskDataError(f"{where}: field 'text' must be a non-empty string")
            examples.append(Example("", obj["text"], where, plain=True))
        else:
            raise TaskDataError(f"{where}: missing fields: need \"prompt\" and \"completion\", or \"text\" "
                                f"(found {sorted(obj)})")
    if not examples:
        raise TaskDataError(f"{path}: no examples (the file is empty or only blank lines)")
    return examples


def _encode(tokenizer, text: str, where: str) -> List[int]:
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:             # unknown character (char tokenizer), special token in the text (BPE)
        raise TaskDataError(f"{where}: cannot encode: {e}") from None


def encode_example(tokenizer, ex: Example, add_eot: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Example -> (ids (L,) int64, learn (L,) bool): learn[i] says token i is a target the loss counts."""
    prompt = _encode(tokenizer, ex.prompt, ex.where) if ex.prompt else []
    completion = _encode(tokenizer, ex.completion, ex.where)
    eot = getattr(tokenizer, "eot_id", None)
    tail = [eot] if (add_eot and eot is not None) else []
    ids = np.array(prompt + completion + tail, dtype=np.int64)
    learn = np.zeros(len(ids), dtype=bool)
    learn[len(prompt):] = True
    return ids, learn


def make_rows(ids: np.ndarray, learn: np.ndarray, block_size: int, where: str = "example",
              plain: bool = False) -> Tuple[List[np.ndarray], List[np.ndarray], bool]:
    """One encoded example -> rows of (x, y) (each (<= T,) int64, unpadded) and whether it was truncated."""
    T = block_size
    if plain:                               # windows of T+1 tokens overlapping by one: every token learned once
        if len(ids) < 2:
            raise TaskDataError(f"{where}: text is {len(ids)} token(s), too short to learn from")
        xs, ys = [], []
        for s in range(0, len(ids) - 1, T):
            w = ids[s:s + T + 1]
            xs.append(w[:-1].copy())
            ys.append(w[1:].copy())
        return xs, ys, False
    truncated = False
    if len(ids) > T + 1:
        truncated = True
        n_prompt = int((~learn).sum())
        drop = min(len(ids) - (T + 1), max(n_prompt - 1, 0))     # keep >= 1 prompt token as context
        ids, learn = ids[drop:], learn[drop:]
        ids, learn = ids[:T + 1], learn[:T + 1]
    x = ids[:-1]
    y = np.where(learn[1:], ids[1:], -1)
    if not (y >= 0).any():
        raise TaskDataError(f"{where}: no completion token fits in block_size={T} (nothing to learn)")
    return [x.copy()], [y.astype(np.int64)], truncated


@dataclass
class TaskData:
    """Padded training rows: x (N, T) int64, y (N, T) int64 with -1 where nothing is learned."""
    x: np.ndarray
    y: np.ndarray
    lengths: np.ndarray                   # (N,) real length of each row before padding
    examples: List[Example] = field(default_factory=list)
    n_truncated: int = 0

    @property
    def n_target_tokens(self) -> int:
        return int((self.y >= 0).sum())


def load_task_data(examples_or_path, tokenizer, block_size: int, pad_id: Optional[int] = None,
                   add_eot: bool = True) -> TaskData:
    """Encode examples (or read them from a path) into padded (x, y) rows for training or validation.

    pad_id fills x after the end of a row (its targets are -1, so its value never matters for the loss);
    by default the eot id, or 0.
    """
    if isinstance(examples_or_path, (str, os.PathLike)):
        examples = read_task_file(examples_or_path)
    else:
        examples = list(examples_or_path)
    if not examples:
        raise TaskDataError("no examples")
    vocab = getattr(tokenizer, "vocab_size", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eot_id", None)
        pad_id = 0 if pad_id is None else pad_id
    xs, ys, n_trunc = [], [], 0
    for ex in examples:
        ids, learn = encode_example(tokenizer, ex, add_eot=add_eot and not ex.plain)
        if vocab is not None and len(ids) and ids.max() >= vocab:
            raise TaskDataError(f"{ex.where}: token id {int(ids.max())} is outside the vocabulary ({vocab})")
        rx, ry, trunc = make_rows(ids, learn, block_size, ex.where, plain=ex.plain)
        xs += rx
        ys += ry
        n_trunc += trunc
    N, T = len(xs), block_size
    x = np.full((N, T), pad_id, dtype=np.int64)     # (N, T)
    y = np.full((N, T), -1, dtype=np.int64)         # (N, T)
    lengths = np.array([len(r) for r in xs], dtype=np.int64)
    for i, (rx, ry) in enumerate(zip(xs, ys)):
        x[i, :len(rx)] = rx
        y[i, :len(ry)] = ry
    return TaskData(x, y, lengths, examples, n_trunc)


def split_examples(examples: Sequence[Example], val_fraction: float = 0.1,
                   seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """Shuffle deterministically and split into (train, val); val gets at least one example when possible."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(examples) > 1:
        n_val = 1
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


class TaskLoader:
    """Batches of task rows with the BatchLoader interface (next_batch, state_dict, iter_sequential).

    Rows are drawn uniformly with replacement from numpy.random.Generator(PCG64(seed)). Each batch is cut to
    its longest row (columns past it are all padding), so short examples train fast; x and y keep T <=
    block_size columns, which GPT.forward accepts.
    """

    def __init__(self, data: TaskData, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rank_rows(batch_size, rank, world_size)     # this rank's rows of every global batch
        self.data = data
        self.batch_size = int(batch_size)
        self.block_size = int(data.x.shape[1])
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.batches_drawn = 0

    def _rows(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        L = max(int(self.data.lengths[rows].max()), 1)
        return self.data.x[rows, :L], self.data.y[rows, :L]        # (b, L), (b, L)

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray]:
        rows = self.rng.integers(0, len(self.data.x), size=self.batch_size)   # (B,) the whole global batch
        rows = rows[self.rows]                                                 # (B/N,) this rank's share
        self.batches_drawn += 1
        return self._rows(rows)

    def __len__(self) -> int:
        return -(-len(self.data.x) // self.batch_size)

    def iter_sequential(self, max_batches: Optional[int] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Every row once, in order (deterministic; the last batch may be smaller)."""
        for k, start in enumerate(range(0, len(self.data.x), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._rows(np.arange(start, min(start + self.batch_size, len(self.data.x))))

    def iter_spread(self, max_batches: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """max_batches batches of rows spread evenly over all the rows, in order (every row when there are
        no more than that): the same sample of the whole split every time."""
        from .loader import spread
        rows = spread(len(self.data.x), max_batches * self.batch_size)
        for start in range(0, len(rows), self.batch_size):
            yield self._rows(rows[start:start + self.batch_size])

    def state_dict(self) -> dict:
        st = self.rng.bit_generator.state
        return {"version": 1, "kind": "task", "seed": self.seed, "batches_drawn": self.batches_drawn,
                "n_rows": int(len(self.data.x)), "bit_generator": st["bit_generator"],
                "state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
                "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["state"]), "inc": int(state["inc"])},
            "has_uint32": int(state.get("has_uint32", 0)), "uinteger": int(state.get("uinteger", 0))}
        self.seed = int(state.get("seed", self.seed))
        self.batches_drawn = int(state.get("batches_drawn", 0))


# ----------------------------------------------------------------------------------------------- trainer glue

def is_task_file(path) -> bool:
    """True for a JSON Lines task file (what `train.py --dataset=...` should read with this module)."""
    p = os.fspath(path)
    return p.endswith(".jsonl") and os.path.isfile(p)


def task_text(examples: Sequence[Example]) -> str:
    """All the text of the examples (to build a character vocabulary when no tokenizer is given)."""
    return "".join(ex.prompt + ex.completion for ex in examples)


def task_loaders(path, tokenizer, block_size: int, batch_size: int, val_fraction: float = 0.1,
                 seed: int = 0, val_path=None, rank: int = 0, world_size: int = 1) -> Tuple["TaskLoader", "TaskLoader"]:
    """(train loader, validation loader) for a task file: the examples are split by `split_examples`
    (or the validation examples come from `val_path`). Both loaders have the BatchLoader interface."""
    examples = read_task_file(path)
    if val_path is not None:
        train, val = examples, read_task_file(val_path)
    else:
        train, val = split_examples(examples, val_fraction, seed)
        if not val:
            raise TaskDataError(f"{path}: {len(examples)} example(s) is too few to hold some out for validation")
    train_data = load_task_data(train, tokenizer, block_size)
    val_data = load_task_data(val, tokenizer, block_size)
    return (TaskLoader(train_data, batch_size, seed=seed, rank=rank, world_size=world_size),
            TaskLoader(val_data, batch_size, seed=seed + 1))


def task_val_loss(model, loader: "TaskLoader", max_batches: Optional[int] = None) -> float:
    """Mean cross-entropy per learned token over the loader's rows (weighted by token count, so the result
    does not depend on how rows fall into batches): all of them, or max_batches batches of rows spread over
    all of them. Restores the model's train/eval mode."""
    from .. import backend
    from ..tensor import no_grad
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with no_grad():
        batches = loader.iter_sequential() if max_batches is None else loader.iter_spread(max_batches)
        for x, y in batches:
            k = int((y >= 0).sum())
            _, loss = model.forward(backend.to_device(x), backend.to_device(y))
            total += loss.item() * k
            n += k
    model.train(was_training)
    return total / n
