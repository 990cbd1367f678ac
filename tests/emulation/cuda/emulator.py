"""Run the project's CUDA kernels (nanogpt_np/kernels/*.cu, unchanged) on the CPU.

    from emulation.cuda import emulator
    mod = emulator.load("gelu")                        # rewrite + g++ once, cached by source hash
    mod.launch("gelu_forward", grid=(4,), block=(256,), args=(out, emulator.NULL, x, emulator.NULL,
                                                                  np.int64(n), np.int32(C)))

How it works (details in cuda_emu.h): rewrite.py turns the .cu text into C++ with checked pointers and
__shared__ arrays in a per-block arena; g++ builds a shared library; a launch runs every block of the grid,
one after another, each CUDA thread as a fiber, switching at every barrier and warp collective in the order
the schedule says. Arguments are checked the way CuPy passes them: an array's dtype against the pointer's
type, np.int32 / np.int64 / np.float32 against int / long long / float. Anything wrong raises EmulatorError.

`emulator(module, kernel, grid, block, args, shared_mem)` has the signature of nanogpt_np.kernels.compile's
`emulator` hook; fake_cupy.install(monkeypatch, kernels="cuda") routes every launch of the wrappers here.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from nanogpt_np.kernels import compile as kernel_compile

from . import rewrite

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = ("cuda_emu.h", "ptx_models.h")
# -fstack-clash-protection: a big stack frame touches every page, so an overflow always hits the guard page
CXXFLAGS = ("-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-fno-strict-aliasing", "-fstack-clash-protection")
SCHEDULES = ("inorder", "reverse", "shuffle", "skew")
NULL = np.uint64(0)

# the numpy dtypes a kernel pointer of each C type accepts (float2/float4 point into float32 arrays)
POINTER_DTYPES = {
    "float": np.float32, "float2": np.float32, "float4": np.float32, "double": np.float64,
    "int": np.int32, "long long": np.int64, "unsigned": np.uint32, "unsigned int": np.uint32,
    "unsigned short": np.uint16, "short": np.int16, "char": np.int8, "unsigned char": np.uint8,
    "uint4": np.uint32,
}
SCALAR_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32, "unsigned": np.uint32,
                "unsigned int": np.uint32, "double": np.float64}


class EmulatorError(RuntimeError):
    """A kernel launch the emulator refused or a fault inside a kernel (what a GPU might do silently)."""


class CompileError(EmulatorError):
    """g++ could not compile the rewritten source (or there is no g++)."""


def compiler():
    """The C++ compiler the emulator uses ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir():
    d = os.environ.get("NANOGPT_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"nanogpt_np_emu_{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


# ctypes mirrors of emu::Arg and emu::Launch
class _Arg(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64)]


class _Launch(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("dynamic_smem", ctypes.c_uint64),
                ("schedule", ctypes.c_int), ("seed", ctypes.c_uint64), ("trace", ctypes.c_int),
                ("kernel", ctypes.c_char_p), ("arg_names", ctypes.POINTER(ctypes.c_char_p)), ("nargs", ctypes.c_int)]


_lock = threading.Lock()       # one launch at a time: the runtime keeps its state in globals
_modules = {}


def build(source, name="kernel"):
    """Rewrite + compile a .cu source text -> path of the shared library (cached by a hash of everything)."""
    cxx = compiler()
    if cxx is None:
        raise CompileError("no C++ compiler (g++) found: the CUDA emulator needs one")
    cpp = rewrite.to_cpp(source, f"{name}.cu")
    h = hashlib.sha256(cpp.encode())
    for hdr in HEADERS + ("rewrite.py",):
        with open(os.path.join(HERE, hdr), "rb") as f:
            h.update(f.read())
    h.update(" ".join((cxx,) + CXXFLAGS).encode())
    so = os.path.join(cache_dir(), f"{name}-{h.hexdigest()[:16]}.so")
    if not os.path.exists(so):
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = os.path.join(tmp, f"{name}.cpp")
            with open(src, "w") as f:
                f.write(cpp)
            out = os.path.join(tmp, "lib.so")
            proc = subprocess.run([cxx, *CXXFLAGS, "-I", HERE, "-o", out, src], capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"g++ could not compile {name}.cu for the emulator:\n{proc.stderr[-4000:]}")
            os.replace(out, so)              # atomic: parallel test processes never see half a file
    return so


class Module:
    """One compiled .cu source: its kernels' signatures and their launch entries."""

    def __init__(self, source, name="kernel"):
        self.name = name
        self.signatures = rewrite.kernel_signatures(source)
        self.lib = ctypes.CDLL(build(source, name))
        self.lib.emu_error.restype = ctypes.c_char_p
        self.launches = 0

    def launch(self, kernel, grid, block, args, shared_mem=0, schedule=None, seed=None, trace=False):
        """Run one kernel over the grid. schedule: one of SCHEDULES (default: they take turns per launch)."""
        if kernel not in self.signatures:
            raise EmulatorError(f"{self.name}.cu has no kernel {kernel!r} (it has {sorted(self.signatures)})")
        params = self.signatures[kernel]
        where = f"{self.name}.{kernel}"
        grid, block = _dims(grid), _dims(block)
        if len(args) != len(params):
            raise EmulatorError(f"{where}: {len(args)} arguments for {len(params)} parameters "
                                f"({', '.join(p.ctype + ' ' + p.name for p in params)})")
        cargs = (_Arg * max(1, len(args)))()
        keep = []                                 # arrays whose memory the kernel uses: alive until it returns
        for i, (p, a) in enumerate(zip(params, args)):
            cargs[i] = _argument(where, i, p, a, keep)
        if schedule is None:
            schedule = os.environ.get("NANOGPT_EMU_SCHEDULE") or SCHEDULES[self.launches % len(SCHEDULES)]
        if schedule not in SCHEDULES:
            raise EmulatorError(f"unknown schedule {schedule!r}: one of {SCHEDULES}")
        if seed is None:
            seed = self.launches
        self.launches += 1
        names = (ctypes.c_char_p * max(1, len(params)))(
            *[f"argument '{p.name}' ({p.ctype})".encode() for p in params])
        spec = _Launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), int(shared_mem),
                       SCHEDULES.index(schedule), int(seed), int(bool(trace)), where.encode(), names, len(params))
        entry = getattr(self.lib, f"emu_launch_{kernel}")
        with _lock:
            rc = entry(ctypes.byref(spec), cargs)
            msg = self.lib.emu_error().decode(errors="replace")
        if rc != 0:
            raise EmulatorError(f"{where} <<<{grid}, {block}, {shared_mem}>>> (schedule {schedule}): {msg}")


def _dims(d):
    d = tuple(int(x) for x in (d if isinstance(d, (tuple, list)) else (d,)))
    if not 1 <= len(d) <= 3:
        raise EmulatorError(f"grid/block needs 1 to 3 dimensions, got {d}")
    return d + (1,) * (3 - len(d))


def _allocation(a):
    """The memory an array view lives in: (lo, hi) byte addresses of its whole allocation."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    lo = base.__array_interface__["data"][0]
    return lo, lo + base.nbytes


def _resolve_raw(ptr):
    """A raw device address (np.uint64) -> the fake-CuPy allocation that holds it."""
    from emulation import fake_cupy
    for base, arr in list(fake_cupy._live.items()):
        if base <= ptr < base + arr.nbytes:
            return arr
    return None


def _argument(where, i, p, a, keep):
    what = f"{where}: argument {i} '{p.name}' ({p.ctype})"
    if p.pointer:
        want = POINTER_DTYPES.get(p.base)
        if isinstance(a, np.uint64):              # a raw pointer, as CuPy passes it: NULL or into an allocation
            if int(a) == 0:
                return _Arg(0, 0, 0)
            arr = _resolve_raw(int(a))
            if arr is None:
                raise EmulatorError(f"{what}: pointer {int(a):#x} is not inside any live device allocation")
            ptr = int(a)
        elif isinstance(a, np.ndarray) and not isinstance(a, np.generic):
            arr, ptr = a, a.__array_interface__["data"][0]
        else:
            raise EmulatorError(f"{what}: expected a device array or a np.uint64 pointer, got {type(a).__name__}")
        if want is not None and arr.dtype != want:
            raise EmulatorError(f"{what}: array dtype {arr.dtype}, the kernel reads {np.dtype(want)}")
        keep.append(arr)
        lo, hi = _allocation(arr)
        return _Arg(ptr, lo, hi)
    want = SCALAR_TYPES.get(p.ctype)
    if want is None:
        raise EmulatorError(f"{what}: the emulator does not know how to pass a {p.ctype}")
    if type(a) is not want:
        raise EmulatorError(f"{what}: pass {np.dtype(want).name} (np.{np.dtype(want).name}), got "
                            f"{type(a).__module__}.{type(a).__name__} {a!r}")
    value = int.from_bytes(np.asarray(a, want).tobytes(), "little")   # the scalar's bytes, as the C type holds them
    return _Arg(value, 0, 0)


def load(module_name, source=None):
    """The compiled Module for nanogpt_np/kernels/<module_name>.cu (or for `source`, e.g. a mutated copy)."""
    if source is None:
        source = kernel_compile.source(module_name)
    key = (module_name, hashlib.sha256(source.encode()).hexdigest())
    mod = _modules.get(key)
    if mod is None:
        mod = _modules[key] = Module(source, module_name)
    return mod


def emulator(module_name, kernel_name, grid, block, args, shared_mem):
    """The nanogpt_np.kernels.compile.emulator hook: run the real kernel code on the CPU."""
    load(module_name).launch(kernel_name, grid, block, args, shared_mem)
