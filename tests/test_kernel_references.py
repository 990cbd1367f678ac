"""CPU tests of the kernels package's NumPy side: references of the fused ops, launch arithmetic, registry.

The fused GPU kernels (residual + layernorm, bias + GELU, flat AdamW with an on-device norm) are tested on the
GPU against the references here (tests/gpu); these tests pin the references themselves down on the CPU, with
finite differences and with the plain ops they compose.
"""
import importlib
import json
import math
import sys

import numpy as np
import pytest

from gradcheck import numerical_grad
from nanogpt_np.kernels import launch, references, registry

rng = np.random.default_rng(0)


def num_grad(f, x, eps=1e-6):
    """Central differences of every entry, as an array shaped like x (gradcheck.numerical_grad does the work)."""
    _, values = numerical_grad(f, x, eps=eps)
    return values.reshape(x.shape)


@pytest.mark.parametrize("with_bias", [False, True])
def test_residual_layernorm_matches_composition_and_finite_differences(with_bias):
    from nanogpt_np.ops.layernorm import layernorm_backward, layernorm_forward
    N, C = 5, 7
    x, r = rng.standard_normal((N, C)), rng.standard_normal((N, C))
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    rb = rng.standard_normal(C) if with_bias else None
    (h, y), saved = references.residual_layernorm_forward(x, r, rb, w, b)
    want_h = x + r + (rb if with_bias else 0.0)
    np.testing.assert_allclose(h, want_h)
    np.testing.assert_allclose(y, layernorm_forward(want_h, w, b)[0])
    # loss = sum(dh_up * h) + sum(dy_up * y): h feeds the residual stream and y the next sublayer
    dh_up, dy_up = rng.standard_normal((N, C)), rng.standard_normal((N, C))

    def loss():
        (hh, yy), _ = references.residual_layernorm_forward(x, r, rb, w, b)
        return float((dh_up * hh).sum() + (dy_up * yy).sum())

    dx, dres, drb, dw, db = references.residual_layernorm_backward((dh_up, dy_up), saved)
    assert dx is dres
    np.testing.assert_allclose(dx, num_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dres, num_grad(loss, r), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, num_grad(loss, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, num_grad(loss, b), rtol=1e-5, atol=1e-7)
    if with_bias:
        np.testing.assert_allclose(drb, num_grad(loss, rb), rtol=1e-5, atol=1e-7)
    else:
        assert drb is None
    # without an incoming residual gradient it is the plain layernorm backward
    dx0, _, _, dw0, db0 = references.residual_layernorm_backward((None, dy_up), saved)
    np.testing.assert_allclose(dx0, layernorm_backward(dy_up, saved[0])[0])


def test_bias_gelu_finite_differences():
    N, C = 4, 6
    x, b = rng.standard_normal((N, C)) * 2, rng.standard_normal(C)
    up = rng.standard_normal((N, C))
    y, saved = references.bias_gelu_forward(x, b)
    a = x + b
    np.testing.assert_allclose(y, 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))))

    def loss():
        return float((up * references.bias_gelu_forward(x, b)[0]).sum())

    dx, db = references.bias_gelu_backward(up, saved)
    np.testing.assert_allclose(dx, num_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, num_grad(loss, b), rtol=1e-5, atol=1e-7)


def _adamw_loop(p, g, m, v, n_decay, lr, b1, b2, eps, wd, step, clip):
    """Element by element, in float64, the way the CUDA kernel does it."""
    norm = math.sqrt(sum(float(x) ** 2 for x in g))
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    for i in range(len(p)):
        gi = g[i] * scale
        m[i] = b1 * m[i] + (1 - b1) * gi
        v[i] = b2 * v[i] + (1 - b2) * gi * gi
        mh, vh = m[i] / (1 - b1 ** step), v[i] / (1 - b2 ** step)
        p[i] -= lr * (mh / (math.sqrt(vh) + eps) + (wd if i < n_decay else 0.0) * p[i])
    return norm, scale


@pytest.mark.parametrize("clip", [0.0, 0.5, 1e9])
def test_adamw_flat_reference(clip):
    n, n_decay = 37, 20
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    m, v = rng.standard_normal(n) * 0.1, rng.random(n) * 0.1
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    P, M, V = p.copy(), m.copy(), v.copy()
    ns = references.adamw_flat_reference(P, g.copy(), M, V, n_decay=n_decay, grad_clip=clip, **kw)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    norm, scale = _adamw_loop(p2, g, m2, v2, n_decay, kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                              kw["weight_decay"], kw["step"], clip)
    np.testing.assert_allclose(P, p2, rtol=1e-12)
    np.testing.assert_allclose(M, m2, rtol=1e-12)
    np.testing.assert_allclose(V, v2, rtol=1e-12)
    np.testing.assert_allclose(ns, [norm, scale], rtol=1e-6)
    if clip == 0.0 or clip == 1e9:
        assert float(ns[1]) == 1.0


def test_adamw_flat_reference_agrees_with_optim():
    optim = pytest.importorskip("nanogpt_np.optim")
    if not hasattr(optim, "adamw_update"):
        pytest.skip("optim.adamw_update not there yet")
    n, n_decay = 50, 30
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, step=1)
    P, M, V = p.copy(), m.copy(), v.copy()
    references.adamw_flat_reference(P, g, M, V, n_decay=n_decay, weight_decay=0.1, **kw)
    p1, m1, v1 = p[:n_decay].copy(), m[:n_decay].copy(), v[:n_decay].copy()
    optim.adamw_update(p1, g[:n_decay], m1, v1, weight_decay=0.1, **kw)
    p2, m2, v2 = p[n_decay:].copy(), m[n_decay:].copy(), v[n_decay:].copy()
    optim.adamw_update(p2, g[n_decay:], m2, v2, weight_decay=0.0, **kw)
    np.testing.assert_allclose(P, np.concatenate([p1, p2]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- launch arithmetic

@pytest.mark.parametrize("N", [1, 7, 8, 9, 100, 8191, 16384])
@pytest.mark.parametrize("C", [1, 33, 768, 1600, 6144])
@pytest.mark.parametrize("sms", [1, 108, 132])
@pytest.mark.parametrize("n_sums", [2, 3])
def test_layernorm_backward_config_covers_rows(N, C, sms, n_sums):
    if 4 * n_sums * C > launch.SMEM_DEFAULT:                # one warp's rows would not fit: refused
        with pytest.raises(ValueError):
            launch.layernorm_backward_config(N, C, sms, n_sums=n_sums)
        return
    nw, rpb, nblocks, smem = launch.layernorm_backward_config(N, C, sms, n_sums=n_sums)
    assert 1 <= nw <= 8 and smem == n_sums * nw * C * 4 <= launch.SMEM_DEFAULT
    covered = np.zeros(N, int)
    for blk in range(nblocks):                      # what layernorm_backward's loops visit
        for warp in range(nw):
            for row in range(blk * rpb + warp, min(N, (blk + 1) * rpb), nw):
                covered[row] += 1
    assert (covered == 1).all()
    assert nblocks <= max(1, 4 * sms) or rpb == nw


def test_layernorm_backward_config_rejects_huge_C():
    with pytest.raises(ValueError):
        launch.layernorm_backward_config(10, 7000, 100)


@pytest.mark.parametrize("N,C", [(1, 1), (5, 31), (8192, 768), (8192, 3072), (1000, 50)])
def test_column_chunks_cover(N, C):
    (gx, gy), (bx, by), rpc = launch.column_chunks(N, C, 132)
    assert bx == 32 and gx * 32 >= C > (gx - 1) * 32
    cols = np.zeros((N,), int)
    for chunk in range(gy):
        for ty in range(by):
            for r in range(chunk * rpc + ty, min(N, (chunk + 1) * rpc), by):
                cols[r] += 1
    assert (cols == 1).all()


def test_elementwise_and_misc():
    assert launch.elementwise(1) == ((1,), (256,))
    assert launch.elementwise(257) == ((2,), (256,))
    assert launch.rows_per_warp(17, 8) == ((3,), (256,))
    assert launch.ceil_div(0, 5) == 0 and launch.ceil_div(10, 5) == 2
    assert launch.flash_padded_T(1) == 128 and launch.flash_padded_T(1024) == 1024 and launch.flash_padded_T(129) == 256
    assert launch.flash_launch(1024, 96) == ((8, 96), (256,)) and launch.flash_launch(128, 1) == ((1, 1), (256,))
    bc1, bc2 = launch.adamw_bias_corrections(0.9, 0.95, 2)
    assert math.isclose(bc1, 0.19) and math.isclose(bc2, 1 - 0.95 ** 2)
    with pytest.raises(ValueError):
        launch.adamw_bias_corrections(0.9, 0.95, 0)
    assert launch.device_bytes(((2, 3), np.float32), ((4,), np.uint16)) == 32


# ------------------------------------------------------------------------------------------------ registry

def test_registry_names_and_cpu_import():
    had_cupy = "cupy" in sys.modules
    for name in ["embedding", "layernorm", "residual_layernorm", "gelu", "bias_gelu", "cross_entropy",
                 "attention", "attention_matmul", "attention_flash", "adamw", "linear", "lm_head"]:
        pair = registry.lookup(name)
        assert pair is not None and all(callable(f) for f in pair), name
    assert registry.lookup("dropout") is None
    if not had_cupy:
        assert "cupy" not in sys.modules, "wrapper modules must import cupy lazily"


def test_registry_attention_switch_and_disable():
    old = registry.attention_kind()
    try:
        registry.set_attention("flash")
        assert registry.resolve("attention") == "attention_flash"
        registry.set_attention("matmul")
        assert registry.lookup("attention") == registry.lookup("attention_matmul")
        with pytest.raises(ValueError):
            registry.set_attention("magic")
        registry.disable("gelu")
        assert registry.lookup("gelu") is None
        registry.enable("gelu")
        assert registry.lookup("gelu") is not None
    finally:
        registry.set_attention(old)


def test_registry_precision_switch():
    """linear and lm_head have one kernel pair for both precisions (kernels/linear.py reads the setting)."""
    pair = registry.lookup("linear")
    assert pair is not None and registry.lookup("lm_head") is not None
    try:
        registry.set_precision("bfloat16")
        assert registry.resolve("linear") == "linear" and registry.resolve("lm_head") == "lm_head"
        assert registry.lookup("linear") == pair and registry.precision() == "bfloat16"
        with pytest.raises(ValueError):
            registry.set_precision("float16")
    finally:
        registry.set_precision("float32")
    assert registry.precision() == "float32"


def test_wrapper_modules_import_without_gpu():
    for mod in ["encoder", "layernorm", "gelu", "cross_entropy", "adamw", "softmax_attention", "flash_attention",
                "precision", "linear"]:
        importlib.import_module(f"nanogpt_np.kernels.{mod}")


# ------------------------------------------------------------------------------ cuBLAS argument arithmetic

def _gemm_colmajor(opa, opb, m, n, k, A, lda, B, ldb, ldc):
    """What cublasGemmEx computes, on flat column-major buffers: C (m x n, ld ldc) = op(A) op(B)."""
    def mat(buf, rows, cols, ld, op):
        # the stored matrix, column-major with leading dimension ld; op(X) is m x k (or k x n)
        stored_rows, stored_cols = (rows, cols) if op == 0 else (cols, rows)
        X = np.array([[buf[r + c * ld] for c in range(stored_cols)] for r in range(stored_rows)])
        return X if op == 0 else X.T
    C = mat(A, m, k, lda, opa) @ mat(B, k, n, ldb, opb)
    out = np.zeros(ldc * n)
    for r in range(m):
        for c in range(n):
            out[r + c * ldc] = C[r, c]
    return out


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (2, 3, 4), (5, 7, 3)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_args_row_major(M, K, N, ta, tb):
    from nanogpt_np.kernels.precision import gemm_args
    a, b = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    A = a.T.copy() if ta else a              # what is stored, row-major
    B = b.T.copy() if tb else b
    opb, opa, m, n, k, ldb, lda, ldc = gemm_args(M, K, N, ta, tb)
    flat = _gemm_colmajor(opb, opa, m, n, k, B.ravel(), ldb, A.ravel(), lda, ldc)
    np.testing.assert_allclose(flat.reshape(M, N), a @ b)      # column-major C^T (N x M) is row-major C


# ------------------------------------------------------------------ flash attention, emulated lane by lane

# T = 200: two 128-row blocks, the second partial (its last 64-row tile has 8 rows)
@pytest.mark.parametrize("B,T,NH,with_bias", [(1, 70, 1, False), (1, 128, 2, False), (2, 70, 2, True), (1, 200, 1, True)])
def test_flash_attention_emulation_matches_reference(B, T, NH, with_bias):
    """flash_attention.cu's index arithmetic, replayed in NumPy (tests/emulation/flash_emulator.py), against the
    float64 attention op on the same bf16-rounded inputs (q, k, v read in place from qkv (B, T, 3C), the bias
    added per loaded tile and rounded back to bf16)."""
    from emulation import flash_emulator as fe
    from nanogpt_np.kernels.bf16 import round_to_bf16
    from nanogpt_np.ops.attention import attention_backward, attention_forward
    C = 64 * NH
    r = np.random.default_rng(7)
    qkv = round_to_bf16(r.standard_normal((B, T, 3 * C)).astype(np.float32))
    bias = r.standard_normal(3 * C).astype(np.float32) if with_bias else None
    out, L2, heads = fe.forward(qkv, NH, bias)
    x = qkv if bias is None else round_to_bf16(qkv + bias)       # the values the kernel multiplies
    ref, saved = attention_forward(x.astype(np.float64), NH)
    assert np.isfinite(out).all() and np.isfinite(L2).all()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-2, err
    dout = r.standard_normal((B, T, C)).astype(np.float32)
    dqkv, db_partial = fe.backward(dout, out, L2, heads, B, T, NH, with_db_partial=True)
    (rd,) = attention_backward(dout.astype(np.float64), saved)
    assert np.isfinite(dqkv).all() and np.isfinite(db_partial).all()       # every (tile, column) written once
    # the per-tile column sums add up to the column sums of dqkv (the qkv bias gradient)
    col = dqkv.reshape(-1, 3 * C).astype(np.float64).sum(0)
    assert np.abs(db_partial.astype(np.float64).sum(0) - col).max() < 1e-5 * max(np.abs(col).max(), 1.0)
    assert np.abs(col - rd.reshape(-1, 3 * C).sum(0)).max() < 2e-2 * np.abs(rd).max() * T
    for i, part in enumerate("qkv"):
        e = np.abs(dqkv[..., i * C:(i + 1) * C] - rd[..., i * C:(i + 1) * C]).max() / np.abs(rd[..., i * C:(i + 1) * C]).max()
        assert e < 2e-2, (part, e)


# --------------------------------------------------- the GPU wrappers on a fake CuPy (kernels emulated)

@pytest.fixture(params=["numpy", "cuda"])
def fake_cp(monkeypatch, request):
    """The fake CuPy, its kernels run by the NumPy emulations or by the real .cu code on the CUDA emulator."""
    from emulation import fake_cupy
    if request.param == "cuda":
        from emulation.cuda import emulator
        if emulator.compiler() is None:
            pytest.skip("no C++ compiler (g++) for the CUDA emulator")
    return fake_cupy.install(monkeypatch, kernels=request.param)


def _rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all(), "unwritten (NaN) or misshapen output"
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _f32(*shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


@pytest.mark.parametrize("B,T,V,C", [(2, 7, 11, 33), (3, 9, 20, 64)])
def test_fake_embedding(fake_cp, B, T, V, C):
    ref = importlib.import_module("nanogpt_np.ops.embedding")
    wte, wpe, idx = _f32(V, C), _f32(T + 3, C), rng.integers(0, 5, size=(B, T))
    fwd, bwd = registry.lookup("embedding")
    out, saved = fwd(fake_cp.asarray(wte), fake_cp.asarray(wpe), idx)      # idx from the host
    r, rs = ref.embedding_forward(wte.astype(np.float64), wpe.astype(np.float64), idx)
    assert _rel(out, r) < 1e-6
    d = _f32(B, T, C)
    dwte, dwpe = bwd(fake_cp.asarray(d), saved)
    rdwte, rdwpe = ref.embedding_backward(d.astype(np.float64), rs)
    assert _rel(dwte, rdwte) < 1e-6 and _rel(dwpe, rdwpe) < 1e-6


@pytest.mark.parametrize("N,C", [(1, 1), (9, 33), (70, 768), (300, 7000 // 8)])
def test_fake_layernorm_and_residual(fake_cp, N, C):
    ref = importlib.import_module("nanogpt_np.ops.layernorm")
    x, r, w, b = _f32(N, C), _f32(N, C), _f32(C), _f32(C)
    fwd, bwd = registry.lookup("layernorm")
    y, saved = fwd(fake_cp.asarray(x), fake_cp.asarray(w), fake_cp.asarray(b), 1e-5)
    ry, rs = ref.layernorm_forward(*(a.astype(np.float64) for a in (x, w, b)), 1e-5)
    assert _rel(y, ry) < 1e-5
    dy = _f32(N, C)
    got = bwd(fake_cp.asarray(dy), saved)
    want = ref.layernorm_backward(dy.astype(np.float64), rs)
    assert all(_rel(g, w_) < 1e-5 for g, w_ in zip(got, want))
    fwd, bwd = registry.lookup("residual_layernorm")
    rb = _f32(C)
    (h, y), saved = fwd(fake_cp.asarray(x), fake_cp.asarray(r), fake_cp.asarray(rb), fake_cp.asarray(w),
                        fake_cp.asarray(b), 1e-5)
    (rh, ry), rs = references.residual_layernorm_forward(*(a.astype(np.float64) for a in (x, r, rb, w, b)))
    assert _rel(h, rh) < 1e-6 and _rel(y, ry) < 1e-5
    dh = _f32(N, C)
    dx, dres, drb, dw, db = bwd((fake_cp.asarray(dh), fake_cp.asarray(dy)), saved)
    rdx, _, rdrb, rdw, rdb = references.residual_layernorm_backward((dh.astype(np.float64), dy.astype(np.float64)), rs)
    assert dx is dres and _rel(dx, rdx) < 1e-5 and _rel(dw, rdw) < 1e-5 and _rel(db, rdb) < 1e-5
    assert _rel(drb, rdrb) < 1e-5


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 8), (1,)])
def test_fake_gelu(fake_cp, shape):
    ref = importlib.import_module("nanogpt_np.ops.gelu")
    x = _f32(*shape, s=2)
    fwd, bwd = registry.lookup("gelu")
    y, saved = fwd(fake_cp.asarray(x))
    ry, rs = ref.gelu_forward(x.astype(np.float64))
    assert _rel(y, ry) < 1e-6
    dy = _f32(*shape)
    (dx,) = bwd(fake_cp.asarray(dy), saved)
    assert _rel(dx, ref.gelu_backward(dy.astype(np.float64), rs)[0]) < 1e-6


@pytest.mark.parametrize("N,C", [(5, 7), (100, 64), (1000, 96)])
def test_fake_bias_gelu(fake_cp, N, C):
    x, b, dy = _f32(N, C), _f32(C), _f32(N, C)
    fwd, bwd = registry.lookup("bias_gelu")
    y, saved = fwd(fake_cp.asarray(x), fake_cp.asarray(b))
    ry, rs = references.bias_gelu_forward(x.astype(np.float64), b.astype(np.float64))
    assert _rel(y, ry) < 1e-6
    dx, db = bwd(fake_cp.asarray(dy), saved)
    rdx, rdb = references.bias_gelu_backward(dy.astype(np.float64), rs)
    assert _rel(dx, rdx) < 1e-6 and _rel(db, rdb) < 1e-6


@pytest.mark.parametrize("N,C", [(5, 7), (100, 64)])
def test_fake_bias_gelu_bf16_inputs(fake_cp, monkeypatch, N, C):
    """bf16 precision: x and dy arrive as bf16 bits (c_fc's and mlp.c_proj's gemms), y and dx leave as bf16, db
    is added into the bias's gradient buffer. The kernels chosen are the bf16-input ones (4-wide when C % 4 == 0)."""
    from nanogpt_np.kernels import compile as kc
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    xb, b, dyb, before = float32_to_bf16(_f32(N, C, s=2)), _f32(C), float32_to_bf16(_f32(N, C)), _f32(C)
    fwd, bwd = registry.lookup("bias_gelu")
    launched = []
    real_launch = kc.launch
    monkeypatch.setattr("nanogpt_np.kernels.gelu.launch", lambda m, k, *a: launched.append(k) or real_launch(m, k, *a))
    y, saved = fwd(fake_cp.asarray(xb), fake_cp.asarray(b))
    into = fake_cp.asarray(before)
    dx, db = bwd(fake_cp.asarray(dyb), saved, db_into=into)
    assert launched == ["gelu_forward_bf16x4" if C % 4 == 0 else "gelu_forward_bf16x", "bias_gelu_backward_bf16",
                        "column_sum_finish"]
    ry, rs = references.bias_gelu_forward(bf16_to_float32(xb).astype(np.float64), b.astype(np.float64))
    rdx, rdb = references.bias_gelu_backward(bf16_to_float32(dyb).astype(np.float64), rs)
    assert y.dtype == np.uint16 and dx.dtype == np.uint16 and db is None
    assert _rel(bf16_to_float32(fake_cp.asnumpy(y)), ry) < 2 ** -8
    assert _rel(bf16_to_float32(fake_cp.asnumpy(dx)), rdx) < 2 ** -8
    assert _rel(fake_cp.asnumpy(into), before + rdb) < 1e-5


def test_fake_gelu_widens_a_bf16_input(fake_cp):
    """The unbiased gelu kernel reads float32 only (its backward too): a bf16 x is widened first, never read as
    integers."""
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    xb = float32_to_bf16(_f32(6, 5, s=2))
    fwd, _ = registry.lookup("gelu")
    y, _ = fwd(fake_cp.asarray(xb))
    y_ref, _ = fwd(fake_cp.asarray(bf16_to_float32(xb)))
    np.testing.assert_array_equal(fake_cp.asnumpy(y), fake_cp.asnumpy(y_ref))


def test_bias_gelu_reference_widens_bf16_and_adds_into():
    """Without the kernel (CPU, or the kernel disabled) bias_gelu's reference reads bf16 bits exactly widened,
    and db_into gets db added (what it held is kept)."""
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    gelu_ops = importlib.import_module("nanogpt_np.ops.gelu")
    x, b, dy = _f32(6, 5, s=2), _f32(5), _f32(6, 5)
    xb, dyb = float32_to_bf16(x), float32_to_bf16(dy)
    y, saved = gelu_ops.bias_gelu_forward(xb, b)
    y_ref, saved_ref = gelu_ops.bias_gelu_forward(bf16_to_float32(xb), b)
    np.testing.assert_array_equal(y, y_ref)
    into = np.ones(5, np.float32)
    dx, db = gelu_ops.bias_gelu_backward(dyb, saved, db_into=into)
    dx_ref, db_ref = gelu_ops.bias_gelu_backward(bf16_to_float32(dyb), saved_ref)
    assert db is None
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(into, np.float32(1) + db_ref)
    assert not np.allclose(gelu_ops.bias_gelu_forward(x, b)[0], y, rtol=1e-5)    # control: rounding x shows


@pytest.mark.parametrize("inplace,dloss", [(False, "device"), (True, "device"), (False, 1.0), (True, 0.5)])
def test_fake_cross_entropy(fake_cp, inplace, dloss):
    from nanogpt_np.kernels import cross_entropy as kce
    ref = importlib.import_module("nanogpt_np.ops.cross_entropy")
    N, V = 13, 50
    z, y = _f32(N, V, s=3), rng.integers(0, V, size=N)
    y[[2, 5]] = -1
    fwd, bwd = registry.lookup("cross_entropy")
    kce.set_inplace(inplace)
    try:
        zz = fake_cp.asarray(z)
        loss, saved = fwd(zz, y, -1)
        rl, rs = ref.cross_entropy_forward(z.astype(np.float64), y, -1)
        assert abs(float(loss) - float(rl)) < 1e-6 * abs(float(rl))
        dl = fake_cp.asarray(np.float32(2.0)) if dloss == "device" else dloss
        (d,) = bwd(dl, saved)
        scale = 2.0 if dloss == "device" else dloss
        assert _rel(d, ref.cross_entropy_backward(np.float64(scale), rs)[0]) < 1e-6
        assert (d.data.ptr == zz.data.ptr) == inplace
    finally:
        kce.set_inplace(False)


@pytest.mark.parametrize("clip", [0.0, 0.3])
def test_fake_adamw(fake_cp, clip):
    from nanogpt_np.kernels import adamw
    n = 5000
    p, g, m, v = _f32(n), _f32(n), _f32(n, s=0.01), np.abs(_f32(n, s=0.01))
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=4)
    P, G, M, Vv = (fake_cp.asarray(a.copy()) for a in (p, g, m, v))
    bf = fake_cp.empty((n,), fake_cp.uint16)
    ns = adamw.adamw_step(P, G, M, Vv, n_decay=3000, grad_clip=clip, params_bf16=bf, **kw)
    rp, rm, rv = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    rns = references.adamw_flat_reference(rp, g.astype(np.float64), rm, rv, n_decay=3000, grad_clip=clip, **kw)
    assert _rel(ns, rns) < 1e-6 and _rel(P, rp) < 1e-6 and _rel(M, rm) < 1e-6 and _rel(Vv, rv) < 1e-6
    np.testing.assert_array_equal(np.asarray(bf), float32_to_bf16_np(np.asarray(P)))


def test_fake_adamw_launch_is_the_same_every_step(fake_cp, monkeypatch):
    """lr and the bias corrections reach the kernel through a device array (kernels/adamw.step_scalars): over
    steps with a changing lr and step, every launch argument of the update (pointers and scalars) is the same,
    which is what a captured CUDA graph needs, and each step still matches the float64 reference. Negative
    control: a launch that froze the first step's scalars (a replayed graph of the old kernel) fails it."""
    from nanogpt_np.kernels import adamw
    from nanogpt_np.kernels import compile as kc
    n = 3000
    p, m, v = _f32(n), _f32(n, s=0.01), np.abs(_f32(n, s=0.01))
    P, M, Vv = (fake_cp.asarray(a.copy()) for a in (p, m, v))
    G = fake_cp.empty((n,), fake_cp.float32)                       # the model's flat gradient buffer
    rp, rm, rv = (a.astype(np.float64) for a in (p, m, v))
    launches, real_launch = [], kc.launch

    def recording(module, kernel, grid, block, args, **kw):
        if kernel == "adamw_update":
            launches.append(tuple(a.data.ptr if isinstance(a, fake_cp.ndarray) else (type(a), a.item())
                                  for a in args) + (grid, block))
        return real_launch(module, kernel, grid, block, args, **kw)
    monkeypatch.setattr(adamw, "launch", recording)
    for step, lr in [(1, 1e-4), (2, 3e-4), (7, 6e-4)]:
        g = _f32(n)
        kw = dict(lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        G.set(g)
        adamw.adamw_step(P, G, M, Vv, n_decay=1000, grad_clip=1.0, **kw)
        references.adamw_flat_reference(rp, g.astype(np.float64), rm, rv, n_decay=1000, grad_clip=1.0, **kw)
        assert _rel(P, rp) < 1e-6 and _rel(M, rm) < 1e-6 and _rel(Vv, rv) < 1e-6, step
    assert len(launches) == 3 and launches[0] == launches[1] == launches[2]
    # negative control: replaying the first step's scalars (no step_scalars refresh) gives the wrong update
    frozen = P.copy()
    monkeypatch.setattr(adamw, "step_scalars", lambda lr, b1, b2, step: adamw._scratch["step_scalars"])
    adamw._scratch["step_scalars"].set(np.array([1e-4, 0.1, 0.05], np.float32))      # step 1's values
    g = _f32(n)
    kw = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=8)
    adamw.adamw_step(frozen, fake_cp.asarray(g), M.copy(), Vv.copy(), n_decay=1000, grad_clip=1.0, **kw)
    references.adamw_flat_reference(rp, g.astype(np.float64), rm, rv, n_decay=1000, grad_clip=1.0, **kw)
    assert _rel(frozen, rp) > 1e-5


def float32_to_bf16_np(x):
    from nanogpt_np.kernels.bf16 import float32_to_bf16
    return float32_to_bf16(np.asarray(x).view(np.ndarray))


@pytest.mark.parametrize("kind", ["matmul", "flash"])
@pytest.mark.parametrize("B,T,C,NH", [(2, 17, 128, 2), (1, 70, 64, 1)])
def test_fake_attention(fake_cp, kind, B, T, C, NH):
    from nanogpt_np.kernels.bf16 import round_to_bf16
    ref = importlib.import_module("nanogpt_np.ops.attention")
    qkv = round_to_bf16(_f32(B, T, 3 * C))
    fwd, bwd = registry.lookup("attention_" + kind)
    out, saved = fwd(fake_cp.asarray(qkv), NH)
    ro, rs = ref.attention_forward(qkv.astype(np.float64), NH)
    from nanogpt_np.kernels import compile as kc
    real_kernel = kc.emulator is not fake_cp.emulate               # the .cu code rounds P to bf16 for P V
    assert _rel(out, ro) < (1e-5 if kind == "matmul" else 2e-2 if real_kernel else 1e-6)
    d = _f32(B, T, C)
    (dq,) = bwd(fake_cp.asarray(d), saved)
    tol = 1e-5 if kind == "matmul" else 1e-2                   # flash: dO is rounded to bf16
    assert _rel(dq, ref.attention_backward(d.astype(np.float64), rs)[0]) < tol


def test_fake_bf16_linear_and_head(fake_cp, monkeypatch):
    from nanogpt_np.kernels import linear as klin
    from nanogpt_np.kernels.bf16 import round_to_bf16
    monkeypatch.setattr(registry, "_precision", "bfloat16")
    ref = importlib.import_module("nanogpt_np.ops.linear")
    x, w, b = round_to_bf16(_f32(6, 10)), round_to_bf16(_f32(10, 4)), _f32(4)
    y, saved = klin.linear_forward(fake_cp.asarray(x), fake_cp.asarray(w), fake_cp.asarray(b))
    ry, rs = ref.linear_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    assert saved[0].dtype == np.uint16 and saved[1].dtype == np.uint16        # bf16 copies saved
    assert _rel(y, ry) < 1e-6
    dy = round_to_bf16(_f32(6, 4))
    got = klin.linear_backward(fake_cp.asarray(dy), saved)
    want = ref.linear_backward(dy.astype(np.float64), rs)
    assert all(_rel(g_, w_) < 1e-6 for g_, w_ in zip(got, want))
    wte = round_to_bf16(_f32(9, 10))
    lg, saved = klin.lm_head_forward(fake_cp.asarray(x), fake_cp.asarray(wte))
    rlg, rs = ref.lm_head_forward(x.astype(np.float64), wte.astype(np.float64))
    assert _rel(lg, rlg) < 1e-6
    d = round_to_bf16(_f32(6, 9))
    got = klin.lm_head_backward(fake_cp.asarray(d), saved)
    want = ref.lm_head_backward(d.astype(np.float64), rs)
    assert all(_rel(g_, w_) < 1e-6 for g_, w_ in zip(got, want))


@pytest.mark.parametrize("attention,dtype", [("matmul", "float32"), ("flash", "float32"), ("flash", "bfloat16")])
def test_fake_training_step_matches_cpu(fake_cp, monkeypatch, attention, dtype):
    """The whole model on the 'GPU' path (registry, wrappers, dtype guard, optimizer hook) with emulated kernels
    against the CPU step on the same weights and batch."""
    from nanogpt_np import backend
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW, clip_grad_norm
    from nanogpt_np.tensor import backward
    cfg = GPTConfig(vocab_size=31, block_size=40, n_layer=2, n_head=2, n_embd=128, dropout=0.0)
    x, y = rng.integers(0, 31, size=(2, 33)), rng.integers(0, 31, size=(2, 33))
    y[0, :3] = -1

    def step():
        model = GPT(cfg, seed=3)
        opt = AdamW(model, lr=1e-3)
        model.zero_grad()
        _, loss = model(backend.to_device(x), backend.to_device(y))
        backward(loss)
        model.finish_gradients()
        g = backend.to_numpy(model.flat_grads).copy()
        clip_grad_norm(model.flat_grads, 1.0)
        opt.step()
        return float(loss.item()), g, backend.to_numpy(model.flat_params).copy()

    l_cpu, g_cpu, p_cpu = step()
    monkeypatch.setattr(backend, "_cupy", fake_cp)
    monkeypatch.setattr(backend, "_device", "cuda")
    registry.set_attention(attention)
    registry.set_precision(dtype)
    calls = []
    from nanogpt_np.kernels import compile as kc
    inner = kc.emulator
    monkeypatch.setattr(kc, "emulator", lambda *a: (calls.append(a[:2]), inner(*a))[1])
    try:
        l_gpu, g_gpu, p_gpu = step()
    finally:
        registry.set_attention("matmul")
        registry.set_precision("float32")
    used = {k for _, k in calls}
    ce = "cross_entropy_fused_bf16" if dtype == "bfloat16" else "cross_entropy_fused"     # (chunked lm_head + loss)
    assert {"layernorm_forward", "layernorm_backward", ce, "adamw_update"} <= used, used
    assert ("flash_attention_forward" in used) == (attention == "flash")
    tol = 1e-4 if (attention, dtype) == ("matmul", "float32") else 3e-2
    assert abs(l_gpu - l_cpu) < tol * abs(l_cpu)
    assert _rel(g_gpu, g_cpu) < tol
    assert _rel(p_gpu, p_cpu) < tol


def test_benchmark_scripts_run_on_fake_gpu(fake_cp, monkeypatch, capsys):
    """benchmarks/kernels.py and benchmarks/train_gpu.py, at toy sizes on the fake GPU: the scripts' own code
    (argument handling, every kernel row, the table) runs before any GPU time is spent on them."""
    import os
    import sys as _sys
    from nanogpt_np import backend
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(bench)
    monkeypatch.setattr(backend, "_device", "cpu")
    import kernels as kbench
    import train_gpu
    monkeypatch.setitem(_sys.modules, "torch", None)                # no PyTorch rows on the CPU
    assert kbench.main(["--small", "--iters", "1", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "Kernels on fake GPU" in out and "cross-entropy" in out and "flash" in out
    assert train_gpu.main(["--small", "--quick", "--steps", "1", "--no-torch", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "Training throughput on fake GPU" in out and "bf16 matmuls, flash attention" in out
    # --graph: the graph row runs the configuration it names (bf16 + flash here, whatever the previous row
    # left in the registry), and gets as far as the capture, which the fake refuses
    graph = json.loads(out.split("CUDA graph of a whole step: ")[1].split("\n")[0])
    assert graph["captured"] is False and "cannot capture" in graph["reason"], graph
    assert (graph["attention"], graph["dtype"], graph["tf32"]) == ("flash", "bfloat16", True)
    backend.use_device("cpu")


def test_registry_configure(fake_cp):
    from nanogpt_np.kernels import cross_entropy as kce
    try:
        registry.configure(attention="flash", dtype="bfloat16", tf32=True, loss_is_root=True, logits_reusable=False)
        assert registry.attention_kind() == "flash" and registry.precision() == "bfloat16"
        assert kce._assume_unit_dloss and kce._inplace
    finally:
        registry.configure(attention="matmul", dtype="float32", tf32=False, loss_is_root=False, logits_reusable=True)
    assert not kce._assume_unit_dloss and not kce._inplace and registry.precision() == "float32"


# ------------------------------------------------------- cross_entropy.cu's scalar helpers, compiled for the host

@pytest.fixture
def ce_helpers(tmp_path):
    import ctypes
    from emulation import device_functions
    if device_functions.compiler() is None:
        pytest.skip("no host C++ compiler")
    lib = device_functions.build(tmp_path, "cross_entropy", ["online_add", "row_loss"], """
extern "C" void row_max_sum(const float* z, long n, float* out) {      // one thread's pass over its elements
    float m = -INFINITY, r = 0.0f;                                       // (max, r = sum of exp(z - max) - 1)
    for (long j = 0; j < n; j++) online_add(m, r, z[j]);
    out[0] = m; out[1] = r;
}
extern "C" float loss_of(float m, float r, float zy) { return row_loss(m, r, zy); }
""")
    lib.loss_of.restype = ctypes.c_float
    lib.loss_of.argtypes = [ctypes.c_float] * 3

    def max_sum(z):
        z = np.ascontiguousarray(z, np.float32)
        out = np.empty(2, np.float32)
        lib.row_max_sum(z.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(z.size), out.ctypes.data_as(ctypes.c_void_p))
        return float(out[0]), float(out[1])
    return max_sum, lib.loss_of


def test_cross_entropy_online_sum_skips_leading_minus_inf(ce_helpers):
    """A -inf logit as a thread's first element made exp(-inf - -inf) = NaN in the running sum."""
    max_sum, _ = ce_helpers
    z = np.array([-np.inf, -np.inf, 1.0, -np.inf, 2.0, 0.5], np.float32)
    m, r = max_sum(z)                                                     # the sum of exp(z - m) is 1 + r
    assert m == 2.0 and math.isclose(1 + r, float(np.exp(z[2:].astype(np.float64) - 2.0).sum()), rel_tol=1e-6)
    assert max_sum(np.full(4, -np.inf, np.float32)) == (-np.inf, 0.0)        # all masked: empty, not NaN


def test_cross_entropy_row_loss_does_not_cancel(ce_helpers):
    """Logits around 100 with a confident target (one thread's share of a row, 64 elements): the loss (~0.2)
    is small next to lse (~104). lse - z[y] in float32 loses digits there (up to ~4e-5 relative, over the GPU
    tests' 1e-5); (m - z[y]) + log1p(r) does not."""
    max_sum, loss_of = ce_helpers
    gen = np.random.default_rng(5)
    worst_old = 0.0
    for _ in range(20):
        z = (gen.standard_normal(64) + 100.0).astype(np.float32)
        y = int(np.argmax(z))
        z[y] += 4.0                                               # a confident, correct prediction
        z64 = z.astype(np.float64)
        ref = float(np.log(np.exp(z64 - z64.max()).sum()) + z64.max() - z64[y])
        m, r = max_sum(z)
        got = loss_of(m, r, z[y])
        assert abs(got - ref) / ref < 1e-5, (got, ref)
        old = float(np.float32(np.float32(m) + np.float32(np.log(np.float32(1 + r)))) - z[y])  # lse - z[y], float32
        worst_old = max(worst_old, abs(old - ref) / ref)
    assert worst_old > 1e-5                                       # the cases really cancel in the old form


def test_cross_entropy_tiny_loss_keeps_its_digits(ce_helpers):
    """A very confident correct prediction (the target beats the rest by 7 to 15): the loss (1e-7 .. 1e-3) is
    log(s) with s next to 1, where a float32 s has only ~1e-7 of resolution: log(s) would be off by up to 100%.
    Kept as r = s - 1, log1p(r) stays within float32's relative precision."""
    max_sum, loss_of = ce_helpers
    gen = np.random.default_rng()
    worst_log_s = 0.0
    for _ in range(20):
        z = gen.standard_normal(64).astype(np.float32)
        y = int(np.argmax(z))
        z[y] += np.float32(gen.uniform(7.0, 15.0))
        z64 = z.astype(np.float64)
        ref = float(np.log1p(np.exp(np.delete(z64, y) - z64[y]).sum()))
        m, r = max_sum(z)
        assert abs(loss_of(m, r, z[y]) - ref) <= 1e-5 * ref, (loss_of(m, r, z[y]), ref)
        worst_log_s = max(worst_log_s, abs(float(np.log(np.float32(1 + r))) - ref) / ref)
    assert worst_log_s > 1e-3                                      # log(s) in float32 really loses them


def test_fake_cross_entropy_out_of_range_target_and_minus_inf(fake_cp):
    """The contract of cross_entropy.cu (mirrored by the fake): a target outside [0, V) that is not ignored makes
    that row's loss and gradient NaN (no read outside the row; the CPU op raises instead), -inf logits are fine."""
    ref = importlib.import_module("nanogpt_np.ops.cross_entropy")
    N, V = 6, 40
    z = _f32(N, V, s=2)
    z[:, :5] = -np.inf                                           # masked-out vocabulary entries
    y = np.array([7, 39, -1, 12, 5, 20])
    fwd, bwd = registry.lookup("cross_entropy")
    loss, saved = fwd(fake_cp.asarray(z), fake_cp.asarray(y), -1)
    rl, rs = ref.cross_entropy_forward(z.astype(np.float64), y, -1)
    assert abs(float(loss) - float(rl)) < 1e-6 * abs(float(rl))
    (d,) = bwd(1.0, saved)
    assert _rel(d, ref.cross_entropy_backward(np.float64(1.0), rs)[0]) < 1e-6
    for bad in (V, -5):
        yb = y.copy()
        yb[3] = bad
        loss, saved = fwd(fake_cp.asarray(z), fake_cp.asarray(yb), -1)
        assert np.isnan(float(loss))
        (d,) = bwd(1.0, saved)
        d = np.asarray(d)
        assert np.isnan(d[3]).all() and np.isfinite(np.delete(d, 3, axis=0)).all()


# ------------------------------------------------------------ flash backward: D from the same bf16 dO as dP

def _dq_dk_over_dv(dqkv, C):
    d = np.abs(np.asarray(dqkv, np.float64))
    return d[..., :2 * C].max() / d[..., 2 * C:].max()


def test_fake_flash_single_position_has_no_dq_dk(fake_cp):
    """With T = 1 the softmax has one entry: dq and dk vanish. They do only if D = rowsum(dO * O) uses the same
    bf16 dO as dP = dO V^T (before, D used the float32 dO and dq, dk came out at ~1e-3 of dv)."""
    from nanogpt_np.kernels.bf16 import round_to_bf16
    B, T, NH = 2, 1, 2
    C = 64 * NH
    qkv = round_to_bf16(_f32(B, T, 3 * C))
    fwd, bwd = registry.lookup("attention_flash")
    out, saved = fwd(fake_cp.asarray(qkv), NH)
    (dqkv,) = bwd(fake_cp.asarray(_f32(B, T, C)), saved)
    assert _dq_dk_over_dv(dqkv, C) < 1e-6


def test_flash_emulation_single_position_has_no_dq_dk():
    """The same property for the lane-by-lane replay of flash_attention.cu (fp32 accumulation noise only)."""
    from emulation import flash_emulator as fe
    from nanogpt_np.kernels.bf16 import round_to_bf16
    r = np.random.default_rng(11)
    qkv = round_to_bf16(r.standard_normal((1, 1, 3 * 64)).astype(np.float32))
    out, L2, heads = fe.forward(qkv, 1)
    dqkv = fe.backward(r.standard_normal((1, 1, 64)).astype(np.float32), out, L2, heads, 1, 1, 1)
    assert _dq_dk_over_dv(dqkv, 64) < 1e-5
