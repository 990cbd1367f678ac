"""Negative controls for the CUDA emulator: break a kernel's source on purpose (the kind of slip a GPU would
run without complaint) and check that running the mutated kernel through the wrappers, on the emulator, is
caught: an emulator error, a non-finite output, or a result off the NumPy reference, in at least one of
the schedules. The unmutated source must pass in every schedule (so a detection is the mutation's doing)."""
import importlib

import numpy as np
import pytest

from emulation.cuda import emulator as emu

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no C++ compiler (g++) for the CUDA emulator")


def _rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(got).all():
        return np.inf
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_flash(cp):
    """Flash attention forward + backward, 3 tiles of 64 with a partial last one; max relative error."""
    from nanogpt_np.kernels import registry
    from nanogpt_np.kernels.bf16 import round_to_bf16
    att = importlib.import_module("nanogpt_np.ops.attention")
    rng = np.random.default_rng(5)
    B, T, C, NH = 1, 130, 128, 2
    qkv = round_to_bf16(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    fwd, bwd = registry.lookup("attention_flash")
    out, saved = fwd(cp.asarray(qkv), NH)
    rout, rsaved = att.attention_forward(qkv.astype(np.float64), NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    (dqkv,) = bwd(cp.asarray(dout), saved)
    (rd,) = att.attention_backward(dout.astype(np.float64), rsaved)
    errs = [_rel(cp.asnumpy(out), rout)]
    errs += [_rel(cp.asnumpy(dqkv)[..., i * C:(i + 1) * C], rd[..., i * C:(i + 1) * C]) for i in range(3)]
    return max(errs) / 2e-2                     # > 1: outside the GPU test's tolerance


def run_layernorm(cp):
    from nanogpt_np.kernels import registry
    ln = importlib.import_module("nanogpt_np.ops.layernorm")
    rng = np.random.default_rng(6)
    N, C = 37, 100
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((N, C), (C,), (C,)))
    fwd, bwd = registry.lookup("layernorm")
    y, saved = fwd(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
    ry, rsaved = ln.layernorm_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    got = bwd(cp.asarray(dy), saved)
    want = ln.layernorm_backward(dy.astype(np.float64), rsaved)
    return max([_rel(cp.asnumpy(y), ry)] + [_rel(cp.asnumpy(g), r) for g, r in zip(got, want)]) / 1e-5


def run_cross_entropy_inplace(cp):
    from nanogpt_np.kernels import cross_entropy as ce
    from nanogpt_np.kernels import registry
    ops = importlib.import_module("nanogpt_np.ops.cross_entropy")
    rng = np.random.default_rng(7)
    N, V = 4, 300
    logits = (rng.standard_normal((N, V)) * 3).astype(np.float32)
    targets = np.array([17, 280, 5, 99])
    fwd, bwd = registry.lookup("cross_entropy")
    ce.set_inplace(True)
    try:
        loss, saved = fwd(cp.asarray(logits), cp.asarray(targets), -1)
        (d,) = bwd(cp.ones((), dtype=cp.float32), saved)
    finally:
        ce.set_inplace(False)
    rloss, rsaved = ops.cross_entropy_forward(logits.astype(np.float64), targets, -1)
    (rd,) = ops.cross_entropy_backward(np.float64(1.0), rsaved)
    return max(abs(float(loss) - float(rloss)) / abs(float(rloss)), _rel(cp.asnumpy(d), rd)) / 1e-5


def run_cross_entropy_bf16(cp):
    """cross_entropy_fused_bf16 on bf16 logits, in place as kernels/lm_head_loss.py runs it: its losses must be
    exactly the float32 kernel's on the same values (widening bf16 is exact, the math is the same) and its
    gradient exactly the float32 kernel's rounded to nearest even; and both within the GPU test's tolerances of
    float64 (losses 1e-5, the bf16 gradient half a bf16 ulp + 1e-5 of its largest element)."""
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    from nanogpt_np.kernels.compile import launch
    rng = np.random.default_rng(8)
    N, V = 3, 301
    bits = float32_to_bf16((rng.standard_normal((N, V)) * 3).astype(np.float32))       # (N, V) bf16
    z = bf16_to_float32(bits)                                                           # the same values, float32
    y = np.array([17, -1, 300])
    targets, n_kept = cp.asarray(y), cp.asarray(np.float32(2.0))
    l32, d32 = cp.empty((N,), dtype=cp.float32), cp.empty((N, V), dtype=cp.float32)
    launch("cross_entropy", "cross_entropy_fused", (N,), (256,), (l32, d32, cp.asarray(z), targets, n_kept,
                                                                  np.int32(V), np.int64(-1)))
    l16, d16 = cp.empty((N,), dtype=cp.float32), cp.asarray(bits)
    launch("cross_entropy", "cross_entropy_fused_bf16", (N,), (256,), (l16, d16, d16, targets, n_kept,
                                                                       np.int32(V), np.int64(-1)))
    l32, d32, l16, d16 = (cp.asnumpy(a) for a in (l32, d32, l16, d16))
    same = np.array_equal(l32, l16) and np.array_equal(float32_to_bf16(d32), d16)
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1)
    kept = y != -1
    ref_losses = np.where(kept, lse - z64[np.arange(N), np.where(kept, y, 0)], 0.0)
    ref_d = np.exp(z64 - lse[:, None])
    ref_d[np.arange(N)[kept], y[kept]] -= 1.0
    ref_d *= (kept / 2.0)[:, None]
    err = max(_rel(l16, ref_losses) / 1e-5, _rel(bf16_to_float32(d16), ref_d) / (2.0 ** -8 + 1e-5))
    return max(err, 0.0 if same else 10.0)


def run_bf16_outputs(cp):
    """With bf16 activations: bias_attention on flash from a float32 x (qkv bias added in qkv_to_bf16, bf16 out
    and dqkv, db summed by the backward kernels from the bf16 dqkv), residual_layernorm with a residual bias and bf16 y, bias_gelu with bf16 y and dx."""
    from nanogpt_np.kernels import references, registry
    from nanogpt_np.kernels.bf16 import bf16_to_float32, round_to_bf16
    att = importlib.import_module("nanogpt_np.ops.attention")
    rng = np.random.default_rng(8)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    bf = lambda a: bf16_to_float32(cp.asnumpy(a))
    old = registry._precision
    registry._precision = "bfloat16"
    try:
        B, T, C, NH = 1, 130, 128, 2
        b = round_to_bf16(f32(3 * C))
        x = (round_to_bf16(f32(B, T, 3 * C) + b) - b).astype(np.float32)
        fwd, bwd = registry.lookup("bias_attention_flash")
        out, saved = fwd(cp.asarray(x), cp.asarray(b), NH)
        dout = f32(B, T, C)
        dx, db = bwd(cp.asarray(dout), saved)
        rout, rs = att.bias_attention_forward(x.astype(np.float64), b.astype(np.float64), NH)
        rdx, rdb = att.bias_attention_backward(dout.astype(np.float64), rs)
        errs = [_rel(bf(out), rout) / 2e-2, _rel(bf(dx), rdx) / 2e-2, _rel(cp.asnumpy(db), rdb) / 2e-2]
        N, C = 37, 100
        h0, r, rb, w, lb = f32(N, C), f32(N, C), f32(C), f32(C), f32(C)
        fwd, bwd = registry.lookup("residual_layernorm")
        (h, y), _ = fwd(*(cp.asarray(a) for a in (h0, r, rb, w, lb)), 1e-5)      # h: the bf16 residual stream
        (rh, ry), _ = references.residual_layernorm_forward(*(a.astype(np.float64) for a in (h0, r, rb, w, lb)),
                                                            round_h=round_to_bf16)
        errs += [_rel(bf(h), rh) / 2 ** -8, _rel(bf(y), ry) / 2 ** -8]
        N, C = 9, 64
        xg, bg, dyg = f32(N, C), f32(C), f32(N, C)
        fwd, bwd = registry.lookup("bias_gelu")
        y, saved = fwd(cp.asarray(xg), cp.asarray(bg))
        dxg, dbg = bwd(cp.asarray(dyg), saved)
        ry, rs = references.bias_gelu_forward(xg.astype(np.float64), bg.astype(np.float64))
        rdx, rdb = references.bias_gelu_backward(dyg.astype(np.float64), rs)
        errs += [_rel(bf(y), ry) / 2 ** -8, _rel(bf(dxg), rdx) / 2 ** -8, _rel(cp.asnumpy(dbg), rdb) / 1e-5]
    finally:
        registry._precision = old
    return max(errs)


def run_embedding_into(cp):
    """The embedding backward adding into gradient buffers that already hold something (the model's case)."""
    from nanogpt_np.kernels import registry
    emb = importlib.import_module("nanogpt_np.ops.embedding")
    rng = np.random.default_rng(9)
    B, T, V, C, Tmax = 2, 9, 7, 36, 12
    wte, wpe = rng.standard_normal((V, C)).astype(np.float32), rng.standard_normal((Tmax, C)).astype(np.float32)
    idx = rng.integers(0, V, size=(B, T))
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    held_wte, held_wpe = rng.standard_normal((V, C)), rng.standard_normal((Tmax, C))
    _, saved = registry.lookup("embedding")[0](cp.asarray(wte), cp.asarray(wpe), cp.asarray(idx))
    into_wte, into_wpe = cp.asarray(held_wte.astype(np.float32)), cp.asarray(held_wpe.astype(np.float32))
    registry.lookup("embedding")[1](cp.asarray(dout), saved, dwte_into=into_wte, dwpe_into=into_wpe)
    _, rsaved = emb.embedding_forward(wte.astype(np.float64), wpe.astype(np.float64), idx)
    rdwte, rdwpe = emb.embedding_backward(dout.astype(np.float64), rsaved)
    return max(_rel(cp.asnumpy(into_wte), held_wte + rdwte), _rel(cp.asnumpy(into_wpe), held_wpe + rdwpe)) / 1e-5


def _on_grid(rng, *shape):
    """Multiples of 2^-10 below 8 in size: x + r + rb is exact in float32, so the bf16 h must match bit for bit."""
    return np.clip(np.round(rng.standard_normal(shape) * 1024) / 1024, -7.9, 7.9).astype(np.float32)


def _residual_layernorm_bf16(cp, x_device, x, r, rb, w, b, dh, dy, held):
    """residual_layernorm forward and backward in bf16 precision as the model runs it (r, dh, dy as bf16 bits,
    bf16_dr; dw, db, drb added into copies of `held`), and its float64 reference with h rounded to bf16.
    x_device: x as the kernel gets it (float32, or bf16 bits). Returns ((h, y), (dx, dres, drb, dw, db), into,
    ((rh, ry), (rdx, rdrb, rdw, rdb)))."""
    from nanogpt_np.kernels import references, registry
    from nanogpt_np.kernels.bf16 import float32_to_bf16, round_to_bf16
    old = registry._precision
    registry._precision = "bfloat16"
    try:
        fwd, bwd = registry.lookup("residual_layernorm")
        hy, saved = fwd(x_device, cp.asarray(float32_to_bf16(r)), *(cp.asarray(a) for a in (rb, w, b)), 1e-5)
        into = [cp.asarray(a) for a in held]
        grads = bwd((cp.asarray(float32_to_bf16(dh)), cp.asarray(float32_to_bf16(dy))), saved,
                    dw_into=into[0], db_into=into[1], drb_into=into[2], bf16_dr=True)
    finally:
        registry._precision = old
    rhy, rs = references.residual_layernorm_forward(*(a.astype(np.float64) for a in (x, r, rb, w, b)),
                                                    round_h=round_to_bf16)
    rdx, _, rdrb, rdw, rdb = references.residual_layernorm_backward((dh.astype(np.float64), dy.astype(np.float64)), rs)
    return hy, grads, into, (rhy, (rdx, rdrb, rdw, rdb))


def run_residual_layernorm_backward(cp):
    """residual_layernorm's backward as the model calls it with bf16 matmuls at the first block's ln_2 (x float32,
    so dx float32): dw, db and the residual bias's drb added into buffers that already hold something, dresidual
    asked for as bf16 (bf16_dr), dh arriving as bf16 bits (the bf16 h's gradient) and dy too (a bf16 matmul's
    bf16_dx), and in the forward the residual as bf16 bits (bf16_out), h stored as bf16 (exact-grid inputs: bit
    for bit). Errors against the float64 reference; the bf16 copy must be exactly the float32 dx rounded to
    nearest even."""
    from nanogpt_np.kernels.bf16 import float32_to_bf16, round_to_bf16
    rng = np.random.default_rng(9)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    N, C = 37, 100
    x, r, rb, w, b, dh, dy = _on_grid(rng, N, C), _on_grid(rng, N, C), _on_grid(rng, C), f32(C), f32(C), f32(N, C), \
        f32(N, C)
    dh, dy, r = round_to_bf16(dh), round_to_bf16(dy), round_to_bf16(r)
    held = [f32(C) for _ in range(3)]
    (h, _), (dx, dres, drb, dw, db), into, ((rh, _), (rdx, rdrb, rdw, rdb)) = _residual_layernorm_bf16(
        cp, cp.asarray(x), x, r, rb, w, b, dh, dy, held)
    if (dw, db, drb) != (None, None, None) or dres.dtype != np.uint16 or dx.dtype != np.float32:
        return 10.0
    if not np.array_equal(cp.asnumpy(h), float32_to_bf16(rh)):
        return 10.0
    dx = cp.asnumpy(dx)
    errs = [_rel(dx, rdx)] + [_rel(cp.asnumpy(g) - h, ref) for g, h, ref in zip(into, held, (rdw, rdb, rdrb))]
    exact = np.array_equal(float32_to_bf16(dx), cp.asnumpy(dres))
    return max(errs) / 1e-5 if exact else 10.0


def run_residual_stream_bf16(cp):
    """A block boundary past the first in bf16 precision: x (the previous h), r, dh and dy all bf16 bits, bf16_dr.
    h must be x + r + rb rounded once, bit for bit (exact-grid inputs); y, and dx = dr (one bf16 array), must be
    their float64 references (y from the ROUNDED h) rounded once: at most 0.2% of the bits may differ (where the
    float32 math and the reference straddle a rounding midpoint; a second rounding moves ~20%); dw, db, drb to
    1e-5."""
    from nanogpt_np.kernels.bf16 import float32_to_bf16, round_to_bf16
    rng = np.random.default_rng(10)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    N, C = 37, 100
    x, r, rb, w, b = round_to_bf16(_on_grid(rng, N, C)), round_to_bf16(_on_grid(rng, N, C)), _on_grid(rng, C), \
        f32(C), f32(C)
    dh, dy = round_to_bf16(f32(N, C)), round_to_bf16(f32(N, C))
    held = [f32(C) for _ in range(3)]
    (h, y), (dx, dres, drb, dw, db), into, ((rh, ry), (rdx, rdrb, rdw, rdb)) = _residual_layernorm_bf16(
        cp, cp.asarray(float32_to_bf16(x)), x, r, rb, w, b, dh, dy, held)
    if (dw, db, drb) != (None, None, None) or dres is not dx or dx.dtype != np.uint16:
        return 10.0
    if not np.array_equal(cp.asnumpy(h), float32_to_bf16(rh)):
        return 10.0
    mismatch = [np.mean(cp.asnumpy(a) != float32_to_bf16(ref)) / 2e-3 for a, ref in ((y, ry), (dx, rdx))]
    errs = [_rel(cp.asnumpy(g) - h, ref) / 1e-5 for g, h, ref in zip(into, held, (rdw, rdb, rdrb))]
    return max(mismatch + errs)


def run_bias_gelu_bf16_inputs(cp):
    """bias_gelu in bf16 precision as the model runs it: x and dy arrive as bf16 bits (c_fc's and mlp.c_proj's
    gemms), y and dx leave as bf16, db is added into a buffer that already holds something. C = 64 takes the
    4-wide forward kernel, C = 7 the one-element one; both backward through bias_gelu_backward_bf16."""
    from nanogpt_np.kernels import references, registry
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    rng = np.random.default_rng(9)
    bf = lambda a: bf16_to_float32(cp.asnumpy(a))
    old = registry._precision
    registry._precision = "bfloat16"
    errs = []
    try:
        for N, C in ((9, 64), (5, 7)):
            xb = float32_to_bf16((rng.standard_normal((N, C)) * 2).astype(np.float32))
            dyb = float32_to_bf16(rng.standard_normal((N, C)).astype(np.float32))
            b, held = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
            fwd, bwd = registry.lookup("bias_gelu")
            y, saved = fwd(cp.asarray(xb), cp.asarray(b))
            into = cp.asarray(held)
            dx, db = bwd(cp.asarray(dyb), saved, db_into=into)
            assert db is None
            ry, rs = references.bias_gelu_forward(bf16_to_float32(xb).astype(np.float64), b.astype(np.float64))
            rdx, rdb = references.bias_gelu_backward(bf16_to_float32(dyb).astype(np.float64), rs)
            errs += [_rel(bf(y), ry) / 2 ** -8, _rel(bf(dx), rdx) / 2 ** -8,
                     _rel(cp.asnumpy(into), held + rdb) / 1e-5]
    finally:
        registry._precision = old
    return max(errs)


def run_column_sum_bf16(cp):
    """precision.column_sum_bf16 (bf16.cu's partial column sums + a gemm) against float64 sums."""
    from nanogpt_np.kernels import precision
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16
    x = float32_to_bf16(np.random.default_rng(10).standard_normal((300, 70)).astype(np.float32))
    got = cp.asnumpy(precision.column_sum_bf16(cp.asarray(x)))
    return _rel(got, bf16_to_float32(x).astype(np.float64).sum(0)) / 1e-5


def run_flash_bf16_in(cp):
    """bias_attention on flash as the bf16 model runs it: x (B, T, 3C) bf16 read in place (row stride 3C, head
    offsets), the float32 bias added per loaded tile and fragment, dout bf16, db added into a buffer."""
    from nanogpt_np.kernels import registry
    from nanogpt_np.kernels.bf16 import bf16_to_float32, float32_to_bf16, round_to_bf16
    att = importlib.import_module("nanogpt_np.ops.attention")
    rng = np.random.default_rng(9)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    old = registry._precision
    registry._precision = "bfloat16"
    try:
        B, T, C, NH = 2, 70, 128, 2
        x16, b, dout16, before = float32_to_bf16(f32(B, T, 3 * C)), f32(3 * C), float32_to_bf16(f32(B, T, C)), f32(3 * C)
        fwd, bwd = registry.lookup("bias_attention_flash")
        out, saved = fwd(cp.asarray(x16), cp.asarray(b), NH)
        db = cp.asarray(before)
        dx, _ = bwd(cp.asarray(dout16), saved, db_into=db)
        xb = round_to_bf16(bf16_to_float32(x16) + b)
        rout, rs = att.attention_forward(xb.astype(np.float64), NH)
        (rdx,) = att.attention_backward(bf16_to_float32(dout16).astype(np.float64), rs)
        got = bf16_to_float32(cp.asnumpy(dx))
        errs = [_rel(bf16_to_float32(cp.asnumpy(out)), rout)]
        errs += [_rel(got[..., i * C:(i + 1) * C], rdx[..., i * C:(i + 1) * C]) for i in range(3)]
        errs.append(_rel(cp.asnumpy(db) - before, rdx.reshape(-1, 3 * C).sum(0)))
    finally:
        registry._precision = old
    return max(errs) / 2e-2


# (name, source, text to replace, replacement, runner)
MUTATIONS = [
    ("embedding backward: a run's sum written over the buffer instead of added", "encoder",
     "dwte[o] = accumulate ? dwte[o] + acc : acc;", "dwte[o] = acc;", run_embedding_into),
    ("embedding backward: the wpe column sums written over the buffer instead of added", "encoder",
     "dwpe[i] = accumulate ? dwpe[i] + acc : acc;", "dwpe[i] = acc;", run_embedding_into),
    ("flash: no barrier before the next K/V tile overwrites shared memory", "flash_attention",
     "        __syncthreads();                               // the previous tiles are no longer read\n", "",
     run_flash),
    ("flash forward: no barrier between the tile's copies landing (each thread's own) and reading it",
     "flash_attention",
     "        __syncthreads();                               // forward: every thread's copies of tile kt have landed\n",
     "", run_flash),
    ("flash forward: the skip test uses the block's first row (warps 4-7 skip their diagonal key tile too)",
     "flash_attention", "have landed\n        if (kt * TILE > q0 + 15) continue;             // every key",
     "have landed\n        if (kt * TILE > qb * QBLOCK + 15) continue;    // every key",
     run_flash),
    ("flash forward: warps 0-3 skip the last key tile before its loads and barriers (unbalanced __syncthreads)",
     "flash_attention",
     "        __syncthreads();                               // the previous tiles are no longer read\n"
     "        if (kt + 1 < n_kt) {",
     "        if (kt * TILE > q0 + 15) continue;\n"
     "        __syncthreads();                               // the previous tiles are no longer read\n"
     "        if (kt + 1 < n_kt) {", run_flash),
    # cp.async double buffering (each kernel streams tiles through two buffers)
    ("flash forward: no cp.async.wait_group before using a tile (copies still in flight)", "flash_attention",
     "        cp_async_wait<1>();                            // forward: this thread's copies of tile kt have landed\n",
     "", run_flash),
    ("flash forward: cp.async.wait_group 2 (lets tile kt itself still be in flight)", "flash_attention",
     "cp_async_wait<1>();                            // forward:", "cp_async_wait<2>();                            // forward:",
     run_flash),
    ("flash forward: waits only on the last tile (nothing left in flight at exit: caught by the values alone)",
     "flash_attention",
     "        cp_async_wait<1>();                            // forward: this thread's copies of tile kt have landed\n",
     "        if (kt + 1 == n_kt) cp_async_wait<0>();\n", run_flash),
    ("flash dkdv: waits only on the last query tile (caught by the values alone)", "flash_attention",
     "        cp_async_wait<1>();                            // dkdv: this thread's copies of query tile qt have landed\n",
     "        if (qt + 1 == n_qt) cp_async_wait<0>();\n", run_flash),
    ("flash forward: the bias added before the tile's copies land", "flash_attention",
     "        cp_async_wait<1>();                            // forward: this thread's copies of tile kt have landed\n"
     "        add_tile_bias(Ks[cur], K, kt * TILE);\n",
     "        add_tile_bias(Ks[cur], K, kt * TILE);\n"
     "        cp_async_wait<1>();                            // forward: this thread's copies of tile kt have landed\n",
     run_flash_bf16_in),
    ("flash forward: the next tile copied into the buffer being read", "flash_attention",
     "            copy_tile_async(Vs[1 - cur], V, (kt + 1) * TILE);\n        }\n        cp_async_commit();                             // (empty",
     "            copy_tile_async(Vs[cur], V, (kt + 1) * TILE);\n        }\n        cp_async_commit();                             // (empty",
     run_flash),
    ("flash dkdv: no cp.async.wait_group before using a query tile", "flash_attention",
     "        cp_async_wait<1>();                            // dkdv: this thread's copies of query tile qt have landed\n",
     "", run_flash),
    ("flash dkdv: cp.async.wait_group 2", "flash_attention",
     "cp_async_wait<1>();                            // dkdv:", "cp_async_wait<2>();                            // dkdv:",
     run_flash),
    ("flash dkdv: no barrier after the wait", "flash_attention",
     "        __syncthreads();                               // dkdv: every thread's copies of query tile qt have landed\n",
     "", run_flash),
    ("flash dkdv: no barrier before the next query tile's copies refill the buffer read last", "flash_attention",
     "        __syncthreads();                               // the previous query tiles are no longer read\n", "",
     run_flash),
    ("flash dkdv: the next L and D rows copied into the current buffer", "flash_attention",
     "copy_rows_async(Ls[nxt], Ds[nxt], L2, D, rows + r);", "copy_rows_async(Ls[cur], Ds[cur], L2, D, rows + r);",
     run_flash),
    ("flash dq: no cp.async.wait_group before using a key tile", "flash_attention",
     "        cp_async_wait<1>();                            // dq: this thread's copies of key tile kt have landed\n",
     "", run_flash),
    ("flash dq: cp.async.wait_group 2", "flash_attention",
     "cp_async_wait<1>();                            // dq:", "cp_async_wait<2>();                            // dq:",
     run_flash),
    ("flash dq: no barrier after the wait", "flash_attention",
     "        __syncthreads();                               // dq: every thread's copies of key tile kt have landed\n",
     "", run_flash),
    ("flash dq: no barrier before the next key tile's copies refill the buffer read last", "flash_attention",
     "        __syncthreads();                               // the previous key tiles are no longer read\n", "",
     run_flash),
    ("flash: mma A and B operands swapped", "flash_attention",
     "{%4,%5,%6,%7}, {%8,%9}", "{%8,%9,%6,%7}, {%4,%5}", run_flash),
    ("flash: ldmatrix .trans left out (the [k][n] tiles V, K, Q, dO read as if they held B transposed)",
     "flash_attention", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
     run_flash),
    ("flash: load_b_x4 row addresses for matrices 1 and 2 swapped (k halves taken for n blocks)", "flash_attention",
     "ldmatrix_x4(b, p + (lane % 8 + 8 * (lane / 16)) * LDS + 8 * (lane / 8 % 2));",
     "ldmatrix_x4(b, p + (lane % 8 + 8 * (lane / 8 % 2)) * LDS + 8 * (lane / 16));", run_flash),
    ("flash: load_b_x4_trans row addresses for matrices 1 and 2 swapped", "flash_attention",
     "ldmatrix_x4_trans(b, p + (lane % 8 + 8 * (lane / 8 % 2)) * LDS + 8 * (lane / 16));",
     "ldmatrix_x4_trans(b, p + (lane % 8 + 8 * (lane / 16)) * LDS + 8 * (lane / 8 % 2));", run_flash),
    ("flash: rows g and g+8 of the A fragment swapped", "flash_attention",
     "    a[0] = head_pair(x, row0 + g, col0 + 2 * t);\n    a[1] = head_pair(x, row0 + g + 8, col0 + 2 * t);\n",
     "    a[0] = head_pair(x, row0 + g + 8, col0 + 2 * t);\n    a[1] = head_pair(x, row0 + g, col0 + 2 * t);\n",
     run_flash),
    ("flash: causal mask off by one (sees the next key)", "flash_attention",
     "s[j][e] = (key <= row) ?", "s[j][e] = (key <= row + 1) ?", run_flash),
    ("flash: quad_sum shuffles with offset 4 instead of 2", "flash_attention",
     "return v + __shfl_xor_sync(0xffffffffu, v, 2);", "return v + __shfl_xor_sync(0xffffffffu, v, 4);", run_flash),
    ("layernorm: warp_sum starts at offset 8 (half the warp)", "layernorm",
     "for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync", "for (int off = 8; off > 0; off >>= 1) v += "
     "__shfl_xor_sync", run_layernorm),
    ("layernorm backward: no barrier before adding the warps' dw/db slices", "layernorm",
     "    __syncthreads();\n    // block sum of the warp slices", "    // block sum of the warp slices", run_layernorm),
    ("cross-entropy in place: no barrier between reading z[y] and overwriting the logits", "cross_entropy",
     "    __syncthreads();                             // z[y] is read above", "    //", run_cross_entropy_inplace),
    ("cross-entropy bf16: the gradient truncated to bf16 instead of rounded", "cross_entropy",
     "    u += 0x7fffu + ((u >> 16) & 1u);\n", "\n", run_cross_entropy_bf16),
    ("cross-entropy bf16: the logits' bits converted as an integer, not widened to a float32", "cross_entropy",
     "return __uint_as_float((unsigned int)z[j] << 16);", "return (float)z[j];", run_cross_entropy_bf16),
    ("cross-entropy: the gradient pass leaves out the max subtraction", "cross_entropy",
     "float e = (logit_at(z, j) - m_row) - log1p_r;", "float e = logit_at(z, j) - log1p_r;",
     run_cross_entropy_bf16),
    ("flash bf16 outputs: the two values of a pair packed in the wrong order", "flash_attention",
     "*(unsigned*)(out_bf16 + i) = pack_bf16x2(a, b);", "*(unsigned*)(out_bf16 + i) = pack_bf16x2(b, a);",
     run_bf16_outputs),
    ("qkv_to_bf16: every third gets q's bias (v's bias then wrong)",
     "flash_attention", "int c = (int)((2 * i) % C3);", "int c = (int)((2 * i) % (C3 / 3));", run_bf16_outputs),
    ("flash qkv in place: the head offset h*64 left out (every head reads head 0)", "flash_attention",
     "r.base = qkv + (long long)b * T * 3 * C + part * C + h * HS;", "r.base = qkv + (long long)b * T * 3 * C + part * C;",
     run_flash_bf16_in),
    ("flash qkv in place: batch stride T*C instead of T*3C", "flash_attention",
     "r.base = qkv + (long long)b * T * 3 * C + part * C + h * HS;", "r.base = qkv + (long long)b * T * C + part * C + h * HS;",
     run_flash_bf16_in),
    ("flash qkv in place: every part gets q's bias", "flash_attention",
     "r.bias = bias ? bias + part * C + h * HS : nullptr;", "r.bias = bias ? bias + h * HS : nullptr;",
     run_flash_bf16_in),
    ("flash qkv in place: tiles (k, v; q in the backward) loaded without the bias", "flash_attention",
     "    if (!x.bias) return;\n    for (int c", "    return;\n    for (int c",
     run_flash_bf16_in),
    ("flash qkv in place: fragments (q in the forward, k and v in dkdv) loaded without the bias", "flash_attention",
     "return x.bias ? add_bias2(p, x.bias + col) : p;", "return p;", run_flash_bf16_in),
    ("flash qkv in place: rows past T not zeroed (reads the next batch or past the end)", "flash_attention",
     "bool inside = row0 + row < x.rows;", "bool inside = row0 + row < x.rows + TILE;", run_flash_bf16_in),
    ("flash dO in place: the head offset h*64 left out (every head reads head 0's dO)", "flash_attention",
     "r.base = x + (long long)b * T * C + h * HS;", "r.base = x + (long long)b * T * C;", run_flash_bf16_in),
    ("flash backward prep: the bf16 copy of a float32 dout not written", "flash_attention",
     "            *(unsigned*)(dO16 + off) = p;\n", "\n", run_flash),
    ("flash db partial sums (dk, dv): the last warp's column sums left out", "flash_attention",
     "((colsum[p][w][d] + colsum[p][w + 1][d]) + colsum[p][w + 2][d]) + colsum[p][w + 3][d];",
     "((colsum[p][w][d] + colsum[p][w + 1][d]) + colsum[p][w + 2][d]);", run_flash_bf16_in),
    ("flash db partial sums (dk, dv): the warps chosen by part, not by 64-key tile (dk from warps 0-3 only)",
     "flash_attention", "int p = i / (2 * HS), half = i / HS % 2, d = i % HS, w = 4 * half;",
     "int p = i / (2 * HS), half = i / HS % 2, d = i % HS, w = 4 * p;", run_flash_bf16_in),
    ("flash dkdv: the skip test against the query tile's first row, not its last (warps 1-3, 5-7 miss their "
     "diagonal tile)", "flash_attention", "if (k0 > qt * TILE + TILE - 1) continue;", "if (k0 > qt * TILE) continue;",
     run_flash),
    ("flash db partial sums: shuffled across t (columns) instead of g (rows)", "flash_attention",
     "for (int off = 4; off < 32; off <<= 1) {", "for (int off = 1; off < 8; off <<= 1) {", run_flash_bf16_in),
    ("flash db partial sums (dq): written to the k third", "flash_attention",
     "db_partial[((long long)b * 2 * gridDim.x + 2 * qb + half) * 3 * C + h * HS + d] =",
     "db_partial[((long long)b * 2 * gridDim.x + 2 * qb + half) * 3 * C + C + h * HS + d] =", run_flash_bf16_in),
    ("flash db partial sums (dq): the second 64-row tile's row summed from the first tile's warps", "flash_attention",
     "int half = i / HS, d = i % HS, w = 4 * half;", "int half = i / HS, d = i % HS, w = 0;", run_flash_bf16_in),
    ("flash dq: the skip test uses the block's first row (warps 4-7 skip their diagonal key tile too)",
     "flash_attention", "        if (kt * TILE > q0 + 15) continue;             // keys all after this warp's rows",
     "        if (kt * TILE > qb * QBLOCK + 15) continue;    // keys all after this warp's rows", run_flash),
    ("flash backward prep: bf16 dout read with its halves swapped", "flash_attention",
     "p = *(const unsigned*)(dout_bf16 + off);", "p = *(const unsigned*)(dout_bf16 + off); p = (p << 16) | (p >> 16);", run_flash_bf16_in),
    ("flash backward prep: bf16 O read with its halves swapped", "flash_attention",
     "o = make_float2(__uint_as_float(ob << 16), __uint_as_float(ob & 0xffff0000u));",
     "o = make_float2(__uint_as_float(ob & 0xffff0000u), __uint_as_float(ob << 16));", run_bf16_outputs),
    ("layernorm: the residual bias left out", "layernorm",
     "v += residual_bias ? rv + residual_bias[c] : rv;", "v += rv;", run_bf16_outputs),
    ("gelu f4: bf16 output words with their halves swapped", "gelu",
     "o[0] = f32_to_bf16_rne(y.x) | ((unsigned)f32_to_bf16_rne(y.y) << 16);",
     "o[0] = f32_to_bf16_rne(y.y) | ((unsigned)f32_to_bf16_rne(y.x) << 16);", run_bf16_outputs),
    ("bias_gelu backward: d left out of the dbias sum", "gelu",
     "            store(dx, dx_bf16, i, d);\n            s += d;", "            store(dx, dx_bf16, i, d);",
     run_bf16_outputs),
    ("bf16 column sum: the bits not shifted into the high half", "bf16",
     "s += __uint_as_float(((unsigned int)x[(long long)r * C + c]) << 16);",
     "s += __uint_as_float((unsigned int)x[(long long)r * C + c]);", run_column_sum_bf16),
    ("layernorm backward: the residual bias sum misses the incoming residual gradient", "layernorm",
     "if (sdh) sdh[c] += v;",
     "if (sdh) sdh[c] += v - (dres ? dres[o + c] : dres_bf16 ? bf16_to_f32(dres_bf16[o + c]) : 0.0f);",
     run_residual_layernorm_backward),
    ("layernorm backward: the bf16 copy of dh truncated instead of rounded", "layernorm",
     "if (dh_bf16) dh_bf16[o + c] = f32_to_bf16_rne(v);", "if (dh_bf16) dh_bf16[o + c] = __float_as_uint(v) >> 16;",
     run_residual_layernorm_backward),
    ("layernorm param reduce: dw overwrites the gradient buffer instead of adding into it", "layernorm",
     "dw[c] += partial_total(partial, 0, nblocks, C, c);", "dw[c] = partial_total(partial, 0, nblocks, C, c);",
     run_residual_layernorm_backward),
    ("layernorm backward: a bf16 dy read with its bits one place too low", "layernorm",
     "return __uint_as_float(((unsigned int)b) << 16);", "return __uint_as_float(((unsigned int)b) << 15);",
     run_residual_layernorm_backward),
    ("layernorm forward: a bf16 residual read from the neighbouring channel", "layernorm",
     "float rv = residual_bf16 ? bf16_to_f32(residual_bf16[o + c]) : residual[o + c];",
     "float rv = residual_bf16 ? bf16_to_f32(residual_bf16[o + (c ^ 1)]) : residual[o + c];",
     run_residual_layernorm_backward),
    ("layernorm backward: the third partial row (drb) written over the second (db)", "layernorm",
     "partial[((long long)s * gridDim.x + blockIdx.x) * C + c] = a;",
     "partial[((long long)min(s, 1) * gridDim.x + blockIdx.x) * C + c] = a;", run_residual_layernorm_backward),
    ("layernorm forward: the mean and variance of the unrounded h (the rounded h stored)", "layernorm",
     "                v = bf16_to_f32(hb);\n", "", run_residual_stream_bf16),
    ("layernorm forward: the bf16 residual stream truncated instead of rounded", "layernorm",
     "bf16_t hb = f32_to_bf16_rne(v);", "bf16_t hb = (bf16_t)(__float_as_uint(v) >> 16);", run_residual_stream_bf16),
    ("layernorm forward: h rounded twice (x + r, then + the bias)", "layernorm",
     "v += residual_bias ? rv + residual_bias[c] : rv;",
     "v = bf16_to_f32(f32_to_bf16_rne(v + rv)) + (residual_bias ? residual_bias[c] : 0.0f);",
     run_residual_stream_bf16),
    ("layernorm: a bf16 row (x or h) read as the low half of a float32", "layernorm",
     "return b ? bf16_to_f32(b[i]) : f[i];", "return b ? __uint_as_float((unsigned int)b[i]) : f[i];",
     run_residual_stream_bf16),
    ("layernorm backward: dh rounded twice (the layernorm's part before the add)", "layernorm",
     "float v = r * (g - sg - xhat * sgx);", "float v = bf16_to_f32(f32_to_bf16_rne(r * (g - sg - xhat * sgx)));",
     run_residual_stream_bf16),
    ("layernorm backward: the bf16 incoming residual gradient dropped", "layernorm",
     "else if (dres_bf16) v += bf16_to_f32(dres_bf16[o + c]);", "else if (dres_bf16) v += 0.0f;",
     run_residual_stream_bf16),
    ("gelu: a bf16 input read as the low half of a float32 (not widened)", "gelu",
     "return __uint_as_float((unsigned)x[i] << 16); }", "return __uint_as_float((unsigned)x[i]); }",
     run_bias_gelu_bf16_inputs),
    ("gelu bf16x4: the two bf16 of an input word taken in the wrong order", "gelu",
     "return make_float4(__uint_as_float(w0 << 16), __uint_as_float(w0 & 0xffff0000u),",
     "return make_float4(__uint_as_float(w0 & 0xffff0000u), __uint_as_float(w0 << 16),", run_bias_gelu_bf16_inputs),
    ("bias_gelu backward: the bias left out of gelu'(x + b)", "gelu",
     "gelu_grad(load_in(x, i) + bc)", "gelu_grad(load_in(x, i))", run_bias_gelu_bf16_inputs),
    ("column_sum_finish: the gradient buffer overwritten instead of added into", "gelu",
     "out[c] = add_into ? out[c] + t : t;", "out[c] = t;", run_bias_gelu_bf16_inputs),
]


@pytest.fixture
def cuda_cp(monkeypatch):
    from emulation import fake_cupy
    return fake_cupy.install(monkeypatch, kernels="cuda")


def _outcomes(monkeypatch, cp, runner, stop_when_caught=False):
    """{schedule: error ratio (> 1 is a failure) or the emulator's message}."""
    out = {}
    for s in emu.SCHEDULES:
        monkeypatch.setenv("NANOGPT_EMU_SCHEDULE", s)
        try:
            out[s] = runner(cp)
        except emu.CompileError:
            raise                                   # a mutation that does not compile proves nothing
        except emu.EmulatorError as e:
            out[s] = str(e)
        if stop_when_caught and (isinstance(out[s], str) or out[s] > 1):
            break
    return out


@pytest.mark.parametrize("runner", [run_embedding_into, run_flash, run_layernorm, run_cross_entropy_inplace,
                                    run_cross_entropy_bf16, run_bf16_outputs, run_residual_layernorm_backward,
                                    run_residual_stream_bf16,
                                    run_bias_gelu_bf16_inputs, run_flash_bf16_in, run_column_sum_bf16])
def test_unmutated_kernels_pass_in_every_schedule(monkeypatch, cuda_cp, runner):
    for s, r in _outcomes(monkeypatch, cuda_cp, runner).items():
        assert not isinstance(r, str) and r < 1, f"schedule {s}: {r}"


@pytest.mark.parametrize("name,module,old,new,runner", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_is_caught(monkeypatch, cuda_cp, name, module, old, new, runner):
    from nanogpt_np.kernels import compile as kc
    original = kc.source(module)
    assert original.count(old) == 1, f"the mutation's target text is not (once) in {module}.cu"
    mutated = original.replace(old, new)
    real_source = kc.source
    monkeypatch.setattr(kc, "source", lambda m: mutated if m == module else real_source(m))
    outcomes = _outcomes(monkeypatch, cuda_cp, runner, stop_when_caught=True)
    caught = {s: r for s, r in outcomes.items() if isinstance(r, str) or r > 1}
    assert caught, f"{name}: not detected in any schedule: {outcomes}"
    print(f"{name}: caught by schedule {list(caught)[0]}: {list(caught.values())[0]}")
