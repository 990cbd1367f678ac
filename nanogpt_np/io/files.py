"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

The recipe: write to a temporary file in the same directory, flush and fsync it, then os.replace() it over
the target (an atomic rename on POSIX and Windows), then fsync the directory so the rename itself is durable.
Every file the project writes for a user (checkpoints, tokenizers, configs, shards) goes through here.
"""
import json
import os
import tempfile
from contextlib import contextmanager


def _default_file_mode() -> int:
    """0o666 minus the process umask: the mode open() would give a new file (mkstemp alone gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextmanager
def atomic_open(path, mode="wb"):
    """`with atomic_open(path) as f: f.write(...)` - the file appears under `path` only if the block ends
    without an exception. mode "wb" (bytes) or "w" (UTF-8 text, newlines written as given)."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports mode 'wb' or 'w'")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)          # readable by others as a normally created file would be
        text = dict(encoding="utf-8", newline="") if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory) -> None:
    """Make the rename durable (best effort: not every platform lets a directory be opened)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
