"""The data pipeline: ingest -> clean -> de-duplicate -> split -> tokenize -> shards + manifest.

    python -m nanogpt_np.data.prepare --input corpus.jsonl.gz --field text --tokenizer bpe --vocab_size 4096 --out data/mine

Two streaming stages, so a corpus larger than memory goes through:
  stage 1  documents are read one at a time (nanogpt_np.data.ingest), grouped into chunks of about
           `chunk_chars` characters, and each chunk is cleaned on a worker process (nanogpt_np.data.clean),
           which also computes the de-duplication keys (nanogpt_np.data.dedup) and the split hash. The main
           process decides what is a duplicate (first one wins, in input order) and appends each kept
           document to _clean_train.jsonl or _clean_val.jsonl (one JSON string per line).
  tokenizer  trained on the cleaned train documents (BPE on the first `bpe_train_chars` characters;
           characters: every character kept), or GPT-2's, or an existing tokenizer file.
  stage 2  the cleaned files are read back in chunks, tokenized on the workers, and written in order
           to llm.c shards (nanogpt_np.data.shards). The cleaned files are deleted unless keep_clean.
Results come back from the workers in input order, so the output is identical for any number of
processes. Memory held for the whole run: the de-duplication tables (about 2 KB per kept document
with near-duplicate removal on) and, for BPE training, the sample it trains on.

Split: a document goes to val when a seeded hash of its cleaned text falls below val_fraction, so the
split is stable across runs and machines, independent of order, and identical documents can never
land on both sides.
Document separators: with a tokenizer that has <|endoftext|> (BPE, GPT-2) every document is preceded
by it (as llm.c's shards are); a character tokenizer has no such token, so every document is followed
by a blank line ("\n\n") instead. Text that spells "<|endoftext|>" is encoded as ordinary text.

Output (out_dir): train.bin, val.bin (or train_000000.bin, ... with shard_tokens), tokenizer.json,
manifest.json (tokenizer, token and document counts, sources, options, and the cleaning report).
Everything is written to out_dir/.prepare_tmp/ and moved into out_dir only when the whole run succeeded,
so a failed rerun leaves the previous dataset intact. An out_dir that is a training run directory
(a checkpoint or a log.jsonl) is refused.
Progress with ETA goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np

from .clean import STEPS as CLEAN_STEPS
from .clean import Cleaner, CleanOptions
from .dedup import ExactDedup, MinHasher, NearDedup, band_keys, exact_key
from .ingest import DataError, ErrorLog, IngestStats, expand_inputs, iter_documents
from .shards import ShardWriter, dtype_for_vocab

CLEAN_FILES = {"train": "_clean_train.jsonl", "val": "_clean_val.jsonl"}


@dataclass
class PrepareConfig:
    inputs: List[str]
    out_dir: str
    # ingest
    fmt: str = "auto"
    field: str = "text"
    column: str = "text"
    text_split: str = "file"
    strict: bool = False  # a bad record is fatal instead of counted and skipped
    # cleaning
    html: object = "auto"
    unicode: bool = True
    whitespace: bool = True
    min_chars: int = 1
    # de-duplication
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8
    num_perm: int = 128
    bands: int = 16
    shingle: int = 5
    # split
    val_fraction: float = 0.1
    seed: int = 0
    # tokenizer: "bpe" (train one), "char", "gpt2" (GPT-2's files), or the path of a tokenizer file
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    gpt2_dir: Optional[str] = None
    bpe_train_chars: int = 20_000_000
    # output and work
    shard_tokens: Optional[int] = None  # None: one train.bin and one val.bin
    processes: Optional[int] = None  # None: every core; 1: everything in this process
    chunk_chars: int = 1 << 20
    keep_clean: bool = False
    progress: bool = True


# --------------------------------------------------------------------------- progress
class Progress:
    """'label: done/total MB (pct) rate MB/s ETA h:mm:ss' on stderr, at most once a second."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done_bytes: int, extra: str = "", final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (1.0 if self.tty else 10.0)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        left = (self.total - done_bytes) / rate if rate > 0 and done_bytes < self.total else 0.0
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        msg = (f"{self.label}: {done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB "
               f"({100 * min(done_bytes / self.total, 1):.0f}%) {rate / 1e6:.2f} MB/s ETA {eta} {extra}")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + msg, end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- worker pool
_W: Dict[str, object] = {}  # per-process worker state, set by the pool initialiser


def _init_worker(state: dict) -> None:
    _W.clear()
    _W.update(state)


def _ordered_map(fn, items: Iterable, processes: int, init_state: dict) -> Iterator:
    """fn over items on `processes` workers, results in input order, at most 2 per worker in flight
    (so reading the input never runs far ahead of the workers). processes=1 runs in this process."""
    if processes <= 1:
        _init_worker(init_state)
        yield from map(fn, items)
        return
    import multiprocessing
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(processes, initializer=_init_worker, initargs=(init_state,)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(items: Iterable, size_of, limit: int) -> Iterator[list]:
    """Group items into lists whose size_of() sums to about `limit` (at least one item each)."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += size_of(item)
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- stage 1: clean
def split_hash(text: str, seed: int) -> float:
    """A number in [0, 1) from a seeded hash of the text: the document goes to val when it is < val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _clean_chunk(docs):
    """Worker: clean each (text, source, line); compute dedup keys and split hash of the survivors.

    Returns (records, band keys (n_kept, bands) or None, signatures (n_kept, P) or None, chars).
    A record is (JSON line of the cleaned text or None if dropped, its UTF-8 bytes, its characters,
    bytes removed per step, exact key, split hash); the i-th kept record's signature is row i
    (MinHash runs once over the whole chunk)."""
    cleaner, hasher, seed = _W["cleaner"], _W["hasher"], _W["seed"]
    records, kept, chars = [], [], set() if _W["collect_chars"] else None
    for text, source, line in docs:
        try:
            cleaned, removed = cleaner.clean(text)
        except Exception as e:  # a bug or a pathological input: say which document
            raise DataError(f"{source}:{line}: cleaning failed: {type(e).__name__}: {e}") from e
        if cleaned is None:
            records.append((None, 0, 0, removed, None, 0.0))
            continue
        key = exact_key(cleaned) if _W["exact"] else None
        if chars is not None:
            chars.update(cleaned)
        stored = json.dumps(cleaned, ensure_ascii=False) + "\n"  # a line of the _clean_*.jsonl files
        records.append((stored, len(cleaned.encode("utf-8")), len(cleaned), removed, key, split_hash(cleaned, seed)))
        kept.append(cleaned)
    sigs = keys = None
    if hasher is not None:
        sigs = hasher.signatures(kept)  # (n_kept, P)
        keys = band_keys(sigs, _W["bands"])  # (n_kept, bands)
    return records, keys, sigs, chars


def _empty_report() -> dict:
    steps = {s: {"docs_removed": 0, "bytes_removed": 0} for s in CLEAN_STEPS + ("exact_dup", "near_dup")}
    return {"input": {}, "steps": steps, "kept": {"documents": 0, "bytes": 0},
            "split": {s: {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0} for s in ("train", "val")}}


def clean_stage(cfg: PrepareConfig, processes: int, report: dict, skip_dir: Optional[str] = None) -> Optional[set]:
    """Stage 1. Writes the cleaned documents of each split; returns the character set (char tokenizer).
    Files an earlier run wrote to skip_dir (the output directory) are not read as input when a folder
    holding it is given as --input."""
    unknown: List[str] = []  # files in input folders left out for their extension
    files = expand_inputs(cfg.inputs, cfg.fmt, skipped=unknown)
    if skip_dir is not None:
        skip = os.path.abspath(skip_dir)
        files = [f for f in files if not (os.path.dirname(os.path.abspath(f)) == skip
                                          and _OUTPUT_NAME.fullmatch(os.path.basename(f)))]
    if not files:
        raise DataError(f"no input files found in {cfg.inputs}")
    total = sum(os.path.getsize(p) for p in files)
    errors, stats = ErrorLog(strict=cfg.strict), IngestStats()
    docs = ((d.text, d.source, d.line) for d in iter_documents(
        files, cfg.fmt, cfg.field, cfg.column, cfg.text_split, errors, stats))
    state = {
        "cleaner": Cleaner(CleanOptions(cfg.html, cfg.unicode, cfg.whitespace, cfg.min_chars)),
        "hasher": MinHasher(cfg.num_perm, cfg.shingle, cfg.seed) if cfg.dedup_near else None,
        "exact": cfg.dedup_exact, "seed": cfg.seed, "collect_chars": cfg.tokenizer == "char", "bands": cfg.bands,
    }
    exact = ExactDedup() if cfg.dedup_exact else None
    near = NearDedup(cfg.num_perm, cfg.bands, cfg.near_threshold) if cfg.dedup_near else None
    steps, kept, split = report["steps"], report["kept"], report["split"]
    chars = set() if cfg.tokenizer == "char" else None
    progress = Progress("clean", total, cfg.progress)
    os.makedirs(cfg.out_dir, exist_ok=True)
    outs = {s: open(os.path.join(cfg.out_dir, name), "w", encoding="utf-8") for s, name in CLEAN_FILES.items()}
    try:
        chunks = _chunks(docs, lambda d: len(d[0]), cfg.chunk_chars)
        for records, keys, sigs, chunk_chars in _ordered_map(_clean_chunk, chunks, processes, state):
            if chars is not None:
                chars.update(chunk_chars)
            i = -1  # row of the current kept record in keys/sigs
            for line, nbytes, nchars, removed, key, u in records:
                for step, removed_bytes in removed.items():
                    steps[step]["bytes_removed"] += removed_bytes
                if line is None:
                    steps["too_short"]["docs_removed"] += 1
                    continue
                i += 1
                if exact is not None and exact.is_duplicate(key):
                    steps["exact_dup"]["docs_removed"] += 1
                    steps["exact_dup"]["bytes_removed"] += nbytes
                    continue
                if near is not None and near.add(sigs[i], keys[i]) is not None:
                    steps["near_dup"]["docs_removed"] += 1
                    steps["near_dup"]["bytes_removed"] += nbytes
                    continue
                which = "val" if u < cfg.val_fraction else "train"
                outs[which].write(line)
                kept["documents"] += 1
                kept["bytes"] += nbytes
                split[which]["documents"] += 1
                split[which]["bytes"] += nbytes
                split[which]["chars"] += nchars
            progress.update(stats.bytes_in, f"{stats.documents} docs")
    finally:
        for f in outs.values():
            f.close()
    progress.update(total, f"{stats.documents} docs", final=True)
    report["input"] = {"files": stats.files, "documents": stats.documents, "bytes": stats.text_bytes,
                       "file_bytes": total, "bad_records": errors.count, "bad_record_examples": errors.messages,
                       "skipped_files": len(unknown), "skipped_file_examples": unknown[:5]}
    report["sources"] = [{"path": p, "bytes": os.path.getsize(p)} for p in files]
    if kept["documents"] == 0:
        raise DataError(
            f"no documents left after cleaning {cfg.inputs}: {stats.documents} read, "
            f"{steps['too_short']['docs_removed']} empty or shorter than {cfg.min_chars} chars, "
            f"{steps['exact_dup']['docs_removed']} exact and {steps['near_dup']['docs_removed']} near duplicates, "
            f"{errors.count} bad records" + (f" (first: {errors.messages[0]})" if errors.messages else "")
            + (f"; is --field/--column right? (field={cfg.field!r}, column={cfg.column!r})" if errors.count else ""))
    for s in ("train", "val"):
        if split[s]["documents"] == 0 and (s == "train" or cfg.val_fraction > 0):
            raise DataError(
                f"the {s} split is empty ({kept['documents']} documents kept, val_fraction={cfg.val_fraction}); "
                f"use more documents, --text_split paragraph or line for a single text file, "
                f"or another --val_fraction")
    return chars


def iter_clean_file(path: str) -> Iterator[str]:
    """The documents of a _clean_*.jsonl file written by stage 1."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# --------------------------------------------------------------------------- tokenizer
def find_gpt2_dir(explicit: Optional[str] = None, option: Optional[str] = None) -> str:
    """GPT-2's encoder.json + vocab.bpe: --gpt2_dir, $NANOGPT_GPT2_DIR, data/gpt2, or ../shared/data/gpt2.

    A folder given explicitly is the only one looked at: silently taking GPT-2's files from somewhere
    else would hide a typo in the path. `option`: the caller's command-line option for that folder, if it
    has one, suggested when nothing is found (only prepare has one: train.py and the dataset reader do not)."""
    if explicit:
        for name in ("encoder.json", "vocab.bpe"):
            if not os.path.isfile(os.path.join(explicit, name)):
                raise FileNotFoundError(f"--gpt2_dir {explicit}: no {name} there "
                                        f"(GPT-2's encoder.json and vocab.bpe are needed)")
        return explicit
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.environ.get("NANOGPT_GPT2_DIR"), os.path.join(repo, "data", "gpt2"),
                  os.path.join(os.path.dirname(repo), "shared", "data", "gpt2")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "encoder.json")) and os.path.isfile(os.path.join(c, "vocab.bpe")):
            return c
    raise FileNotFoundError(
        "GPT-2's encoder.json and vocab.bpe were not found (looked in: "
        + ", ".join(c for c in candidates if c) + "); put them in data/gpt2/ or set NANOGPT_GPT2_DIR=DIR"
        + (f", or pass {option} DIR" if option else ""))


def load_given_tokenizer(cfg: PrepareConfig):
    """The tokenizer when it is not learned from the data (gpt2 or a file), else None after checking the
    options. Called before anything is cleaned or written, so a bad --tokenizer costs nothing and a
    tokenizer file inside --out is read before a rerun replaces it."""
    kind = cfg.tokenizer
    if kind == "char":
        return None
    if kind == "bpe":
        from ..tokenizers.bpe import ENDOFTEXT
        if cfg.vocab_size < 256 + len([ENDOFTEXT]):  # one id per byte + <|endoftext|>
            raise ValueError(f"--vocab_size must be at least 257 for --tokenizer bpe "
                             f"(256 bytes + <|endoftext|>), got {cfg.vocab_size}")
        return None
    if kind == "gpt2":
        from ..tokenizers.bpe import BPETokenizer
        d = find_gpt2_dir(cfg.gpt2_dir, option="--gpt2_dir")
        return BPETokenizer.from_gpt2_files(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe"))
    if os.path.exists(kind):
        from ..tokenizers.load import load_tokenizer
        return load_tokenizer(kind)
    raise ValueError(f"--tokenizer must be bpe, char, gpt2 or the path of a tokenizer file, got {kind!r}")


def build_tokenizer(cfg: PrepareConfig, chars: Optional[set], given=None):
    """The tokenizer for this dataset (see PrepareConfig.tokenizer); `given` is load_given_tokenizer's."""
    kind = cfg.tokenizer
    if given is not None:
        return given
    if kind == "char":
        from ..tokenizers.char import CharTokenizer
        return CharTokenizer(sorted(chars | {"\n"}))  # "\n" separates documents
    if kind == "bpe":
        from ..tokenizers.bpe import BPETokenizer

        def sample():  # the first bpe_train_chars characters of the cleaned train documents
            budget = cfg.bpe_train_chars
            for text in iter_clean_file(os.path.join(cfg.out_dir, CLEAN_FILES["train"])):
                if budget <= 0:
                    return
                yield text[:budget]
                budget -= len(text)

        return BPETokenizer.train(sample(), cfg.vocab_size)
    return load_given_tokenizer(cfg)


def tokenizer_name(tok) -> str:
    return tok.to_dict()["type"] if hasattr(tok, "to_dict") else type(tok).__name__


# --------------------------------------------------------------------------- stage 2: tokenize
def _tokenize_chunk(lines: List[str]) -> np.ndarray:
    """Worker: the ids of a list of documents (JSON lines of a _clean_*.jsonl file) with their
    separators, as one array."""
    tok, dtype = _W["tokenizer"], _W["dtype"]
    texts = [json.loads(line) for line in lines]
    eot = tok.eot_id
    if eot is not None:
        pieces = [chain((eot,), tok.encode(t, allowed_special="none")) for t in texts]
    else:
        pieces = [tok.encode(t + "\n\n", allowed_special="none") for t in texts]
    return np.fromiter(chain.from_iterable(pieces), dtype=np.int64).astype(dtype)


def tokenize_stage(cfg: PrepareConfig, tok, processes: int, report: dict) -> Dict[str, List[str]]:
    dtype = dtype_for_vocab(tok.vocab_size)
    files: Dict[str, List[str]] = {}
    for split in ("train", "val"):
        src = os.path.join(cfg.out_dir, CLEAN_FILES[split])
        if cfg.shard_tokens:
            target = os.path.join(cfg.out_dir, split + "_{index:06d}.bin")
        else:
            target = os.path.join(cfg.out_dir, split + ".bin")
        total_chars = os.path.getsize(src)  # close enough to the characters of the JSON lines
        progress = Progress(f"tokenize {split}", total_chars, cfg.progress)
        sizes = deque()  # characters in each chunk sent out, in order; popped as results come back

        def chunks():  # raw JSON lines: parsing them is left to the workers
            with open(src, encoding="utf-8") as f:
                for chunk in _chunks(f, len, cfg.chunk_chars):
                    sizes.append(sum(map(len, chunk)))
                    yield chunk

        done = 0
        with ShardWriter(target, dtype=dtype, max_tokens=cfg.shard_tokens) as writer:
            for ids in _ordered_map(_tokenize_chunk, chunks(), processes, {"tokenizer": tok, "dtype": dtype}):
                writer.write(ids)
                done += sizes.popleft()
                progress.update(done, f"{writer.n_tokens} tokens")
        progress.update(total_chars, f"{writer.n_tokens} tokens", final=True)
        files[split] = [os.path.basename(p) for p in writer.paths]
        report["split"][split]["tokens"] = writer.n_tokens
    return files


# --------------------------------------------------------------------------- the whole pipeline
_OUTPUT_NAME = re.compile(r"(train|val)(_\d{6})?\.bin|manifest\.json|tokenizer\.json")
WORK_DIR = ".prepare_tmp"  # inside out_dir; hidden, so a folder given as --input never reads it


def check_options(cfg: PrepareConfig) -> None:
    """Range checks of the numeric options (named as on the command line), before any work is done:
    a negative --shard_tokens, say, would otherwise create files forever."""
    def at_least(name, value, low):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")

    for name in ("processes", "shard_tokens", "chunk_chars", "bpe_train_chars", "num_perm", "bands", "shingle"):
        at_least(name, getattr(cfg, name), 1)
    at_least("seed", cfg.seed, 0)
    at_least("min_chars", cfg.min_chars, 0)
    if cfg.num_perm % cfg.bands:
        raise ValueError(f"--num_perm ({cfg.num_perm}) must be a multiple of --bands ({cfg.bands})")
    if not 0.0 < cfg.near_threshold <= 1.0:
        raise ValueError(f"--near_threshold must be in (0, 1], got {cfg.near_threshold}")
    if not 0.0 < cfg.val_fraction < 1.0:  # training needs documents on both sides
        raise ValueError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")


def check_out_dir(out_dir: str) -> None:
    """Refuse an --out that is a file or a training run directory (a rerun would replace its tokenizer.json)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file, not a directory")
    from ..io.run_dir import holds_run
    if holds_run(out_dir):
        raise DataError(f"--out {out_dir} is a training run directory, not a dataset directory; choose "
                        f"another --out (e.g. data/NAME)")


def remove_previous_output(out_dir: str) -> None:
    """Delete what an earlier run wrote (shards, manifest, tokenizer) so no stale file survives a rerun;
    other files in out_dir (a downloaded input.txt, say) are left alone."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if _OUTPUT_NAME.fullmatch(name):
                os.remove(os.path.join(out_dir, name))


def _swap_in(work_dir: str, out_dir: str) -> None:
    """Replace the previous output of out_dir by the finished files of work_dir (manifest.json last,
    so a dataset directory with a manifest is always a complete one)."""
    remove_previous_output(out_dir)
    names = sorted(os.listdir(work_dir), key=lambda n: n == "manifest.json")
    for name in names:
        os.replace(os.path.join(work_dir, name), os.path.join(out_dir, name))
    os.rmdir(work_dir)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline; returns the manifest (also written to out_dir/manifest.json).

    Everything is written to out_dir/.prepare_tmp first and moved into out_dir only when it all
    succeeded: a failed rerun leaves the previous dataset as it was."""
    import dataclasses
    import shutil

    from ..io.files import atomic_write_json

    check_options(cfg)
    check_out_dir(cfg.out_dir)
    given = load_given_tokenizer(cfg)  # before anything is written (it may live in out_dir)
    t0 = time.perf_counter()
    processes = min(cfg.processes or os.cpu_count() or 1, os.cpu_count() or 1)
    report = _empty_report()
    final_dir = cfg.out_dir
    created = not os.path.isdir(final_dir)
    work = os.path.join(final_dir, WORK_DIR)
    if os.path.isdir(work):
        shutil.rmtree(work)  # left by a run that was killed
    os.makedirs(work)
    cfg = dataclasses.replace(cfg, out_dir=work)
    try:
        try:
            chars = clean_stage(cfg, processes, report, skip_dir=final_dir)
            t1 = time.perf_counter()
            tok = build_tokenizer(cfg, chars, given)
            tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
            t2 = time.perf_counter()
            files = tokenize_stage(cfg, tok, processes, report)
            t3 = time.perf_counter()
        finally:
            if not cfg.keep_clean:
                for name in CLEAN_FILES.values():
                    path = os.path.join(cfg.out_dir, name)
                    if os.path.exists(path):
                        os.remove(path)
        in_mb = report["input"]["file_bytes"] / 1e6
        report["timing"] = {"clean_s": round(t1 - t0, 3), "tokenizer_s": round(t2 - t1, 3),
                            "tokenize_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3),
                            "processes": processes, "input_mb_per_s": round(in_mb / max(t3 - t0, 1e-9), 3)}
        dtype = dtype_for_vocab(tok.vocab_size)
        options = asdict(cfg)
        options.pop("inputs"), options.pop("out_dir"), options.pop("progress")
        manifest = {
            "format": "llmc",
            "version": 1,
            "created_by": "nanogpt_np.data.prepare",
            "tokenizer": {"type": tokenizer_name(tok), "source": cfg.tokenizer, "file": "tokenizer.json",
                          "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
            "dtype": dtype.name,
            "separator": "eot before each document" if tok.eot_id is not None else "blank line after each document",
            "train": {"files": files["train"], "tokens": report["split"]["train"]["tokens"],
                      "documents": report["split"]["train"]["documents"]},
            "val": {"files": files["val"], "tokens": report["split"]["val"]["tokens"],
                    "documents": report["split"]["val"]["documents"]},
            "sources": report.pop("sources"),
            "options": options,
            "report": report,
        }
        atomic_write_json(os.path.join(cfg.out_dir, "manifest.json"), manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # the previous output is untouched
        if created and not os.listdir(final_dir):
            os.rmdir(final_dir)
        raise
    _swap_in(work, final_dir)
    return manifest


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 10_000_000 else f"{n / 1e6:,.1f} MB"


def format_report(manifest: dict) -> str:
    """A short human-readable table of what each step removed and what was written."""
    r = manifest["report"]
    lines = [f"read {r['input']['documents']:,} documents, {_size(r['input']['bytes'])} of text from "
             f"{r['input']['files']} files ({r['input']['bad_records']} bad records skipped)"]
    for m in r["input"]["bad_record_examples"]:  # the first 20 (ErrorLog keeps no more), as data/README says
        lines.append(f"  bad record: {m}")
    if r["input"].get("skipped_files"):
        lines.append(f"  skipped {r['input']['skipped_files']} files with an unknown extension (e.g. "
                     f"{', '.join(r['input']['skipped_file_examples'])}); --format text reads every file")
    for step, c in r["steps"].items():
        lines.append(f"  {step:<12} removed {c['docs_removed']:>10,} documents {_size(c['bytes_removed']):>18}")
    lines.append(f"kept {r['kept']['documents']:,} documents, {_size(r['kept']['bytes'])}")
    for s in ("train", "val"):
        c = r["split"][s]
        lines.append(f"  {s:<5} {c['documents']:>10,} documents {c['tokens']:>14,} tokens -> {', '.join(manifest[s]['files'])}")
    t = r["timing"]
    lines.append(f"tokenizer {manifest['tokenizer']['type']} vocab_size={manifest['tokenizer']['vocab_size']}; "
                 f"{t['total_s']:.1f}s on {t['processes']} processes ({t['input_mb_per_s']:.2f} MB/s of input)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- downloads
def download(url: str, dest: str, timeout: float = 60.0) -> str:
    """Fetch url to dest (atomically) unless dest exists; a clear error on a machine without internet."""
    if os.path.isfile(dest):
        return dest
    import urllib.request
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot download {url} ({e}); on a machine without internet pass "
                                f"--input PATH to a local copy") from None
    from ..io.files import atomic_write_bytes
    atomic_write_bytes(dest, data)
    return dest


# --------------------------------------------------------------------------- command line
def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser(prog: str = "python -m nanogpt_np.data.prepare") -> argparse.ArgumentParser:
    d = PrepareConfig(inputs=[], out_dir="")
    p = argparse.ArgumentParser(prog=prog, description="Turn text/JSON/JSONL/CSV (gzip ok) into token shards.")
    p.add_argument("--input", nargs="+", required=True, help="files and/or folders")
    p.add_argument("--out", required=True, help="output directory, e.g. data/NAME")
    p.add_argument("--format", dest="fmt", default=d.fmt, choices=["auto", "text", "jsonl", "json", "csv"])
    p.add_argument("--field", default=d.field, help="JSON/JSONL field holding the text (dotted path: a.b.0.c)")
    p.add_argument("--column", default=d.column, help="CSV column holding the text")
    p.add_argument("--text_split", default=d.text_split, choices=["file", "paragraph", "line"],
                   help="for text files: one document per file, per blank-line paragraph, or per line")
    p.add_argument("--strict", type=_bool, default=d.strict, help="stop at the first bad record")
    p.add_argument("--html", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--unicode", type=_bool, default=d.unicode, help="NFC + control characters")
    p.add_argument("--whitespace", type=_bool, default=d.whitespace)
    p.add_argument("--min_chars", type=int, default=d.min_chars)
    p.add_argument("--dedup_exact", type=_bool, default=d.dedup_exact)
    p.add_argument("--dedup_near", type=_bool, default=d.dedup_near)
    p.add_argument("--near_threshold", type=float, default=d.near_threshold, help="estimated Jaccard similarity")
    p.add_argument("--num_perm", type=int, default=d.num_perm, help="MinHash signature length")
    p.add_argument("--bands", type=int, default=d.bands, help="LSH bands (num_perm must be a multiple)")
    p.add_argument("--shingle", type=int, default=d.shingle, help="shingle length in bytes")
    p.add_argument("--val_fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer", default=d.tokenizer, help="bpe | char | gpt2 | path of a tokenizer file")
    p.add_argument("--vocab_size", type=int, default=d.vocab_size, help="for --tokenizer bpe")
    p.add_argument("--gpt2_dir", default=None, help="folder with GPT-2's encoder.json and vocab.bpe")
    p.add_argument("--bpe_train_chars", type=int, default=d.bpe_train_chars)
    p.add_argument("--shard_tokens", type=int, default=None, help="tokens per shard file (default: one file per split)")
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: every core)")
    p.add_argument("--chunk_chars", type=int, default=d.chunk_chars)
    p.add_argument("--keep_clean", type=_bool, default=d.keep_clean, help="keep the cleaned documents as JSONL")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    kw = vars(args).copy()
    kw["inputs"] = kw.pop("input")
    kw["out_dir"] = kw.pop("out")
    kw["html"] = {"auto": "auto", "always": True, "never": False}[kw["html"]]
    kw["progress"] = not kw.pop("quiet")
    return PrepareConfig(**kw)


def main(argv=None, prog: str = "python -m nanogpt_np.data.prepare", defaults: Optional[dict] = None) -> dict:
    parser = build_parser(prog)
    if defaults:
        parser.set_defaults(**defaults)
        for action in parser._actions:  # what the calling script fills in is not required of the user
            if action.dest in defaults:
                action.required = False
    cfg = config_from_args(parser.parse_args(argv))
    try:
        manifest = prepare(cfg)
    except (ValueError, OSError) as e:  # DataError, TokenizerFileError, a bad option, an unwritable --out ...
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(format_report(manifest), file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
