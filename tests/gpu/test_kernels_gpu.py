"""Every fused kernel against its NumPy reference, on fresh random inputs, on the GPU.

Shapes include sizes that are not multiples of any block or tile size; outputs come from NaN-poisoned memory
(an element a kernel never writes fails the finiteness check). float32 kernels must match the float64
reference to a norm-wise relative error below 1e-5; the bf16 flash attention to below 2e-2.
Kernels whose output feeds a matmul write bf16 bits when the matmuls run in bf16 (registry.bf16_activations());
they are run in both output dtypes (the act_dtype fixture), and a bf16 output must be the float64 reference
rounded to bf16: within half a bf16 ulp (2^-8 relative) of it, element by element (check_act).
"""
import importlib

import numpy as np
import pytest

from nanogpt_np.kernels import references, registry
from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16, round_to_bf16
attention_ops = importlib.import_module("nanogpt_np.ops.attention")
ce_ops = importlib.import_module("nanogpt_np.ops.cross_entropy")
emb_ops = importlib.import_module("nanogpt_np.ops.embedding")
gelu_ops = importlib.import_module("nanogpt_np.ops.gelu")
ln_ops = importlib.import_module("nanogpt_np.ops.layernorm")

from .helpers import f64, rel_err

TOL = 1e-5
rng = np.random.default_rng(1234)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_np(x):
    import cupy
    return cupy.asnumpy(x)


@pytest.fixture(params=["float32", "bfloat16"])
def act_dtype(request, monkeypatch):
    """Run a kernel test with float32 matmuls, then with bf16 ones (the producers then write bf16)."""
    monkeypatch.setattr(registry, "_precision", request.param)
    assert registry.bf16_activations() == (request.param == "bfloat16")
    return request.param


def check_act(got, ref, act_dtype, tol=TOL, scale=None):
    """An output that feeds a matmul against its float64 reference: float32 to a norm-wise `tol`; bf16 bits
    (uint16) element by element within half a bf16 ulp of the reference (2^-8 of |ref|, plus `tol` of its
    largest value for the kernel's own float32 rounding). A negative control goes with every bf16 check: the
    same bits put in the wrong half of a float32 (a bf16 array read as if it were float32 data) must fail.
    scale: what errors are measured against (rel_err's scale), max |ref| unless given."""
    got = to_np(got)
    if scale is None:
        scale = np.abs(ref).max() if ref.size else 0.0
    if act_dtype == "float32":
        assert got.dtype == np.float32
        assert rel_err(got, ref, scale=scale) < tol
        return
    assert got.dtype == np.uint16, got.dtype
    val = bf16_to_float32(got).astype(np.float64)
    assert np.isfinite(val).all(), "NaN/inf in the kernel output (an element was not written?)"
    bound = 2.0 ** -8 * np.abs(ref) + tol * scale
    assert (np.abs(val - ref) <= bound).all(), f"max excess {np.max(np.abs(val - ref) - bound)}"
    assert rel_err(val, ref, scale=scale) < 2.0 ** -8 + tol
    misread = got.astype(np.uint32).view(np.float32)            # bits in the low half: tiny denormals
    if np.abs(ref).max() > 0:
        assert rel_err(misread, ref) > 0.5


# ---------------------------------------------------------------------------------------------------- embedding

@pytest.mark.parametrize("B,T,V,C,Tmax", [(1, 1, 5, 4, 1), (2, 7, 11, 33, 9), (3, 65, 300, 768, 128), (8, 1024, 50257, 768, 1024)])
def test_embedding(cp, poison, B, T, V, C, Tmax):
    wte, wpe = randn(V, C), randn(Tmax, C)
    idx = rng.integers(0, min(V, 40), size=(B, T))          # few distinct ids: long runs of repeats
    fwd, bwd = registry.lookup("embedding")
    poison()
    out, saved = fwd(cp.asarray(wte), cp.asarray(wpe), cp.asarray(idx))
    ref, rsaved = emb_ops.embedding_forward(*f64(wte, wpe), idx)
    assert rel_err(to_np(out), ref) < TOL
    dout = randn(B, T, C)
    poison()
    dwte, dwpe = bwd(cp.asarray(dout), saved)
    rdwte, rdwpe = emb_ops.embedding_backward(dout.astype(np.float64), rsaved)
    assert rel_err(to_np(dwte), rdwte) < TOL
    assert rel_err(to_np(dwpe), rdwpe) < TOL
    dwte2, dwpe2 = bwd(cp.asarray(dout), saved)                 # deterministic: bit-identical on a rerun
    assert (to_np(dwte2) == to_np(dwte)).all() and (to_np(dwpe2) == to_np(dwpe)).all()
    # into gradient buffers (the model's case; wte's already holds the output head's part): added, not written;
    # wpe's rows t >= T keep what they held
    held_wte, held_wpe = randn(V, C), randn(Tmax, C)
    into_wte, into_wpe = cp.asarray(held_wte), cp.asarray(held_wpe)
    assert bwd(cp.asarray(dout), saved, dwte_into=into_wte, dwpe_into=into_wpe) == (None, None)
    assert rel_err(to_np(into_wte), held_wte + rdwte) < TOL
    assert rel_err(to_np(into_wpe), held_wpe + rdwpe) < TOL
    assert (to_np(into_wpe)[T:] == held_wpe[T:]).all()
    # into FRESH gradient buffers (a step's first write, nanogpt_np/tensor.py FreshGradBuffers; NaN = stale bytes):
    # wpe's kernel writes every row (zeros past T), wte's buffer is zeroed before the scatter-add: the sums alone
    from nanogpt_np.tensor import fresh_grads
    fresh_wte, fresh_wpe = cp.full((V, C), np.nan, dtype=cp.float32), cp.full((Tmax, C), np.nan, dtype=cp.float32)
    fresh_grads.mark([fresh_wte, fresh_wpe])
    assert bwd(cp.asarray(dout), saved, dwte_into=fresh_wte, dwpe_into=fresh_wpe) == (None, None)
    assert not fresh_grads.is_fresh(fresh_wte) and not fresh_grads.is_fresh(fresh_wpe)
    assert (to_np(fresh_wte) == to_np(dwte)).all() and (to_np(fresh_wpe) == to_np(dwpe)).all()


# ---------------------------------------------------------------------------------------------------- layernorm

LN_SHAPES = [(1, 1), (7, 33), (64, 768), (1000, 1600), (4097, 768), (3, 6144)]


@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm(cp, poison, act_dtype, N, C):
    x, w, b = randn(N, C, scale=3) + 1.0, randn(C), randn(C)
    fwd, bwd = registry.lookup("layernorm")
    poison()
    y, saved = fwd(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
    ry, rsaved = ln_ops.layernorm_forward(*f64(x, w, b), 1e-5)
    check_act(y, ry, act_dtype)
    dy = randn(N, C)
    poison()
    dx, dw, db = bwd(cp.asarray(dy), saved)
    rdx, rdw, rdb = ln_ops.layernorm_backward(dy.astype(np.float64), rsaved)
    assert rel_err(to_np(dx), rdx) < TOL
    assert rel_err(to_np(dw), rdw) < TOL
    assert rel_err(to_np(db), rdb) < TOL
    # the *_into contract: dw, db added into buffers that already hold something (docs/CONTRACTS.md)
    held_w, held_b = randn(C), randn(C)
    dw_into, db_into = cp.asarray(held_w), cp.asarray(held_b)
    dx2, dw2, db2 = bwd(cp.asarray(dy), saved, dw_into=dw_into, db_into=db_into)
    assert dw2 is None and db2 is None
    assert (to_np(dx2) == to_np(dx)).all()
    assert rel_err(to_np(dw_into), held_w + rdw) < TOL and rel_err(to_np(db_into), held_b + rdb) < TOL
    # dy as bf16 bits (a bf16 matmul's bf16_dx): the same results as for that dy in float32
    dy16 = round_to_bf16(dy)
    poison()
    dx3, dw3, db3 = bwd(cp.asarray(float32_to_bf16(dy16)), saved)
    rdx, rdw, rdb = ln_ops.layernorm_backward(dy16.astype(np.float64), rsaved)
    assert to_np(dx3).dtype == np.float32
    assert rel_err(to_np(dx3), rdx) < TOL and rel_err(to_np(dw3), rdw) < TOL and rel_err(to_np(db3), rdb) < TOL


def on_grid(*shape):
    """Random values on a grid (multiples of 2^-10, |v| < 8: at most 13 significant bits): sums of three of them
    are exact in float32, so the GPU's float32 x + r + rb equals the float64 reference's, and rounding either to
    bf16 gives the same bits. Every such value is also exactly a bf16 value below 2^-2 in size, and a bf16 value
    rounded from it above (round_to_bf16 keeps the grid), so the same inputs serve as bf16 bits."""
    return np.clip(np.round(rng.standard_normal(shape) * 1024) / 1024, -7.9, 7.9).astype(np.float32)


def bf16_mismatch(got, ref, within_a_step=True):
    """Fraction of the bf16 bits `got` that are not `ref` (float64) rounded to nearest even; with within_a_step
    every element must be within one bf16 step of that rounding (plus TOL of the largest |ref|, for the kernel's
    own float32 rounding where terms cancel). A value stored after ONE rounding of the kernel's float32 result
    differs from the rounded float64 reference only where the two straddle a rounding midpoint (a fraction of
    ~1e-3 or less); a second rounding, or a rounding of the wrong value, moves a large fraction."""
    got = to_np(got)
    assert got.dtype == np.uint16, got.dtype
    want = float32_to_bf16(ref.astype(np.float32))
    val, wval = bf16_to_float32(got).astype(np.float64), bf16_to_float32(want).astype(np.float64)
    assert np.isfinite(val).all(), "NaN/inf in the kernel output (an element was not written?)"
    step = np.maximum(np.abs(wval), np.abs(ref)) * 2.0 ** -7 + TOL * np.abs(ref).max()  # a bf16 step (or more)
    assert not within_a_step or (np.abs(val - wval) <= step).all(), "more than one bf16 step off the reference"
    return float(np.mean(got != want))


ROUNDED_ONCE = 2e-3     # bf16_mismatch of an output rounded once from float32 math (measured: <= 6e-5)


@pytest.mark.parametrize("N,C", LN_SHAPES)
@pytest.mark.parametrize("with_dh,with_rb,into", [(True, True, True), (True, True, False), (False, False, False)])
def test_residual_layernorm(cp, poison, act_dtype, N, C, with_dh, with_rb, into):
    """x float32 (the first block's stream: the embedding's output), r float32. into: dw, db, drb are added into
    buffers that already hold something (the model's flat gradient buffer), and dresidual is asked for in bf16
    (bf16_dr, as the model asks for c_proj): bf16 bits when the matmuls run in bf16, exactly dx rounded to nearest
    even; the float32 dx itself otherwise. With bf16 activations h is stored as bf16 bits, rounded once (exact
    bits here: inputs on_grid), y normalises that rounded h, and dh arrives as bf16 bits (the next block's dx)."""
    bf16 = act_dtype == "bfloat16"
    x, r, w, b = on_grid(N, C), on_grid(N, C), randn(C), randn(C)
    rb = on_grid(C) if with_rb else None                    # the bias of the matmul that made r
    fwd, bwd = registry.lookup("residual_layernorm")
    poison()
    (h, y), saved = fwd(cp.asarray(x), cp.asarray(r), None if rb is None else cp.asarray(rb), cp.asarray(w),
                        cp.asarray(b), 1e-5)
    (rh, ry), rsaved = references.residual_layernorm_forward(*f64(x, r), None if rb is None else f64(rb)[0],
                                                             *f64(w, b), 1e-5, round_h=round_to_bf16 if bf16 else None)
    if bf16:                                                # the stream in bf16: x + r + rb rounded once
        assert to_np(h).dtype == np.uint16 and (to_np(h) == float32_to_bf16(rh)).all()
    else:
        assert to_np(h).dtype == np.float32 and rel_err(to_np(h), rh) < TOL
    check_act(y, ry, act_dtype)
    dh, dy = (on_grid(N, C) if with_dh else None), randn(N, C)
    if bf16 and dh is not None:
        dh = round_to_bf16(dh)                              # the gradient of a bf16 h is bf16 bits
    held = [randn(C) for _ in range(3)] if into else [0.0] * 3
    intos = dict(dw_into=cp.asarray(held[0]), db_into=cp.asarray(held[1]),
                 drb_into=cp.asarray(held[2]) if with_rb else None, bf16_dr=True) if into else {}
    poison()
    dh_in = None if dh is None else cp.asarray(float32_to_bf16(dh) if bf16 else dh)
    dx, dres, drb, dw, db = bwd((dh_in, cp.asarray(dy)), saved, **intos)
    rdx, _, rdrb, rdw, rdb = references.residual_layernorm_backward(
        (None if dh is None else dh.astype(np.float64), dy.astype(np.float64)), rsaved)
    assert to_np(dx).dtype == np.float32 and rel_err(to_np(dx), rdx) < TOL    # x float32: dx float32
    if into:
        assert dw is None and db is None and (drb is None)
        dw, db, drb = intos["dw_into"], intos["db_into"], intos["drb_into"]
    assert rel_err(to_np(dw) - held[0], rdw) < TOL and rel_err(to_np(db) - held[1], rdb) < TOL
    if rb is not None:
        assert rel_err(to_np(drb) - held[2], rdrb) < TOL
    else:
        assert drb is None
    if into and bf16:                                       # the bf16 copy: dx's own float32 values, rounded
        assert dres is not dx and (to_np(dres) == float32_to_bf16(to_np(dx))).all()
        check_act(dres, rdx, act_dtype)
    else:
        assert dres is dx


@pytest.mark.parametrize("N,C", [(1, 1), (7, 33), (4097, 768)])
def test_residual_layernorm_bf16_residual(cp, poison, act_dtype, N, C):
    """The residual as bf16 bits (a bf16 matmul's bf16_out) and x float32 (the first block's ln_2): the same
    results as for those values in float32; in bf16 precision h is rounded once to bf16 and dh arrives as bf16."""
    bf16 = act_dtype == "bfloat16"
    x, r, rb, w, b, dh, dy = on_grid(N, C), round_to_bf16(on_grid(N, C)), on_grid(C), randn(C), randn(C), \
        randn(N, C), randn(N, C)
    dh = round_to_bf16(dh) if bf16 else dh
    fwd, bwd = registry.lookup("residual_layernorm")
    poison()
    (h, y), saved = fwd(cp.asarray(x), cp.asarray(float32_to_bf16(r)), *(cp.asarray(a) for a in (rb, w, b)), 1e-5)
    (rh, ry), rsaved = references.residual_layernorm_forward(*f64(x, r, rb, w, b), 1e-5,
                                                             round_h=round_to_bf16 if bf16 else None)
    if bf16:
        assert to_np(h).dtype == np.uint16 and (to_np(h) == float32_to_bf16(rh)).all()
    else:
        assert to_np(h).dtype == np.float32 and rel_err(to_np(h), rh) < TOL
    check_act(y, ry, act_dtype)
    poison()
    dx, _, drb, dw, db = bwd((cp.asarray(float32_to_bf16(dh) if bf16 else dh), cp.asarray(dy)), saved)
    rdx, _, rdrb, rdw, rdb = references.residual_layernorm_backward((dh.astype(np.float64), dy.astype(np.float64)),
                                                                    rsaved)
    assert to_np(dx).dtype == np.float32                    # x float32: dx float32
    for got, want in ((dx, rdx), (drb, rdrb), (dw, rdw), (db, rdb)):
        assert rel_err(to_np(got), want) < TOL


@pytest.mark.parametrize("N,C", [(1, 1), (7, 33), (64, 768), (300, 768)])
@pytest.mark.parametrize("r_from", ["matmul", "dropout"])
def test_residual_layernorm_bf16_stream(cp, poison, N, C, r_from, monkeypatch):
    """The residual stream in bf16 (registry.bf16_activations()), as every block boundary but the first has it:
    x is the previous block's h (bf16 bits), r a bf16 matmul's output (bf16_dr: its gradient goes back as bf16),
    or with dropout a float32 r whose gradient stays float32. h = x + r + rb is rounded ONCE to bf16 (exact bits:
    inputs on_grid) and y is the layernorm of the rounded h; the backward's dx = dh + d layernorm(dy), float32
    math, is stored ONCE as bf16 (dx's dtype follows x) and is then also dr (no copy) when r wants bf16.
    Negative controls: the references without the rounding of h, or rounding dx twice, are told apart
    (measured: ~20% of the bits differ, against <= 6e-5 for the kernel and the right reference)."""
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    bf16_r = r_from == "matmul"
    x, r, rb, w, b = on_grid(N, C), on_grid(N, C), on_grid(C), randn(C), randn(C)
    x = round_to_bf16(x)                                    # still on the grid (on_grid's docstring)
    if bf16_r:
        r = round_to_bf16(r)
    fwd, bwd = registry.lookup("residual_layernorm")
    poison()
    (h, y), saved = fwd(cp.asarray(float32_to_bf16(x)), cp.asarray(float32_to_bf16(r) if bf16_r else r),
                        cp.asarray(rb), cp.asarray(w), cp.asarray(b), 1e-5)
    (rh, ry), rsaved = references.residual_layernorm_forward(*f64(x, r, rb, w, b), 1e-5, round_h=round_to_bf16)
    assert to_np(h).dtype == np.uint16
    assert (to_np(h) == float32_to_bf16(rh)).all()          # x + r + rb rounded once (to nearest even)
    mismatch_y = bf16_mismatch(y, ry)
    assert mismatch_y <= ROUNDED_ONCE, mismatch_y
    dh, dy = round_to_bf16(randn(N, C)), round_to_bf16(randn(N, C))
    held = [randn(C) for _ in range(3)]
    into = [cp.asarray(a) for a in held]
    poison()
    dx, dres, drb, dw, db = bwd((cp.asarray(float32_to_bf16(dh)), cp.asarray(float32_to_bf16(dy))), saved,
                                dw_into=into[0], db_into=into[1], drb_into=into[2], bf16_dr=bf16_r)
    assert (drb, dw, db) == (None, None, None)
    rdx, _, rdrb, rdw, rdb = references.residual_layernorm_backward((f64(dh)[0], f64(dy)[0]), rsaved)
    for got, held_, want in zip(into, held, (rdw, rdb, rdrb)):
        assert rel_err(to_np(got) - held_, want) < TOL      # drb: the column sum of the unrounded dx
    mismatch_dx = bf16_mismatch(dx, rdx)                    # x bf16: dx is bf16 bits, rounded once
    assert mismatch_dx <= ROUNDED_ONCE, mismatch_dx
    if bf16_r:
        assert dres is dx                                   # one bf16 array: the stream's gradient and c_proj's dy
    else:                                                   # dropout's float32 r: a float32 dr in the same pass
        assert to_np(dres).dtype == np.float32 and rel_err(to_np(dres), rdx) < TOL
        assert (float32_to_bf16(to_np(dres)) == to_np(dx)).all()
    if N * C >= 1000:                                       # negative controls (enough elements to tell)
        (_, ry_unrounded), _ = references.residual_layernorm_forward(*f64(x, r, rb, w, b), 1e-5)
        assert bf16_mismatch(y, ry_unrounded, within_a_step=False) > 10 * ROUNDED_ONCE   # y of the unrounded h
        ln_part = rdx - f64(dh)[0]                          # the layernorm's part rounded before the add
        twice = round_to_bf16(f64(dh)[0] + round_to_bf16(ln_part)).astype(np.float64)
        assert np.mean(float32_to_bf16(twice) != to_np(dx)) > 10 * ROUNDED_ONCE


@pytest.mark.parametrize("N,C", [(1, 1), (7, 33), (4097, 768)])
def test_residual_layernorm_without_residual(cp, poison, act_dtype, N, C):
    """residual None (the first block's ln_1): h is x itself, y = layernorm(x); the backward adds dh. With bf16
    activations the stream starts here: h is the float32 x rounded to bf16 (y its layernorm), dh arrives as bf16
    bits, and dx stays float32 (x's dtype: the embedding's output). A bf16 x is passed through as it is."""
    bf16 = act_dtype == "bfloat16"
    x, w, b, dh, dy = randn(N, C), randn(C), randn(C), randn(N, C), randn(N, C)
    dh = round_to_bf16(dh) if bf16 else dh
    fwd, bwd = registry.lookup("residual_layernorm")
    xd = cp.asarray(x)
    poison()
    (h, y), saved = fwd(xd, None, None, cp.asarray(w), cp.asarray(b), 1e-5)
    (rh, ry), rsaved = references.residual_layernorm_forward(f64(x)[0], None, None, *f64(w, b), 1e-5,
                                                             round_h=round_to_bf16 if bf16 else None)
    rdx_of = lambda saved: references.residual_layernorm_backward((dh.astype(np.float64), dy.astype(np.float64)),
                                                                  saved)[0]
    if bf16:
        assert to_np(h).dtype == np.uint16 and (to_np(h) == float32_to_bf16(x)).all()
        xb = cp.asarray(float32_to_bf16(x))                 # already bf16: passed through, not copied, and
        (hb, _), saved_b = fwd(xb, None, None, cp.asarray(w), cp.asarray(b), 1e-5)     # its dx is bf16 bits
        assert hb is xb
        dxb, dresb, _, _, _ = bwd((cp.asarray(float32_to_bf16(dh)), cp.asarray(dy)), saved_b)
        assert dresb is dxb and bf16_mismatch(dxb, rdx_of(rsaved)) <= (ROUNDED_ONCE if N * C > 1 else 0)
    else:
        assert h is xd
    check_act(y, ry, act_dtype)
    poison()
    dx, dres, drb, dw, db = bwd((cp.asarray(float32_to_bf16(dh) if bf16 else dh), cp.asarray(dy)), saved)
    rdx, _, _, rdw, rdb = references.residual_layernorm_backward((dh.astype(np.float64), dy.astype(np.float64)),
                                                                 rsaved)
    assert dres is dx and drb is None and to_np(dx).dtype == np.float32
    assert rel_err(to_np(dx), rdx) < TOL and rel_err(to_np(dw), rdw) < TOL and rel_err(to_np(db), rdb) < TOL


# --------------------------------------------------------------------------------------------------------- gelu

def _gelu_scale(ref, dy=None):
    """GELU's float32 form 0.5 a (1 + tanh u) cancels where tanh u -> -1 (a << 0, y -> -0), and so does its
    derivative: there the kernel is accurate to ~1e-7 absolute (times |dy| backward) but not relative, which
    decides a test of a few elements. So errors are measured against max(|ref|, 1) forward and max(|ref|, |dy|)
    backward."""
    return max(float(np.abs(ref).max()), 1.0 if dy is None else float(np.abs(dy).max()))


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (17, 30), (1000, 3072), (8, 1024, 3072)])
def test_gelu(cp, poison, act_dtype, shape):
    x = randn(*shape, scale=3)
    fwd, bwd = registry.lookup("gelu")
    poison()
    y, saved = fwd(cp.asarray(x))
    ry, rsaved = gelu_ops.gelu_forward(x.astype(np.float64))
    check_act(y, ry, act_dtype, scale=_gelu_scale(ry))
    dy = randn(*shape)
    poison()
    (dx,) = bwd(cp.asarray(dy), saved)
    (rdx,) = gelu_ops.gelu_backward(dy.astype(np.float64), rsaved)
    assert rel_err(to_np(dx), rdx, scale=_gelu_scale(rdx, dy)) < TOL


def _check_db(cp, db, db_into, before, rdb, scale):
    """db returned (db_into None), or added into db_into, which held `before` (the *_into contract)."""
    if db_into is None:
        assert rel_err(to_np(db), rdb, scale=scale) < TOL
        return
    assert db is None, "a gradient added into its buffer must not be returned as well"
    assert rel_err(to_np(db_into), before + rdb, scale=scale) < TOL


@pytest.mark.parametrize("into", [False, True], ids=["db", "db_into"])
@pytest.mark.parametrize("N,C", [(1, 1), (5, 7), (17, 30), (1000, 3072), (8193, 3072)])
def test_bias_gelu(cp, poison, act_dtype, N, C, into):
    x, b = randn(N, C, scale=2), randn(C)
    fwd, bwd = registry.lookup("bias_gelu")
    poison()
    y, saved = fwd(cp.asarray(x), cp.asarray(b))
    ry, rsaved = references.bias_gelu_forward(*f64(x, b))
    check_act(y, ry, act_dtype, scale=_gelu_scale(ry))
    dy, before = randn(N, C), randn(C)
    db_into = cp.asarray(before) if into else None
    poison()
    dx, db = bwd(cp.asarray(dy), saved, db_into=db_into)
    rdx, rdb = references.bias_gelu_backward(dy.astype(np.float64), rsaved)
    check_act(dx, rdx, act_dtype, scale=_gelu_scale(rdx, dy))   # dx feeds c_fc's backward matmul
    _check_db(cp, db, db_into, before, rdb, _gelu_scale(rdb, dy))  # db: summed in float32, before rounding


@pytest.mark.parametrize("into", [False, True], ids=["db", "db_into"])
@pytest.mark.parametrize("N,C", [(1, 1), (3, 5), (5, 7), (17, 30), (9, 64), (1000, 3072), (8193, 3072)])
def test_bias_gelu_bf16_inputs(cp, poison, monkeypatch, N, C, into):
    """bf16 precision as the model runs it: x arrives as bf16 bits (c_fc's gemm, bf16_out) and dy too
    (mlp.c_proj's gemm, bf16_dx). The kernels read the bits (gelu_forward_bf16x[4], bias_gelu_backward_bf16):
    the reference is the float64 GELU of the exactly widened inputs, y and dx rounded once (check_act), db
    from the unrounded d. Odd C takes the one-element forward kernel, C % 4 == 0 the 4-wide one."""
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    x_bits, b, dy_bits = float32_to_bf16(randn(N, C, scale=2)), randn(C), float32_to_bf16(randn(N, C))
    xw, dyw = bf16_to_float32(x_bits), bf16_to_float32(dy_bits)
    fwd, bwd = registry.lookup("bias_gelu")
    poison()
    y, saved = fwd(cp.asarray(x_bits), cp.asarray(b))
    ry, rsaved = references.bias_gelu_forward(*f64(xw, b))
    check_act(y, ry, "bfloat16", scale=_gelu_scale(ry))
    before = randn(C)
    db_into = cp.asarray(before) if into else None
    poison()
    dx, db = bwd(cp.asarray(dy_bits), saved, db_into=db_into)
    rdx, rdb = references.bias_gelu_backward(dyw.astype(np.float64), rsaved)
    check_act(dx, rdx, "bfloat16", scale=_gelu_scale(rdx, dyw))
    _check_db(cp, db, db_into, before, rdb, _gelu_scale(rdb, dyw))
    with pytest.raises(AssertionError):      # negative control: the same check sees a bias left out
        check_act(y, references.bias_gelu_forward(*f64(xw, 0 * b))[0], "bfloat16", scale=_gelu_scale(ry))


# -------------------------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("N,V", [(1, 2), (5, 11), (300, 1000), (64, 50257), (1025, 8193)])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy(cp, poison, N, V, inplace):
    from nanogpt_np.kernels import cross_entropy as ce
    logits = randn(N, V, scale=4)
    targets = rng.integers(0, V, size=N)
    if N > 1:
        targets[rng.random(N) < 0.3] = -1                       # masked rows
        targets[0] = 0
    fwd, bwd = registry.lookup("cross_entropy")
    ce.set_inplace(inplace)
    try:
        poison()
        g_logits = cp.asarray(logits)
        loss, saved = fwd(g_logits, cp.asarray(targets), -1)
        rloss, rsaved = ce_ops.cross_entropy_forward(logits.astype(np.float64), targets, -1)
        assert abs(float(loss) - float(rloss)) / abs(float(rloss)) < TOL
        (dlogits,) = bwd(cp.ones((), dtype=cp.float32), saved)
        (rd,) = ce_ops.cross_entropy_backward(np.float64(1.0), rsaved)
        assert rel_err(to_np(dlogits), rd) < TOL
        if inplace:
            assert dlogits.data.ptr == g_logits.data.ptr
        # a d loss that is not 1, on the device and as a Python number
        loss, saved = fwd(cp.asarray(logits), cp.asarray(targets), -1)
        (d2,) = bwd(cp.asarray(2.5, dtype=cp.float32), saved)
        assert rel_err(to_np(d2), 2.5 * rd) < TOL
        loss, saved = fwd(cp.asarray(logits), cp.asarray(targets), -1)
        (d3,) = bwd(0.5, saved)
        assert rel_err(to_np(d3), 0.5 * rd) < TOL
    finally:
        ce.set_inplace(False)


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_confident_rows(cp, poison, inplace):
    """Rows whose target beats every other logit by 8 to 16: losses of 1e-7 .. 1e-3 and gradients as small.
    float32 holds the sum of exponentials (next to 1) to ~1e-7 only, so log(sum) and p_y - 1 computed from it
    lose most digits; the kernel keeps sum - 1 apart (log1p, expm1) and must stay within TOL of float64."""
    from nanogpt_np.kernels import cross_entropy as ce
    N, V = 37, 300
    gen = np.random.default_rng()
    logits = gen.standard_normal((N, V)).astype(np.float32)
    targets = logits.argmax(1)
    logits[np.arange(N), targets] += gen.uniform(8.0, 16.0, size=N).astype(np.float32)
    fwd, bwd = registry.lookup("cross_entropy")
    ce.set_inplace(inplace)
    try:
        poison()
        loss, saved = fwd(cp.asarray(logits), cp.asarray(targets), -1)
        rloss, rsaved = ce_ops.cross_entropy_forward(logits.astype(np.float64), targets, -1)
        assert abs(float(loss) - float(rloss)) / abs(float(rloss)) < TOL
        (dlogits,) = bwd(cp.ones((), dtype=cp.float32), saved)
        (rd,) = ce_ops.cross_entropy_backward(np.float64(1.0), rsaved)
        assert rel_err(to_np(dlogits), rd) < TOL
    finally:
        ce.set_inplace(False)


def test_cross_entropy_edge_cases(cp, poison):
    """Large logits with a small loss (lse - z[y] cancelled there), -inf as the first element every thread reads
    (NaN from exp(-inf - -inf)), and an out-of-range target (NaN loss and gradient row, nothing read outside)."""
    N, V = 8, 3000
    logits = randn(N, V) + 100.0
    targets = logits.argmax(1)
    logits[np.arange(N), targets] += 4.0                       # confident: loss ~ 1e-2..1e-1, lse ~ 104
    logits[:, :1024] = -np.inf                                 # each of the 256 or 1024 threads starts on -inf
    logits[np.arange(N), targets] = np.maximum(logits[np.arange(N), targets], 104.0)
    fwd, bwd = registry.lookup("cross_entropy")
    poison()
    loss, saved = fwd(cp.asarray(logits), cp.asarray(targets), -1)
    rloss, rsaved = ce_ops.cross_entropy_forward(logits.astype(np.float64), targets, -1)
    assert abs(float(loss) - float(rloss)) / abs(float(rloss)) < TOL
    (d,) = bwd(1.0, saved)
    assert rel_err(to_np(d), ce_ops.cross_entropy_backward(np.float64(1.0), rsaved)[0]) < TOL
    bad = targets.copy()
    bad[2] = V + 7
    loss, saved = fwd(cp.asarray(logits), cp.asarray(bad), -1)
    assert np.isnan(float(loss))
    (d,) = bwd(1.0, saved)
    d = to_np(d)
    assert np.isnan(d[2]).all() and np.isfinite(np.delete(d, 2, axis=0)).all()


@pytest.mark.parametrize("N,V", [(1, 3), (7, 31), (37, 1001), (5, 8193)])    # 8193: the 1024-thread blocks
@pytest.mark.parametrize("inplace", [True, False])
def test_cross_entropy_fused_bf16(cp, poison, N, V, inplace):
    """The bf16 kernel of the chunked output layer, launched as kernels/lm_head_loss.py launches it: bf16 logits
    (as the bf16 gemm writes them) in, float32 row losses and the bf16 gradient out, over the logits in place (as
    lm_head_loss runs it) or into a buffer of its own; ignored rows (ignore_index) and a rows * V that no block
    size divides. Widening bf16 is exact, so the float64 reference on the same values is the whole meaning: the
    losses within TOL, the gradient rounded once (check_act: within half a bf16 ulp of each element)."""
    from nanogpt_np.kernels.compile import launch
    ignore = -100
    bits = float32_to_bf16(randn(N, V, scale=3))                       # (N, V) bf16 logits
    targets = rng.integers(0, V, size=N)
    targets[rng.random(N) < 0.3] = ignore
    targets[0] = V - 1                                                 # at least one kept row
    kept = targets != ignore
    n_kept = kept.sum()
    z = bf16_to_float32(bits).astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    rows, ys = np.arange(N), np.where(kept, targets, 0)
    ref_losses = np.where(kept, lse - z[rows, ys], 0.0)                  # (N,)
    ref_d = np.exp(z - lse[:, None])
    ref_d[rows, ys] -= 1.0
    ref_d *= (kept / n_kept)[:, None]                                   # 0 for ignored rows
    poison()
    logits = cp.asarray(bits)
    losses = cp.empty((N,), dtype=cp.float32)
    d = logits if inplace else cp.empty((N, V), dtype=cp.uint16)
    launch("cross_entropy", "cross_entropy_fused_bf16", (N,), (1024 if V >= 8192 else 256,),
           (losses, d, logits, cp.asarray(targets), cp.asarray(np.float32(n_kept)), np.int32(V), np.int64(ignore)))
    assert rel_err(to_np(losses), ref_losses) < TOL
    assert (to_np(losses)[~kept] == 0).all()
    check_act(d, ref_d, "bfloat16")
    assert (to_np(d)[~kept] == 0).all()                                # +0.0 bits: nothing left of the logits
    if not inplace:
        assert (to_np(logits) == bits).all()                           # the logits only read


# --------------------------------------------------------------------------------------------------------- AdamW

@pytest.mark.parametrize("n,n_decay", [(1, 1), (1000, 0), (1000, 999), (1_000_003, 700_001)])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adamw(cp, n, n_decay, clip):
    from nanogpt_np.kernels import adamw
    p, g = randn(n), randn(n, scale=0.5)
    m, v = randn(n, scale=0.01), np.abs(randn(n, scale=0.01))
    kw = dict(n_decay=n_decay, lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7, grad_clip=clip)
    gp, gg, gm, gv = (cp.asarray(a) for a in (p, g, m, v))
    bf = cp.empty((n,), dtype=cp.uint16)
    ns = adamw.adamw_step(gp, gg, gm, gv, params_bf16=bf, **kw)
    P, M, V = f64(p, m, v)
    rns = references.adamw_flat_reference(P, g.astype(np.float64), M, V, **kw)
    assert abs(float(ns[0]) - rns[0]) / rns[0] < TOL
    assert abs(float(ns[1]) - rns[1]) < TOL
    assert rel_err(to_np(gp), P) < TOL and rel_err(to_np(gv), V) < TOL
    # m = 0.9 m + 0.1 g (g clipped) may cancel to far below its terms (n = 1 drew m = 0.01, 0.1 g = -0.0098 once):
    # float32 rounds each term, so the error is relative to the terms' size, not to the small result
    terms = max(np.abs(0.9 * m).max(), np.abs(0.1 * g).max())
    assert np.abs(to_np(gm) - M).max() / terms < TOL
    np.testing.assert_array_equal(to_np(bf), float32_to_bf16(to_np(gp)))
    np.testing.assert_array_equal(to_np(gg), g)                  # the gradient buffer is not modified


def test_global_norm_deterministic(cp):
    from nanogpt_np.kernels import adamw
    g = cp.asarray(randn(5_000_001))
    a = to_np(adamw.global_grad_norm(g, 1.0))
    b = to_np(adamw.global_grad_norm(g, 1.0))
    assert (a == b).all()
    assert abs(a[0] - np.sqrt((to_np(g).astype(np.float64) ** 2).sum())) / a[0] < TOL


# ---------------------------------------------------------------------------------------------------- attention

ATT_SHAPES = [(1, 1, 16, 1), (2, 17, 48, 3), (1, 64, 128, 2), (2, 130, 256, 4), (1, 257, 768, 12)]


@pytest.mark.parametrize("B,T,C,NH", ATT_SHAPES)
def test_attention_matmul(cp, poison, B, T, C, NH):
    qkv = randn(B, T, 3 * C)
    fwd, bwd = registry.lookup("attention_matmul")
    poison()
    out, saved = fwd(cp.asarray(qkv), NH)
    rout, rsaved = attention_ops.attention_forward(qkv.astype(np.float64), NH)
    assert rel_err(to_np(out), rout) < TOL
    dout = randn(B, T, C)
    poison()
    (dqkv,) = bwd(cp.asarray(dout), saved)
    (rdqkv,) = attention_ops.attention_backward(dout.astype(np.float64), rsaved)
    assert rel_err(to_np(dqkv), rdqkv) < TOL


# T around the 64-row tiles and the 128-row query blocks (a block spans two key tiles on its diagonal)
FLASH_SHAPES = [(1, 1, 64, 1), (2, 100, 128, 2), (1, 63, 128, 2), (1, 64, 64, 1), (1, 65, 192, 3), (1, 127, 128, 2),
                (1, 128, 64, 1), (2, 129, 128, 2), (1, 130, 192, 3), (1, 257, 768, 12), (2, 1024, 768, 12)]


def _as_f32(a, act_dtype):
    """A kernel output as float32 values: bf16 bits (uint16) with bf16 activations, float32 otherwise."""
    a = to_np(a)
    assert a.dtype == (np.uint16 if act_dtype == "bfloat16" else np.float32), a.dtype
    return bf16_to_float32(a) if a.dtype == np.uint16 else a


@pytest.mark.parametrize("B,T,C,NH", FLASH_SHAPES)
def test_attention_flash(cp, poison, act_dtype, B, T, C, NH):
    """bf16 tensor cores: compared with the float64 reference on the same bf16-rounded inputs. The output
    is bf16 with bf16 activations (the backward then reads that bf16 O); dqkv stays float32 in this op."""
    qkv = round_to_bf16(randn(B, T, 3 * C))
    fwd, bwd = registry.lookup("attention_flash")
    poison()
    out, saved = fwd(cp.asarray(qkv), NH)
    assert saved[0] is True and saved[1][0] == "flash"          # (kernel used, (variant, state))
    rout, rsaved = attention_ops.attention_forward(qkv.astype(np.float64), NH)
    assert rel_err(_as_f32(out, act_dtype), rout) < 2e-2
    if act_dtype == "bfloat16":                                 # negative control: bf16 bits misread
        assert rel_err(to_np(out).astype(np.uint32).view(np.float32), rout) > 0.5
    dout = randn(B, T, C)
    poison()
    (dqkv,) = bwd(cp.asarray(dout), saved)
    assert to_np(dqkv).dtype == np.float32
    (rdqkv,) = attention_ops.attention_backward(dout.astype(np.float64), rsaved)
    C_ = C
    overall = np.abs(rdqkv).max()                               # dq, dk are exactly 0 when T = 1
    for i, part in enumerate("qkv"):
        r = rdqkv[..., i * C_:(i + 1) * C_]
        e = rel_err(to_np(dqkv)[..., i * C_:(i + 1) * C_], r, scale=np.abs(r).max() or overall)
        assert e < 2e-2, f"d{part}: relative error {e}"


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 64, 1), (2, 100, 128, 2), (1, 130, 768, 12)])
def test_bias_attention_flash(cp, poison, act_dtype, B, T, C, NH):
    """attention(x + b) for a float32 x: qkv_to_bf16 adds the bias while it rounds x + b to bf16; with bf16
    activations out and dx are bf16 bits and db is summed (float32) from those bits (by the backward kernels,
    per 64-row tile). x + b is exactly a bf16 value, so the reference sees what the kernels read."""
    b = round_to_bf16(randn(3 * C))
    x = (round_to_bf16(randn(B, T, 3 * C) + b) - b).astype(np.float32)     # x + b exact in float32 and bf16
    fwd, bwd = registry.lookup("bias_attention_flash")
    poison()
    out, saved = fwd(cp.asarray(x), cp.asarray(b), NH)
    assert saved[1][0] == "flash"
    rout, rsaved = attention_ops.bias_attention_forward(*f64(x, b), NH)
    assert rel_err(_as_f32(out, act_dtype), rout) < 2e-2
    dout = randn(B, T, C)
    poison()
    dx, db = bwd(cp.asarray(dout), saved)
    rdx, rdb = attention_ops.bias_attention_backward(dout.astype(np.float64), rsaved)
    got = _as_f32(dx, act_dtype)
    overall = np.abs(rdx).max()
    for i, part in enumerate("qkv"):
        r = rdx[..., i * C:(i + 1) * C]
        e = rel_err(got[..., i * C:(i + 1) * C], r, scale=np.abs(r).max() or overall)
        assert e < 2e-2, f"d{part}: relative error {e}"
    assert to_np(db).dtype == np.float32
    assert rel_err(to_np(db), rdb, scale=np.abs(rdb).max() or overall) < 2e-2
    # db is the column sum of the dx the kernels wrote (bf16 or float32), to float32 rounding
    assert rel_err(to_np(db), got.reshape(-1, 3 * C).astype(np.float64).sum(0), scale=overall) < 1e-5
    if act_dtype == "bfloat16":                                 # negative control: bf16 bits misread
        assert rel_err(to_np(dx).astype(np.uint32).view(np.float32), rdx) > 0.5


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 64, 1), (2, 64, 128, 2), (2, 100, 128, 2), (1, 130, 256, 4),
                                      (1, 257, 768, 12)])
def test_bias_attention_flash_bf16_in(cp, poison, monkeypatch, B, T, C, NH):
    """bf16 matmuls: the qkv matmul writes x (B, T, 3C) as bf16 and the kernels read q, k, v from it in place
    (row stride 3C, head offsets h*64, C + h*64, 2C + h*64), adding the float32 bias as they load each tile and
    rounding back to bf16; dout arrives as bf16 (c_proj's bf16 dx). The reference gets those same bf16 values
    of x + b. db is added into a gradient buffer that already holds something (db_into, beta = 1)."""
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    x16 = float32_to_bf16(randn(B, T, 3 * C))
    b = randn(3 * C, scale=0.5)                                 # not a bf16 value: the kernel must round x + b
    xb = round_to_bf16(bf16_to_float32(x16) + b)                # what the kernels multiply
    fwd, bwd = registry.lookup("bias_attention_flash")
    poison()
    out, saved = fwd(cp.asarray(x16), cp.asarray(b), NH)
    assert saved[1][0] == "flash" and to_np(out).dtype == np.uint16
    rout, rsaved = attention_ops.attention_forward(xb.astype(np.float64), NH)
    assert rel_err(bf16_to_float32(to_np(out)), rout) < 2e-2
    # negative controls: the bias left out, or only x rounded, are far from this (the bias is not a shift
    # that softmax ignores for v, and q + bias_q changes every score)
    nob, _ = attention_ops.attention_forward(bf16_to_float32(x16).astype(np.float64), NH)
    assert rel_err(nob, rout) > 5e-2
    dout16 = float32_to_bf16(randn(B, T, C))
    before = randn(3 * C)
    db_buf = cp.asarray(before)
    poison()
    dx, db = bwd(cp.asarray(dout16), saved, db_into=db_buf)
    assert db is None and to_np(dx).dtype == np.uint16
    (rdx,) = attention_ops.attention_backward(bf16_to_float32(dout16).astype(np.float64), rsaved)
    got = bf16_to_float32(to_np(dx))
    overall = np.abs(rdx).max()
    for i, part in enumerate("qkv"):
        r = rdx[..., i * C:(i + 1) * C]
        e = rel_err(got[..., i * C:(i + 1) * C], r, scale=np.abs(r).max() or overall)
        assert e < 2e-2, f"d{part}: relative error {e}"
    # the buffer gained the column sums of the dx the kernels wrote (and kept what it held)
    colsum = got.reshape(-1, 3 * C).astype(np.float64).sum(0)
    assert rel_err(to_np(db_buf) - before, colsum, scale=max(np.abs(colsum).max(), 1.0)) < 1e-5
    assert rel_err(to_np(db_buf) - before, rdx.reshape(-1, 3 * C).sum(0), scale=overall * T) < 2e-2


def test_bias_attention_matmul(cp, poison):
    B, T, C, NH = 2, 37, 96, 3
    x, b = randn(B, T, 3 * C), randn(3 * C)
    fwd, bwd = registry.lookup("bias_attention_matmul")
    poison()
    out, saved = fwd(cp.asarray(x), cp.asarray(b), NH)
    rout, rsaved = attention_ops.bias_attention_forward(*f64(x, b), NH)
    assert rel_err(to_np(out), rout) < TOL
    dout = randn(B, T, C)
    dx, db = bwd(cp.asarray(dout), saved)
    rdx, rdb = attention_ops.bias_attention_backward(dout.astype(np.float64), rsaved)
    assert rel_err(to_np(dx), rdx) < TOL and rel_err(to_np(db), rdb) < TOL


def test_attention_flash_falls_back_for_other_head_sizes(cp):
    qkv = randn(1, 10, 3 * 96)
    fwd, bwd = registry.lookup("attention_flash")
    out, saved = fwd(cp.asarray(qkv), 3)                        # head size 32: the cuBLAS form
    assert saved[1][0] == "matmul"
    rout, _ = attention_ops.attention_forward(qkv.astype(np.float64), 3)
    assert rel_err(to_np(out), rout) < TOL


# ------------------------------------------------------------------------------------------------- bf16 helpers

def test_bf16_device_conversions_match_numpy(cp):
    from nanogpt_np.kernels import precision
    bits = rng.integers(0, 2 ** 32, size=1_000_003, dtype=np.uint64).astype(np.uint32)
    bits[:6] = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x3F808000, 0x7F7FFFFF]
    x = bits.view(np.float32)
    h = precision.to_bf16(cp.asarray(x))
    np.testing.assert_array_equal(to_np(h), float32_to_bf16(x))
    back = precision.to_float32(h)
    np.testing.assert_array_equal(to_np(back).view(np.uint32), bf16_to_float32(float32_to_bf16(x)).view(np.uint32))


@pytest.mark.parametrize("N,C", [(1, 1), (37, 100), (1000, 2304)])
def test_column_sum_bf16(cp, poison, N, C):
    """precision.column_sum_bf16: column sums (float32) of a bf16 matrix (kernels/mlp.py's fallback bias gradient)."""
    from nanogpt_np.kernels import precision
    x = float32_to_bf16(randn(N, C))
    ref = bf16_to_float32(x).astype(np.float64).sum(0)
    poison()
    assert rel_err(to_np(precision.column_sum_bf16(cp.asarray(x))), ref) < TOL


_CVT_PROBE = r"""
extern "C" __global__ void cvt_probe(unsigned short* out, const float* in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(in[i])); out[i] = h; }
}
"""


def test_bf16_conversion_matches_the_hardware_instruction(cp):
    """The GPU's own float32 -> bf16 conversion (cvt.rn.bf16.f32, what flash_attention.cu uses) on NaNs with
    payloads and signs, ties, overflow and random bits: kernels/bf16.py (and so bf16.cu) must agree bit for bit."""
    if cp.__name__ != "cupy":
        pytest.skip("the hardware instruction itself is the point: real GPU only")
    bits = rng.integers(0, 2 ** 32, size=100_003, dtype=np.uint64).astype(np.uint32)
    bits[:10] = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF80FFFF, 0x7FA00000, 0x3F808000, 0x3F818000,
                 0x7F7FFFFF, 0x00008000]
    x = bits.view(np.float32)
    fn = cp.RawModule(code=_CVT_PROBE).get_function("cvt_probe")
    out = cp.empty(x.shape, dtype=cp.uint16)
    fn(((x.size + 255) // 256,), (256,), (out, cp.asarray(x), np.int64(x.size)))
    hw = to_np(out)
    bad = np.nonzero(hw != float32_to_bf16(x))[0]
    assert bad.size == 0, [(hex(int(bits[i])), hex(int(hw[i])), hex(int(float32_to_bf16(x)[i]))) for i in bad[:8]]


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 5), (256, 768, 2304), (1000, 3072, 768)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True)])
def test_matmul_bf16(cp, M, K, N, ta, tb):
    from nanogpt_np.kernels import precision
    a, b = round_to_bf16(randn(M, K)), round_to_bf16(randn(K, N))
    A = a.T.copy() if ta else a
    Bm = b.T.copy() if tb else b
    out = precision.matmul_bf16(precision.to_bf16(cp.asarray(A)), precision.to_bf16(cp.asarray(Bm)), ta, tb)
    assert rel_err(to_np(out), a.astype(np.float64) @ b.astype(np.float64)) < 1e-5


def tf32_round(x):
    """float32 -> the nearest TF32 value (10 mantissa bits, ties to even), as the tensor cores read float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0xFFF + ((u >> 13) & 1)) & ~np.uint64(0x1FFF)
    return (u & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kind", ["float32", "tf32", "bf16", "bf16_out"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (1.0, 1.0), (0.5, -2.0)])
def test_gemm(cp, poison, ta, tb, kind, alpha, beta):
    """precision.gemm: C = alpha op(A) op(B) + beta C, every transpose, float32 (exact, TF32) and bf16 inputs,
    float32 or bf16 results, against float64 NumPy on the values the hardware reads."""
    from nanogpt_np.kernels import precision
    M, K, N = 37, 70, 29
    a, b, c = randn(M, K), randn(K, N), randn(M, N)
    if kind.startswith("bf16"):
        a, b = round_to_bf16(a), round_to_bf16(b)
        A, B = (precision.to_bf16(cp.asarray(x)) for x in (a.T.copy() if ta else a, b.T.copy() if tb else b))
        reads = a, b
    else:
        A, B = (cp.asarray(x) for x in (a.T.copy() if ta else a, b.T.copy() if tb else b))
        reads = (tf32_round(a), tf32_round(b)) if kind == "tf32" else (a, b)
    out_bf16 = kind == "bf16_out"
    if out_bf16:
        c = round_to_bf16(c)
    poison()
    C = None
    if beta != 0:
        C = precision.to_bf16(cp.asarray(c)) if out_bf16 else cp.asarray(c.copy())
    got = precision.gemm(A, B, ta, tb, C, alpha=alpha, beta=beta, tf32=(kind == "tf32"),
                         out_dtype=np.uint16 if out_bf16 else None)
    assert got.shape == (M, N) and got.dtype == (np.uint16 if out_bf16 else np.float32)
    if C is not None:
        assert got is C                                           # written in place
    want = alpha * (f64(reads[0])[0] @ f64(reads[1])[0]) + (beta * c.astype(np.float64) if beta else 0.0)
    got = bf16_to_float32(to_np(got)) if out_bf16 else to_np(got)
    if kind != "tf32":
        assert rel_err(got, want) < (2 ** -8 if out_bf16 else 1e-5)
        return
    exact = alpha * (f64(a)[0] @ f64(b)[0]) + (beta * c.astype(np.float64) if beta else 0.0)
    assert rel_err(got, exact) < 5e-3                  # TF32: 10 mantissa bits per input, float32 accumulation
    if str(getattr(cp, "__version__", "")).startswith("fake"):
        # the fake's cuBLAS rounds inputs to nearest TF32 for compute type 32F_FAST_TF32 (and only for it): the
        # wrapper passed that compute type, and the exact one otherwise (the other kinds above)
        assert rel_err(got, want) < 1e-5 and rel_err(got, exact) > 1e-5
    # (on a GPU, cuBLAS may round or truncate to TF32, or pick a non-tensor-core kernel for so small a product)



@pytest.mark.parametrize("N,Cin,Cout", [(1, 1, 1), (37, 70, 29), (130, 768, 2304), (8192, 768, 3072)])
@pytest.mark.parametrize("kind", ["tf32", "bf16"])
def test_weight_grad_into_a_fresh_buffer_equals_adding_into_zeros(cp, poison, N, Cin, Cout, kind):
    """A weight gradient's gemm into a fresh (NaN: stale bytes) buffer writes over it with beta = 0
    (kernels/linear.py _weight_grad, FreshGradBuffers in nanogpt_np/tensor.py); it must give the very bits that
    beta = 1 into a zeroed buffer gives (the model's gradients bit for bit as before, float32 included), and
    a second write adds. On a GPU this also checks that cuBLAS picks no different sum order for beta = 0."""
    from nanogpt_np.kernels import linear, precision
    from nanogpt_np.tensor import fresh_grads
    a, d = randn(N, Cin), randn(N, Cout)
    if kind == "bf16":
        A, D = precision.to_bf16(cp.asarray(a)), precision.to_bf16(cp.asarray(d))
    else:
        A, D = cp.asarray(a), cp.asarray(d)
    precision.set_tf32(kind == "tf32")
    try:
        poison()
        zeroed = cp.zeros((Cin, Cout), dtype=cp.float32)
        assert linear._weight_grad(A, D, zeroed) is None                      # not fresh: beta = 1
        fresh = cp.full((Cin, Cout), np.nan, dtype=cp.float32)
        fresh_grads.mark([fresh])
        assert linear._weight_grad(A, D, fresh) is None and not fresh_grads.is_fresh(fresh)   # beta = 0
        got, want = to_np(fresh), to_np(zeroed)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
        reads = (a, d) if kind == "tf32" else (round_to_bf16(a), round_to_bf16(d))
        assert rel_err(got, f64(reads[0])[0].T @ f64(reads[1])[0]) < (5e-3 if kind == "tf32" else 1e-5)
        linear._weight_grad(A, D, fresh)                                        # the second write adds
        np.testing.assert_array_equal(to_np(fresh), (want + want).astype(np.float32))
    finally:
        precision.set_tf32(False)


# ------------------------------------------------------------------------------------- strided batched gemm

BG_B, BG_NH = 2, 3                       # batch axes (B, NH), as attention uses them


def _bg_operand(cp, rows, cols, layout):
    """A (B, NH, rows, cols) float32 operand and its host values: layout "heads" is a view into a wider
    (B, rows, NH*cols + 3) buffer, starting one element in (heads side by side in each row, as in qkv: no one
    batch stride); "contiguous" is a plain array (one cuBLAS call covers the batch)."""
    if layout == "contiguous":
        vals = randn(BG_B, BG_NH, rows, cols)
        return cp.asarray(vals), vals, None
    buf = randn(BG_B, rows, BG_NH * cols + 3)
    dev = cp.asarray(buf)
    view = dev[..., 1:1 + BG_NH * cols].reshape(BG_B, rows, BG_NH, cols).transpose(0, 2, 1, 3)
    vals = buf[..., 1:1 + BG_NH * cols].reshape(BG_B, rows, BG_NH, cols).transpose(0, 2, 1, 3)
    return view, vals, (dev, buf)


def _run_batched_gemm(cp, ta, tb, layout, kind="float32", alpha=1.0, beta=0.0):
    """batched_gemm on (B, NH) batches of odd-sized operands: returns (relative error against float64 NumPy on
    the values the hardware reads, relative error against the exact product, cuBLAS calls made)."""
    from cupy_backends.cuda.libs import cublas
    from nanogpt_np.kernels.batched_gemm import batched_gemm
    M, K, N = 17, 9, 13
    a, av, _ = _bg_operand(cp, *((K, M) if ta else (M, K)), layout)
    b, bv, _ = _bg_operand(cp, *((N, K) if tb else (K, N)), layout)
    out, ov, whole = _bg_operand(cp, M, N, layout)
    before = ov.astype(np.float64)
    calls = []
    real = cublas.gemmStridedBatchedEx
    cublas.gemmStridedBatchedEx = lambda *args: calls.append(args[-3]) or real(*args)
    try:
        batched_gemm(a, b, out, ta, tb, alpha=alpha, beta=beta, tf32=(kind == "tf32"))
    finally:
        cublas.gemmStridedBatchedEx = real
    opa = (lambda x: x.swapaxes(-1, -2)) if ta else (lambda x: x)
    opb = (lambda x: x.swapaxes(-1, -2)) if tb else (lambda x: x)
    read = tf32_round if kind == "tf32" else (lambda x: x)
    want = alpha * (opa(read(av).astype(np.float64)) @ opb(read(bv).astype(np.float64))) + beta * before
    exact = alpha * (opa(av.astype(np.float64)) @ opb(bv.astype(np.float64))) + beta * before
    got = to_np(out)
    if whole is not None:                    # nothing outside the output's head slots was written
        dev, buf = whole
        rest = to_np(dev).copy()
        rest[..., 1:1 + BG_NH * N] = 0
        keep = buf.copy()
        keep[..., 1:1 + BG_NH * N] = 0
        np.testing.assert_array_equal(rest, keep)
    return rel_err(got, want), rel_err(got, exact), calls


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout", ["heads", "contiguous"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, -2.0)])
def test_batched_gemm(cp, ta, tb, layout, alpha, beta):
    """batched_gemm.batched_gemm: out[b, h] = alpha op(a[b, h]) op(b[b, h]) + beta out[b, h] for every transpose,
    with operands read in place from strided views (heads side by side, as in qkv) or contiguous arrays."""
    err, _, calls = _run_batched_gemm(cp, ta, tb, layout, alpha=alpha, beta=beta)
    assert err < 1e-5
    # heads: one call per batch row b, NH products each; contiguous: one call for all B * NH
    assert calls == ([BG_NH] * BG_B if layout == "heads" else [BG_B * BG_NH])


def test_batched_gemm_tf32(cp):
    """tf32=True (what precision.set_tf32(True) gives by default) asks cuBLAS for TF32 tensor cores."""
    err, exact, _ = _run_batched_gemm(cp, False, True, "heads", kind="tf32")
    assert exact < 5e-3
    if str(getattr(cp, "__version__", "")).startswith("fake"):       # the fake rounds inputs only for TF32
        assert err < 1e-5 and exact > 1e-5


def test_batched_gemm_wrong_stride_fails(cp, monkeypatch):
    """Negative control: a's batch stride one element short (the heads read shifted by one column per head,
    still inside the buffer) must give a wrong product, for both layouts."""
    from nanogpt_np.kernels import batched_gemm as bg
    real = bg._layout

    def short_stride(x, name):
        ld, strides = real(x, name)
        return ld, (strides[:-1] + [strides[-1] - 1]) if name == "a" else strides
    monkeypatch.setattr(bg, "_layout", short_stride)
    for layout in ("heads", "contiguous"):
        err, _, _ = _run_batched_gemm(cp, False, True, layout)
        assert err > 0.1, layout


def test_batched_gemm_refuses_what_cublas_cannot_read(cp):
    from nanogpt_np.kernels.batched_gemm import batched_gemm
    a, b = cp.asarray(randn(2, 4, 5)), cp.asarray(randn(2, 5, 3))
    with pytest.raises(ValueError):
        batched_gemm(a, b, cp.empty((2, 4, 4), dtype=cp.float32))                  # wrong output shape
    with pytest.raises(ValueError):
        bt = cp.asarray(randn(2, 3, 5)).transpose(0, 2, 1)                           # (2, 5, 3), columns strided
        batched_gemm(a, bt, cp.empty((2, 4, 3), dtype=cp.float32))
    with pytest.raises(TypeError):
        batched_gemm(a.astype(cp.float64), b, cp.empty((2, 4, 3), dtype=cp.float32))

def test_gemm_refuses_mixed_operands_and_a_missing_c(cp):
    from nanogpt_np.kernels import precision
    a, b = cp.asarray(randn(4, 5)), cp.asarray(randn(5, 3))
    with pytest.raises(TypeError):
        precision.gemm(a, precision.to_bf16(b))
    with pytest.raises(ValueError):
        precision.gemm(a, b, beta=1.0)                            # beta != 0 needs the C to add into
    with pytest.raises(ValueError):
        precision.gemm(a, a)


def test_registry_falls_back_for_float64(cp):
    """float64 arrays (the gradient checks) go to the reference, not to a float32 kernel."""
    x, w, b = (cp.asarray(a, dtype=cp.float64) for a in (randn(4, 8), randn(8), randn(8)))
    fwd, bwd = registry.lookup("layernorm")
    y, saved = fwd(x, w, b, 1e-5)
    assert y.dtype == cp.float64 and saved[0] is False
    ry, _ = ln_ops.layernorm_forward(to_np(x), to_np(w), to_np(b), 1e-5)
    assert rel_err(to_np(y), ry) < 1e-12


@pytest.fixture(params=["float32", "bfloat16"])
def precision_mode(request):
    old = registry.precision()
    registry.set_precision(request.param)
    yield request.param
    registry.set_precision(old)


@pytest.mark.parametrize("N,Cin,Cout,bias", [(5, 7, 3, True), (300, 768, 2304, True), (1000, 3072, 768, False)])
@pytest.mark.parametrize("into", [False, True])
def test_linear(cp, precision_mode, N, Cin, Cout, bias, into):
    """kernels/linear.py in both precisions (bf16: operands rounded to bf16, float32 accumulation; compared on
    the same bf16-rounded operands), with the weight gradients returned or added into given buffers."""
    from nanogpt_np.kernels import linear as klin
    lin = importlib.import_module("nanogpt_np.ops.linear")
    x, w = round_to_bf16(randn(N, Cin)), round_to_bf16(randn(Cin, Cout))
    b = randn(Cout) if bias else None
    y, saved = klin.linear_forward(cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b))
    ry, rsaved = lin.linear_forward(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64))
    assert rel_err(to_np(y), ry) < 1e-5
    dy = round_to_bf16(randn(N, Cout))
    dw0, db0 = randn(Cin, Cout), randn(Cout)                     # what the buffers held before
    dw_into, db_into = (cp.asarray(dw0.copy()), cp.asarray(db0.copy())) if into else (None, None)
    dx, dw, db = klin.linear_backward(cp.asarray(dy), saved, dw_into=dw_into, db_into=db_into if bias else None)
    rdx, rdw, rdb = lin.linear_backward(dy.astype(np.float64), rsaved)
    assert rel_err(to_np(dx), rdx) < 1e-5
    if into:
        assert dw is None and db is None                         # added into the buffers instead
        assert rel_err(to_np(dw_into), dw0 + rdw) < 1e-5
        assert rel_err(to_np(db_into), db0 + rdb if bias else db0) < 1e-5
    else:
        assert rel_err(to_np(dw), rdw) < 1e-5
        assert (db is None) == (not bias) and (db is None or rel_err(to_np(db), rdb) < 1e-5)


def test_linear_bf16_results(cp, precision_mode):
    """bf16_out / bf16_dx: in bf16 precision y and dx come back as bf16 (uint16), each the float32 result rounded
    once (so within bf16's half-ulp of the float64 product of the same operands); in float32 the hints change
    nothing. A layer with a bias refuses bf16_out (the bias add needs the float32 result)."""
    from nanogpt_np.kernels import linear as klin
    lin = importlib.import_module("nanogpt_np.ops.linear")
    x, w = round_to_bf16(randn(200, 96)), round_to_bf16(randn(96, 160))
    y, saved = klin.linear_forward(cp.asarray(x), cp.asarray(w), None, bf16_out=True)
    ry, rsaved = lin.linear_forward(x.astype(np.float64), w.astype(np.float64), None)
    dy = round_to_bf16(randn(200, 160))
    dx, _, _ = klin.linear_backward(cp.asarray(dy), saved, bf16_dx=True)
    rdx, _, _ = lin.linear_backward(dy.astype(np.float64), rsaved)
    for got, want in ((y, ry), (dx, rdx)):
        got = to_np(got)
        if precision_mode == "bfloat16":
            assert got.dtype == np.uint16
            got = bf16_to_float32(got).astype(np.float64)
            assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-6)     # one rounding, no more
            assert rel_err(got, want) > 1e-4                                         # and it did round
        else:
            assert got.dtype == np.float32 and rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="bf16_out"):
        klin.linear_forward(cp.asarray(x), cp.asarray(w), cp.asarray(randn(160)), bf16_out=True)


@pytest.mark.parametrize("into", [False, True])
def test_lm_head(cp, precision_mode, into):
    from nanogpt_np.kernels import linear as klin
    lin = importlib.import_module("nanogpt_np.ops.linear")
    x, wte = round_to_bf16(randn(77, 64)), round_to_bf16(randn(1001, 64))
    wte_bf16 = None
    if precision_mode == "bfloat16":            # a bf16 copy of the weight (the model keeps one) is multiplied
        from nanogpt_np.kernels import precision
        wte_bf16 = precision.to_bf16(cp.asarray(wte))
    y, saved = klin.lm_head_forward(cp.asarray(x), cp.asarray(wte), wte_bf16=wte_bf16)
    ry, rsaved = lin.lm_head_forward(x.astype(np.float64), wte.astype(np.float64))
    assert rel_err(to_np(y), ry) < 1e-5
    d = round_to_bf16(randn(77, 1001))
    g0 = randn(1001, 64)
    into_buf = cp.asarray(g0.copy()) if into else None
    dx, dwte = klin.lm_head_backward(cp.asarray(d), saved, dwte_into=into_buf)
    rdx, rdwte = lin.lm_head_backward(d.astype(np.float64), rsaved)
    assert rel_err(to_np(dx), rdx) < 1e-5
    if into:
        assert dwte is None and rel_err(to_np(into_buf), g0 + rdwte) < 1e-5
    else:
        assert rel_err(to_np(dwte), rdwte) < 1e-5


# ---------------------------------------------------------------------------- chunked output layer + cross-entropy

lmce_ops = importlib.import_module("nanogpt_np.ops.lm_head_loss")

# Tolerances against the float64 reference, norm-wise (rel_err). The inputs lie on a fixed-point grid (x: multiples
# of 2^-6 below 4, wte: multiples of 2^-7 below 2, both exact in bf16 and in TF32), so every logit, a sum of at
# most 64 products that are multiples of 2^-13, is below 2^9 and exact in float32 whatever order cuBLAS sums in:
# both precisions multiply the same numbers, and the kernels' own rounding is all that is measured:
#  * float32: exact float32 logits and the float32 loss/gradient of cross_entropy.cu: ~1e-7 per element, sums of up
#    to V products -> TOL (1e-5), as the other float32 kernels;
#  * bf16: the gemm rounds each (exact) logit to bf16 once; the reference does the same (round_logits, float64 from
#    there on), so the loss, float32 math on those bf16 values, is held to TOL as well (against a reference without
#    that rounding it is off by ~1e-6 .. 3e-4 with random targets, ~2e-3 in the negative control below). The
#    gradient dlogits is rounded once to bf16 (relative error <= 2^-9 = 2e-3 per element) before the dx and dwte
#    gemms. Those sums mix terms of both signs (a softmax row minus its one-hot sums to 0), so the error relative
#    to the largest result can exceed 2^-9 (measured on these shapes: 1e-3 .. 3.5e-3); BF16_GRAD_TOL = 1e-2 leaves
#    room for that and is still far below what a wrong row, chunk or scale gives (the negative control: ~0.7).
BF16_GRAD_TOL = 1e-2
LMCE_SHAPES = [(37, 64, 1001, 16), (5, 8, 11, 2), (20, 32, 8193, 7), (33, 16, 300, 64)]   # N, C, V, chunk_rows


def _on_grid(shape, step):
    """Normal values (std 64 steps) rounded to multiples of `step`, fewer than 256 steps from 0 (8 bits)."""
    return (np.clip(np.rint(rng.standard_normal(shape) * 64), -255, 255) * step).astype(np.float32)


def _lmce_case(N, C, V):
    assert C <= 64                                              # (the logits are exact in float32: above)
    x, wte = _on_grid((N, C), 2.0 ** -6), _on_grid((V, C), 2.0 ** -7)
    targets = rng.integers(0, V, size=N)
    if N > 2:
        targets[rng.random(N) < 0.25] = -1                      # ignored rows, some at chunk edges
        targets[[0, N - 2, N - 1]] = [-1, 0, V - 1]                # (N - 2 kept: the negative control needs it)
    return x, wte, targets


def _lmce_errors(cp, poison, dtype, N, C, V, chunk_rows, dloss=None, kernel_chunks=None, ref_rounds=True,
                 targets_for=None):
    """Run the registry's lm_head_cross_entropy (the kernel path) at `dtype` precision; return the relative
    errors (loss, dx, dwte) against the float64 reference, whose logits are rounded to bf16 for the bf16 run
    (ref_rounds=False: not rounded, a negative control). kernel_chunks replaces ops.lm_head_loss.chunks for the
    kernel run only (negative control); targets_for(x, wte) picks the targets instead of the random ones."""
    x, wte, targets = _lmce_case(N, C, V)
    if targets_for is not None:
        targets = targets_for(x, wte)
    fwd, bwd = registry.lookup("lm_head_cross_entropy")
    registry.set_precision(dtype)
    good_chunks = lmce_ops.chunks
    lmce_ops.chunks = kernel_chunks or good_chunks
    try:
        poison()
        loss, saved = fwd(cp.asarray(x), cp.asarray(wte), cp.asarray(targets), -1, with_grad=True,
                          chunk_rows=chunk_rows)
        assert saved[0] is True                                  # the kernel path, not the fallback
        dx, dwte = bwd(1.0 if dloss is None else dloss, saved)
    finally:
        registry.set_precision("float32")
        lmce_ops.chunks = good_chunks
    rounding = round_to_bf16 if dtype == "bfloat16" and ref_rounds else None
    rloss, rsaved = lmce_ops.lm_head_cross_entropy_forward(x.astype(np.float64), wte.astype(np.float64), targets,
                                                           chunk_rows=5, round_logits=rounding)
    rdx, rdwte = lmce_ops.lm_head_cross_entropy_backward(np.float64(1.0 if dloss is None else float(dloss)), rsaved)
    return abs(float(loss) - float(rloss)) / abs(float(rloss)), rel_err(to_np(dx), rdx), rel_err(to_np(dwte), rdwte)


@pytest.mark.parametrize("N,C,V,chunk_rows", LMCE_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_cross_entropy(cp, poison, dtype, N, C, V, chunk_rows):
    e_loss, e_dx, e_dwte = _lmce_errors(cp, poison, dtype, N, C, V, chunk_rows)
    grad_tol = TOL if dtype == "float32" else BF16_GRAD_TOL
    assert e_loss < TOL and e_dx < grad_tol and e_dwte < grad_tol, (e_loss, e_dx, e_dwte)


def test_lm_head_cross_entropy_wrong_chunk_offset_fails(cp, poison):
    """Negative control: the last (shorter) chunk starts one row early, so that row (N - 2 = 31, a kept one) is
    counted twice in dwte (a wrong chunk offset); the comparison above must catch it, in bf16 too."""
    good = lmce_ops.chunks

    def overlapping(n_rows, rows):
        spans = good(n_rows, rows)
        r0, r1 = spans[-1]
        return spans[:-1] + [(r0 - 1, r1)]
    for dtype in ("float32", "bfloat16"):
        e_loss, e_dx, e_dwte = _lmce_errors(cp, poison, dtype, 33, 64, 1001, 16, kernel_chunks=overlapping)
        assert e_dwte > 5 * BF16_GRAD_TOL, (dtype, e_dwte)


def test_lm_head_cross_entropy_bf16_loss_needs_the_rounded_reference(cp, poison):
    """Negative control for the bf16 loss: against the reference without the logits' rounding to bf16, the
    kernel's loss is far outside TOL (the rounding is real, and the reference must model it). Each row's target is
    the logit that the rounding lowered most, so every row's loss rises (by up to a bf16 ulp of that logit, ~2e-3
    of the loss here) and the mean cannot cancel by chance, as it can with random targets (1e-6 .. 3e-4)."""
    def lowered_most(x, wte):
        z = x.astype(np.float64) @ wte.T.astype(np.float64)    # exact (the grid), so exactly the kernel's logits
        return np.argmin(round_to_bf16(z) - z, axis=1)
    e_rounded = _lmce_errors(cp, poison, "bfloat16", 37, 64, 1001, 16, targets_for=lowered_most)[0]
    e_plain = _lmce_errors(cp, poison, "bfloat16", 37, 64, 1001, 16, targets_for=lowered_most, ref_rounds=False)[0]
    assert e_rounded < TOL < 10 * TOL < e_plain, (e_rounded, e_plain)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_cross_entropy_dloss_and_no_grad(cp, poison, dtype):
    """A d loss that is not 1 (on the device, and as a Python number) scales dx and dwte; with_grad=False gives
    the same loss and saves nothing; float64 inputs go to the NumPy reference."""
    N, C, V, rows = 21, 32, 517, 8
    e = _lmce_errors(cp, poison, dtype, N, C, V, rows, dloss=cp.asarray(2.5, dtype=cp.float32))
    grad_tol = TOL if dtype == "float32" else BF16_GRAD_TOL
    assert e[0] < TOL and e[1] < grad_tol and e[2] < grad_tol, e
    e = _lmce_errors(cp, poison, dtype, N, C, V, rows, dloss=0.5)
    assert e[0] < TOL and e[1] < grad_tol and e[2] < grad_tol, e
    x, wte, targets = _lmce_case(N, C, V)
    fwd, bwd = registry.lookup("lm_head_cross_entropy")
    registry.set_precision(dtype)
    try:
        loss, saved = fwd(cp.asarray(x), cp.asarray(wte), cp.asarray(targets), -1, with_grad=False, chunk_rows=rows)
        assert saved == (True, (None, None))
        with pytest.raises(RuntimeError, match="with_grad=False"):
            bwd(1.0, saved)
        loss64, saved64 = fwd(cp.asarray(x, dtype=cp.float64), cp.asarray(wte, dtype=cp.float64),
                              cp.asarray(targets), -1, with_grad=True, chunk_rows=rows)
        assert saved64[0] is False and loss64.dtype == cp.float64
    finally:
        registry.set_precision("float32")
    rounding = round_to_bf16 if dtype == "bfloat16" else None
    rloss, _ = lmce_ops.lm_head_cross_entropy_forward(*f64(x, wte), targets, with_grad=False, round_logits=rounding)
    assert abs(float(loss) - float(rloss)) < TOL * abs(float(rloss))
    rloss64, _ = lmce_ops.lm_head_cross_entropy_forward(*f64(x, wte), targets, with_grad=False)   # no rounding
    assert abs(float(loss64) - float(rloss64)) < 1e-12 * abs(float(rloss64))
