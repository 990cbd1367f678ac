"""The one place that decides which array library does the math.

Model and op code never import numpy or cupy for math. They ask this module:

    xp = backend.xp_of(array)     # the module that owns an existing array (numpy or cupy)
    xp = backend.xp()             # the module of the current device, for creating new arrays

`use_device("cpu" | "cuda" | "auto")` picks the device once, at start-up. NumPy is always
there; CuPy is imported only when a GPU is asked for, so the CPU path never needs it.
"""
import ctypes
import sys

import numpy as np

_device = "cpu"
_cupy = None          # the cupy module, once a GPU has been selected


class BackendError(RuntimeError):
    """A device was asked for that this machine cannot give (clear message, no traceback needed)."""


def _import_cupy():
    try:
        import cupy
    except ImportError as e:  # cupy not installed at all
        raise BackendError("device=cuda needs CuPy: pip install 'nanogpt_np[gpu]' (or a cupy-cudaXXx wheel)") from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # driver missing, no device, ...
        raise BackendError(f"device=cuda: CuPy is installed but no CUDA GPU is usable ({e})") from e
    if n == 0:
        raise BackendError("device=cuda: CuPy is installed but it sees no GPU")
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _import_cupy()
        return True
    except BackendError:
        return False


def use_device(device: str = "auto") -> str:
    """Select 'cpu', 'cuda' or 'auto' (cuda when available, else cpu). Returns the device chosen."""
    global _device, _cupy
    if device not in ("cpu", "cuda", "auto"):
        raise BackendError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        _cupy = _import_cupy()
    _device = device
    return device


def device() -> str:
    """The device selected by use_device ('cpu' until told otherwise)."""
    return _device


def xp():
    """The array module of the current device: numpy on 'cpu', cupy on 'cuda'."""
    return _cupy if _device == "cuda" else np


def xp_of(array):
    """The array module that owns `array` (numpy for numpy arrays and Python scalars)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def is_gpu_array(array) -> bool:
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def to_numpy(array) -> np.ndarray:
    """Copy an array (numpy or cupy) to a host numpy array; numpy arrays are returned as they are."""
    if is_gpu_array(array):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array):
    """Move a host array to the current device (a no-op on the CPU)."""
    if _device == "cuda":
        return _cupy.asarray(array)
    return np.asarray(array)


def synchronize():
    """Wait for queued GPU work (for timing); a no-op on the CPU."""
    if _device == "cuda":
        _cupy.cuda.get_current_stream().synchronize()


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc's malloc to reuse freed large blocks instead of returning them to the OS.

    A training step on the CPU allocates and frees the same large activation arrays every step. By default
    glibc hands blocks above a size threshold straight back to the OS (munmap), so every step pays page
    faults to get them again; in the small recipes that is about a third of the step. Raising the mmap and
    trim thresholds keeps those blocks in the heap. Linux/glibc only; elsewhere this does nothing.
    Returns True when the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1      # glibc caps this at 32 MiB on 64-bit
        return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
    except (OSError, AttributeError):
        return False


keep_freed_memory_for_reuse()
