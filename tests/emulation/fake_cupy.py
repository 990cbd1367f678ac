"""A CPU stand-in for CuPy, for tests of the kernel wrappers without a GPU.

`install(monkeypatch)` puts a fake `cupy` (and `cupy_backends...cublas`) into sys.modules and routes
compile.launch to Python emulations of every kernel here. The emulations take the kernels' arguments in the
CUDA signatures' order, check the launch configuration the wrapper chose (block size, grid limits, dynamic
shared memory, that the grid covers the rows), and compute the kernel's result with NumPy. So a wrapper that
passes arguments in the wrong order, sizes a grid too small, or forgets a conversion fails on the CPU.

Arrays are a NumPy subclass with CuPy's `.data.ptr`; `empty` fills floats with NaN (and integers with all ones),
so an output element no kernel writes shows up, like the GPU tests' poisoned memory pool. What this cannot
check is the CUDA code itself (flash_emulator.py does that for flash attention; the GPU tests for the rest).

`cuda.nccl` is a fake NCCL communicator for data-parallel tests: ranks started by mpiexec sum their fake-device
buffers through MPI, and `devices_used` records which GPU each rank selected.
"""
import contextlib
import ctypes
import functools
import itertools
import math
import sys
import threading
import types
import weakref

import numpy as np

from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16


__version__ = f"fake (NumPy {np.__version__})"
ALLOCATIONS_POISONED = True          # empty() fills with NaN / all ones: tests/gpu's poison() has nothing to add


class ndarray(np.ndarray):
    """numpy.ndarray with CuPy's `.data` (a MemoryPointer: `.ptr`, the address of the first element, and
    `memset_async`) and `.set(host_array)` (CuPy's host->device copy into an existing array)."""

    @property
    def data(self):
        """CuPy's MemoryPointer: .ptr, the address (which also remembers the array, for cuBLAS), memset_async."""
        ptr = _DevicePointer(self.__array_interface__["data"][0])
        ptr.array = self
        return MemoryPointer(ptr)

    def set(self, arr, stream=None):
        """cupy.ndarray.set (cupy/_core/core.pyx): a numpy array of the same dtype and shape, copied in."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, DeviceArray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        np.copyto(self.view(np.ndarray), arr)


class MemoryPointer:
    """cupy.cuda.MemoryPointer: an address into device memory (`ptr`) and the byte-wise fill CuPy offers on it.
    memset_async(value, size) sets `size` bytes from ptr to `value` (cudaMemsetAsync on the current stream);
    the bytes must lie inside one live allocation."""

    def __init__(self, ptr):
        self.ptr = ptr

    def memset_async(self, value, size, stream=None):
        if size <= 0:
            return
        mem = _resolve(np.uint64(self.ptr)).view(np.ndarray).view(np.uint8)      # from ptr to the allocation's end
        assert size <= mem.size, f"memset_async of {size} bytes runs past the allocation ({mem.size} bytes left)"
        mem[:size] = value & 0xFF


class _DevicePointer(int):
    """A device address as CuPy's `.data.ptr` gives it (an int), plus the array it points into, so that the fake
    cuBLAS finds the memory of any array (one made by a ufunc or a view, which no allocation call registered).
    ptr + offset (bytes, a whole number of elements, inside the allocation) is again such a pointer (cuBLAS
    calls that walk a buffer, batched_gemm.py); other arithmetic gives a plain int, resolved through the
    registered allocations."""

    skip = 0                # elements from the first element of `array` to this address

    def __add__(self, offset):
        item = self.array.dtype.itemsize
        if isinstance(offset, (int, np.integer)) and offset >= 0 and offset % item == 0:
            p = _DevicePointer(int(self) + int(offset))
            p.array, p.skip = self.array, self.skip + int(offset) // item     # resolved when a library reads it
            return p
        return int(self) + offset

    __radd__ = __add__


DeviceArray = ndarray      # every fake device array is one (a tracer may swap `ndarray` for a subclass of it)
_live = weakref.WeakValueDictionary()      # address of an allocation -> the array (resolves raw pointers)


def _wrap(a):
    if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
        a = a.view(ndarray)
    if isinstance(a, ndarray) and a.flags.c_contiguous and a.size:
        _live.setdefault(a.__array_interface__["data"][0], a)       # resolves raw pointers into this memory
    return a


def _wrap_all(r):
    if isinstance(r, tuple):
        return tuple(_wrap_all(x) for x in r)
    if isinstance(r, list):
        return [_wrap_all(x) for x in r]
    return _wrap(r) if isinstance(r, np.ndarray) else r


def _poisoned(shape, dtype):
    dtype = np.dtype(dtype)
    a = np.empty(shape, dtype)
    if dtype.kind == "f":
        a.fill(np.nan)
    elif dtype.kind in "iu":
        a.fill(-1 if dtype.kind == "i" else np.iinfo(dtype).max)
    b = a.view(ndarray)
    _live[b.__array_interface__["data"][0]] = b
    return b


def empty(shape, dtype=np.float64, order="C"):
    return _poisoned(shape, dtype)


def empty_like(prototype, dtype=None):
    return _poisoned(prototype.shape, dtype or prototype.dtype)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _wrap(np.array(a, dtype=dtype, copy=True))


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _wrap(np.array(a, dtype=dtype, order="C", copy=True))


def asnumpy(a):
    return np.array(a).view(np.ndarray)


def argsort(a, axis=-1):
    return _wrap(np.argsort(np.asarray(a), axis=axis, kind="stable"))


def __getattr__(name):
    obj = getattr(np, name)
    if isinstance(obj, (np.ufunc, type)) or not callable(obj):
        # dtypes, ufuncs, constants: plain module attributes in CuPy, so kept as ours after the first look-up
        # (a module __getattr__ call per `cp.float32` would count as the project's host time in gpu_model)
        globals()[name] = obj
        return obj

    def call(*args, **kwargs):
        return _wrap_all(obj(*args, **kwargs))
    return call


class _Generator:
    """numpy's Generator whose arrays come back as fake-device arrays (like cupy.random's)."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        obj = getattr(self._g, name)
        if not callable(obj):
            return obj
        return lambda *a, **k: _wrap_all(obj(*a, **k))


class _RandomState:
    """cupy.random.RandomState (cuRAND's host API): seed() restarts the stream, random_sample() draws."""

    def __init__(self, seed=None, method=None):
        self.method = method
        self.seed(seed)

    def seed(self, seed=None):
        self._g = np.random.default_rng(seed)

    def random_sample(self, size=None, dtype=float):
        return _wrap(np.asarray(self._g.random(size, dtype=np.dtype(dtype).type)))


random = types.SimpleNamespace(default_rng=_Generator, RandomState=_RandomState)


class _Stream:
    """cupy.cuda.Stream: work is synchronous here. CUDA-graph capture is refused: plain NumPy arrays cannot
    record what they compute (trace_cupy.Tracer's arrays can: its Stream captures and replays)."""

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        pass

    ptr = 0                  # the raw stream handle NCCL calls take (0: the default stream)

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self, mode=None):
        raise NotImplementedError("the fake CuPy cannot capture CUDA graphs")

    def end_capture(self):
        raise NotImplementedError("the fake CuPy cannot capture CUDA graphs")


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _Pool:
    """cupy.cuda.MemoryPool (and the default pool): the fake allocates with NumPy, so there is nothing to count."""

    def malloc(self, size):
        raise NotImplementedError("the fake CuPy allocates with NumPy, not through a pool")

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


class OutOfMemoryError(MemoryError):
    pass


class CUDARuntimeError(RuntimeError):
    """cupy.cuda.runtime.CUDARuntimeError: a CUDA runtime call that did not return cudaSuccess."""


# The device the fake reports. Small by default (5 SMs: small grids, quick tests); set_device(H200) gives an
# H100/H200's 132 SMs, so the launch arithmetic that depends on the SM count (layernorm backward's blocks and
# partial rows, bias+GELU's column chunks, AdamW's grid) runs at the sizes of the real card.
SMALL = dict(name="fake GPU (NumPy)", sms=5, cc="90")
H200 = dict(name="NVIDIA H200 (fake, NumPy)", sms=132, cc="90")
_device = dict(SMALL)
devices_used = []          # the ids passed to Device(i).use(), in order (which GPU a rank chose)


def set_device(props):
    """Make the fake report `props` (SMALL, H200 or a dict of name, sms, cc); returns the previous ones."""
    old = dict(_device)
    _device.update(props)
    return old


class _Device:
    """cupy.cuda.Device: .id, .compute_capability ("90"), .attributes (CUDA attribute names without cudaDevAttr)."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def use(self):
        devices_used.append(self.id)

    @property
    def compute_capability(self):
        return _device["cc"]

    @property
    def attributes(self):
        return {"MultiProcessorCount": _device["sms"], "MaxThreadsPerBlock": 1024, "WarpSize": 32,
                "MaxSharedMemoryPerBlock": 48 * 1024}


class _NcclCommunicator:
    """cupy.cuda.nccl.NcclCommunicator for fake-device arrays. The test's ranks are real processes started by
    mpiexec, so the sum goes through MPI (mpi4py); like a kernel emulation, allReduce takes raw pointers and
    checks its arguments: the count, the NCCL data type against the buffer's, SUM, and the unique id that
    rank 0 made and every rank must have received."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    all_reduces = 0

    def __init__(self, ndev, unique_id, rank):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        assert (ndev, rank) == (self.comm.Get_size(), self.comm.Get_rank()), "NCCL rank / size differ from MPI's"
        assert self.comm.allgather(unique_id) == [unique_id] * ndev, "the ranks hold different NCCL unique ids"

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        send, recv = _resolve(sendbuf), _resolve(recvbuf)
        assert 0 < count <= min(send.size, recv.size) and op == self.NCCL_SUM and isinstance(stream, int)
        expected = {np.dtype(np.float32): self.NCCL_FLOAT32, np.dtype(np.float64): self.NCCL_FLOAT64}[send.dtype]
        assert datatype == expected, f"NCCL data type {datatype} for a {send.dtype} buffer"
        total = np.empty(count, send.dtype)
        self.comm.Allreduce(np.ascontiguousarray(send[:count]), total, op=self.MPI.SUM)
        recv[:count] = total
        _NcclCommunicator.all_reduces += 1


nccl = types.SimpleNamespace(
    available=True, NcclCommunicator=_NcclCommunicator, get_unique_id=lambda: tuple(np.random.bytes(128)),
    NCCL_FLOAT32=_NcclCommunicator.NCCL_FLOAT32, NCCL_FLOAT64=_NcclCommunicator.NCCL_FLOAT64,
    NCCL_SUM=_NcclCommunicator.NCCL_SUM)


class _Graph:
    """cupy.cuda.Graph: made only by Stream.end_capture (which the fake refuses), never by the user."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("currently this class cannot be initiated by the user and must be created via "
                                  "stream capture")

    def launch(self, stream=None):
        raise NotImplementedError


@contextlib.contextmanager
def _using_allocator(allocator=None):
    """cupy.cuda.using_allocator: the fake's arrays come from NumPy whatever the allocator."""
    yield


cuda = types.SimpleNamespace(
    Device=_Device,
    Graph=_Graph,
    MemoryPool=_Pool,
    MemoryPointer=MemoryPointer,
    using_allocator=_using_allocator,
    nccl=nccl,
    get_current_stream=lambda: _Stream(),
    Stream=_Stream,
    device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0,
                                  streamIsCapturing=lambda stream: False,     # the tracer's capture says True
                                  CUDARuntimeError=CUDARuntimeError,
                                  getDeviceProperties=lambda device: {"name": _device["name"].encode(),
                                                                 "multiProcessorCount": _device["sms"]},
                                  runtimeGetVersion=lambda: 13000),
    Event=_Event,
    get_elapsed_time=lambda start_event, end_event: 1.0,
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
)


def get_default_memory_pool():
    return _Pool()


# ----------------------------------------------------------------------------------------------- arguments

def _memory_at(ptr):
    """What a library call sees at the address `ptr`: the array's memory from there on (see _DevicePointer)."""
    if isinstance(ptr, _DevicePointer):
        mem = _device_memory(ptr.array)
        assert ptr.skip < mem.size or ptr.skip == 0, "pointer past the end of its allocation"
        return mem[ptr.skip:]
    return _resolve(np.uint64(ptr))


def _resolve(ptr):
    """A raw address (np.uint64) -> (the allocation holding it, element offset), or None for NULL."""
    ptr = int(ptr)
    if ptr == 0:
        return None
    for base, arr in list(_live.items()):
        if base <= ptr < base + arr.nbytes:
            return arr.reshape(-1)[(ptr - base) // arr.itemsize:]
    raise AssertionError(f"pointer {ptr:#x} is not inside any live fake-device allocation")


def _device_memory(a):
    """What a kernel sees for the device array `a`: the memory of its allocation from a.data.ptr to the end, as
    a flat array of a's dtype. CuPy passes the raw pointer (ndarray.get_pointer()) whatever the strides, so a
    transposed or sliced view is read as if it were contiguous from its first element, and nothing is copied:
    the kernel writes into the array's own memory."""
    owner = a
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    assert owner.flags.c_contiguous or owner.flags.f_contiguous, "fake allocation is not contiguous"
    flat = owner.ravel(order="K")                # a view of the whole allocation, in memory order
    start = flat.__array_interface__["data"][0]
    ptr = a.__array_interface__["data"][0]
    assert ptr % a.dtype.itemsize == 0, f"misaligned {a.dtype} pointer"
    raw = flat.view(np.uint8)
    offset = ptr - start
    n = (raw.size - offset) // a.dtype.itemsize
    return raw[offset:offset + n * a.dtype.itemsize].view(a.dtype)


def _arr(x):
    """A pointer argument, as CuPy's kernel-argument rules (cupy/cuda/function.pyx, _pointer) pass it:
    None -> NULL; a device array -> its raw pointer (no copy, strides ignored); a raw address (np.uint64, as
    launch.NULL and `ptr + offset` are passed) -> that address. A host NumPy array is refused: CuPy passes a
    one-element one *by value* (its bits, not an address) and raises TypeError for a larger one."""
    if x is None:
        return None
    if isinstance(x, DeviceArray):
        return _device_memory(x)
    if isinstance(x, np.ndarray):
        if x.size == 1:
            raise AssertionError("a one-element host numpy array is passed by value by CuPy, not as a pointer: "
                                 "the kernel would read its bits as an address")
        raise TypeError(f"You are trying to pass a numpy.ndarray of shape {x.shape} as a kernel parameter. "
                        "Only numpy.ndarrays of size one can be passed by value (CuPy's rule)")
    if isinstance(x, np.uint64):
        return _resolve(x)
    raise AssertionError(f"expected a device array or a pointer, got {type(x).__name__}")


def _rows(a, C):
    """A flat kernel view as rows of C (the allocation may run on past the last whole row)."""
    return a[:a.size // C * C].reshape(-1, C)


def _int(x, kind):
    assert isinstance(x, kind), f"scalar argument should be {kind.__name__}, got {type(x).__name__}"
    return int(x)


def _flt(x):
    assert isinstance(x, np.float32), f"float argument should be np.float32, got {type(x).__name__}"
    return float(x)


def _f32(a, n=None):
    a = a.reshape(-1)
    assert a.dtype == np.float32, f"kernel expects float32, got {a.dtype}"
    if n is not None:
        assert a.size >= n, f"the kernel would access {n} floats, the allocation holds {a.size}"
    return a if n is None else a[:n]


def _threads(grid, block):
    return math.prod(grid) * math.prod(block)


# ----------------------------------------------------------------------------------------------- kernels

def _encoder_forward(vec):
    def k(grid, block, smem, out, idx, wte, wpe, BT, T, C):
        BT, T, C = _int(BT, np.int32), _int(T, np.int32), _int(C, np.int32)
        assert _threads(grid, block) * vec >= BT * C, "grid too small"
        idx = _arr(idx)[:BT]
        assert idx.dtype == np.int32
        o = _f32(_arr(out), BT * C).reshape(BT, C)
        o[...] = _rows(_f32(_arr(wte)), C)[idx] + _rows(_f32(_arr(wpe)), C)[np.arange(BT) % T]
    return k


def _encoder_backward_wpe(grid, block, smem, dwpe, dout, B, T, Tmax, C, accumulate):
    B, T, Tmax, C, accumulate = (_int(v, np.int32) for v in (B, T, Tmax, C, accumulate))
    assert _threads(grid, block) >= Tmax * C
    d = _f32(_arr(dwpe), Tmax * C).reshape(Tmax, C)
    s = _f32(_arr(dout), B * T * C).reshape(B, T, C).sum(0)
    if accumulate:
        d[:T] += s
    else:
        d[...] = 0
        d[:T] = s


def _encoder_backward_wte(grid, block, smem, dwte, dout, sorted_pos, sorted_tok, BT, C, accumulate):
    BT, C, accumulate = _int(BT, np.int32), _int(C, np.int32), _int(accumulate, np.int32)
    assert grid[0] == BT and block[0] <= 1024
    pos, tok = _arr(sorted_pos)[:BT], _arr(sorted_tok)[:BT]
    assert pos.dtype == np.int32 and tok.dtype == np.int32 and np.all(np.diff(tok) >= 0), "ids must be sorted"
    dw = _rows(_f32(_arr(dwte)), C)
    do = _f32(_arr(dout), BT * C).reshape(BT, C)
    s = 0
    while s < BT:
        e = s
        while e < BT and tok[e] == tok[s]:
            e += 1
        run = do[pos[s:e]].sum(0)
        dw[tok[s]] = dw[tok[s]] + run if accumulate else run
        s = e


def _store(out, out_bf16, n, values):
    """A kernel output written as float32 into `out` or as bf16 bits into `out_bf16` (the other one is NULL)."""
    if _arr(out_bf16) is not None:
        assert _arr(out) is None and _arr(out_bf16).dtype == np.uint16
        _arr(out_bf16).reshape(-1)[:n] = float32_to_bf16(np.asarray(values, dtype=np.float32).reshape(-1))
    else:
        _f32(_arr(out), n)[...] = np.asarray(values).reshape(-1)


def _f32_or_bf16(f, b, n):
    """A float32 kernel input or, when that pointer is NULL, bf16 bits (uint16) widened exactly: n values."""
    if _arr(b) is not None:
        assert _arr(f) is None and _arr(b).dtype == np.uint16
        return bf16_to_float32(_arr(b).reshape(-1)[:n])
    return _f32(_arr(f), n)


def _layernorm_forward(grid, block, smem, out, out_bf16, mean, rstd, h_out, h_out_bf16, x, x_bf16, residual,
                       residual_bf16, rbias, w, b, N, C, eps):
    N, C, eps = _int(N, np.int32), _int(C, np.int32), _flt(eps)
    assert grid[0] * block[0] // 32 >= N and block[0] % 32 == 0
    xv = _f32_or_bf16(x, x_bf16, N * C).reshape(N, C).astype(np.float64)
    r, r16 = _arr(residual), _arr(residual_bf16)
    if r is not None or r16 is not None or _arr(h_out_bf16) is not None:    # h written out
        if r is not None or r16 is not None:
            rv = _f32_or_bf16(residual, residual_bf16, N * C).reshape(N, C)
            if _arr(rbias) is not None:
                rv = rv + _f32(_arr(rbias), C)
            xv = xv + rv
        if _arr(h_out_bf16) is not None:           # h stored as bf16; the layernorm normalises the rounded h
            assert _arr(h_out) is None and _arr(h_out_bf16).dtype == np.uint16
            hb = float32_to_bf16(xv.astype(np.float32).reshape(-1))
            _arr(h_out_bf16).reshape(-1)[:N * C] = hb
            xv = bf16_to_float32(hb).reshape(N, C).astype(np.float64)
        else:
            _f32(_arr(h_out), N * C).reshape(N, C)[...] = xv
    m = xv.mean(1)
    rs = 1 / np.sqrt(((xv - m[:, None]) ** 2).mean(1) + eps)
    _store(out, out_bf16, N * C, (xv - m[:, None]) * rs[:, None] * _f32(_arr(w), C) + _f32(_arr(b), C))
    _f32(_arr(mean), N)[...] = m
    _f32(_arr(rstd), N)[...] = rs


def _layernorm_backward(grid, block, smem, dh, dh_bf16, partial, dout, dout_bf16, h, h_bf16, mean, rstd, w, dres,
                        dres_bf16, n_sums, N, C, rpb):
    n_sums, N, C, rpb = _int(n_sums, np.int32), _int(N, np.int32), _int(C, np.int32), _int(rpb, np.int32)
    nw = block[0] // 32
    assert n_sums in (2, 3) and block[0] % 32 == 0
    assert smem == n_sums * nw * C * 4 <= 48 * 1024, "dynamic shared memory must be n_sums*NW*C floats"
    assert grid[0] * rpb >= N, "blocks do not cover the rows"
    assert _arr(dh) is not None or _arr(dh_bf16) is not None, "no output"
    hv = _f32_or_bf16(h, h_bf16, N * C).reshape(N, C).astype(np.float64)
    dy = _f32_or_bf16(dout, dout_bf16, N * C).reshape(N, C).astype(np.float64)
    xhat = (hv - _f32(_arr(mean), N)[:, None]) * _f32(_arr(rstd), N)[:, None]
    g = dy * _f32(_arr(w), C)
    dx = _f32(_arr(rstd), N)[:, None] * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
    if _arr(dres) is not None or _arr(dres_bf16) is not None:
        dx = dx + _f32_or_bf16(dres, dres_bf16, N * C).reshape(N, C)
    dx32 = dx.astype(np.float32)
    if _arr(dh) is not None:
        _f32(_arr(dh), N * C).reshape(N, C)[...] = dx32
    if _arr(dh_bf16) is not None:                   # bf16: the float32 value rounded once
        assert _arr(dh_bf16).dtype == np.uint16
        _arr(dh_bf16).reshape(-1)[:N * C] = float32_to_bf16(dx32.reshape(-1))
    p = _f32(_arr(partial), n_sums * grid[0] * C).reshape(n_sums, grid[0], C)
    for k in range(grid[0]):
        rows = slice(k * rpb, min(N, (k + 1) * rpb))
        p[0, k] = (dy[rows] * xhat[rows]).sum(0)
        p[1, k] = dy[rows].sum(0)
        if n_sums == 3:
            p[2, k] = dx[rows].sum(0)


def _param_reduce(grid, block, smem, dw, db, dsum, partial, nblocks, C):
    nblocks, C = _int(nblocks, np.int32), _int(C, np.int32)
    assert _threads(grid, block) >= C
    outs = [dw, db] + ([dsum] if _arr(dsum) is not None else [])
    p = _f32(_arr(partial), len(outs) * nblocks * C).reshape(len(outs), nblocks, C)
    for s, out in enumerate(outs):                  # the kernel ADDS into its outputs
        _f32(_arr(out), C)[...] += p[s].sum(0)


def _gelu(a):
    return 0.5 * a * (1 + np.tanh(0.7978845608028654 * (a + 0.044715 * a ** 3)))


def _gelu_grad(a):
    th = np.tanh(0.7978845608028654 * (a + 0.044715 * a ** 3))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * 0.7978845608028654 * (1 + 3 * 0.044715 * a * a)


def _in(a, n, bf16):
    """A kernel input of n elements: float32, or bf16 bits (uint16) widened exactly (the *_bf16x kernels)."""
    if not bf16:
        return _f32(a, n)
    a = a.reshape(-1)
    assert a.dtype == np.uint16 and a.size >= n, f"kernel expects {n} bf16 (uint16), got {a.dtype} x {a.size}"
    return bf16_to_float32(a[:n])


def _gelu_forward(vec, bf16_in=False):
    def k(grid, block, smem, out, out_bf16, x, bias, n, C):
        n, C = _int(n, np.int64) * vec, _int(C, np.int32) * vec
        assert _threads(grid, block) * vec >= n
        a = _in(_arr(x), n, bf16_in).astype(np.float64)
        b = _arr(bias)
        if b is not None:
            a = a + np.tile(_f32(b, C), n // C)
        _store(out, out_bf16, n, _gelu(a))
    return k


def _gelu_backward(grid, block, smem, dx, dout, x, n):
    n = _int(n, np.int64)
    assert _threads(grid, block) >= n
    _f32(_arr(dx), n)[...] = _f32(_arr(dout), n) * _gelu_grad(_f32(_arr(x), n).astype(np.float64))


def _bias_gelu_backward(bf16_in=False):
    def k(grid, block, smem, dx, dx_bf16, partial, dout, x, bias, N, C, rpc):
        N, C, rpc = _int(N, np.int32), _int(C, np.int32), _int(rpc, np.int32)
        assert block == (32, 8, 1) or block == (32, 8), block
        assert grid[0] * 32 >= C and grid[1] * rpc >= N and grid[1] < 65536
        a = _in(_arr(x), N * C, bf16_in).reshape(N, C) + _f32(_arr(bias), C)
        d = _in(_arr(dout), N * C, bf16_in).reshape(N, C) * _gelu_grad(a.astype(np.float64))
        _store(dx, dx_bf16, N * C, d)
        p = _rows(_f32(_arr(partial)), C)
        for c in range(grid[1]):
            p[c] = d[c * rpc:min(N, (c + 1) * rpc)].sum(0)
    return k


def _column_sum_finish(grid, block, smem, out, partial, nchunks, C, add_into):
    nchunks, C, add_into = _int(nchunks, np.int32), _int(C, np.int32), _int(add_into, np.int32)
    assert _threads(grid, block) >= C
    t = _f32(_arr(partial), nchunks * C).reshape(nchunks, C).sum(0)
    o = _f32(_arr(out), C)
    o[...] = o + t if add_into else t


def _cross_entropy(grid, block, smem, losses, dlogits, logits, targets, n_kept, V, ignore, bf16=False):
    V, ignore = _int(V, np.int32), _int(ignore, np.int64)
    N = grid[0]
    assert block[0] % 32 == 0 and block[0] <= 1024
    if bf16:                                             # cross_entropy_fused_bf16: bf16 logits, widened exactly
        assert _arr(logits).dtype == np.uint16, f"kernel expects bf16 (uint16) logits, got {_arr(logits).dtype}"
        assert _arr(logits).size >= N * V, "the kernel would read past the logits"
        z = _bf(logits, (N, V))
    else:
        z = _f32(_arr(logits), N * V).reshape(N, V).astype(np.float64)
    y = _arr(targets)[:N]
    assert y.dtype == np.int64
    nk = float(_f32(_arr(n_kept))[0])
    kept = y != ignore
    valid = kept & (y >= 0) & (y < V)                    # an out-of-range target: NaN loss and gradient row
    mx = z.max(1, keepdims=True)
    s = np.exp(z - mx).sum(1, keepdims=True)
    lse = (mx + np.log(s))[:, 0]
    ys = np.where(valid, y, 0)
    row_loss = (mx[:, 0] - z[np.arange(N), ys]) + np.log(s[:, 0])     # the kernel's form (no cancellation)
    _f32(_arr(losses), N)[...] = np.where(valid, row_loss, np.where(kept, np.nan, 0.0))
    d = _arr(dlogits)
    if d is not None:
        g = np.exp(z - lse[:, None])
        g[np.arange(N), ys] -= valid
        g = g * (kept / nk)[:, None]
        g[kept & ~valid] = np.nan
        if bf16:                                         # the gradient rounded once from float32 to bf16 bits
            assert d.dtype == np.uint16                  # (may be the logits buffer itself: read in full above)
            d.reshape(-1)[:N * V] = float32_to_bf16(g.astype(np.float32)).ravel()
        else:
            _f32(d, N * V).reshape(N, V)[...] = g


def _cross_entropy_bf16(grid, block, smem, *args):
    _cross_entropy(grid, block, smem, *args, bf16=True)


def _scale(grid, block, smem, x, s, n):
    n = _int(n, np.int64)
    assert _threads(grid, block) >= n
    _f32(_arr(x), n)[...] *= _f32(_arr(s))[0]


def _sumsq_partial(grid, block, smem, partial, g, n):
    n = _int(n, np.int64)
    gv = _f32(_arr(g), n).astype(np.float64)
    owner = (np.arange(n) // block[0]) % grid[0]           # the grid-stride loop's block for element i
    _f32(_arr(partial), grid[0])[...] = np.bincount(owner, weights=gv * gv, minlength=grid[0])


def _norm_and_scale(grid, block, smem, out, partial, nparts, max_norm):
    nparts, max_norm = _int(nparts, np.int32), _flt(max_norm)
    assert grid[0] == 1
    norm = math.sqrt(float(_f32(_arr(partial), nparts).astype(np.float64).sum()))
    o = _f32(_arr(out), 2)
    o[0] = norm
    o[1] = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def _adamw_update(grid, block, smem, p, g, m, v, p_bf16, clip, n, n_decay, step_scalars, b1, b2, eps, wd):
    n, n_decay = _int(n, np.int64), _int(n_decay, np.int64)
    b1, b2, eps, wd = (_flt(a) for a in (b1, b2, eps, wd))
    lr, bc1, bc2 = (float(x) for x in _f32(_arr(step_scalars), 3))        # read from device memory at launch
    c = _arr(clip)
    scale = 1.0 if c is None else float(_f32(c)[0])
    pv, gv, mv, vv = (_f32(_arr(a), n) for a in (p, g, m, v))
    gs = gv.astype(np.float64) * scale
    mv[...] = b1 * mv + (1 - b1) * gs
    vv[...] = b2 * vv + (1 - b2) * gs * gs
    decay = np.where(np.arange(n) < n_decay, wd, 0.0)
    pv[...] = pv - lr * ((mv / bc1) / (np.sqrt(vv / bc2) + eps) + decay * pv)
    pb = _arr(p_bf16)
    if pb is not None:
        assert pb.dtype == np.uint16
        pb.reshape(-1)[:n] = float32_to_bf16(pv)


def _causal_mask(T):
    return np.tril(np.ones((T, T), bool))


def _softmax_forward(grid, block, smem, P, S, BH, T, scale):
    BH, T, scale = _int(BH, np.int32), _int(T, np.int32), _flt(scale)
    assert grid[0] * block[0] // 32 >= BH * T
    s = _f32(_arr(S), BH * T * T).reshape(BH, T, T).astype(np.float64) * scale
    s = np.where(_causal_mask(T), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    _f32(_arr(P), BH * T * T).reshape(BH, T, T)[...] = e / e.sum(-1, keepdims=True)


def _softmax_backward(grid, block, smem, dS, P, dP, BH, T, scale):
    BH, T, scale = _int(BH, np.int32), _int(T, np.int32), _flt(scale)
    assert grid[0] * block[0] // 32 >= BH * T
    p = _f32(_arr(P), BH * T * T).reshape(BH, T, T).astype(np.float64)
    dp = _f32(_arr(dP), BH * T * T).reshape(BH, T, T).astype(np.float64)
    ds = scale * p * (dp - (p * dp).sum(-1, keepdims=True))
    _f32(_arr(dS), BH * T * T).reshape(BH, T, T)[...] = np.where(_causal_mask(T), ds, 0.0)


def _heads_in(qkv, B, T, Tp, NH, part):
    C = NH * 64
    x = np.zeros((B * NH, Tp, 64))
    x[:, :T] = qkv.reshape(B, T, 3 * C)[..., part * C:(part + 1) * C].reshape(B, T, NH, 64) \
        .transpose(0, 2, 1, 3).reshape(B * NH, T, 64)
    return x


def _qkv_to_bf16(grid, block, smem, out, qkv, bias, n_pairs, C3):
    n_pairs, C3 = _int(n_pairs, np.int64), _int(C3, np.int32)
    assert _threads(grid, block) >= n_pairs and _arr(out).dtype == np.uint16
    src = _f32(_arr(qkv), 2 * n_pairs)
    if _arr(bias) is not None:
        src = (src.reshape(-1, C3) + _f32(_arr(bias), C3)).reshape(-1)
    _arr(out).reshape(-1)[:2 * n_pairs] = float32_to_bf16(src.astype(np.float32))


def _qkv_heads(qkv, bias, BH, T, Tp, NH):
    """q, k, v (BH, Tp, 64) float64 as the flash kernels load them from a bf16 qkv (B, T, 3C): bias added to the
    bf16 value and rounded back to bf16, rows t >= T zero."""
    C = NH * 64
    B = BH // NH
    assert _arr(qkv).dtype == np.uint16
    x = bf16_to_float32(_arr(qkv).reshape(-1)[:B * T * 3 * C]).reshape(B * T, 3 * C)
    if _arr(bias) is not None:
        x = bf16_to_float32(float32_to_bf16((x + _f32(_arr(bias), 3 * C)).astype(np.float32)))
    return tuple(_heads_in(x.astype(np.float64), B, T, Tp, NH, part) for part in range(3))


def _bf(a, shape):
    return bf16_to_float32(_arr(a).reshape(-1)[:math.prod(shape)]).reshape(shape).astype(np.float64)


def _flash_forward(grid, block, smem, out, out_bf16, L2, qkv, bias, T, Tp, NH, scale_log2):
    T, Tp, NH, sl2 = _int(T, np.int32), _int(Tp, np.int32), _int(NH, np.int32), _flt(scale_log2)
    BH = grid[1]
    assert Tp % 128 == 0 and grid[0] == Tp // 128 and block[0] == 256     # 128 query rows per block, 8 warps
    q, k, v = _qkv_heads(qkv, bias, BH, T, Tp, NH)
    s2 = np.where(_causal_mask(Tp), q @ k.transpose(0, 2, 1) * sl2, -np.inf)
    m = s2.max(-1, keepdims=True)
    l = np.exp2(s2 - m).sum(-1, keepdims=True)
    o = (np.exp2(s2 - m) / l) @ v                                     # (BH, Tp, 64)
    _f32(_arr(L2), BH * Tp).reshape(BH, Tp)[...] = (m + np.log2(l))[..., 0]
    B = BH // NH
    _store(out, out_bf16, B * T * NH * 64, o.reshape(B, NH, Tp, 64)[:, :, :T].transpose(0, 2, 1, 3))


def _flash_prep(grid, block, smem, dO16, D, dout, dout_bf16, out, out_bf16, B, T, Tp, NH):
    B, T, Tp, NH = (_int(a, np.int32) for a in (B, T, Tp, NH))
    assert grid[0] * block[0] // 32 >= B * NH * Tp
    C = NH * 64
    if _arr(dout_bf16) is not None:
        assert _arr(dout) is None and _arr(dO16) is None          # read in place: no copy to write
        do = _bf(dout_bf16, (B * T * C,))
    else:
        do = _f32(_arr(dout), B * T * C).astype(np.float64)
        assert _arr(dO16).dtype == np.uint16
        _arr(dO16).reshape(-1)[:B * T * C] = float32_to_bf16(do.astype(np.float32))
    if _arr(out_bf16) is not None:
        assert _arr(out) is None
        o = _bf(out_bf16, (B * T * C,))
    else:
        o = _f32(_arr(out), B * T * C).astype(np.float64)
    dh = np.zeros((B * NH, Tp, 64))
    oh = np.zeros((B * NH, Tp, 64))
    dh[:, :T] = do.reshape(B, T, NH, 64).transpose(0, 2, 1, 3).reshape(B * NH, T, 64)
    oh[:, :T] = o.reshape(B, T, NH, 64).transpose(0, 2, 1, 3).reshape(B * NH, T, 64)
    dh16 = float32_to_bf16(dh.astype(np.float32))
    _f32(_arr(D), B * NH * Tp)[...] = (bf16_to_float32(dh16) * oh).sum(-1).ravel()     # from the bf16 dO


def _flash_grads(grid, dqkv, dqkv_bf16, qkv, bias, dO, L2, D, T, Tp, NH, scale_log2, scale, db_partial):
    T, Tp, NH = _int(T, np.int32), _int(Tp, np.int32), _int(NH, np.int32)
    sl2, sc = _flt(scale_log2), _flt(scale)
    BH = grid[1]
    assert Tp % 128 == 0
    q, k, v = _qkv_heads(qkv, bias, BH, T, Tp, NH)
    B, C = BH // NH, NH * 64
    assert _arr(dO).dtype == np.uint16
    do = np.zeros((BH, Tp, 64))                                       # dO (B, T, C) bf16 -> heads, rows t >= T zero
    do[:, :T] = _bf(dO, (B, T, NH, 64)).transpose(0, 2, 1, 3).reshape(BH, T, 64)
    L = _f32(_arr(L2), BH * Tp).reshape(BH, Tp, 1)
    Dv = _f32(_arr(D), BH * Tp).reshape(BH, Tp, 1)
    p = np.where(_causal_mask(Tp), np.exp2(q @ k.transpose(0, 2, 1) * sl2 - L), 0.0)
    ds = p * (do @ v.transpose(0, 2, 1) - Dv)
    B = BH // NH
    C = NH * 64
    if _arr(dqkv_bf16) is not None:
        assert _arr(dqkv) is None and _arr(dqkv_bf16).dtype == np.uint16
        dst = _arr(dqkv_bf16).reshape(-1)[:B * T * 3 * C].reshape(B, T, 3, NH, 64)
        convert = float32_to_bf16
    else:
        dst = _f32(_arr(dqkv), B * T * 3 * C).reshape(B, T, 3, NH, 64)
        convert = np.asarray

    partial = None if _arr(db_partial) is None else _rows(_f32(_arr(db_partial)), 3 * C)
    nt = Tp // 64

    def put(part, x):
        dst[:, :, part] = convert(x.reshape(B, NH, Tp, 64)[:, :, :T].transpose(0, 2, 1, 3).astype(np.float32))
        if partial is not None:            # per (b, 64-row tile): column sums of the values as written
            written = dst[:, :, part].astype(np.float32) if convert is np.asarray else bf16_to_float32(dst[:, :, part])
            w = np.zeros((B, Tp, NH * 64))
            w[:, :T] = written.reshape(B, T, NH * 64)
            partial.reshape(B, nt, 3 * C)[:, :, part * C:(part + 1) * C] = w.reshape(B, nt, 64, C).sum(2)
    return p, ds, q, k, do, sc, put


def _flash_dkdv(grid, block, smem, dqkv, dqkv_bf16, qkv, bias, dO, L2, D, T, Tp, NH, scale_log2, scale, db_partial):
    assert block[0] == 256 and grid[0] == _int(Tp, np.int32) // 128        # a block per 128 keys, 8 warps
    p, ds, q, k, do, sc, put = _flash_grads(grid, dqkv, dqkv_bf16, qkv, bias, dO, L2, D, T, Tp, NH, scale_log2, scale,
                                            db_partial)
    put(1, sc * ds.transpose(0, 2, 1) @ q)
    put(2, p.transpose(0, 2, 1) @ do)


def _flash_dq(grid, block, smem, dqkv, dqkv_bf16, qkv, bias, dO, L2, D, T, Tp, NH, scale_log2, scale, db_partial):
    assert block[0] == 256 and grid[0] == _int(Tp, np.int32) // 128        # a block per 128 queries, 8 warps
    p, ds, q, k, do, sc, put = _flash_grads(grid, dqkv, dqkv_bf16, qkv, bias, dO, L2, D, T, Tp, NH, scale_log2, scale,
                                            db_partial)
    put(0, sc * ds @ k)


def _to_bf16(grid, block, smem, out, inp, n):
    n = _int(n, np.int64)
    assert _threads(grid, block) >= n and _arr(out).dtype == np.uint16
    _arr(out).reshape(-1)[:n] = float32_to_bf16(_f32(_arr(inp), n))


def _bf16_column_sum_partial(grid, block, smem, partial, x, N, C, rpc):
    N, C, rpc = _int(N, np.int32), _int(C, np.int32), _int(rpc, np.int32)
    assert tuple(block[:2]) == (32, 8) and grid[0] * 32 >= C and grid[1] * rpc >= N
    assert _arr(x).dtype == np.uint16
    xv = bf16_to_float32(_arr(x).reshape(-1)[:N * C]).reshape(N, C).astype(np.float64)
    p = _rows(_f32(_arr(partial)), C)
    for k in range(grid[1]):
        p[k] = xv[k * rpc:min(N, (k + 1) * rpc)].sum(0)


def _to_f32(grid, block, smem, out, inp, n):
    n = _int(n, np.int64)
    assert _threads(grid, block) >= n and _arr(inp).dtype == np.uint16
    _f32(_arr(out), n)[...] = bf16_to_float32(_arr(inp).reshape(-1)[:n])


KERNELS = {
    ("encoder", "encoder_forward_f4"): _encoder_forward(4),
    ("encoder", "encoder_forward"): _encoder_forward(1),
    ("encoder", "encoder_backward_wpe"): _encoder_backward_wpe,
    ("encoder", "encoder_backward_wte"): _encoder_backward_wte,
    ("layernorm", "layernorm_forward"): _layernorm_forward,
    ("layernorm", "layernorm_backward"): _layernorm_backward,
    ("layernorm", "layernorm_param_reduce"): _param_reduce,
    ("gelu", "gelu_forward"): _gelu_forward(1),
    ("gelu", "gelu_forward_f4"): _gelu_forward(4),
    ("gelu", "gelu_forward_bf16x"): _gelu_forward(1, bf16_in=True),
    ("gelu", "gelu_forward_bf16x4"): _gelu_forward(4, bf16_in=True),
    ("gelu", "gelu_backward"): _gelu_backward,
    ("gelu", "bias_gelu_backward"): _bias_gelu_backward(),
    ("gelu", "bias_gelu_backward_bf16"): _bias_gelu_backward(bf16_in=True),
    ("gelu", "column_sum_finish"): _column_sum_finish,
    ("cross_entropy", "cross_entropy_fused"): _cross_entropy,
    ("cross_entropy", "cross_entropy_fused_bf16"): _cross_entropy_bf16,
    ("cross_entropy", "scale_by_device_scalar"): _scale,
    ("adamw", "sumsq_partial"): _sumsq_partial,
    ("adamw", "norm_and_scale"): _norm_and_scale,
    ("adamw", "adamw_update"): _adamw_update,
    ("softmax_attention", "causal_softmax_forward"): _softmax_forward,
    ("softmax_attention", "causal_softmax_backward"): _softmax_backward,
    ("flash_attention", "qkv_to_bf16"): _qkv_to_bf16,
    ("flash_attention", "flash_attention_forward"): _flash_forward,
    ("flash_attention", "flash_attention_backward_prep"): _flash_prep,
    ("flash_attention", "flash_attention_backward_dkdv"): _flash_dkdv,
    ("flash_attention", "flash_attention_backward_dq"): _flash_dq,
    ("bf16", "f32_to_bf16"): _to_bf16,
    ("bf16", "bf16_to_f32"): _to_f32,
    ("bf16", "bf16_column_sum_partial"): _bf16_column_sum_partial,
}


def emulate(module, kernel, grid, block, args, shared_mem):
    assert math.prod(block) <= 1024 and all(b >= 1 for b in block), f"bad block {block}"
    assert grid[0] < 2 ** 31 and all(g < 65536 for g in grid[1:]) and all(g >= 1 for g in grid), f"bad grid {grid}"
    assert shared_mem <= 48 * 1024
    fn = KERNELS[(module, kernel)]
    fn(grid, block, shared_mem, *args)


# ------------------------------------------------------------------------------------------------- cuBLAS

CUBLAS_COMPUTE = {68: "32F", 69: "32F_PEDANTIC", 77: "32F_FAST_TF32"}      # the compute types the fake knows
_pointer_modes = {0: 0}         # cuBLAS handle -> pointer mode (0 = HOST); handle 0 is CuPy's (get_cublas_handle)


def _create():
    """cublasCreate: a new handle, in pointer mode HOST as cuBLAS makes it."""
    handle = max(_pointer_modes) + 1
    _pointer_modes[handle] = 0
    return handle


def _get_pointer_mode(handle):
    return _pointer_modes[handle]


def _set_pointer_mode(handle, mode):
    assert mode in (0, 1), f"pointer mode {mode}"
    _pointer_modes[handle] = mode


def _tf32(x):
    """float32 values rounded to TF32 (10 mantissa bits, round to nearest even), as the tensor cores read them."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0xFFF + ((u >> 13) & 1)) & ~np.uint64(0x1FFF)
    return (u & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType,
             algo):
    """cublasGemmEx on fake-device buffers (column-major): bf16 (14) or float32 (0) operands, a float32 or bf16
    result, compute type 32F (exact float32; bf16 inputs are exact in it) or 32F_FAST_TF32 (float32 inputs
    rounded to TF32). alpha and beta are read from host memory: the handle must be in pointer mode HOST."""
    assert _pointer_modes[handle] == 0, "alpha/beta are host pointers but the handle is in pointer mode DEVICE"
    assert Atype == Btype and Atype in (0, 14) and Ctype in (0, 14), (Atype, Btype, Ctype)
    assert computeType in CUBLAS_COMPUTE and algo == -1, (computeType, algo)
    assert not (Atype == 14 and computeType == 77), "bf16 inputs with a TF32 compute type"

    def mat(ptr, dtype, rows, cols, ld, op):
        buf = _memory_at(ptr)
        assert buf.dtype == (np.uint16 if dtype == 14 else np.float32), (buf.dtype, dtype)
        sr, sc = (rows, cols) if op == 0 else (cols, rows)
        assert ld >= max(1, sr) and buf.size >= ld * (sc - 1) + sr, "matrix runs past its allocation"
        vals = buf[:ld * (sc - 1) + sr]
        vals = bf16_to_float32(vals) if dtype == 14 else (_tf32(vals) if computeType == 77 else vals)
        vals = np.concatenate([vals, np.zeros(ld * sc - vals.size, vals.dtype)])
        X = np.asarray(vals, dtype=np.float64).reshape(sc, ld).T[:sr]
        return X if op == 0 else X.T
    a_, b_ = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    prod = mat(A, Atype, m, k, lda, transa) @ mat(B, Btype, k, n, ldb, transb)
    cbuf = _memory_at(C)
    assert cbuf.dtype == (np.uint16 if Ctype == 14 else np.float32) and ldc >= m
    assert cbuf.size >= ldc * (n - 1) + m, "C runs past its allocation"
    flat = cbuf[:ldc * (n - 1) + m]
    idx = (np.arange(n)[:, None] * ldc + np.arange(m)[None, :]).T          # (m, n) column-major positions
    cur = bf16_to_float32(flat[idx]) if Ctype == 14 else flat[idx]
    old = np.nan_to_num(cur.astype(np.float64)) if b_ == 0 else cur.astype(np.float64)
    res = (a_ * prod + b_ * old).astype(np.float32)     # float32 accumulator, rounded to C's type
    flat[idx] = float32_to_bf16(res) if Ctype == 14 else res


# CuPy's cuBLAS wrapper (cupy_backends/cuda/libs/cublas.pyx, CuPy 14): every function first binds the handle to
# the current stream with setStream, which refuses while that stream captures a CUDA graph. So gemmEx and
# CuPy's own matmul (tensordot_core / matmul -> cuBLAS) cannot be captured through CuPy; precision.gemm calls
# cuBLAS itself (kernels/cublas_ctypes.py, faked by _ctypes_binding below: no such check).
CAPTURE_REFUSED = "calling cuBLAS API during stream capture is currently unsupported"       # CuPy's words


def _set_stream(handle, stream):
    """cublas.setStream: refused (NotImplementedError) while `stream` captures, as in CuPy."""
    if sys.modules[__name__].cuda.runtime.streamIsCapturing(stream):
        raise NotImplementedError(CAPTURE_REFUSED)


def _through_cupy(library_call):
    """CuPy's cuBLAS wrapper around a library call: _setStream(handle) first (the current stream: refused during a
    capture), then the call. functools.wraps keeps the call's parameters (tests/test_fake_cupy.py compares them)."""
    @functools.wraps(library_call)
    def wrapper(handle, *args):
        _set_stream(handle, sys.modules[__name__].cuda.get_current_stream().ptr)
        return library_call(handle, *args)
    return wrapper


def _set_workspace(handle, ptr, nbytes):
    """cublasSetWorkspace_v2: the buffer must be live device memory of at least nbytes."""
    assert handle in _pointer_modes and _memory_at(ptr).nbytes >= nbytes, "workspace outside a live allocation"


def _ctypes_binding(monkeypatch):
    """Point nanogpt_np/kernels/cublas_ctypes at the fake cuBLAS: the same handles and gemm emulation as the fake
    CuPy wrapper, without the wrapper's capture check (cuBLAS itself has none)."""
    from nanogpt_np.kernels import cublas_ctypes
    monkeypatch.setattr(cublas_ctypes, "load", lambda: cublas_ctypes)
    monkeypatch.setattr(cublas_ctypes, "create", _create)
    monkeypatch.setattr(cublas_ctypes, "set_pointer_mode", _set_pointer_mode)
    monkeypatch.setattr(cublas_ctypes, "set_stream", lambda handle, stream: None)
    monkeypatch.setattr(cublas_ctypes, "set_workspace", _set_workspace)
    monkeypatch.setattr(cublas_ctypes, "gemm_ex", _gemm_ex)


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
                             strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):
    """cublasGemmStridedBatchedEx: batchCount independent gemmEx products (same rules as _gemm_ex above), the
    i-th reading A + i * strideA, B + i * strideB and writing C + i * strideC (strides in elements). The
    outputs of the batch must not overlap (cuBLAS leaves that undefined); inputs may (a stride of 0 is fine)."""
    assert batchCount >= 1 and min(strideA, strideB, strideC) >= 0, (batchCount, strideA, strideB, strideC)
    if batchCount > 1 and strideC < ldc * (n - 1) + m:     # interleaved outputs (heads side by side): disjoint?
        cells = (np.arange(n)[:, None] * ldc + np.arange(m)[None, :]).ravel()
        written = (np.arange(batchCount, dtype=np.int64)[:, None] * strideC + cells[None, :]).ravel()
        assert np.unique(written).size == written.size, "the batch's C matrices overlap"

    def at(ptr, i, stride):                     # the i-th matrix's first element
        if i * stride == 0:
            return ptr
        mem = _memory_at(ptr)                   # the allocation from ptr on (a view's memory too)
        assert i * stride < mem.size, "batch runs past its allocation"
        p = _DevicePointer(int(ptr) + i * stride * mem.itemsize)
        p.array = mem[i * stride:]
        return p
    for i in range(batchCount):
        _gemm_ex(handle, transa, transb, m, n, k, alpha, at(A, i, strideA), Atype, lda, at(B, i, strideB), Btype,
                 ldb, beta, at(C, i, strideC), Ctype, ldc, computeType, algo)


# ------------------------------------------------------------------------------------------------- cuBLASLt
# kernels/cublaslt_ctypes.py on fake-device buffers. Descriptors, layouts and preferences are host objects (here:
# dicts); the heuristic accepts what the cuBLASLt docs allow for the calls the project makes and refuses the rest
# (no algo: the project falls back); cublasLtMatmul emulates the documented arithmetic: products accumulated in
# float32, the epilogue applied to the float32 result (+ float32 bias), and only what is stored rounded (bf16:
# round to nearest even). The GELU is the tanh form (kernels/cublaslt.py says why).
_lt_objects = {}                # id -> {"kind": "desc" | "layout" | "pref" | "handle", ...}
_lt_ids = itertools.count(0x7001)


def _lt_new(kind, **fields):
    key = next(_lt_ids)
    _lt_objects[key] = dict(kind=kind, **fields)
    return key


def _lt_get(key, kind):
    obj = _lt_objects.get(key)
    assert obj is not None and obj["kind"] == kind, f"not a live cuBLASLt {kind}: {key}"
    return obj


def _lt_create():
    return _lt_new("handle")


def _lt_desc_create(compute_type, scale_type):
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    assert compute_type in CUBLAS_COMPUTE and scale_type == lt.CUDA_R_32F, (compute_type, scale_type)
    return _lt_new("desc", attrs={lt.DESC_TRANSA: 0, lt.DESC_TRANSB: 0, lt.DESC_EPILOGUE: lt.EPILOGUE_DEFAULT,
                                  lt.DESC_BIAS_POINTER: 0, lt.DESC_EPILOGUE_AUX_POINTER: 0,
                                  lt.DESC_EPILOGUE_AUX_LD: 0, lt.DESC_EPILOGUE_AUX_DATA_TYPE: -1,
                                  lt.DESC_BIAS_DATA_TYPE: -1}, compute=compute_type)


def _lt_desc_set(desc, attribute, value):
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    assert attribute in lt.DESC_ATTRIBUTE_TYPES, f"attribute {attribute}"
    if isinstance(value, _DevicePointer):          # a device pointer: kept with the array it points into
        _lt_get(desc, "desc")["attrs"][attribute] = value
        return
    _lt_get(desc, "desc")["attrs"][attribute] = lt.DESC_ATTRIBUTE_TYPES[attribute](value).value or 0


def _lt_destroy(kind):
    def destroy(key):
        _lt_get(key, kind)
        del _lt_objects[key]
    return destroy


def _lt_layout_create(dtype, rows, cols, ld):
    assert dtype in (0, 14) and rows >= 1 and cols >= 1 and ld >= rows, (dtype, rows, cols, ld)
    return _lt_new("layout", dtype=dtype, rows=rows, cols=cols, ld=ld)


def _lt_pref_create():
    return _lt_new("pref")


def _lt_pref_set(pref, attribute, value):
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    assert attribute in lt.PREF_ATTRIBUTE_TYPES, f"preference attribute {attribute}"
    _lt_get(pref, "pref")[attribute] = int(value)


def lt_snapshot(desc):
    """A copy of a matmul descriptor as it is now: what a CUDA graph keeps of a cublasLtMatmul call captured with
    it (the kernel's parameters, pointers included, are fixed at capture; later attribute changes do not reach
    the graph)."""
    obj = _lt_get(desc, "desc")
    return _lt_new("desc", attrs=dict(obj["attrs"]), compute=obj["compute"])


def lt_describe(desc, a, b, d):
    """(m, n, k, the descriptor's attributes, the A, B, D layouts) of a matmul description."""
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    attrs = _lt_get(desc, "desc")["attrs"]
    A, B, D = _lt_get(a, "layout"), _lt_get(b, "layout"), _lt_get(d, "layout")
    k = A["cols"] if attrs[lt.DESC_TRANSA] == lt.CUBLAS_OP_N else A["rows"]
    return D["rows"], D["cols"], k, attrs, A, B, D


def _lt_heuristic(handle, desc, a, b, c, d, pref):
    """An algo when the description is one cuBLASLt supports (as far as the project uses it), else None."""
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    _lt_get(handle, "handle")
    _lt_get(pref, "pref")
    assert c == d, "the project passes C = D"
    return _lt_algo() if _lt_supported(desc, a, b, d) else None


def _lt_algo():
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    result = lt.HeuristicResult()
    result.algo[0] = 1
    return result


def _lt_supported(desc, a, b, d):
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    m, n, k, attrs, A, B, D = lt_describe(desc, a, b, d)
    ta, tb = attrs[lt.DESC_TRANSA], attrs[lt.DESC_TRANSB]
    if (A["rows"], A["cols"]) != ((m, k) if ta == 0 else (k, m)) or (B["rows"], B["cols"]) != ((k, n) if tb == 0 else (n, k)):
        return False                                                    # shapes do not fit
    if not A["dtype"] == B["dtype"] == D["dtype"] == lt.CUDA_R_16BF:
        return False
    epilogue = attrs[lt.DESC_EPILOGUE]
    if epilogue not in (lt.EPILOGUE_GELU_AUX_BIAS, lt.EPILOGUE_GELU_AUX, lt.EPILOGUE_DGELU_BGRAD, lt.EPILOGUE_DGELU):
        return False
    aux_ld = attrs[lt.DESC_EPILOGUE_AUX_LD]
    if aux_ld % 8 or aux_ld < m or attrs[lt.DESC_EPILOGUE_AUX_DATA_TYPE] not in (-1, lt.CUDA_R_16BF):
        return False                                                    # the header's rule for the GELU aux
    if attrs[lt.DESC_BIAS_DATA_TYPE] not in (-1, lt.CUDA_R_16BF, lt.CUDA_R_32F):
        return None
    return True


def _lt_read(ptr, layout):
    """The stored column-major (rows, cols) matrix of a layout, as float64."""
    buf = _memory_at(ptr)
    rows, cols, ld = layout["rows"], layout["cols"], layout["ld"]
    assert buf.dtype == (np.uint16 if layout["dtype"] == 14 else np.float32), (buf.dtype, layout)
    assert buf.size >= ld * (cols - 1) + rows, "matrix runs past its allocation"
    idx = np.arange(cols)[None, :] * ld + np.arange(rows)[:, None]
    vals = buf[idx]
    return (bf16_to_float32(vals) if layout["dtype"] == 14 else vals).astype(np.float64)


def _lt_write(ptr, layout, values):
    buf = _memory_at(ptr)
    rows, cols, ld = layout["rows"], layout["cols"], layout["ld"]
    assert values.shape == (rows, cols) and buf.size >= ld * (cols - 1) + rows
    idx = np.arange(cols)[None, :] * ld + np.arange(rows)[:, None]
    buf[idx] = float32_to_bf16(values) if layout["dtype"] == 14 else values


_GELU_S, _GELU_A = np.float32(math.sqrt(2.0 / math.pi)), np.float32(0.044715)


def gelu_tanh_f32(z):
    """The tanh GELU in float32 arithmetic, and its derivative."""
    z = np.asarray(z, dtype=np.float32)
    t = np.tanh(_GELU_S * (z + _GELU_A * z * z * z))
    dt = (np.float32(1) - t * t) * _GELU_S * (np.float32(1) + np.float32(3) * _GELU_A * z * z)
    return np.float32(0.5) * z * (np.float32(1) + t), np.float32(0.5) * (np.float32(1) + t) + np.float32(0.5) * z * dt


def _lt_matmul(handle, desc, alpha, A, a, B, b, beta, C, c, D, d, algo, workspace, workspace_bytes, stream):
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    _lt_get(handle, "handle")
    assert algo is not None and algo.algo[0] == 1, "an algo from the heuristic"
    assert _memory_at(workspace).nbytes >= workspace_bytes, "workspace outside a live allocation"
    m, n, k, attrs, la, lb, ld_ = lt_describe(desc, a, b, d)
    assert _lt_supported(desc, a, b, d) and C == D
    a_, b_ = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    assert b_ == 0 and C == D, "the project's epilogue matmuls overwrite D"
    opa = _lt_read(A, la) if attrs[lt.DESC_TRANSA] == 0 else _lt_read(A, la).T
    opb = _lt_read(B, lb) if attrs[lt.DESC_TRANSB] == 0 else _lt_read(B, lb).T
    acc = (a_ * (opa @ opb)).astype(np.float32)                         # (m, n), float32 accumulator
    epilogue = attrs[lt.DESC_EPILOGUE]
    aux_layout = dict(dtype=lt.CUDA_R_16BF, rows=m, cols=n, ld=attrs[lt.DESC_EPILOGUE_AUX_LD])
    bias_ptr = attrs[lt.DESC_BIAS_POINTER]
    bias_type = attrs[lt.DESC_BIAS_DATA_TYPE] if attrs[lt.DESC_BIAS_DATA_TYPE] != -1 else ld_["dtype"]
    bias_layout = dict(dtype=bias_type, rows=m, cols=1, ld=m)
    if epilogue in (lt.EPILOGUE_GELU_AUX_BIAS, lt.EPILOGUE_GELU_AUX):
        if epilogue == lt.EPILOGUE_GELU_AUX_BIAS:
            acc = acc + _lt_read(bias_ptr, bias_layout).astype(np.float32)      # bias along D's rows
        _lt_write(attrs[lt.DESC_EPILOGUE_AUX_POINTER], aux_layout, acc)         # the GELU input, rounded
        out = gelu_tanh_f32(acc)[0]
    else:                                                               # DGELU(_BGRAD)
        pre = _lt_read(attrs[lt.DESC_EPILOGUE_AUX_POINTER], aux_layout).astype(np.float32)
        out = acc * gelu_tanh_f32(pre)[1]
        if epilogue == lt.EPILOGUE_DGELU_BGRAD:                         # sums over D's columns, from float32
            _lt_write(bias_ptr, bias_layout, out.astype(np.float64).sum(axis=1, keepdims=True).astype(np.float32))
    _lt_write(D, ld_, out)


def _lt_binding(monkeypatch):
    """Point nanogpt_np/kernels/cublaslt_ctypes at the fake cuBLASLt above."""
    from nanogpt_np.kernels import cublaslt_ctypes as lt
    for name, fn in (("load", lambda: lt), ("create", _lt_create), ("matmul_desc_create", _lt_desc_create),
                     ("matmul_desc_set", _lt_desc_set), ("matmul_desc_destroy", _lt_destroy("desc")),
                     ("matrix_layout_create", _lt_layout_create), ("matrix_layout_destroy", _lt_destroy("layout")),
                     ("preference_create", _lt_pref_create), ("preference_set", _lt_pref_set),
                     ("preference_destroy", _lt_destroy("pref")), ("algo_get_heuristic", _lt_heuristic),
                     ("matmul", _lt_matmul)):
        monkeypatch.setattr(lt, name, fn)


# cupy._core._routines_linalg as CuPy 14 has it: the constants are CuPy's own (not cuBLAS's), and the compute
# type is kept per dtype: set_compute_type(dtype, compute_type), two positional arguments.
LINALG_CONSTANTS = dict(COMPUTE_TYPE_TBD=0, COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_PEDANTIC=2, COMPUTE_TYPE_FP16=3,
                        COMPUTE_TYPE_FP32=4, COMPUTE_TYPE_FP64=5, COMPUTE_TYPE_BF16=6, COMPUTE_TYPE_TF32=7)


def _linalg_module():
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.__dict__.update(LINALG_CONSTANTS)
    linalg.compute_types = {}                   # dtype char -> compute type (what a test can look at)

    def set_compute_type(dtype, compute_type):
        dtype = np.dtype(dtype)
        if dtype.char not in "efdFD":
            raise TypeError(f"set_compute_type: no compute type for dtype {dtype}")
        if compute_type not in LINALG_CONSTANTS.values():
            raise ValueError(f"set_compute_type: unknown compute type {compute_type!r}")
        linalg.compute_types[dtype.char] = compute_type

    def get_compute_type(dtype):
        return linalg.compute_types.get(np.dtype(dtype).char, LINALG_CONSTANTS["COMPUTE_TYPE_DEFAULT"])

    linalg.set_compute_type, linalg.get_compute_type = set_compute_type, get_compute_type
    return linalg


def install(monkeypatch, kernels="numpy", sms=None):
    """Replace cupy with this module for the duration of a test (pytest monkeypatch).

    kernels="numpy": launches run the NumPy emulations in KERNELS above (fast, our reading of each kernel).
    kernels="cuda": launches run the real .cu code on the CPU (emulation/cuda: needs g++; slower).
    sms: the device's multiprocessor count, which sizes some grids (default 5; an H100/H200 has 132).
    """
    from nanogpt_np.kernels import compile as kc
    if kernels not in ("numpy", "cuda"):
        raise ValueError(f"kernels must be 'numpy' or 'cuda', got {kernels!r}")
    this = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "cupy", this)
    monkeypatch.setitem(sys.modules, "cupy.cuda", this.cuda)              # for `from cupy.cuda import nccl`
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", this.cuda.nccl)
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.gemmEx = _through_cupy(_gemm_ex)
    cublas.setStream = _set_stream
    cublas.gemmStridedBatchedEx = _through_cupy(_gemm_strided_batched_ex)
    cublas.create = _create
    cublas.getPointerMode = _get_pointer_mode
    cublas.setPointerMode = _set_pointer_mode
    cublas.CUBLAS_POINTER_MODE_HOST = 0
    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    for name, mod in (("cupy_backends", types.ModuleType("cupy_backends")),
                      ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                      ("cupy_backends.cuda.libs", libs), ("cupy_backends.cuda.libs.cublas", cublas)):
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["cupy_backends"].cuda = sys.modules["cupy_backends.cuda"]
    sys.modules["cupy_backends.cuda"].libs = libs
    linalg = _linalg_module()
    from nanogpt_np.kernels import precision
    monkeypatch.setattr(precision, "_tf32", False)      # a fresh CuPy multiplies float32 exactly; gemm() mirrors it
    monkeypatch.setattr(precision, "_local", threading.local())     # cuBLAS handles belong to the fake that made them
    monkeypatch.setattr(precision, "_ones", {})                     # so do cached device arrays
    _ctypes_binding(monkeypatch)
    _lt_binding(monkeypatch)
    from nanogpt_np.kernels import cublaslt
    monkeypatch.setattr(cublaslt, "_local", threading.local())       # cuBLASLt state belongs to the fake too
    from nanogpt_np.ops import reductions
    monkeypatch.setattr(reductions, "_ones_cache", {})  # cached device arrays belong to the fake they were made on
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    monkeypatch.setattr(this, "_core", core, raising=False)
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    if sms is not None:
        monkeypatch.setitem(_device, "sms", int(sms))
    if kernels == "cuda":
        from emulation.cuda.emulator import emulator as cuda_emulator
        monkeypatch.setattr(kc, "emulator", cuda_emulator)
    else:
        monkeypatch.setattr(kc, "emulator", emulate)
    return this
