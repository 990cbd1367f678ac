"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

The recipe: write to a temporary file in the same directory, flush and fsync it, then os.replace() it over
the target (an atomic rename on POSIX and Windows), then fsync the directory so the rename itself is durable.
Every file the project writes for a user (checkpoints, tokenizers, configs, shards) goes through here.
atomic_folder does the same for a whole folder of files (a checkpoint): it appears complete or not at all.
Temporary names start with "." and end with ".tmp", so leftovers of a killed process are easy to recognise.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


def _process_umask() -> int:
    """The permission bits this process's new files and folders do not get (os.umask can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_process_umask()      # the mode open() gives a new file (mkstemp alone gives 0o600)
_FOLDER_MODE = 0o777 & ~_process_umask()    # the mode os.mkdir gives a new folder (mkdtemp alone gives 0o700)


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


@contextmanager
def atomic_folder(path):
    """`with atomic_folder(path) as tmp: write files into tmp` - the folder appears under `path`, complete,
    only if the block ends without an exception. The files go into a hidden temporary folder beside `path`
    (write them with atomic_open & co., which fsync each one); the folder is fsynced and then renamed to
    `path`: one atomic rename switches the whole folder in. `path` must not exist yet."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists already")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, _FOLDER_MODE)            # mkdtemp gives 0o700; a normal folder is readable by others
        yield tmp
        _fsync_directory(tmp)                 # the names of the files inside are durable ...
        os.rename(tmp, path)                  # ... before the folder gets its real name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_directory(parent)


def remove_folder(path) -> None:
    """Delete a folder so that a crash half-way never leaves a partial folder under its real name: it is
    first renamed to a hidden ".NAME.removing.tmp" beside it, then its files are deleted."""
    path = os.path.abspath(os.fspath(path))
    doomed = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".removing.tmp")
    shutil.rmtree(doomed, ignore_errors=True)          # a leftover of an earlier, interrupted removal
    os.rename(path, doomed)
    _fsync_directory(os.path.dirname(path))
    shutil.rmtree(doomed, ignore_errors=True)


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
