"""Compile single `__device__` helper functions of a kernel source for the host, to test their arithmetic.

Some kernel helpers are plain scalar code (bit tricks, an online max/sum update, a loss formula): with a few
CUDA names defined for the host they compile unchanged with g++, and a test can call them through ctypes on
values that are hard to reach through a whole kernel (NaN payloads, -inf as the first element, cancellation).
Host libm's expf/logf differ from CUDA's by an ulp or two: fine for the properties tested this way.
This is not the kernel emulator: no threads, barriers or shuffles, only straight-line helpers.
"""
import ctypes
import shutil
import subprocess

from nanogpt_np.kernels.compile import source

PRELUDE = """
#include <cmath>                 // also INFINITY, as the kernels spell it
#include <cstring>
#define __device__
#define __forceinline__ inline
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
"""


def compiler():
    return shutil.which("g++") or shutil.which("c++")


def device_function(source_name: str, name: str) -> str:
    """The text of the `__device__` function `name` in `<source_name>.cu`, signature to closing brace."""
    text = source(source_name)
    start = text.rindex("__device__", 0, text.index(" " + name + "(") + 1)
    end = text.index("\n}\n", start) + 3
    return text[start:end]


def build(tmp_path, source_name: str, names, wrappers: str, defines: str = ""):
    """Compile the named helpers of `<source_name>.cu` plus `wrappers` (extern "C" functions calling them)
    into a shared library in tmp_path; returns the ctypes.CDLL."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no host C++ compiler")
    code = PRELUDE + defines + "\n".join(device_function(source_name, n) for n in names) + wrappers
    src = tmp_path / f"{source_name}_helpers.cpp"
    src.write_text(code)
    lib = tmp_path / f"{source_name}_helpers.so"
    proc = subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(lib),
                           str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"host compile of {source_name}.cu helpers failed:\n{proc.stderr}\n{code}")
    return ctypes.CDLL(str(lib))
