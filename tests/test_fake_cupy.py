"""The fake CuPy (tests/emulation/fake_cupy.py) held to real CuPy, and the host-side CuPy calls of the package.

The CPU tests of the GPU path run on the fake, so the fake must accept exactly what CuPy accepts: the same
function names, signatures and constants, and CuPy's kernel-argument rules (a device array passes its raw
pointer, whatever its strides; a host NumPy array passes its value when it has one element and is refused
otherwise). Where real CuPy is installed (it imports without a GPU), test_fake_matches_real_cupy compares the
two directly; without it that one test skips and the rest still pin the fake down to what CuPy 14 does.
"""
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
    N, C = 2048, 3072
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
