"""Each fused CUDA kernel against the unfused CuPy composition it replaces (and PyTorch when installed).

    PYTHONPATH=. python benchmarks/kernels.py [--B 8] [--iters 20] [--warmup 3] [--json out.json]

GPT-2 124M sizes: B=8, T=1024, C=768, V=50257, NH=12 (N = B*T rows). For every kernel: median time (CUDA
events), achieved bandwidth = the bytes the op must move at least (inputs read once, outputs written once)
divided by the time, and that as a percentage of the device's copy bandwidth, measured here in the same run
(a device-to-device copy of 1 GiB: read + write). The "unfused" column is the NumPy-generic reference op of
nanogpt_np.ops running on CuPy arrays (what the GPU would do without our kernels). Attention is compute-bound:
it reports TFLOP/s instead (the causal half of the 4*B*T*T*C matmul FLOPs, x2.5 for forward + backward).
"""
import argparse
import importlib
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here (rewritten after every row, "
                    "so a run cut short keeps what it measured)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--small", action="store_true", help="toy sizes (a smoke test of this script, not a benchmark)")
    args = ap.parse_args(argv)
    try:
        import cupy as cp
        from nanogpt_np import backend
        backend.use_device("cuda")
    except Exception as e:
        print(f"kernels benchmark needs CuPy and a GPU: {e}")
        return 2
    torch = None
    if not args.no_torch:
        try:
            import torch as _t
            torch = _t if _t.cuda.is_available() else None
        except Exception:
            torch = None

    from nanogpt_np.kernels import adamw as k_adamw
    from nanogpt_np.kernels import cross_entropy as k_ce
    from nanogpt_np.kernels import encoder as k_enc
    from nanogpt_np.kernels import flash_attention as k_flash
    from nanogpt_np.kernels import gelu as k_gelu
    from nanogpt_np.kernels import layernorm as k_ln
    from nanogpt_np.kernels import precision
    from nanogpt_np.kernels import softmax_attention as k_sm
    from nanogpt_np.kernels.launch import rows_per_warp
    from nanogpt_np.kernels.compile import launch
    r_att = importlib.import_module("nanogpt_np.ops.attention")
    r_ce = importlib.import_module("nanogpt_np.ops.cross_entropy")
    r_emb = importlib.import_module("nanogpt_np.ops.embedding")
    r_gelu = importlib.import_module("nanogpt_np.ops.gelu")
    r_ln = importlib.import_module("nanogpt_np.ops.layernorm")
    from nanogpt_np import optim

    B, T, C, V, NH = args.B, args.T, 768, 50257, 12
    P = 124_475_904                                          # GPT-2 124M parameters (the AdamW row)
    if args.small:
        B, T, C, V, NH, P = 2, 64, 128, 1000, 2, 100_000
    N = B * T
    rs = cp.random.default_rng(0)
    f32 = cp.float32

    def rand(*shape, scale=1.0):
        return rs.standard_normal(shape, dtype=f32) * scale

    def timed(fn, iters=args.iters, warmup=args.warmup):
        for _ in range(warmup):
            fn()
        cp.cuda.get_current_stream().synchronize()
        ts = []
        a, b = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(iters):
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b))
        return float(np.median(ts))                          # ms

    def timed_torch(fn, iters=args.iters, warmup=args.warmup):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return float(np.median(ts))

    # ---- the yardstick: device-to-device copy bandwidth
    src = cp.empty((1 << (16 if args.small else 28),), dtype=f32)   # 1 GiB
    dst = cp.empty_like(src)
    src.fill(1.0)
    t_copy = timed(lambda: cp.copyto(dst, src), iters=10)
    copy_gbs = 2 * src.nbytes / (t_copy * 1e-3) / 1e9
    del src, dst
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    print(f"device: {name}; copy bandwidth {copy_gbs:.0f} GB/s (1 GiB device-to-device, read + write)")

    rows = []

    def row(kernel, t_ours, nbytes, t_ref=None, t_torch=None, note=""):
        gbs = nbytes / (t_ours * 1e-3) / 1e9 if nbytes else None
        r = dict(kernel=kernel, ours_ms=t_ours, GBps=gbs, pct_copy=(100 * gbs / copy_gbs) if gbs else None,
                 unfused_ms=t_ref, speedup=(t_ref / t_ours) if t_ref else None, torch_ms=t_torch, note=note)
        rows.append(r)
        print(fmt_row(r), flush=True)
        dump()

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=name, copy_GBps=copy_gbs, B=B, T=T, rows=rows), f, indent=1)

    def safe(fn):
        try:
            return fn()
        except Exception as e:                               # a missing CuPy feature must not stop the run
            print(f"  (skipped: {type(e).__name__}: {str(e)[:120]})")
            return None

    print(HEADER)
    # ---- encoder
    Tmax = max(T, 1024 if not args.small else T)
    wte, wpe = rand(V, C), rand(Tmax, C)
    idx = rs.integers(0, V, size=(B, T)).astype(cp.int64)
    out, saved = k_enc.embedding_forward(wte, wpe, idx)
    tf = timed(lambda: k_enc.embedding_forward(wte, wpe, idx))
    tr = safe(lambda: timed(lambda: r_emb.embedding_forward(wte, wpe, idx)))
    tt = None
    if torch:
        twte, twpe, tidx = (torch.as_tensor(a, device="cuda") for a in (wte, wpe, idx))
        tt = timed_torch(lambda: torch.nn.functional.embedding(tidx, twte) + twpe[:T])
    row("encoder forward", tf, 4 * (2 * N * C + T * C) + 8 * N, tr, tt)
    dout = rand(B, T, C)
    tb = timed(lambda: k_enc.embedding_backward(dout, saved))
    rsaved = (idx, wte.shape, wpe.shape)
    tr = safe(lambda: timed(lambda: r_emb.embedding_backward(dout, rsaved), iters=3))
    row("encoder backward (deterministic)", tb, 4 * (2 * N * C + V * C + Tmax * C), tr, None,
        "includes zeroing dwte (V*C)")
    del wte, wpe, out, saved, dout

    # ---- layernorm (+ residual)
    x, res, w, b = rand(N, C), rand(N, C), rand(C), rand(C)
    tf = timed(lambda: k_ln.layernorm_forward(x, w, b))
    tr = timed(lambda: r_ln.layernorm_forward(x, w, b))
    tt = None
    if torch:
        tx, tw, tb_ = (torch.as_tensor(a, device="cuda") for a in (x, w, b))
        tt = timed_torch(lambda: torch.nn.functional.layer_norm(tx, (C,), tw, tb_))
    row("layernorm forward", tf, 4 * 2 * N * C, tr, tt)
    tf = timed(lambda: k_ln.residual_layernorm_forward(x, res, None, w, b))
    tr = timed(lambda: r_ln.layernorm_forward(x + res, w, b))
    tt = None
    if torch:
        tres = torch.as_tensor(res, device="cuda")
        tt = timed_torch(lambda: torch.nn.functional.layer_norm(tx + tres, (C,), tw, tb_))
    row("residual + layernorm forward", tf, 4 * 4 * N * C, tr, tt)
    (h, y), saved = k_ln.residual_layernorm_forward(x, res, None, w, b)
    dy, dh = rand(N, C), rand(N, C)
    tbk = timed(lambda: k_ln.residual_layernorm_backward((dh, dy), saved))
    _, rsaved = r_ln.layernorm_forward(h, w, b)

    def ref_bwd():
        dx, dw, db = r_ln.layernorm_backward(dy, rsaved)
        return dx + dh
    tr = timed(ref_bwd)
    tt = None
    if torch:
        th = torch.as_tensor(h, device="cuda").requires_grad_(True)
        tw2, tb2 = tw.clone().requires_grad_(True), tb_.clone().requires_grad_(True)
        ty = torch.nn.functional.layer_norm(th, (C,), tw2, tb2)
        tdy, tdh = torch.as_tensor(dy, device="cuda"), torch.as_tensor(dh, device="cuda")

        def torch_ln_bwd():
            g = torch.autograd.grad(ty, (th, tw2, tb2), tdy, retain_graph=True)
            return g[0] + tdh
        tt = timed_torch(torch_ln_bwd)
    row("layernorm backward (+ residual grad)", tbk, 4 * 4 * N * C, tr, tt)
    del x, res, h, y, saved, dy, dh, rsaved

    # ---- bias + GELU (the MLP's 4C activations)
    x4, b4 = rand(N, 4 * C), rand(4 * C)
    tf = timed(lambda: k_gelu.bias_gelu_forward(x4, b4))
    tr = tr_fwd = timed(lambda: r_gelu.gelu_forward(x4 + b4))
    tt = None
    if torch:
        tx4, tb4 = torch.as_tensor(x4, device="cuda"), torch.as_tensor(b4, device="cuda")
        tt = timed_torch(lambda: torch.nn.functional.gelu(tx4 + tb4, approximate="tanh"))
    row("bias + GELU forward", tf, 4 * 2 * N * 4 * C, tr, tt)
    _, saved = k_gelu.bias_gelu_forward(x4, b4)
    d4 = rand(N, 4 * C)
    tbk = timed(lambda: k_gelu.bias_gelu_backward(d4, saved))
    _, rsaved = r_gelu.gelu_forward(x4 + b4)

    def ref_gelu_bwd():
        (dx,) = r_gelu.gelu_backward(d4, rsaved)
        return dx, dx.sum(axis=0)
    tr = timed(ref_gelu_bwd)
    row("bias + GELU backward (+ dbias)", tbk, 4 * 3 * N * 4 * C, tr, None)
    # bf16 precision as the model runs it: x from c_fc's gemm and dy from mlp.c_proj's as bf16 bits, y and dx
    # written as bf16, db added into a gradient buffer
    from nanogpt_np.kernels import registry
    old_precision = registry.precision()
    registry.set_precision("bfloat16")
    try:
        x4h, d4h, db_into = precision.to_bf16(x4), precision.to_bf16(d4), cp.zeros(4 * C, dtype=f32)
        row("bias + GELU forward, bf16 in/out", timed(lambda: k_gelu.bias_gelu_forward(x4h, b4)),
            2 * 2 * N * 4 * C, tr_fwd, None)
        _, saved = k_gelu.bias_gelu_forward(x4h, b4)
        row("bias + GELU backward, bf16 in/out (+ dbias into)",
            timed(lambda: k_gelu.bias_gelu_backward(d4h, saved, db_into=db_into)), 2 * 3 * N * 4 * C, tr, None)
        # the whole MLP (c_fc, GELU, mlp.c_proj; forward + backward, gradients into buffers) as the model runs it
        # in bf16: the GELU on cuBLASLt epilogues (kernels/mlp.py), against the separate kernels ("unfused")
        from nanogpt_np.kernels import mlp as k_mlp
        xm, w_fc, b_fc, w_proj = precision.to_bf16(rand(N, C)), rand(C, 4 * C), rand(4 * C), rand(4 * C, C)
        w_fc_h, w_proj_h, dy_h = precision.to_bf16(w_fc), precision.to_bf16(w_proj), precision.to_bf16(rand(N, C))
        bufs = dict(dw_fc_into=cp.zeros_like(w_fc), db_fc_into=cp.zeros_like(b_fc), dw_proj_into=cp.zeros_like(w_proj))

        def mlp_step():
            y, saved = k_mlp.mlp_forward(xm, w_fc, b_fc, w_proj, None, w_fc_h, w_proj_h, bf16_out=True)
            return k_mlp.mlp_backward(dy_h, saved, **bufs)
        t_lt = timed(mlp_step)
        registry.disable("mlp_epilogue")
        try:
            t_sep = timed(mlp_step)
        finally:
            registry.enable("mlp_epilogue")
        from nanogpt_np.kernels import cublaslt
        row("MLP fwd + bwd, bf16 (GELU on cuBLASLt epilogues)", t_lt, None, t_sep, None,
            note="" if cublaslt.available() else "no cuBLASLt: both are the separate kernels")
        del xm, w_fc, b_fc, w_proj, w_fc_h, w_proj_h, dy_h, bufs
    finally:
        registry.set_precision(old_precision)
    del x4, d4, saved, rsaved, x4h, d4h

    # ---- cross-entropy (forward + backward: one pass)
    logits = rand(N, V, scale=2.0)
    targets = rs.integers(0, V, size=(N,)).astype(cp.int64)
    one = cp.ones((), dtype=f32)
    k_ce.set_assume_unit_dloss(True)

    def ours_ce():
        loss, s = k_ce.cross_entropy_forward(logits, targets)
        return k_ce.cross_entropy_backward(one, s)
    tf = timed(ours_ce)
    k_ce.set_assume_unit_dloss(False)

    def ref_ce():
        loss, s = r_ce.cross_entropy_forward(logits, targets)
        return r_ce.cross_entropy_backward(one, s)
    tr = safe(lambda: timed(ref_ce, iters=5))
    tt = None
    if torch:
        tl = torch.as_tensor(logits, device="cuda").requires_grad_(True)
        tg = torch.as_tensor(targets, device="cuda")

        def torch_ce():
            loss = torch.nn.functional.cross_entropy(tl, tg)
            return torch.autograd.grad(loss, tl)
        tt = timed_torch(torch_ce, iters=5)
    row("cross-entropy fwd+bwd (fused)", tf, 4 * 2 * N * V, tr, tt, "dlogits to a new buffer, d loss = 1")
    del logits

    # ---- AdamW over GPT-2 124M parameters (clip by global norm on the device)
    p, g, m, v = rand(P, scale=0.02), rand(P, scale=1e-3), cp.zeros(P, f32), cp.zeros(P, f32)
    kw = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    tf = timed(lambda: k_adamw.adamw_step(p, g, m, v, n_decay=P - 100_000, grad_clip=1.0, **kw))

    def ref_adamw():
        optim.clip_grad_norm(g, 1e9)                         # norm computed (no scaling: keeps g unchanged)
        optim.adamw_update(p, g, m, v, n_decay=P - 100_000, **kw)
    tr = timed(ref_adamw, iters=5)
    tt = None
    if torch:
        tp = torch.nn.Parameter(torch.as_tensor(p, device="cuda"))
        tp.grad = torch.as_tensor(g, device="cuda")
        opt = torch.optim.AdamW([tp], lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)

        def torch_adamw():
            torch.nn.utils.clip_grad_norm_([tp], 1.0)
            opt.step()
        tt = timed_torch(torch_adamw, iters=5)
    row(f"AdamW + global norm ({P / 1e6:.0f}M)", tf, 4 * 7 * P, tr, tt, "3 launches")
    pbf = cp.empty(P, dtype=cp.uint16)
    tf = timed(lambda: k_adamw.adamw_step(p, g, m, v, n_decay=P, grad_clip=1.0, params_bf16=pbf, **kw))
    row("AdamW + bf16 weight copy", tf, 4 * 7 * P + 2 * P, None, None)
    del p, g, m, v, pbf

    # ---- causal softmax (matmul-form attention)
    BH = B * NH
    S = rand(BH, T, T)
    grid, block = rows_per_warp(BH * T, 8)
    sc = np.float32(1 / 8)
    tf = timed(lambda: launch("softmax_attention", "causal_softmax_forward", grid, block,
                              (S, S, np.int32(BH), np.int32(T), sc)))
    tr = timed(lambda: r_att.causal_softmax(S * sc), iters=5)
    row("causal softmax forward (in place)", tf, 4 * 1.5 * BH * T * T, tr, None, "reads the causal half")
    Pm = r_att.causal_softmax(S * sc)
    dP = rand(BH, T, T)
    tf = timed(lambda: launch("softmax_attention", "causal_softmax_backward", grid, block,
                              (dP, Pm, dP, np.int32(BH), np.int32(T), sc)))
    row("causal softmax backward (in place)", tf, 4 * 2 * BH * T * T, None, None, "reads the causal halves")
    del S, Pm, dP

    # ---- whole attention, forward + backward
    qkv = rand(B, T, 3 * C)
    dout = rand(B, T, C)
    flops = 2.5 * 2 * 2 * B * T * T * C / 2

    def fb(mod):
        def go():
            out, s = mod.attention_forward(qkv, NH)
            return mod.attention_backward(dout, s)
        return go
    for label, tf32 in (("fp32", False), ("tf32", True)):
        precision.set_tf32(tf32)
        t = timed(fb(k_sm), iters=5)
        row(f"attention fwd+bwd, cuBLAS + fused softmax ({label})", t, 0, None, None,
            f"{flops / (t * 1e-3) / 1e12:.1f} TFLOP/s")
    precision.set_tf32(False)
    t_ref = timed(fb(r_att), iters=3)
    t = timed(fb(k_flash), iters=5)
    tt = None
    if torch:
        q = torch.randn(B, NH, T, C // NH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k_ = torch.randn_like(q, requires_grad=True)
        v_ = torch.randn_like(q, requires_grad=True)
        do = torch.randn_like(q)

        def sdpa():
            o = torch.nn.functional.scaled_dot_product_attention(q, k_, v_, is_causal=True)
            return torch.autograd.grad(o, (q, k_, v_), do)
        tt = timed_torch(sdpa, iters=5)
    row("attention fwd+bwd, flash (bf16 mma)", t, 0, t_ref, tt, f"{flops / (t * 1e-3) / 1e12:.1f} TFLOP/s;"
        " unfused = reference ops on CuPy; torch = SDPA bf16")

    print()
    print(table(rows, name, copy_gbs))
    dump()
    return 0


HEADER = "| kernel | ours ms | GB/s | % of copy | unfused CuPy ms | speedup | PyTorch ms | note |\n|---|---|---|---|---|---|---|---|"


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_row(r):
    return (f"| {r['kernel']} | {_f(r['ours_ms'], '.3f')} | {_f(r['GBps'], '.0f')} | {_f(r['pct_copy'], '.0f')} |"
            f" {_f(r['unfused_ms'], '.3f')} | {_f(r['speedup'], '.1f')} | {_f(r['torch_ms'], '.3f')} | {r['note']} |")


def table(rows, device, copy_gbs):
    return "\n".join([f"Kernels on {device} (copy bandwidth {copy_gbs:.0f} GB/s)", HEADER] + [fmt_row(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
