"""Record what a piece of GPU-path code asks of CuPy, on the CPU, through the fake CuPy (fake_cupy.py).

    with Tracer(shape_only=True, sms=132) as tr:       # installs the fake CuPy, with recording arrays
        ...run GPU-path code (backend.use_device("cuda") picks up the fake)...
        tr.start(); step(); tr.stop()
    tr.ops                                             # every op the step issued, in order

What is recorded (one `Op` each), only for calls made by the project's code (what the fake does inside an
emulation is not recorded):
  kernel   a launch of one of our CUDA kernels (compile.launch), with its grid, block and scalar arguments
  gemm     a cuBLAS gemmEx call (precision.gemm), with m, n, k, the operand types, beta and compute type; or a
           gemmStridedBatchedEx call (kernels/batched_gemm.py), the same plus batch (the number of products); or a
           cublasLtMatmul call (kernels/cublaslt.py), the same plus its epilogue and the types of the bias
           vector and aux matrix it reads or writes
  matmul   cupy.matmul / `@` (cuBLAS through CuPy), with the operands' shapes and whether CuPy must copy them
  elementwise, reduction, copy, cast, gather, scatter, fill, memset
           a CuPy elementwise or reduction kernel: a ufunc, a method such as astype/copy/fill, x[...] = y,
           fancy indexing, add.at, zeros/ones/full
  alloc    a new array from the memory pool (bytes), with the live total after it (for the peak)
  h2d, d2h host <-> device copies (d2h also waits for the device: a sync)
  view     a reshape/transpose/slice that CuPy does without touching memory (a host-side cost only)
  host     other host-side library calls (cuBLAS handle creation and pointer mode)

With shape_only=True nothing is computed: new arrays are zero pages that are never touched (mmap), kernel
emulations and cuBLAS calls are skipped, and every op returns an output of the right shape and dtype. A GPT-2
step then traces in well under a second instead of hours of float64 arithmetic; the op sequence is the same as
with arithmetic (tests/test_gpu_model.py checks it), because the code's control flow does not depend on values.

Each op also carries the project's own Python time spent since the previous op (`py_s`), measured with
perf_counter outside the tracer's hooks: the host cost of the project's code, without CuPy's own overhead.
"""
import math
import mmap
import sys
import time
import types
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import fake_cupy

_tracer = None            # the active Tracer (one at a time)
_MMAP_FROM = 1 << 16      # shape-only arrays of at least this many bytes are untouched anonymous mappings


@dataclass
class Op:
    kind: str                 # see the module docstring
    name: str                 # ufunc / kernel / function name
    family: str               # the project code that issued it (layernorm, attention, matmul, ...), see FAMILIES
    phase: tuple              # (stage, layer): stage "fwd", "bwd", "step", "optimizer"; layer index or None
    inputs: tuple = ()        # ((shape, dtype str, nbytes), ...) of the array operands
    outputs: tuple = ()       # the same for the arrays written
    args: dict = field(default_factory=dict)   # kernel scalars, grid/block, gemm m/n/k, ...
    alloc: int = 0            # bytes this op allocated from the pool
    live: int = 0             # bytes live on the device after this op
    py_s: float = 0.0         # the project's Python time since the previous op (shape-only traces)


def _desc(a):
    a = np.asarray(a) if not isinstance(a, np.ndarray) else a
    return (tuple(a.shape), a.dtype.str, int(a.nbytes))


# Which project code an op belongs to: the innermost frame found in these tables names its family.
# (module, function) entries are looked up before module entries; None means "look further out".
FAMILIES = {
    ("nanogpt_np.kernels.precision", "to_bf16"): "casts",
    ("nanogpt_np.kernels.precision", "to_float32"): "casts",
    ("nanogpt_np.kernels.precision", "matmul_bf16"): None,
    ("nanogpt_np.kernels.precision", "gemm"): None,
    ("nanogpt_np.kernels.precision", "cublas_handle"): None,
    "nanogpt_np.kernels.linear": "matmul",
    "nanogpt_np.ops.linear": "matmul",
    "nanogpt_np.kernels.cublaslt": "matmul",                # the MLP's matmuls with GELU epilogues
    "nanogpt_np.kernels.mlp": "matmul",                     # (its GELU kernels, float32: kernels.gelu's frames)
    "nanogpt_np.ops.mlp": "matmul",
    "nanogpt_np.kernels.softmax_attention": "attention",
    "nanogpt_np.kernels.flash_attention": "attention",
    "nanogpt_np.ops.attention": "attention",
    "nanogpt_np.kernels.layernorm": "layernorm",
    "nanogpt_np.ops.layernorm": "layernorm",
    "nanogpt_np.kernels.gelu": "gelu",
    "nanogpt_np.ops.gelu": "gelu",
    "nanogpt_np.kernels.cross_entropy": "cross-entropy",
    "nanogpt_np.ops.cross_entropy": "cross-entropy",
    "nanogpt_np.kernels.lm_head_loss": "cross-entropy",     # its gemms are costed as matmuls (gpu_model.category_of)
    "nanogpt_np.ops.lm_head_loss": "cross-entropy",
    "nanogpt_np.kernels.encoder": "embedding",
    "nanogpt_np.ops.embedding": "embedding",
    "nanogpt_np.kernels.adamw": "adamw",
    "nanogpt_np.optim": "adamw",
    "nanogpt_np.ops.residual": "residual",
    "nanogpt_np.ops.dropout": "dropout",
    "nanogpt_np.tensor": "tensor",                 # gradient sums into .grad, item()
    "nanogpt_np.model": "model",
    "nanogpt_np.trainer": "trainer",
}


def _family():
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod.startswith("nanogpt_np."):
            key = (mod, f.f_code.co_name)
            if key in FAMILIES:
                if FAMILIES[key] is not None:
                    return FAMILIES[key]
            elif mod in FAMILIES:
                return FAMILIES[mod]
        f = f.f_back
    return "other"


class TracedArray(fake_cupy.ndarray):
    """The fake's device array, with every CuPy-level operation reported to the active Tracer."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _call(lambda: _tracer.ufunc(ufunc, method, inputs, kwargs),
                     lambda: _plain_ufunc(ufunc, method, inputs, kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        return _call(lambda: _tracer.array_function(func, args, kwargs),
                     lambda: super(TracedArray, self).__array_function__(func, types_, args, kwargs))

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        plain = lambda: fake_cupy._wrap(np.ndarray.astype(self, dtype, order=order, casting=casting, copy=copy))
        return _call(lambda: _tracer.astype(self, dtype, copy, plain), plain)

    def copy(self, order="C"):
        plain = lambda: fake_cupy._wrap(np.ndarray.copy(self, order=order))
        return _call(lambda: _tracer.produce("copy", "copy", (self,), self.shape, self.dtype, plain), plain)

    def fill(self, value):
        plain = lambda: np.ndarray.fill(self, value)
        return _call(lambda: _tracer.inplace("fill", "fill", (), self, plain), plain)

    def __setitem__(self, key, value):
        plain = lambda: np.ndarray.__setitem__(self, key, value)
        return _call(lambda: _tracer.setitem(self, key, value, plain), plain)

    def __getitem__(self, key):
        plain = lambda: np.ndarray.__getitem__(self, key)
        return _call(lambda: _tracer.getitem(self, key, plain), plain)

    def reshape(self, *shape, **kwargs):
        plain = lambda: np.ndarray.reshape(self, *shape, **kwargs)
        return _call(lambda: _tracer.reshape(self, shape, kwargs, plain), plain)

    def transpose(self, *axes):
        plain = lambda: np.ndarray.transpose(self, *axes)
        return _call(lambda: _tracer.view_op("transpose", self, plain), plain)

    @property
    def data(self):
        # the tracer's own time (building the pointer from __array_interface__ costs ~1 us here; CuPy's
        # `.data` is a cheap attribute), so that it does not count as the project's Python
        make = lambda: _TracedMemoryPointer(self)
        return _call(make, make)

    def set(self, arr, stream=None):
        plain = lambda: fake_cupy.DeviceArray.set(self, arr, stream)
        return _call(lambda: _tracer.inplace("h2d", "ndarray.set", (arr,), self, plain), plain)

    def item(self, *args):
        plain = lambda: np.ndarray.item(self, *args)
        return _call(lambda: _tracer.to_host("item", self, plain), plain)

    def __float__(self):
        plain = lambda: float(np.ndarray.item(self))
        return _call(lambda: _tracer.to_host("float", self, plain), plain)


class _TracedMemoryPointer(fake_cupy.MemoryPointer):
    """The `.data` of a traced array: memset_async is reported as a memset of the array it came from (the
    project memsets whole arrays)."""

    def __init__(self, array):
        super().__init__(array.__array_interface__["data"][0])
        self.array = array

    def memset_async(self, value, size, stream=None):
        plain = lambda: fake_cupy.MemoryPointer.memset_async(self, value, size, stream)
        return _call(lambda: _tracer.inplace("memset", "memset_async", (), self.array, plain), plain)


def _call(traced, plain):
    """Run `traced` when the call comes from project code under an active tracer, else the plain operation."""
    tr = _tracer
    if tr is None or tr.depth:
        return plain()
    with tr.hook():
        return traced()


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, np.ndarray) else x


def _plain_ufunc(ufunc, method, inputs, kwargs):
    ins = [_plain(x) for x in inputs]
    outs = kwargs.get("out")
    if outs is not None:
        kwargs = dict(kwargs, out=tuple(_plain(o) for o in outs))
    r = getattr(ufunc, method)(*ins, **kwargs)
    if outs is not None:
        return outs[0] if len(outs) == 1 else outs
    if isinstance(r, np.generic):               # CuPy returns 0-d arrays, never NumPy scalars
        r = np.asarray(r)
    return fake_cupy._wrap_all(r)


# ------------------------------------------------------------------------------------------ shape inference

def _broadcast_shape(inputs):
    return np.broadcast_shapes(*[np.shape(x) for x in inputs])


def _proxy(x, shape=()):
    return np.zeros(shape, x.dtype) if isinstance(x, np.ndarray) else x


def _matmul_shape(a, b):
    sa, sb = tuple(a.shape), tuple(b.shape)
    va, vb = len(sa) == 1, len(sb) == 1
    if va:
        sa = (1,) + sa
    if vb:
        sb = sb + (1,)
    out = np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1])
    if va:
        out = out[:-2] + out[-1:]
    if vb:
        out = out[:-1]
    return out


def _reduced_shape(shape, axis, keepdims):
    nd = len(shape)
    axes = range(nd) if axis is None else [a % nd for a in (axis if isinstance(axis, tuple) else (axis,))]
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def _needs_copy_for_cublas(a, batched):
    """Does CuPy copy this matmul operand first? Batched (ndim > 2): unless C-contiguous
    (cupy/_core/_routines_linalg.pyx: matmul calls ascontiguousarray on both operands). 2-D: unless C- or
    F-contiguous (tensordot_core hands a transpose to cuBLAS as a flag)."""
    if batched:
        return a.ndim > 1 and not a.flags.c_contiguous
    return not (a.flags.c_contiguous or a.flags.f_contiguous)


def _reshape_without_copy(a, shape):
    """a.reshape(shape) as a view, or ValueError when that needs a copy."""
    try:
        return np.reshape(a, shape, copy=False)                      # NumPy >= 2.1
    except TypeError:                                                # older NumPy: no copy= argument
        v = a.view()
        try:
            v.shape = shape
        except AttributeError as e:
            raise ValueError("reshape needs a copy") from e
        return v


def _is_advanced(key):
    ks = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, list)) and not isinstance(k, np.generic) for k in ks)


# ------------------------------------------------------------------------------------------------ tracer

class _Patches:
    """The two methods of pytest's monkeypatch that fake_cupy.install uses, with undo (no pytest needed)."""

    def __init__(self):
        self._undo = []

    def setitem(self, d, key, value):
        self._undo.append((lambda k=key, v=d.get(key, _MISSING): d.pop(k, None) if v is _MISSING else d.__setitem__(k, v)))
        d[key] = value

    def setattr(self, obj, name, value, raising=True):
        old = getattr(obj, name, _MISSING)
        self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))
        setattr(obj, name, value)

    def undo(self):
        while self._undo:
            self._undo.pop()()


_MISSING = object()


class Tracer:
    """Install the fake CuPy with recording arrays; record ops between start() and stop()."""

    def __init__(self, shape_only=True, sms=132, compute_capability="90"):
        self.shape_only = shape_only
        self.sms = sms
        self.compute_capability = compute_capability
        self.ops = []
        self.recording = False
        self.depth = 0
        self.phase = ("step", None)
        self.tf32 = False
        self.live = 0
        self.peak = 0
        self._resumed = None
        self._py = 0.0
        self.capture = None        # while a stream captures: [the replay closures, the arrays allocated]
        # shape-only mappings made while recording, unmapped at stop(): munmap is the fake's cost (CuPy's pool
        # keeps freed memory), and an array freed in project code would otherwise count it as the project's time
        self._unmap_at_stop = []

    # ----- install / uninstall
    def __enter__(self):
        global _tracer
        if _tracer is not None:
            raise RuntimeError("a Tracer is already active")
        from nanogpt_np.kernels import compile as kc
        self._patches = p = _Patches()
        fc = fake_cupy.install(p)
        p.setattr(fc, "ndarray", TracedArray)
        p.setattr(fc, "cuda", types.SimpleNamespace(**{**vars(fc.cuda), "Device": self._device,
                                                       "Stream": self._stream_class()}))
        for name in ("empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "asarray",
                     "ascontiguousarray", "asnumpy", "argsort"):
            p.setattr(fc, name, self._creation(name, getattr(fc, name)))
        p.setattr(kc, "emulator", self._launch)
        cublas = sys.modules["cupy_backends.cuda.libs.cublas"]      # CuPy's wrapper: refuses capture
        self._gemm_emulation = fake_cupy._gemm_ex
        p.setattr(cublas, "gemmEx", lambda h, *args: (cublas.setStream(h, 0), self._gemm(h, *args))[1])
        self._gemm_batched_emulation = fake_cupy._gemm_strided_batched_ex
        p.setattr(cublas, "gemmStridedBatchedEx",
                  lambda h, *args: (cublas.setStream(h, 0), self._gemm_batched(h, *args))[1])
        create, set_mode = cublas.create, cublas.setPointerMode
        p.setattr(cublas, "create", lambda: self._host_call("cublasCreate", create()))
        p.setattr(cublas, "getPointerMode", lambda h: self._host_call("cublasGetPointerMode", 0))
        p.setattr(cublas, "setPointerMode", lambda h, m: self._host_call("cublasSetPointerMode", set_mode(h, m)))
        from nanogpt_np.kernels import cublas_ctypes                # cuBLAS itself (faked by fake_cupy): no check
        binding = {name: getattr(cublas_ctypes, name) for name in ("create", "set_pointer_mode", "set_stream",
                                                                    "set_workspace")}
        p.setattr(cublas_ctypes, "gemm_ex", self._gemm)
        p.setattr(cublas_ctypes, "create", lambda: self._host_call("cublasCreate", binding["create"]()))
        for name, call in (("set_pointer_mode", "cublasSetPointerMode"), ("set_stream", "cublasSetStream"),
                           ("set_workspace", "cublasSetWorkspace")):
            p.setattr(cublas_ctypes, name, lambda *a, fn=binding[name], call=call: self._host_call(call, fn(*a)))
        from nanogpt_np.kernels import cublaslt_ctypes as lt            # cuBLASLt (faked by fake_cupy)
        self._lt_emulation = lt.matmul
        p.setattr(lt, "matmul", self._lt_matmul)
        for name, call in (("matmul_desc_set", "cublasLtMatmulDescSetAttribute"), ("create", "cublasLtCreate"),
                           ("algo_get_heuristic", "cublasLtMatmulAlgoGetHeuristic")):
            p.setattr(lt, name, lambda *a, fn=getattr(lt, name), call=call: self._host_call(call, fn(*a)))
        p.setattr(fc.cuda.runtime, "streamIsCapturing", lambda stream: self.capture is not None)
        linalg = sys.modules["cupy._core._routines_linalg"]
        self._fake_set_compute_type = linalg.set_compute_type
        p.setattr(linalg, "set_compute_type", self._set_compute_type)
        self._linalg = linalg
        _tracer = self
        return self

    def __exit__(self, *exc):
        global _tracer
        _tracer = None
        self._patches.undo()
        return False

    def _device(self, *a):
        return types.SimpleNamespace(attributes={"MultiProcessorCount": self.sms},
                                     compute_capability=self.compute_capability, id=0)

    # ----- the recording window and the project-time clock
    def start(self):
        self.ops = []
        self.recording = True
        self.peak = self.live
        self._py = 0.0
        self._resumed = time.perf_counter()

    def stop(self):
        self.recording = False
        self._unmap_at_stop.clear()

    def hook(self):
        return _Hook(self)

    # ----- CUDA-graph capture (Stream.begin_capture / end_capture / Graph.launch)
    def _do(self, compute):
        """An op's arithmetic: run now (arithmetic mode), skipped (shape-only), or, while a stream captures, kept
        for the graph's replays and NOT run now (as CUDA records work without executing it)."""
        if self.capture is not None:
            if not self.shape_only:                        # shape-only: nothing to replay either
                self.capture[0].append(compute)
            return None
        if not self.shape_only:
            return compute()
        return None

    def _refuse_in_capture(self, what):
        if self.capture is not None:
            raise RuntimeError(f"the current stream is capturing, so {what} are disallowed")   # CuPy's words

    def _stream_class(self):
        tracer = self

        class Stream(fake_cupy._Stream):
            """cupy.cuda.Stream whose capture records the traced ops; end_capture returns a replayable Graph."""

            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
                self.null = null

            def begin_capture(self, mode=None):
                if self.null:
                    raise RuntimeError("cannot capture on the default (legacy) stream")
                if tracer.capture is not None:
                    raise RuntimeError("a capture is already under way")
                tracer.capture = ([], [])
                self.recorded = len(tracer.ops)

            def end_capture(self):
                closures, keep = tracer.capture
                tracer.capture = None
                return _Graph(tracer, closures, keep, nodes=len(tracer.ops) - self.recorded)

        return Stream

    def record(self, kind, name, inputs=(), outputs=(), alloc=0, **args):
        if not self.recording:
            return None
        op = Op(kind, name, _family(), self.phase, tuple(_desc(a) for a in inputs),
                tuple(_desc(a) for a in outputs), args, alloc, self.live, self._py)
        self._py = 0.0
        self.ops.append(op)
        return op

    # ----- device memory: allocations and their lifetime
    def new_array(self, shape, dtype, compute=None):
        """A fresh device array: computed by `compute()` (arithmetic mode) or untouched zero pages; while a stream
        captures, NaN (integers all ones) until a replay of the graph computes it."""
        dtype = np.dtype(dtype)
        if self.capture is not None and not self.shape_only:
            a = fake_cupy._poisoned(shape, dtype).view(TracedArray)
            if compute is not None:
                target = a.view(np.ndarray)
                self.capture[0].append(lambda: np.copyto(target, np.asarray(compute()).view(np.ndarray)))
        elif compute is not None and not self.shape_only:
            a = compute()
            if not isinstance(a, TracedArray):
                a = fake_cupy._wrap(np.asarray(a).view(np.ndarray))
        else:
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes >= _MMAP_FROM:
                mapping = mmap.mmap(-1, nbytes)
                if self.recording:
                    self._unmap_at_stop.append(mapping)
                base = np.frombuffer(mapping, dtype=dtype).reshape(shape)
            else:
                base = np.zeros(shape, dtype)
            a = fake_cupy._wrap(base)
        self._allocated(a)
        return a

    def _allocated(self, a):
        nbytes = int(a.nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(a, self._freed, nbytes)
        if self.capture is not None:
            self.capture[1].append(a)          # the graph's memory pool keeps its allocations for the replays
        if self.recording:
            self.record("alloc", "pool", outputs=(a,), alloc=nbytes)

    def _freed(self, nbytes):
        self.live -= nbytes

    # ----- ops
    def produce(self, kind, name, inputs, shape, dtype, compute, **args):
        """An op that writes a new array of `shape` and `dtype`."""
        out = self.new_array(shape, dtype, compute)
        self.record(kind, name, inputs=[x for x in inputs if isinstance(x, np.ndarray)], outputs=(out,), **args)
        return out

    def inplace(self, kind, name, inputs, target, compute, **args):
        if kind == "h2d":
            self._refuse_in_capture("H2D transfers")
        self.record(kind, name, inputs=[x for x in inputs if isinstance(x, np.ndarray)], outputs=(target,), **args)
        return self._do(compute)

    def ufunc(self, ufunc, method, inputs, kwargs):
        compute = lambda: _plain_ufunc(ufunc, method, inputs, kwargs)
        arrays = [x for x in inputs if isinstance(x, np.ndarray)]
        if method == "at":                                           # add.at(a, idx, values): in place
            target = inputs[0]
            return self.inplace("scatter", ufunc.__name__ + ".at", inputs[1:], target, compute)
        out = kwargs.get("out")
        kind, extra = ("elementwise", {})
        if ufunc is np.matmul:
            fake_cupy._set_stream(0, 0)                 # CuPy's matmul goes through its cuBLAS wrapper: refused
            kind = "matmul"                             # while the stream captures
            batched = max(x.ndim for x in arrays) > 2
            extra = dict(copies=[_needs_copy_for_cublas(x, batched) for x in arrays], tf32=self.tf32)
        elif method == "reduce":
            kind = "reduction"
        elif method != "__call__":
            kind = "elementwise"
        if out is not None:
            self.record(kind, ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}",
                        inputs=arrays, outputs=tuple(out), **extra)
            if self.capture is None and not self.shape_only:
                return compute()
            self._do(compute)
            return out[0] if len(out) == 1 else out
        shape, dtype = self._ufunc_result(ufunc, method, inputs, kwargs)
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        return self.produce(kind, name, arrays, shape, dtype, compute, **extra)

    def _ufunc_result(self, ufunc, method, inputs, kwargs):
        with np.errstate(all="ignore"):
            if method == "reduce":
                x = inputs[0]
                axis = kwargs.get("axis", 0)
                shape = _reduced_shape(x.shape, axis, kwargs.get("keepdims", False))
                dt = np.asarray(ufunc.reduce(np.zeros((1,), x.dtype), dtype=kwargs.get("dtype"))).dtype
                return shape, dt
            if ufunc is np.matmul:
                a, b = inputs
                dt = np.matmul(np.zeros((1, 1), a.dtype), np.zeros((1, 1), b.dtype)).dtype
                return _matmul_shape(a, b), dt
            if ufunc.nout != 1:
                raise NotImplementedError(f"shape-only tracing of {ufunc.__name__} (more than one output)")
            extra = {k: kwargs[k] for k in ("dtype", "casting", "signature") if k in kwargs}
            dt = np.asarray(ufunc(*[_proxy(x) for x in inputs], **extra)).dtype
            return _broadcast_shape(inputs), dt

    def array_function(self, func, args, kwargs):
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        compute = lambda: fake_cupy._wrap_all(func(*[_plain(a) for a in args], **kwargs))
        if func is np.where and len(args) == 3:
            dt = np.result_type(*[_proxy(a) for a in args[1:]])
            return self.produce("elementwise", "where", arrays, _broadcast_shape(args), dt, compute)
        r = func(*[_plain(a) for a in args], **kwargs)                # anything else: computed, then recorded
        r = fake_cupy._wrap_all(np.asarray(r) if isinstance(r, np.generic) else r)
        if isinstance(r, np.ndarray):
            if self.capture is not None and not self.shape_only:       # and recomputed by every replay
                r = r.view(TracedArray)
                target = r.view(np.ndarray)
                self.capture[0].append(lambda: np.copyto(target, np.asarray(
                    func(*[_plain(a) for a in args], **kwargs))))
            self._allocated(r)
            self.record("elementwise", func.__name__, inputs=arrays, outputs=(r,))
        return r

    def astype(self, a, dtype, copy, compute):
        dtype = np.dtype(dtype)
        if dtype == a.dtype and not copy:
            return a
        kind = "cast" if dtype != a.dtype else "copy"
        return self.produce(kind, f"astype {a.dtype}->{dtype}", (a,), a.shape, dtype, compute)

    def setitem(self, target, key, value, compute):
        region = np.ndarray.__getitem__(target, key)
        region = region if isinstance(region, np.ndarray) else np.asarray(region)
        if isinstance(value, TracedArray):
            self.record("copy", "setitem", inputs=(value,), outputs=(region,))
        elif isinstance(value, np.ndarray) and value.size > 1:
            self.record("h2d", "setitem from host", inputs=(value,), outputs=(region,))
        else:
            self.record("fill", "setitem scalar", outputs=(region,))
        if isinstance(value, np.ndarray) and not isinstance(value, TracedArray) and value.size > 1:
            self._refuse_in_capture("H2D transfers")
        self._do(compute)

    def getitem(self, a, key, compute):
        if not _is_advanced(key):
            r = compute()
            if isinstance(r, np.ndarray):
                self.record("view", "getitem")
            return r
        shape = np.ndarray.__getitem__(np.broadcast_to(np.zeros((), a.dtype), a.shape), key).shape
        idx = [k for k in (key if isinstance(key, tuple) else (key,)) if isinstance(k, np.ndarray)]
        return self.produce("gather", "fancy getitem", [a] + idx, shape, a.dtype,
                            lambda: fake_cupy._wrap(np.asarray(compute())))

    def reshape(self, a, shape, kwargs, compute):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        try:
            _reshape_without_copy(a.view(np.ndarray), shape)
        except ValueError:                                           # CuPy copies too
            return self.produce("copy", "reshape copy", (a,), np.reshape(np.broadcast_to(0, a.shape), shape).shape,
                                a.dtype, lambda: fake_cupy._wrap(np.reshape(a.view(np.ndarray), shape)))
        self.record("view", "reshape")
        return compute()

    def view_op(self, name, a, compute):
        self.record("view", name)
        return compute()

    def to_host(self, name, a, compute):
        self._refuse_in_capture("D2H transfers")
        self.record("d2h", name, inputs=(a,))
        return compute()

    def _host_call(self, name, result=None):
        """A host-side library call (no device work)."""
        if not self.depth:
            with self.hook():
                self.record("host", name)
        return result

    def _set_compute_type(self, dtype, compute_type):
        self.tf32 = compute_type == self._linalg.COMPUTE_TYPE_TF32
        self._fake_set_compute_type(dtype, compute_type)        # get_compute_type answers as CuPy would
        self._host_call("set_compute_type")

    # ----- the fake's module functions, wrapped
    def _creation(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            with self.hook():
                return self._create(name, fn, args, kwargs)
        wrapped.__name__ = name
        return wrapped

    def _create(self, name, fn, args, kwargs):
        compute = lambda: fn(*args, **kwargs)
        if name in ("empty", "zeros", "ones", "full"):
            shape = args[0] if args else kwargs["shape"]
            shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
            dtype = kwargs.get("dtype", args[2] if name == "full" and len(args) > 2 else
                               args[1] if name != "full" and len(args) > 1 else None)
            if dtype is None:
                dtype = np.asarray(args[1]).dtype if name == "full" else np.float64
            out = self.new_array(shape, dtype, compute)
            if name != "empty":
                self.record("memset" if name == "zeros" else "fill", name, outputs=(out,))
            return out
        if name in ("empty_like", "zeros_like", "ones_like"):
            like = args[0]
            dtype = kwargs.get("dtype") or (args[1] if len(args) > 1 else None) or like.dtype
            out = self.new_array(like.shape, dtype, compute)
            if name != "empty_like":
                self.record("memset" if name == "zeros_like" else "fill", name, outputs=(out,))
            return out
        if name in ("asarray", "ascontiguousarray"):
            a = args[0]
            dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            if not isinstance(a, np.ndarray) or isinstance(a, np.generic):
                a = np.asarray(a, dtype=dtype)
            dtype = np.dtype(dtype) if dtype is not None else a.dtype
            if isinstance(a, TracedArray):
                if dtype == a.dtype and (name == "asarray" or a.flags.c_contiguous):
                    return a
                kind = "cast" if dtype != a.dtype else "copy"
                return self.produce(kind, f"{name} {a.dtype}->{dtype}" if kind == "cast" else f"{name} copy",
                                    (a,), a.shape, dtype, compute)
            self._refuse_in_capture("H2D transfers")
            host = np.ascontiguousarray(a, dtype=dtype)               # from the host: always computed
            out = self.new_array(host.shape, host.dtype, lambda: host.copy())
            if self.shape_only and host.nbytes < _MMAP_FROM:
                np.copyto(out.view(np.ndarray), host)                 # small host data keeps its values
            self.record("h2d", name, inputs=(host,), outputs=(out,))
            return out
        if name == "asnumpy":
            self._refuse_in_capture("D2H transfers")
            self.record("d2h", "asnumpy", inputs=(args[0],))
            return fn(*args, **kwargs)
        if name == "argsort":
            a = args[0]
            return self.produce("sort", "argsort", (a,), a.shape, np.int64, compute)
        raise AssertionError(name)

    # ----- kernels and cuBLAS
    def _launch(self, module, kernel, grid, block, args, shared_mem):
        if self.depth:
            return fake_cupy.emulate(module, kernel, grid, block, args, shared_mem)
        with self.hook():
            scalars = {f"a{i}": (a.item() if isinstance(a, np.generic) and not isinstance(a, np.uint64) else None)
                       for i, a in enumerate(args)}
            arrays = [a for a in args if isinstance(a, np.ndarray) and not isinstance(a, np.generic)]
            self.record("kernel", kernel, inputs=arrays, module=module, grid=tuple(grid), block=tuple(block),
                        smem=shared_mem, scalars=[scalars[f"a{i}"] for i in range(len(args))],
                        null=[isinstance(a, np.uint64) and int(a) == 0 for a in args])
            self._do(lambda: fake_cupy.emulate(module, kernel, grid, block, args, shared_mem))

    def _gemm(self, handle, opa, opb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, compute, algo):
        import ctypes
        if self.depth:
            return self._gemm_emulation(handle, opa, opb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
                                        Ctype, ldc, compute, algo)
        with self.hook():
            b = ctypes.c_float.from_address(beta).value
            self.record("gemm", "cublasGemmEx", m=m, n=n, k=k, Atype=Atype, Btype=Btype, Ctype=Ctype, beta=b,
                        compute=compute)
            # host pointer mode: cuBLAS reads alpha and beta when the call is made (a capture keeps the values)
            ab = (ctypes.c_float(ctypes.c_float.from_address(alpha).value), ctypes.c_float(b))
            self._do(lambda: self._gemm_emulation(handle, opa, opb, m, n, k, ctypes.addressof(ab[0]), A, Atype, lda,
                                                  B, Btype, ldb, ctypes.addressof(ab[1]), C, Ctype, ldc, compute,
                                                  algo))


    def _lt_matmul(self, handle, desc, alpha, A, a, B, b, beta, C, c, D, d, algo, workspace, nbytes, stream):
        """cublasLtMatmul: recorded as a gemm with its epilogue (and the bias / aux vectors it reads or writes)."""
        import ctypes
        from nanogpt_np.kernels import cublaslt_ctypes as lt
        args = (handle, desc, alpha, A, a, B, b, beta, C, c, D, d, algo, workspace, nbytes, stream)
        if self.depth:
            return self._lt_emulation(*args)
        with self.hook():
            m, n, k, attrs, la, lb, ld_ = fake_cupy.lt_describe(desc, a, b, d)
            bv = ctypes.c_float.from_address(beta).value
            epilogue = attrs[lt.DESC_EPILOGUE]
            bias_type = attrs[lt.DESC_BIAS_DATA_TYPE] if attrs[lt.DESC_BIAS_DATA_TYPE] != -1 else ld_["dtype"]
            self.record("gemm", "cublasLtMatmul", m=m, n=n, k=k, Atype=la["dtype"], Btype=lb["dtype"],
                        Ctype=ld_["dtype"], beta=bv, compute=lt.CUBLAS_COMPUTE_32F, epilogue=epilogue,
                        bias=bias_type if epilogue & (lt.EPILOGUE_BIAS | lt.EPILOGUE_BGRAD_BIT) else None,
                        aux=lt.CUDA_R_16BF if epilogue & lt.EPILOGUE_AUX_BIT else None)
            ab = (ctypes.c_float(ctypes.c_float.from_address(alpha).value), ctypes.c_float(bv))
            if self.capture is not None:        # a graph keeps the call as captured: the descriptor's pointers too
                desc = fake_cupy.lt_snapshot(desc)
            self._do(lambda: self._lt_emulation(handle, desc, ctypes.addressof(ab[0]), A, a, B, b,
                                                ctypes.addressof(ab[1]), C, c, D, d, algo, workspace, nbytes, stream))

    def _gemm_batched(self, handle, opa, opb, m, n, k, alpha, A, Atype, lda, sA, B, Btype, ldb, sB, beta, C, Ctype,
                      ldc, sC, count, compute, algo):
        import ctypes
        if self.depth:
            return self._gemm_batched_emulation(handle, opa, opb, m, n, k, alpha, A, Atype, lda, sA, B, Btype, ldb,
                                                sB, beta, C, Ctype, ldc, sC, count, compute, algo)
        with self.hook():
            b = ctypes.c_float.from_address(beta).value
            self.record("gemm", "cublasGemmStridedBatchedEx", m=m, n=n, k=k, Atype=Atype, Btype=Btype, Ctype=Ctype,
                        beta=b, compute=compute, batch=count)
            ab = (ctypes.c_float(ctypes.c_float.from_address(alpha).value), ctypes.c_float(b))
            self._do(lambda: self._gemm_batched_emulation(handle, opa, opb, m, n, k, ctypes.addressof(ab[0]), A,
                                                          Atype, lda, sA, B, Btype, ldb, sB, ctypes.addressof(ab[1]),
                                                          C, Ctype, ldc, sC, count, compute, algo))


class _Graph:
    """cupy.cuda.Graph from a traced capture: launch() replays the captured ops in order, recomputing each from
    the arrays' current contents (kernels, cuBLAS, CuPy array ops, memsets), with the arguments and scalars of
    the capture. The arrays allocated during the capture stay alive with the graph (CuPy: its memory pool)."""

    def __init__(self, tracer, closures, keep, nodes=0):
        self.tracer, self.closures, self.keep = tracer, closures, keep
        self.nodes = nodes                     # the ops recorded during the capture (when the tracer recorded)

    def launch(self, stream=None):
        with self.tracer.hook():
            if self.tracer.depth == 1:
                self.tracer.record("graph", "cudaGraphLaunch", nodes=self.nodes)
            for op in self.closures:
                op()


class _Hook:
    """Marks the tracer's own code: nested calls are not recorded, and its time is not the project's."""

    def __init__(self, tr):
        self.tr = tr

    def __enter__(self):
        tr = self.tr
        if tr.depth == 0 and tr._resumed is not None:
            tr._py += time.perf_counter() - tr._resumed
        tr.depth += 1

    def __exit__(self, *exc):
        tr = self.tr
        tr.depth -= 1
        if tr.depth == 0:
            tr._resumed = time.perf_counter()
        return False
