"""kernels/mlp.py: the MLP op on the GPU (fake CuPy without one; there the cuBLASLt calls run the NumPy emulation
of tests/emulation/fake_cupy.py, with the documented arithmetic).

bf16 precision: c_fc's matmul writes h = gelu(x W_fc + b_fc) and its aux pre = x W_fc + b_fc (epilogue
GELU_AUX_BIAS), mlp.c_proj's dx matmul writes dpre = (dy W_proj^T) * gelu'(pre) and the c_fc bias gradient
(DGELU_BGRAD). Each stage is checked against float64 on the kernel's own bf16 inputs (the values it was given),
each bf16 output within half a bf16 ulp plus the epilogue's own float32 error. On a real GPU that float32 error
includes cuBLASLt's tanh, which may be the hardware approximation (2^-11 relative): EPILOGUE_TOL allows for it.
Without epilogues (float32 precision, a shape cuBLASLt refuses, the switch off) the op must be exactly the
separate ops' kernels, bit for bit.
"""
import math

import numpy as np
import pytest

from nanogpt_np.kernels import cublaslt, cublaslt_ctypes, registry
from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16, round_to_bf16

from .helpers import rel_err

EPILOGUE_TOL = 2e-3       # of max(|ref|, 1): the epilogue's float32 GELU (a fast tanh on the GPU, maybe)
rng = np.random.default_rng(4321)
_S, _A = math.sqrt(2 / math.pi), 0.044715


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_np(x):
    import cupy
    return cupy.asnumpy(x)


def widen(bits):
    return bf16_to_float32(to_np(bits)).astype(np.float64)


def gelu(z):
    return 0.5 * z * (1 + np.tanh(_S * (z + _A * z ** 3)))


def gelu_grad(z):
    t = np.tanh(_S * (z + _A * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _S * (1 + 3 * _A * z * z)


def gelu_erf(z):
    return 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def check_bf16(got, ref, tol):
    """bf16 bits within half a bf16 ulp of ref (2^-8 |ref|, as tests/gpu/test_kernels_gpu.check_act) plus tol of
    max(|ref|, 1)."""
    assert to_np(got).dtype == np.uint16
    val = widen(got)
    assert np.isfinite(val).all(), "NaN/inf in the output (an element was not written?)"
    bound = 2.0 ** -8 * np.abs(ref) + tol * max(float(np.abs(ref).max()), 1.0)
    assert (np.abs(val - ref) <= bound).all(), f"max excess {np.max(np.abs(val - ref) - bound)}"


@pytest.fixture
def bf16(cp, monkeypatch):
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    assert registry.bf16_activations()


@pytest.fixture
def lt_calls(cp, monkeypatch):
    """The cublasLtMatmul calls made (their epilogues), counted around whichever binding is installed."""
    calls = []
    real = cublaslt_ctypes.matmul

    def counting(handle, desc, *args):
        calls.append(desc)
        return real(handle, desc, *args)
    monkeypatch.setattr(cublaslt_ctypes, "matmul", counting)
    return calls


def _params(N, C, H, fc_bias):
    x, w_fc, w_proj = round_to_bf16(randn(N, C)), round_to_bf16(randn(C, H, scale=0.3)), round_to_bf16(randn(H, C))
    b_fc = randn(H) if fc_bias else None
    return x, w_fc, b_fc, w_proj, round_to_bf16(randn(N, C))


def _run(cp, x, w_fc, b_fc, w_proj, dy, into):
    fwd, bwd = registry.lookup("mlp")
    dev = [None if a is None else cp.asarray(a) for a in (x, w_fc, b_fc, w_proj)]
    y, saved = fwd(*dev)
    H, C = w_proj.shape
    before = dict(w_fc=randn(C, H), b_fc=randn(H), w_proj=randn(H, C))
    bufs = {k: cp.asarray(v.copy()) for k, v in before.items()} if into else {}
    grads = bwd(cp.asarray(dy), saved, dw_fc_into=bufs.get("w_fc"),
                db_fc_into=bufs.get("b_fc") if b_fc is not None else None, dw_proj_into=bufs.get("w_proj"))
    return y, saved, grads, bufs, before


@pytest.mark.parametrize("N,C,H,fc_bias", [(7, 24, 40, True), (33, 20, 64, False), (130, 64, 256, True),
                                           (1, 8, 8, True)])
@pytest.mark.parametrize("into", [False, True], ids=["returned", "into"])
def test_mlp_bf16_epilogues(cp, poison, bf16, lt_calls, N, C, H, fc_bias, into):
    x, w_fc, b_fc, w_proj, dy = _params(N, C, H, fc_bias)
    poison()
    y, saved, (dx, dw_fc, db_fc, dw_proj, db_proj), bufs, before = _run(cp, x, w_fc, b_fc, w_proj, dy, into)
    assert len(lt_calls) == 2                                 # c_fc forward, mlp.c_proj's dx: both on cuBLASLt
    kind, xm, wf, pre, h, wp, has_bias, _ = saved[1]          # (the registry's guard tags the saved state)
    assert kind == "epilogue" and has_bias == fc_bias
    # forward: the aux is the float32 pre-activation rounded once, h the GELU of the float32 value rounded once
    pre_ref = x.astype(np.float64) @ w_fc + (0 if b_fc is None else b_fc)
    check_bf16(pre, pre_ref, 1e-5)
    check_bf16(h, gelu(pre_ref), EPILOGUE_TOL)
    assert rel_err(to_np(y), widen(h) @ w_proj) < 1e-5
    # backward: dpre from the float32 dh and the GELU derivative at the bf16 aux; db_fc its unrounded column sums
    dpre_ref = (dy.astype(np.float64) @ w_proj.T) * gelu_grad(widen(pre))
    scale = max(float(np.abs(dpre_ref).max()), 1.0)
    if into:
        assert dw_fc is None and db_fc is None and dw_proj is None
        got_dw_proj, got_dw_fc = to_np(bufs["w_proj"]) - before["w_proj"], to_np(bufs["w_fc"]) - before["w_fc"]
        got_db = to_np(bufs["b_fc"]) - before["b_fc"] if fc_bias else None
    else:
        got_dw_proj, got_dw_fc = to_np(dw_proj), to_np(dw_fc)
        got_db = to_np(db_fc) if fc_bias else None
        assert (db_fc is None) == (not fc_bias)
    assert db_proj is None
    assert rel_err(got_dw_proj, widen(h).T @ dy) < 1e-5
    if fc_bias:
        assert rel_err(got_db, dpre_ref.sum(axis=0), scale=scale * math.sqrt(N)) < EPILOGUE_TOL
    # dW_fc and dx come from the bf16 dpre: within half an ulp of dpre_ref per element, so norm-wise close
    assert rel_err(got_dw_fc, x.T.astype(np.float64) @ dpre_ref) < 2 * 2.0 ** -8 + EPILOGUE_TOL
    assert rel_err(to_np(dx), dpre_ref @ w_fc.T) < 2 * 2.0 ** -8 + EPILOGUE_TOL


def test_dgelu_epilogue_output_and_negative_controls(cp, bf16, lt_calls):
    """dgelu_gemm alone: dpre within half an ulp of (dy W^T) * gelu'(aux). Negative controls: the same check
    fails for a derivative taken at h instead of the aux, for the aux ignored (gelu' = 1), and for ReLU's step."""
    N, C, H = 65, 16, 48
    dy, w, pre = (float32_to_bf16(randn(N, C)), float32_to_bf16(randn(H, C)), float32_to_bf16(randn(N, H, scale=2)))
    dpre, db = cublaslt.dgelu_gemm(cp.asarray(dy), cp.asarray(w), cp.asarray(pre), True)
    dh = bf16_to_float32(dy).astype(np.float64) @ bf16_to_float32(w).T.astype(np.float64)
    z = bf16_to_float32(pre).astype(np.float64)
    check_bf16(dpre, dh * gelu_grad(z), EPILOGUE_TOL)
    assert rel_err(to_np(db), (dh * gelu_grad(z)).sum(axis=0)) < EPILOGUE_TOL
    for wrong in (dh * gelu_grad(gelu(z)), dh, dh * (z > 0)):
        with pytest.raises(AssertionError):
            check_bf16(dpre, wrong, EPILOGUE_TOL)


def test_the_epilogue_gelu_is_the_tanh_form(cp, bf16, lt_calls):
    """x @ I + 0 puts chosen values into the GELU exactly. Where the tanh form and the erf form differ most
    (|z| ~ 2..3.5, up to 4e-4 apart: below one bf16 rounding each, but systematic), the average error against
    the tanh form must be well below that against the erf form."""
    z = round_to_bf16(np.tile(np.linspace(-3.5, -1.5, 64, dtype=np.float32), (256, 1)))    # (256, 64)
    eye = np.eye(64, dtype=np.float32)
    h, pre = cublaslt.gelu_gemm(cp.asarray(float32_to_bf16(z)), cp.asarray(float32_to_bf16(eye)),
                                cp.zeros(64, dtype=np.float32))
    got, zz = widen(h), z.astype(np.float64)
    assert np.array_equal(widen(pre), zz)
    err_tanh, err_erf = np.mean(got - gelu(zz)), np.mean(got - gelu_erf(zz))
    assert abs(err_tanh) < abs(err_erf) / 4, (err_tanh, err_erf)


@pytest.mark.parametrize("fc_bias", [True, False])
def test_refused_shapes_use_the_separate_kernels_bit_for_bit(cp, bf16, lt_calls, monkeypatch, fc_bias):
    """H % 8 != 0 breaks the aux leading-dimension rule (cublasLt.h: EPILOGUE_AUX_LD divisible by 8): no
    cuBLASLt call, and the result is exactly that of the separate kernels (the switch "mlp_epilogue" off)."""
    x, w_fc, b_fc, w_proj, dy = _params(9, 12, 36, fc_bias)
    y1, _, g1, _, _ = _run(cp, x, w_fc, b_fc, w_proj, dy, False)
    assert lt_calls == []
    monkeypatch.setattr(registry, "_disabled", registry._disabled | {"mlp_epilogue"})
    y2, _, g2, _, _ = _run(cp, x, w_fc, b_fc, w_proj, dy, False)
    for a, b in zip((y1,) + tuple(g1), (y2,) + tuple(g2)):
        assert (a is None and b is None) or np.array_equal(to_np(a), to_np(b))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_without_epilogues_the_op_is_the_separate_ops(cp, monkeypatch, lt_calls, precision):
    """float32 precision (and bf16 with the switch off): linear, bias_gelu, linear with the model's former hints,
    bit for bit."""
    monkeypatch.setattr(registry, "_precision", precision)
    if precision == "bfloat16":
        monkeypatch.setattr(registry, "_disabled", registry._disabled | {"mlp_epilogue"})
    x, w_fc, b_fc, w_proj, dy = (randn(10, 16), randn(16, 64), randn(64), randn(64, 16), randn(10, 16))
    y, _, (dx, dw_fc, db_fc, dw_proj, _), _, _ = _run(cp, x, w_fc, b_fc, w_proj, dy, False)
    assert lt_calls == []
    lf, lb = registry.lookup("linear")
    gf, gb = registry.lookup("bias_gelu")
    bf16 = precision == "bfloat16"
    m, s1 = lf(cp.asarray(x), cp.asarray(w_fc), None, bf16_out=bf16)
    h, s2 = gf(m, cp.asarray(b_fc))
    y2, s3 = lf(h, cp.asarray(w_proj), None)
    dh, dwp, _ = lb(cp.asarray(dy), s3, bf16_dx=bf16)
    dm, db = gb(dh, s2)
    dx2, dwf, _ = lb(dm, s1)
    for a, b in ((y, y2), (dx, dx2), (dw_fc, dwf), (db_fc, db), (dw_proj, dwp)):
        assert np.array_equal(to_np(a), to_np(b))


@pytest.mark.parametrize("refused", ["bias gradient", "all"])
def test_a_refused_backward_falls_back(cp, bf16, lt_calls, monkeypatch, refused):
    """The forward on cuBLASLt, its backward matmul refused (a description of its own): without the bias
    gradient (DGELU, then db summed from the bf16 dpre), or entirely (float32: dh, gelu_backward on the widened
    aux, sum_rows). The same gradients to bf16 accuracy."""
    x, w_fc, b_fc, w_proj, dy = _params(20, 16, 32, True)
    _, saved, want, _, _ = _run(cp, x, w_fc, b_fc, w_proj, dy, False)
    real = cublaslt.dgelu_gemm
    monkeypatch.setattr(cublaslt, "dgelu_gemm", lambda dy, w, pre, with_bias_grad:
                        None if (with_bias_grad or refused == "all") else real(dy, w, pre, with_bias_grad))
    fwd, bwd = registry.lookup("mlp")
    y, saved = fwd(*[cp.asarray(a) for a in (x, w_fc, b_fc, w_proj)])
    got = bwd(cp.asarray(dy), saved)
    for a, b in zip(got[:4], want[:4]):
        assert rel_err(to_np(a), to_np(b)) < 2 * 2.0 ** -8
