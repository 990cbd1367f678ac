"""Ingest: stream documents out of text, JSON, JSON Lines and CSV files (gzip or not), file by file.

Everything here is a generator: one record is decoded at a time, so a corpus larger than memory
streams through (the exceptions are named below). Each document carries the file and line it came
from, so later steps can say where a problem is.

Formats (`fmt`; "auto" picks by extension, after removing a ".gz"):
  text   .txt .text .md .rst .html .htm and anything unknown. `text_split` says what one document is:
         "file" (the whole file: it must fit in memory), "paragraph" (blocks separated by blank
         lines), or "line" (each non-blank line).
  jsonl  .jsonl .ndjson: one JSON value per line; the text is at `field`, a dotted path into
         nested objects and lists ("text", "meta.body", "messages.0.content").
  json   .json: a top-level list of records (streamed element by element) or a single record.
  csv    .csv: a header row, then the text is in the column named `column`.
Gzip is recognised by the file's first two bytes (1f 8b), whatever its name.

Bad input never passes silently: malformed JSON, a missing field or column, a value that is not a
string, undecodable (non UTF-8) bytes are each reported through an `ErrorLog` with the file and line,
counted, and the record is skipped (or, with strict=True, raised as `DataError`).

Not handled: encodings other than UTF-8 (convert first), CSV dialects other than the default comma
dialect, and resuming inside a malformed JSON array (the rest of that file is skipped and reported).
"""
from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import sys
from dataclasses import dataclass, field as dc_field
from typing import Iterable, Iterator, List, Optional, Union

TEXT_EXTS = {".txt", ".text", ".md", ".rst", ".html", ".htm"}
FORMAT_BY_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
KNOWN_EXTS = TEXT_EXTS | set(FORMAT_BY_EXT)
FORMATS = ("auto", "text", "jsonl", "json", "csv")


class DataError(ValueError):
    """Bad input data; the message names the file and the line (or byte offset)."""


@dataclass
class Document:
    text: str
    source: str  # the file it came from
    line: int  # 1-based line where the record starts (1 for a whole file)


@dataclass
class ErrorLog:
    """Counts bad records and keeps the first few messages. strict=True raises on the first one."""

    strict: bool = False
    max_messages: int = 20
    count: int = 0
    messages: List[str] = dc_field(default_factory=list)
    verbose: bool = False  # print each message to stderr as it happens

    def bad(self, message: str) -> None:
        self.count += 1
        if self.strict:
            raise DataError(message + " (strict mode: bad records are fatal)")
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        if self.verbose:
            print(f"skipped: {message}", file=sys.stderr)


@dataclass
class IngestStats:
    files: int = 0
    documents: int = 0
    bytes_in: int = 0  # bytes of input files consumed so far (compressed size for .gz), for progress
    text_bytes: int = 0  # UTF-8 bytes of the documents yielded
    _done_files_bytes: int = 0


# --------------------------------------------------------------------------- finding files
def _ext(path: str) -> str:
    base = path[:-3] if path.lower().endswith(".gz") else path
    return os.path.splitext(base)[1].lower()


def expand_inputs(inputs: Union[str, Iterable[str]], fmt: str = "auto",
                  skipped: Optional[List[str]] = None) -> List[str]:
    """Files named by `inputs` (paths of files or folders; folders are walked recursively, sorted).

    In a folder, hidden files are skipped; with fmt="auto" only files with a known extension
    (optionally .gz) are taken, with an explicit fmt every file is. The files left out for their
    extension are appended to `skipped` when it is given (so a report can say so).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: List[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    if fmt == "auto" and _ext(name) not in KNOWN_EXTS:
                        if skipped is not None:
                            skipped.append(os.path.join(root, name))
                        continue
                    files.append(os.path.join(root, name))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return files


def format_of(path: str, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt if fmt != "auto" else FORMAT_BY_EXT.get(_ext(path), "text")


def _open_binary(path: str):
    """(decompressed binary stream, raw file) for a plain or gzip file; raw.tell() gives progress."""
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


# --------------------------------------------------------------------------- records
def get_field(record, path: Optional[str]):
    """Follow a dotted path ("a.b.0.c") into nested dicts/lists. Raises KeyError with what is there."""
    if path is None or path == "":
        return record
    if isinstance(record, dict) and path in record:  # a key that itself contains dots
        return record[path]
    node = record
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                keys = ", ".join(map(str, list(node)[:10]))
                raise KeyError(f"no field {path!r} (missing {part!r}; keys here: {keys or 'none'})")
            node = node[part]
        elif isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise KeyError(f"no field {path!r} ({part!r} is not an index into a list of {len(node)})")
            node = node[int(part)]
        else:
            raise KeyError(f"no field {path!r} ({part!r} asked of a {type(node).__name__})")
    return node


def _text_of(record, path: Optional[str], where: str, errors: ErrorLog) -> Optional[str]:
    try:
        value = get_field(record, path)
    except KeyError as e:
        errors.bad(f"{where}: {e.args[0]}")
        return None
    if not isinstance(value, str):
        errors.bad(f"{where}: field {path!r} is a {type(value).__name__}, not a string")
        return None
    return value


def _decode(raw_line: bytes, where: str, errors: ErrorLog) -> Optional[str]:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.bad(f"{where}: undecodable bytes (not UTF-8) at byte {e.start} of the line: "
                   f"{raw_line[e.start:e.start + 8]!r}")
        return None


# --------------------------------------------------------------------------- readers
def _lines(path: str, stats: IngestStats):
    """(line number, raw bytes) of a file, updating stats.bytes_in as it goes."""
    f, raw = _open_binary(path)
    try:
        for lineno, raw_line in enumerate(f, 1):
            if lineno == 1 and raw_line.startswith(codecs.BOM_UTF8):
                raw_line = raw_line[len(codecs.BOM_UTF8):]
            if lineno % 256 == 0:
                stats.bytes_in = stats._done_files_bytes + raw.tell()
            yield lineno, raw_line
    except (OSError, EOFError) as e:  # corrupt gzip stream and the like
        raise DataError(f"{path}: cannot read: {e}") from e
    finally:
        f.close()
        raw.close()


def read_text(path, errors, stats, text_split="file") -> Iterator[Document]:
    if text_split not in ("file", "paragraph", "line"):
        raise ValueError(f"text_split must be 'file', 'paragraph' or 'line', got {text_split!r}")
    parts: List[str] = []
    start = 1
    bad = False
    for lineno, raw_line in _lines(path, stats):
        line = _decode(raw_line, f"{path}:{lineno}", errors)
        if line is None:
            bad = True  # the whole document holding this line is dropped (already reported)
            if text_split == "paragraph" and not parts:
                parts.append("")  # an undecodable line is not a blank line: the paragraph goes on
            continue
        if text_split == "line":
            if line.strip():
                yield Document(line.rstrip("\r\n"), path, lineno)
        elif text_split == "paragraph":
            if line.strip():
                if not parts:
                    start = lineno
                parts.append(line)
            elif parts:
                if not bad:
                    yield Document("".join(parts), path, start)
                parts, bad = [], False
        else:
            parts.append(line)
    if text_split != "line" and parts and not bad:
        yield Document("".join(parts), path, start)


def _json_error(msg: str, column: int, line: Optional[int] = None) -> str:
    """json's message with where it happened ("Unterminated string starting at" already ends in "at")."""
    where = f"line {line} column {column}" if line is not None else f"column {column}"
    return msg + (" " if msg.endswith(" at") else " at ") + where


def read_jsonl(path, errors, stats, field="text") -> Iterator[Document]:
    for lineno, raw_line in _lines(path, stats):
        where = f"{path}:{lineno}"
        line = _decode(raw_line, where, errors)
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.bad(f"{where}: malformed JSON ({_json_error(e.msg, e.colno)})")
            continue
        text = _text_of(record, field, where, errors)
        if text is not None:
            yield Document(text, path, lineno)


class _Undecodable(Exception):
    """Raised inside the JSON array reader; reported as one bad record by read_json."""


def _iter_json_array(path: str, stream, errors: ErrorLog, max_record_chars: int, chunk: int = 1 << 16):
    """Yield (line, value) for each element of a top-level JSON array, reading the file in chunks.

    json.JSONDecoder.raw_decode parses one value from a position in a string; when it fails because
    the buffer ends mid-value, more of the file is read and the parse retried (with growing reads).
    A top-level value that is not an array is yielded whole (it must fit in memory).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    consumed_bytes = 0
    counted_line, counted_pos = 1, 0  # line number at buffer position counted_pos
    col0 = 0  # characters of its line before buf[0] (buf starts mid-line once parsed text is dropped)

    def column_at(p: int) -> int:  # 1-based column of buffer position p, as json counts
        nl = buf.rfind("\n", 0, p)
        return p - nl if nl >= 0 else col0 + p + 1

    def line_at(p: int) -> int:  # line number of buffer position p (p >= counted_pos), counted incrementally
        nonlocal counted_line, counted_pos
        counted_line += buf.count("\n", counted_pos, p)
        counted_pos = p
        return counted_line

    bad_bytes = None  # message for undecodable bytes met while reading ahead; raised when they are needed

    def more(grow: bool = False) -> bool:  # read the next chunk; grow=True doubles the chunk size
        nonlocal buf, pos, eof, chunk, consumed_bytes, counted_pos, bad_bytes, col0
        if bad_bytes:
            raise _Undecodable(bad_bytes)
        if eof:
            return False
        if grow:
            chunk = min(chunk * 2, 1 << 24)
        data = stream.read(chunk)
        try:
            text = utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            # e.object = bytes held back from the previous read + data; keep the good part before the error
            offset = consumed_bytes - (len(e.object) - len(data)) + e.start
            text = e.object[: e.start].decode("utf-8")
            line = line_at(pos) + buf.count("\n", pos) + text.count("\n")
            bad_bytes = (f"{path}:{line}: undecodable bytes (not UTF-8) at byte offset {offset}; "
                         f"rest of file skipped")
        consumed_bytes += len(data)
        line_at(pos)  # drop what has been parsed, keeping the line count (and the column of the new start)
        col0 = column_at(pos) - 1
        buf, pos, counted_pos = buf[pos:] + text, 0, 0
        eof = not data
        return True

    def skip_ws() -> bool:  # move pos to the next non-blank character; False at end of input
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    if not skip_ws():
        return
    if buf[pos] == "\ufeff":
        pos += 1
        skip_ws()
    if buf[pos] != "[":  # a single top-level record
        start_line = line_at(pos)
        while more(grow=True):
            pass
        try:
            yield start_line, json.loads(buf[pos:])
        except json.JSONDecodeError as e:
            errors.bad(f"{path}:{e.lineno + start_line - 1}: malformed JSON ({_json_error(e.msg, e.colno)})")
        return
    pos += 1
    first = True
    while True:
        if not skip_ws():
            errors.bad(f"{path}:{line_at(pos)}: malformed JSON (the top-level array is not closed)")
            return
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                errors.bad(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' between records, "
                           f"got {buf[pos]!r}); rest of file skipped")
                return
            pos += 1
            if not skip_ws():
                errors.bad(f"{path}:{line_at(pos)}: malformed JSON (the top-level array is not closed)")
                return
        first = False
        start_line = line_at(pos)
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # a following character proves the value is complete
                    break
                more(grow=True)
            except json.JSONDecodeError as e:
                if len(buf) - pos > max_record_chars or not more(grow=True):
                    where = _json_error(e.msg, column_at(e.pos), line_at(e.pos))
                    errors.bad(f"{path}:{start_line}: malformed JSON ({where}); "
                               f"rest of file skipped")
                    return
        pos = end
        yield start_line, value


def read_json(path, errors, stats, field="text", max_record_chars=64 << 20) -> Iterator[Document]:
    f, raw = _open_binary(path)
    try:
        for line, record in _iter_json_array(path, f, errors, max_record_chars):
            stats.bytes_in = stats._done_files_bytes + raw.tell()
            text = _text_of(record, field, f"{path}:{line}", errors)
            if text is not None:
                yield Document(text, path, line)
    except _Undecodable as e:  # the array cannot be followed past bytes that do not decode
        errors.bad(str(e))
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    finally:
        f.close()
        raw.close()


def read_csv(path, errors, stats, column="text") -> Iterator[Document]:
    csv.field_size_limit(2**31 - 1)
    current = {"line": 0}

    def decoded_lines():  # csv.reader wants str lines; lines that do not decode are reported and dropped
        for lineno, raw_line in _lines(path, stats):
            current["line"] = lineno
            line = _decode(raw_line, f"{path}:{lineno}", errors)
            if line is not None:
                yield line

    reader = csv.reader(decoded_lines())
    try:
        header = next(reader, None)
        if header is None:
            return
        if column not in header:
            errors.bad(f"{path}:1: no column {column!r} in the CSV header (columns: {', '.join(header)}); file skipped")
            return
        idx = header.index(column)
        for row in reader:
            where = f"{path}:{current['line']}"
            if not row:
                continue
            if idx >= len(row):
                errors.bad(f"{where}: row has {len(row)} fields, column {column!r} is field {idx + 1}")
                continue
            yield Document(row[idx], path, current["line"])
    except csv.Error as e:
        raise DataError(f"{path}:{current['line']}: malformed CSV: {e}") from e


def iter_documents(
    inputs,
    fmt: str = "auto",
    field: Optional[str] = "text",
    column: str = "text",
    text_split: str = "file",
    errors: Optional[ErrorLog] = None,
    stats: Optional[IngestStats] = None,
) -> Iterator[Document]:
    """Stream Documents from files and folders (see the module docstring for formats)."""
    errors = errors if errors is not None else ErrorLog()
    stats = stats if stats is not None else IngestStats()
    for path in expand_inputs(inputs, fmt):
        kind = format_of(path, fmt)
        if kind == "text":
            docs = read_text(path, errors, stats, text_split)
        elif kind == "jsonl":
            docs = read_jsonl(path, errors, stats, field)
        elif kind == "json":
            docs = read_json(path, errors, stats, field)
        else:
            docs = read_csv(path, errors, stats, column)
        for doc in docs:
            stats.documents += 1
            stats.text_bytes += len(doc.text.encode("utf-8"))
            yield doc
        stats.files += 1
        stats._done_files_bytes += os.path.getsize(path)
        stats.bytes_in = stats._done_files_bytes
