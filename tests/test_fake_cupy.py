"""The fake CuPy (tests/emulation/fake_cupy.py) held to real CuPy, and the host-side CuPy calls of the package.

The CPU tests of the GPU path run on the fake, so the fake must accept exactly what CuPy accepts: the same
function names, signatures and constants, and CuPy's kernel-argument rules (a device array passes its raw
pointer, whatever its strides; a host NumPy array passes its value when it has one element and is refused
otherwise). Where real CuPy is installed (it imports without a GPU), test_fake_matches_real_cupy compares the
two directly; without it that one test skips and the rest still pin the fake down to what CuPy 14 does.
"""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def fake_cp(monkeypatch):
    from emulation import fake_cupy
    return fake_cupy.install(monkeypatch)


def test_set_tf32_uses_cupys_two_argument_set_compute_type(fake_cp):
    """precision.set_tf32 once called set_compute_type(compute_type): a TypeError on real CuPy at the first
    GPU test (the session fixture calls it)."""
    from cupy._core import _routines_linalg as lin
    from nanogpt_np.kernels import precision
    with pytest.raises(TypeError):
        lin.set_compute_type(lin.COMPUTE_TYPE_TF32)            # one argument: refused, as CuPy refuses it
    precision.set_tf32(True)
    assert lin.get_compute_type(np.float32) == lin.COMPUTE_TYPE_TF32 == 7
    precision.set_tf32(False)
    assert lin.get_compute_type(np.float32) == lin.COMPUTE_TYPE_DEFAULT == 1


# ------------------------------------------------------------------------ CuPy's kernel-argument rules

def test_strided_device_array_is_passed_as_its_raw_pointer(fake_cp):
    """CuPy hands a kernel the array's data pointer, strides ignored: a transposed view is read in memory order
    and written in place. (The fake used to copy the view into logical order, hiding a missing
    ascontiguousarray in a wrapper.)"""
    from nanogpt_np.kernels import compile as kc
    from nanogpt_np.kernels.bf16 import float32_to_bf16
    x = fake_cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    out = fake_cp.empty((4, 3), dtype=np.uint16)
    kc.launch("bf16", "f32_to_bf16", (1,), (256,), (out.T, x.T, np.int64(12)))   # both views non-contiguous
    np.testing.assert_array_equal(np.asarray(out).ravel(), float32_to_bf16(np.arange(12, dtype=np.float32)))
    row = fake_cp.asarray(np.zeros((4, 8), np.float32))[1, 2:]                    # a view at an offset
    kc.launch("bf16", "bf16_to_f32", (1,), (256,), (row, fake_cp.asarray(np.full(6, 0x3F80, np.uint16)), np.int64(6)))
    assert np.asarray(row).tolist() == [1.0] * 6


def test_host_numpy_arrays_are_refused_as_pointers(fake_cp):
    """CuPy passes a one-element numpy array by value (its bits, not an address) and refuses larger ones."""
    from nanogpt_np.kernels import compile as kc
    out = fake_cp.empty((4,), dtype=np.uint16)
    with pytest.raises(TypeError, match="size one"):
        kc.launch("bf16", "f32_to_bf16", (1,), (256,), (out, np.ones(4, np.float32), np.int64(4)))
    with pytest.raises(AssertionError, match="by value"):
        kc.launch("bf16", "f32_to_bf16", (1,), (256,), (out, np.ones(1, np.float32), np.int64(1)))


# --------------------------------------------------------------------- launch arithmetic at an H200's size

def test_wrappers_at_132_sms(fake_cp, monkeypatch):
    """The grids and partial buffers that depend on the SM count, at an H100/H200's 132 SMs and real layer
    sizes: layernorm backward (N=8192, C=768), bias+GELU backward (C=3072), AdamW past one grid-stride wave."""
    import importlib
    from emulation import fake_cupy
    from nanogpt_np.kernels import adamw, compile as kc, launch, references, registry
    monkeypatch.setattr(fake_cupy, "_device", dict(fake_cupy.H200))
    assert kc.num_sms() == 132
    grids = {}
    inner = kc.emulator
    monkeypatch.setattr(kc, "emulator", lambda m, k, g, b, a, s: (grids.setdefault(k, g), inner(m, k, g, b, a, s))[1])
    r = np.random.default_rng(2)
    ln = importlib.import_module("nanogpt_np.ops.layernorm")
    N, C = 8192, 768
    x, w, b, dy = (r.standard_normal(s).astype(np.float32) for s in ((N, C), C, C, (N, C)))
    fwd, bwd = registry.lookup("layernorm")
    y, saved = fwd(fake_cp.asarray(x), fake_cp.asarray(w), fake_cp.asarray(b), 1e-5)
    dx, dw, db = bwd(fake_cp.asarray(dy), saved)
    rdx, rdw, rdb = ln.layernorm_backward(dy.astype(np.float64), ln.layernorm_forward(x.astype(np.float64), w, b)[1])
    assert grids["layernorm_backward"] == (launch.layernorm_backward_config(N, C, 132)[2],) == (512,)
    for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()
    N, C = 1024, 3072
    x, bias, dy = (r.standard_normal(s).astype(np.float32) for s in ((N, C), C, (N, C)))
    fwd, bwd = registry.lookup("bias_gelu")
    _, saved = fwd(fake_cp.asarray(x), fake_cp.asarray(bias))
    dx, dbias = bwd(fake_cp.asarray(dy), saved)
    rdx, rdb = references.bias_gelu_backward(dy.astype(np.float64), references.bias_gelu_forward(x, bias)[1])
    assert grids["bias_gelu_backward"] == launch.column_chunks(N, C, 132)[0] == (96, 11)
    assert np.abs(np.asarray(dbias) - rdb).max() <= 1e-5 * np.abs(rdb).max()
    n = 132 * 16 * 256 + 1001                                    # more than one wave of the grid-stride loop
    p, g = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1, grad_clip=1.0)
    P = fake_cp.asarray(p.copy())
    adamw.adamw_step(P, fake_cp.asarray(g), fake_cp.asarray(m), fake_cp.asarray(v), n_decay=n // 2, **kw)
    rp = p.astype(np.float64)
    references.adamw_flat_reference(rp, g.astype(np.float64), m.astype(np.float64), v.astype(np.float64),
                                    n_decay=n // 2, **kw)
    assert grids["adamw_update"] == (132 * 16,)
    assert np.abs(np.asarray(P) - rp).max() <= 1e-5 * np.abs(rp).max()


# --------------------------------------------------------------- the fake against real CuPy (when installed)

REPO = Path(__file__).resolve().parents[1]
_USE = re.compile(r"\b(?:cp|cupy|_cupy)\.((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)")

# objects the project gets back from CuPy, and what it calls on them (not visible to a scan of `cp.` uses)
RETURNED = {
    ("cuda", "Device"): ["attributes", "compute_capability", "id"],
    ("cuda", "Event"): ["record", "synchronize"],
    ("cuda", "Stream"): ["synchronize", "begin_capture", "end_capture", "__enter__", "__exit__"],
    ("cuda", "MemoryPointer"): ["ptr", "memset_async"],               # ndarray.data (model.zero_grad)
    ("cuda", "Graph"): ["launch"],                                    # Stream.end_capture's result
    ("random", "Generator"): ["integers", "standard_normal", "random"],
    ("random", "RandomState"): ["seed", "random_sample"],          # model.py's dropout generator
}


def used_cupy_names():
    """Every `cp.X.Y` / `cupy.X.Y` attribute chain in the package, the benchmarks and the GPU tests."""
    names = set()
    files = list((REPO / "nanogpt_np").rglob("*.py")) + list((REPO / "benchmarks").glob("*.py")) + \
        list((REPO / "tests" / "gpu").glob("*.py"))
    for f in files:
        for m in _USE.finditer(f.read_text(encoding="utf-8")):
            names.add(m.group(1))
    return sorted(names)


def _resolve_chain(mod, chain):
    obj = mod
    for part in chain.split("."):
        obj = getattr(obj, part)
    return obj


def _params(fn):
    """Parameter names of a function, from its signature or, for Cython functions, its docstring's first line."""
    try:
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        pass
    head = (fn.__doc__ or "").strip().split("\n")[0]
    m = re.match(r"[\w.]+\((.*)\)", head)
    if not m:
        return None
    out = []
    for p in m.group(1).split(","):
        p = p.split("=")[0].strip()
        if p and p not in ("*", "self"):
            out.append(p.split()[-1])
    return out


def _fake_params_fit(fake_fn, real_fn):
    """The fake's parameters, in order, are a prefix of the real ones (it may accept fewer, never others)."""
    f, r = _params(fake_fn), _params(real_fn)
    if f is None or r is None:
        return True
    return f == r[:len(f)], (f, r)


_LIBS_PROBE = r"""
import ctypes, importlib, json, os, re, subprocess, sys, tempfile
import cupy_backends.cuda.libs as libs
d = os.path.dirname(libs.__file__)


def load(name, lib_prefix):
    try:
        return importlib.import_module("cupy_backends.cuda.libs." + name)
    except ImportError:
        pass
    # no CUDA library here (no GPU toolkit): load an empty stand-in with the same soname and symbol names
    # (functions that do nothing and are never called) so that CuPy's module imports and can be read
    so = os.path.join(d, [f for f in os.listdir(d) if f.startswith(name + ".")][0])
    out = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
    syms = dict(re.findall(r"\bU (\w+)@(" + lib_prefix + r"\S*)", out))
    ver = sorted(set(syms.values()))[0]
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "s.c"), "w") as f:
        f.write("".join(f"void {n}(void) {{}}\n" for n in syms))
    with open(os.path.join(tmp, "s.map"), "w") as f:
        f.write(ver + " { global: *; };\n")
    lib = os.path.join(tmp, "lib" + name + "_stub.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", lib, os.path.join(tmp, "s.c"), "-Wl,-soname," + ver,
                    "-Wl,--version-script=" + os.path.join(tmp, "s.map")], check=True, capture_output=True)
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return importlib.import_module("cupy_backends.cuda.libs." + name)


cublas = load("cublas", "libcublas")
curand = load("curand", "libcurand")
names = ["CUBLAS_POINTER_MODE_HOST", "CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT",
         "CUBLAS_COMPUTE_32F_FAST_TF32"]
print(json.dumps(dict(constants={n: getattr(cublas, n) for n in names},
                      curand_philox=curand.CURAND_RNG_PSEUDO_PHILOX4_32_10,
                      docs={n: getattr(cublas, n).__doc__.strip().split("\n")[0]
                            for n in ("gemmEx", "gemmStridedBatchedEx", "create", "getPointerMode", "setPointerMode",
                                      "setStream")},
                      capture_refused=open(cublas.__file__, "rb").read().find(
                          sys.argv[1].encode()) >= 0)))
"""


def _real_cuda_libs():
    """Constants and signatures of CuPy's real cublas and curand modules, read in a separate process (they
    may need stand-in CUDA libraries, which should not stay loaded in the test process)."""
    import json
    import shutil
    if not (shutil.which("gcc") and shutil.which("nm")):
        return None
    from emulation import fake_cupy
    proc = subprocess.run([sys.executable, "-c", _LIBS_PROBE, fake_cupy.CAPTURE_REFUSED], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fake_matches_real_cupy(monkeypatch):
    """Every CuPy attribute the project uses exists in real CuPy and in the fake, with the fake's parameters a
    prefix of the real ones; the constants (compute types, cuBLAS and CUDA enums) are the real values."""
    try:
        import cupy as real
        from cupy._core import _routines_linalg as real_lin
        from cupy_backends.cuda.api import runtime as real_runtime
        from cupy_backends.cuda.libs import cublas as real_cublas
    except Exception as e:                           # not installed, or broken
        pytest.skip(f"real CuPy not importable ({type(e).__name__}): the fake cannot be compared with it")
    from emulation import fake_cupy
    from nanogpt_np.kernels import precision
    problems = []
    used = used_cupy_names()
    assert "cuda.Event" in used and "empty" in used, used
    real_objs = {}                               # resolved before the fake replaces sys.modules["cupy"]
    for chain in used:
        try:
            real_objs[chain] = _resolve_chain(real, chain)
        except AttributeError:
            problems.append(f"cupy.{chain}: used by the project but not in CuPy {real.__version__}")
    real_classes = {key: getattr(getattr(real, key[0]), key[1]) for key in RETURNED}
    real_pool = real.cuda.MemoryPool
    fake = fake_cupy.install(monkeypatch)
    for chain, r in real_objs.items():
        if chain == "RawModule" or chain.startswith("_core") or chain.startswith("__"):
            continue                             # compile.py's path (the fake routes launches around it) / below
        try:
            f = _resolve_chain(fake, chain)
        except AttributeError:
            problems.append(f"cupy.{chain}: in CuPy, missing from the fake")
            continue
        if callable(r) and callable(f) and getattr(f, "__module__", "") == fake_cupy.__name__ and chain != "ndarray":
            # (ndarray: the project only tests isinstance; the fake's is a numpy subclass)
            ok = _fake_params_fit(f, r)
            if ok is not True and not ok[0]:
                problems.append(f"cupy.{chain}: fake parameters {ok[1][0]} are not a prefix of CuPy's {ok[1][1]}")
        if not callable(r) and not isinstance(r, type(real)) and r != f:
            problems.append(f"cupy.{chain}: CuPy has {r!r}, the fake {f!r}")
    fake_objs = {"Device": fake.cuda.Device(), "Event": fake.cuda.Event(), "Stream": fake.cuda.Stream(),
                 "MemoryPointer": fake.empty((4,), np.float32).data, "Graph": fake.cuda.Graph,
                 "Generator": fake.random.default_rng(0), "RandomState": fake.random.RandomState(0, method=161)}
    if _params(real_classes[("random", "RandomState")]) != ["seed", "method"]:
        problems.append(f"RandomState: CuPy's parameters are {_params(real_classes[('random', 'RandomState')])}")
    for (sub, cls), attrs in RETURNED.items():
        for a in attrs:
            if not hasattr(real_classes[(sub, cls)], a):
                problems.append(f"cupy.{sub}.{cls}.{a}: used by the project, not in CuPy")
            if not hasattr(fake_objs[cls], a):
                problems.append(f"cupy.{sub}.{cls}.{a}: in CuPy, missing from the fake")
    # methods of the arrays themselves: ndarray.set (adamw.step_scalars), MemoryPointer.memset_async's parameters
    if not hasattr(real.ndarray, "set"):
        problems.append("cupy.ndarray.set: used by the project, not in CuPy")
    for name, f_fn, r_fn in (("ndarray.set", fake.ndarray.set, getattr(real.ndarray, "set", None)),
                             ("MemoryPointer.memset_async", fake_cupy.MemoryPointer.memset_async,
                              getattr(real.cuda.MemoryPointer, "memset_async", None))):
        ok = _fake_params_fit(f_fn, r_fn) if r_fn is not None else True
        if ok is not True and not ok[0]:
            problems.append(f"cupy.{name}: fake parameters {ok[1][0]} are not a prefix of CuPy's {ok[1][1]}")
    # the capture check of CuPy's cuBLAS wrapper asks the runtime (fake_cupy._set_stream mirrors it)
    if not hasattr(real_runtime, "streamIsCapturing") or not hasattr(fake.cuda.runtime, "streamIsCapturing"):
        problems.append("runtime.streamIsCapturing: missing on one side")
    # Device().attributes keys are CUDA's cudaDevAttr* names without the prefix (CuPy's documented rule)
    for key in fake.cuda.Device().attributes:
        if not hasattr(real_runtime, "cudaDevAttr" + key):
            problems.append(f"Device().attributes[{key!r}]: CUDA has no cudaDevAttr{key}")
    for a in ("total_bytes", "free_all_blocks"):
        if not (hasattr(real_pool, a) and hasattr(fake.get_default_memory_pool(), a)):
            problems.append(f"memory pool .{a}: missing on one side")
    # the compute types: the fake's constants and signature are CuPy's
    for n, v in fake_cupy.LINALG_CONSTANTS.items():
        if getattr(real_lin, n, None) != v:
            problems.append(f"_routines_linalg.{n}: CuPy {getattr(real_lin, n, None)}, fake {v}")
    if _params(real_lin.set_compute_type) != ["dtype", "compute_type"]:
        problems.append(f"set_compute_type: CuPy's parameters are {_params(real_lin.set_compute_type)}")
    # precision.py's CUDA enums: CuPy's runtime module has them too
    for n in ("CUDA_R_32F", "CUDA_R_16BF"):
        if getattr(real_runtime, n) != getattr(precision, n):
            problems.append(f"{n}: CuPy {getattr(real_runtime, n)}, precision.py {getattr(precision, n)}")
    # RawModule: the keywords compile.module() passes exist
    raw_params = _params(real.RawModule)
    for kw in ("code", "options"):
        if raw_params is not None and kw not in raw_params:
            problems.append(f"RawModule has no keyword {kw!r}: {raw_params}")
    # cuBLAS (read in a subprocess; skipped quietly when it cannot be loaded without a GPU toolkit)
    cb = _real_cuda_libs()                # None: no gcc/nm to build the stand-ins, the cuBLAS checks are left out
    if cb is not None and "error" in cb:
        problems.append(f"reading CuPy's cublas/curand modules failed:\n{cb['error']}")
    elif cb is not None:
        from nanogpt_np import model
        if cb["curand_philox"] != model.CURAND_PHILOX4_32_10:
            problems.append(f"CURAND_RNG_PSEUDO_PHILOX4_32_10: CuPy {cb['curand_philox']}, model.py "
                            f"{model.CURAND_PHILOX4_32_10}")
        fake_cublas = sys.modules["cupy_backends.cuda.libs.cublas"]
        # CuPy's setStream (run by every cuBLAS wrapper, gemmEx included) refuses a capturing stream with this
        # message; the fake's does too (fake_cupy.CAPTURE_REFUSED). When CuPy drops it, --cuda_graph may too.
        if not cb.get("capture_refused"):
            problems.append("CuPy's cublas module no longer holds the capture refusal: update fake_cupy's setStream")
        for n, v in cb["constants"].items():          # the fake's and precision.py's copies of the enums
            mine = [getattr(m, n) for m in (fake_cublas, precision) if hasattr(m, n)]
            if not mine or any(x != v for x in mine):
                problems.append(f"cublas.{n}: CuPy {v}, ours {mine}")
        for n, doc in cb["docs"].items():   # cuBLAS functions the project calls
            m = re.match(r"\w+\((.*)\)", doc)
            real_params = [p.split()[-1] for p in m.group(1).split(",")] if m and m.group(1) else []
            fake_params = [p for p in inspect.signature(getattr(fake_cublas, n)).parameters]
            if real_params != fake_params:
                problems.append(f"cublas.{n}: CuPy ({', '.join(real_params)}), fake ({', '.join(fake_params)})")
    assert not problems, "\n".join(problems)


def test_fake_memset_async_and_set_behave_like_cupys(fake_cp):
    """MemoryPointer.memset_async(value, size) fills `size` bytes from the pointer (never past the allocation);
    ndarray.set copies a host numpy array of the same dtype and shape, and refuses anything else (as
    cupy/_core/core.pyx's set does)."""
    a = fake_cp.asarray(np.arange(1, 9, dtype=np.float32))
    a[2:].data.memset_async(0, 4 * 3)                       # 3 floats from element 2: bytes 0 are 0.0f
    assert np.asarray(a).tolist() == [1, 2, 0, 0, 0, 6, 7, 8]
    with pytest.raises(AssertionError, match="past the allocation"):
        a[6:].data.memset_async(0, 4 * 3)
    host = np.array([0.5, 0.25, 2.0], np.float32)
    b = fake_cp.empty((3,), fake_cp.float32)
    b.set(host)
    assert np.asarray(b).tolist() == host.tolist()
    with pytest.raises(TypeError):
        b.set(host.astype(np.float64))
    with pytest.raises(ValueError):
        b.set(host[:2])
    with pytest.raises(TypeError):
        b.set(b)                                            # a device array: CuPy's set takes host arrays only
