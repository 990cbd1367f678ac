"""GPU training throughput of nanogpt_np against PyTorch on the same card, and the Shakespeare char recipe.

    PYTHONPATH=. python benchmarks/train_gpu.py            # GPT-2 124M, T=1024, largest batch that fits
    PYTHONPATH=. python benchmarks/train_gpu.py --quick    # fixed B=8, fewer steps, no torch.compile (GPU check)
    PYTHONPATH=. python benchmarks/train_gpu.py --shakespeare [--data tinyshakespeare.txt]   # ~minutes

Throughput mode: GPT-2 124M (12 layers, 12 heads, 768 channels, vocab 50257, T=1024) on random tokens, in three
configurations: float32 (TF32) matmuls with the cuBLAS + fused-softmax attention, the same with flash attention,
and --dtype=bfloat16 (linear layers and head in bf16 with fp32 accumulation, flash attention, fp32 master
weights, AdamW state and layernorm/softmax/cross-entropy).
A step is forward + backward + AdamW with the global-norm clip computed on the device (no host sync inside the
step; the loss comes back once, after the timed steps). Reported: tokens/s, MFU, peak device memory (CuPy
memory pool), launches of our kernels per step, and the host's share of the step (the time Python needs to
enqueue a step divided by the step's GPU time: near 1 or above means launch-bound).

MFU (as nanoGPT / the PaLM paper count it):
    FLOPs per token = 6 * N + 12 * n_layer * n_embd * T      (N = parameters without wpe; the second term is
                                                               attention's QK^T and PV, forward + backward)
    MFU = FLOPs per token * tokens/s / peak FLOP/s of the card for the matmul precision used
    (H100 SXM / H200: bf16 989 TFLOP/s, TF32 495, fp32 67; override with --peak-tflops).

PyTorch, in the same run on the same card (optional import): the same architecture written below in ~60 lines,
bf16 autocast, SDPA (flash) attention, fused AdamW; eager and torch.compile; the ratios ours / PyTorch.

Shakespeare mode: nanoGPT's character recipe on the GPU: 6 layers, 6 heads, 384 channels, block 256, batch 64,
dropout 0.2, lr 1e-3 (warmup 100, cosine to 1e-4 at 5000), beta2 0.99, 5000 iterations, evaluation every 250
iterations on 200 validation batches. Reports the time and the best validation loss (nanoGPT: about 1.47).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

PEAK_TFLOPS = {  # dense, per precision of the matmuls
    "H200": dict(bf16=989.4, tf32=494.7, fp32=66.9),
    "H100 PCIe": dict(bf16=756.0, tf32=378.0, fp32=51.2),
    "H100": dict(bf16=989.4, tf32=494.7, fp32=66.9),
    "A100": dict(bf16=312.0, tf32=156.0, fp32=19.5),
}


def peak_tflops(device_name, precision, override=None):
    if override:
        return override
    for key, val in PEAK_TFLOPS.items():      # "H100 PCIe" is tested before "H100"
        if key in device_name:
            return val[precision]
    return None


def flops_per_token(n_params_no_wpe, n_layer, n_embd, T):
    return 6 * n_params_no_wpe + 12 * n_layer * n_embd * T


# ------------------------------------------------------------------------------------------------ nanogpt_np

SIZE = dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768)     # GPT-2 124M (--small shrinks it)


def fused_adamw(model, opt, **hyper):
    """The fused AdamW kernel on the model's flat buffers, as optim.AdamW.step calls it: the bf16 copy of the
    weights (bf16 matmuls) is updated in the same pass, and the model is told its weights changed."""
    from nanogpt_np.kernels import adamw as k_adamw
    model.finish_gradients()
    k_adamw.adamw_step(model.flat_params, model.flat_grads, opt.m, opt.v, n_decay=model.n_decay,
                       params_bf16=model.flat_params_bf16, **hyper)
    model.params_written(bf16_copy_refreshed=model.flat_params_bf16 is not None)


def ours_throughput(B, T, steps, warmup, attention, tf32, log, dtype="float32"):
    import cupy as cp
    from nanogpt_np import backend
    from nanogpt_np.kernels import compile as kc
    from nanogpt_np.kernels import cross_entropy as k_ce
    from nanogpt_np.kernels import precision, registry
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW
    from nanogpt_np.tensor import backward

    backend.use_device("cuda")
    precision.set_tf32(tf32)
    registry.set_attention(attention)
    registry.set_precision(dtype)          # bfloat16: linear layers and the head multiply in bf16
    k_ce.set_inplace(True)                 # the logits are not needed after the loss: gradient over them
    k_ce.set_assume_unit_dloss(True)       # the loss is the root of the graph (no gradient accumulation)
    pool = cp.get_default_memory_pool()
    cfg = GPTConfig(block_size=T, **SIZE)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rs = cp.random.default_rng(0)
    x = rs.integers(0, cfg.vocab_size, size=(B, T)).astype(cp.int64)
    y = rs.integers(0, cfg.vocab_size, size=(B, T)).astype(cp.int64)

    def step(i):
        model.zero_grad()
        _, loss = model(x, y)
        backward(loss)
        fused_adamw(model, opt, lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=i + 1,
                    grad_clip=1.0)
        return loss

    try:
        for i in range(warmup):
            loss = step(i)
        cp.cuda.get_current_stream().synchronize()
        first_loss = float(loss.item())
        l0 = kc.launches
        a, b = cp.cuda.Event(), cp.cuda.Event()
        host = []
        a.record()
        t0 = time.perf_counter()
        for i in range(steps):
            h0 = time.perf_counter()
            loss = step(warmup + i)
            host.append(time.perf_counter() - h0)
        b.record()
        b.synchronize()
        wall = time.perf_counter() - t0
        gpu_ms = cp.cuda.get_elapsed_time(a, b) / steps
        final_loss = float(loss.item())
    finally:
        k_ce.set_inplace(False)
        k_ce.set_assume_unit_dloss(False)
        registry.set_precision("float32")
    step_s = wall / steps
    prec = "bf16" if dtype == "bfloat16" else ("tf32" if tf32 else "fp32")
    res = dict(impl=f"nanogpt_np ({prec} matmuls, {attention} attention)", B=B, T=T,
               step_ms=1e3 * step_s, tokens_per_s=B * T / step_s, peak_mem_GiB=pool.total_bytes() / 2 ** 30,
               launches_per_step=(kc.launches - l0) / steps, host_share=float(np.median(host)) * 1e3 / gpu_ms,
               first_loss=first_loss, last_loss=final_loss,
               n_params=model.num_params(include_position=False), precision=prec)
    del model, opt, x, y
    pool.free_all_blocks()
    return res


def largest_batch(try_fn, candidates, log):
    """Run try_fn(B) from the largest candidate down; the first that does not run out of memory wins."""
    import cupy as cp
    for B in candidates:
        try:
            return try_fn(B)
        except cp.cuda.memory.OutOfMemoryError:
            log(f"  B={B}: out of memory")
            cp.get_default_memory_pool().free_all_blocks()
    raise RuntimeError("no batch size fits")


# ---------------------------------------------------------------------------------------------------- PyTorch

def torch_gpt(torch, V, T, L, NH, C):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B_, T_, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B_, T_, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).reshape(B_, T_, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.h:
                x = blk(x)
            logits = self.ln_f(x) @ self.wte.weight.T            # tied head
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))

    return GPT2()


def torch_throughput(B, T, steps, warmup, compile_, log):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = torch_gpt(torch, SIZE["vocab_size"], T, SIZE["n_layer"], SIZE["n_head"], SIZE["n_embd"]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    run = torch.compile(model) if compile_ else model
    x = torch.randint(0, SIZE["vocab_size"], (B, T), device="cuda")
    y = torch.randint(0, SIZE["vocab_size"], (B, T), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    torch.cuda.reset_peak_memory_stats()
    t_c = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t_c
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    res = dict(impl=f"PyTorch {torch.__version__} bf16 autocast + SDPA, {'torch.compile' if compile_ else 'eager'}",
               B=B, T=T, step_ms=1e3 * step_s, tokens_per_s=B * T / step_s,
               peak_mem_GiB=torch.cuda.max_memory_allocated() / 2 ** 30, last_loss=float(loss), n_params=n_params,
               precision="bf16", warmup_s=warm_s)
    del model, opt, run
    torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------- CUDA graphs

def try_cuda_graph(B, T, log, attention="flash", dtype="bfloat16", tf32=True, steps=5):
    """Capture one training step (zero_grad, forward, backward, AdamW) in a CUDA graph and replay it; report
    whether it worked, whether the replays train exactly like eager steps, and the speed-up.

    What makes a replay correct (nanogpt_np/kernels/README.md, "CUDA graphs", has CuPy's side with references):
    - the configuration is set here (attention, precision, TF32), not inherited from the previous benchmark row;
    - AdamW's per-step scalars (lr, bias corrections) live in a device array (kernels/adamw.step_scalars),
      written by a host->device copy before each replay: the captured kernel reads this step's values;
    - the batch is read from fixed device buffers (a real loop would .set() the next batch into them);
    - every allocation made during the capture comes from a dedicated memory pool kept alive with the graph: the
      replays reuse those addresses, and nothing else allocates from that pool (the default pool's
      free_all_blocks, which runs on any out-of-memory retry, cannot free them).
    Check: `steps` replays and `steps` eager steps from the same weights and optimizer state must give the same
    weights, bit for bit when the eager steps repeat bit for bit (eager_repeat_max_diff 0: our reductions have
    fixed orders); a replay that froze the captured step's scalars or inputs would differ."""
    import cupy as cp
    from nanogpt_np import backend
    from nanogpt_np.kernels import adamw as k_adamw
    from nanogpt_np.kernels import cross_entropy as k_ce
    from nanogpt_np.kernels import precision, registry
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW, lr_at
    from nanogpt_np.tensor import backward
    backend.use_device("cuda")
    precision.set_tf32(tf32)
    registry.set_attention(attention)
    registry.set_precision(dtype)
    k_ce.set_inplace(True)
    k_ce.set_assume_unit_dloss(True)
    config = dict(attention=attention, dtype=dtype, tf32=tf32, B=B, T=T)
    graph_pool = cp.cuda.MemoryPool()            # the graph's own memory: alive as long as this function runs
    try:
        cfg = GPTConfig(block_size=T, **SIZE)
        model = GPT(cfg, seed=0)
        opt = AdamW(model)
        hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, n_decay=model.n_decay)
        lr = lambda i: lr_at(i, lr=6e-4, min_lr=6e-5, warmup_iters=3, decay_iters=20)    # changes every step
        x = cp.random.default_rng(0).integers(0, cfg.vocab_size, size=(B, T)).astype(cp.int64)
        y = cp.random.default_rng(1).integers(0, cfg.vocab_size, size=(B, T)).astype(cp.int64)

        def body(scalars):
            """One step; AdamW reads lr and the bias corrections from `scalars` (device). Returns the loss."""
            model.zero_grad()
            _, loss = model(x, y)
            backward(loss)
            model.finish_gradients()
            k_adamw.adamw_step(model.flat_params, model.flat_grads, opt.m, opt.v, scalars=scalars,
                               params_bf16=model.flat_params_bf16, **hp)     # the bf16 weights' copy too
            model.params_written(bf16_copy_refreshed=model.flat_params_bf16 is not None)
            return loss.data

        def eager(i):
            return body(k_adamw.step_scalars(lr(i), 0.9, 0.95, i + 1))

        def state():
            return [a.copy() for a in (model.flat_params, opt.m, opt.v)]

        def restore(saved):
            for a, b in zip((model.flat_params, opt.m, opt.v), saved):
                a[...] = b

        s = cp.cuda.Stream(non_blocking=True)
        with s:
            eager(0)                                       # warm-up: kernels compiled, caches filled
            s.synchronize()
            scalars = k_adamw.step_scalars(lr(1), 0.9, 0.95, 2)
            with cp.cuda.using_allocator(graph_pool.malloc):
                s.begin_capture()
                loss_out = body(scalars)                   # lives in graph_pool: the replays write it
                graph = s.end_capture()
            s.synchronize()
            start = state()                                # after step 1 (the capture ran nothing)
            eager_losses = [float(eager(i)) for i in range(1, 1 + steps)]
            expected = state()
            restore(start)
            for i in range(1, 1 + steps):                  # the eager steps again: are they deterministic?
                eager(i)
            repeat = state()
            restore(start)
            graph_losses = []
            for i in range(1, 1 + steps):
                k_adamw.step_scalars(lr(i), 0.9, 0.95, i + 1)       # this step's scalars, then the replay
                graph.launch(stream=s)
                graph_losses.append(float(loss_out))
            got = state()
        diff = max(float(cp.abs(a - b).max()) for a, b in zip(got, expected))
        eager_diff = max(float(cp.abs(a - b).max()) for a, b in zip(repeat, expected))
        a, b = cp.cuda.Event(), cp.cuda.Event()
        with s:
            for _ in range(2):
                graph.launch(stream=s)
            a.record(s)
            for _ in range(steps):
                graph.launch(stream=s)
            b.record(s)
        b.synchronize()
        g_ms = cp.cuda.get_elapsed_time(a, b) / steps
        with s:
            a.record(s)
            for i in range(steps):
                eager(i)
            b.record(s)
        b.synchronize()
        e_ms = cp.cuda.get_elapsed_time(a, b) / steps
        return dict(captured=True, **config, graph_step_ms=g_ms, eager_step_ms=e_ms,
                    replay_matches_eager=diff == 0.0, max_weight_diff=diff, eager_repeat_max_diff=eager_diff,
                    eager_losses=eager_losses,
                    graph_losses=graph_losses, graph_pool_GiB=graph_pool.total_bytes() / 2 ** 30)
    except Exception as e:
        return dict(captured=False, **config, reason=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        k_ce.set_inplace(False)
        k_ce.set_assume_unit_dloss(False)
        registry.set_precision("float32")
        cp.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------------------------------------------ Shakespeare

def find_shakespeare(path):
    cands = [path] if path else []
    cands += [os.path.join(REPO, "shared", "data", "tinyshakespeare.txt"),
              os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
              os.path.join(REPO, "data", "tinyshakespeare.txt")]
    for c in cands:
        if c and os.path.isfile(c):
            return c
    return None


def shakespeare(path, iters, attention, tf32, log):
    import cupy as cp
    from nanogpt_np import backend
    from nanogpt_np.kernels import adamw as k_adamw
    from nanogpt_np.kernels import cross_entropy as k_ce
    from nanogpt_np.kernels import precision, registry
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW, lr_at
    from nanogpt_np.tensor import backward
    backend.use_device("cuda")
    precision.set_tf32(tf32)
    registry.set_attention(attention)
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(data))
    train, val = cp.asarray(data[:n]), cp.asarray(data[n:])
    B, T = 64, 256
    cfg = GPTConfig(vocab_size=len(chars), block_size=T, n_layer=6, n_head=6, n_embd=384, dropout=0.2)
    model = GPT(cfg, seed=1337)
    opt = AdamW(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    rs = cp.random.default_rng(1337)
    offs = cp.arange(T + 1)

    def batch(split):
        d = train if split == "train" else val
        starts = rs.integers(0, d.size - T - 1, size=(B,))
        w = d[starts[:, None] + offs[None, :]]
        return w[:, :-1], w[:, 1:]

    def evaluate():
        model.eval()
        losses = [model.loss_on(*batch("val")) for _ in range(200)]
        model.train()
        return float(np.mean(losses))

    k_ce.set_assume_unit_dloss(True)
    best, t0, log_rows = float("inf"), time.perf_counter(), []
    try:
        for it in range(iters + 1):
            if it % 250 == 0 or it == iters:
                v = evaluate()
                best = min(best, v)
                log(f"  iter {it}: val loss {v:.4f} (best {best:.4f}), {time.perf_counter() - t0:.0f} s")
                log_rows.append((it, v))
            if it == iters:
                break
            lr = lr_at(it, lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=5000)
            model.zero_grad()
            _, loss = model(*batch("train"))
            backward(loss)
            fused_adamw(model, opt, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=it + 1,
                        grad_clip=1.0)
    finally:
        k_ce.set_assume_unit_dloss(False)
    return dict(mode="shakespeare-char", iters=iters, seconds=time.perf_counter() - t0, best_val_loss=best,
                evals=log_rows)


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B=8, few steps, no torch.compile (GPU check)")
    ap.add_argument("--batch", type=int, default=None, help="fixed batch size (default: largest that fits)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--attention", default="both", choices=["matmul", "flash", "both"])
    ap.add_argument("--no-tf32", action="store_true", help="exact float32 matmuls")
    ap.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"],
                    help="matmul precision of the linear layers (bfloat16: bf16 operands, fp32 accumulation)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also try a CUDA-graph step")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--shakespeare", action="store_true", help="run the Shakespeare char recipe instead")
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--data", default=None)
    ap.add_argument("--json", default=None, help="append each measured row to this file as it is measured "
                    "(JSON Lines), then the device and the table")
    ap.add_argument("--budget-s", type=float, default=None, help="skip torch.compile when this would run over")
    ap.add_argument("--small", action="store_true", help="a toy model (smoke test of this script, not a benchmark)")
    args = ap.parse_args(argv)
    if args.small:
        SIZE.update(vocab_size=257, n_layer=2, n_head=2, n_embd=128)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)
    try:
        import cupy as cp
        from nanogpt_np import backend
        backend.use_device("cuda")
    except Exception as e:
        log(f"train_gpu needs CuPy and a GPU: {e}")
        return 2
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    log(f"device: {name}")
    tf32 = not args.no_tf32

    if args.shakespeare:
        path = find_shakespeare(args.data)
        if path is None:
            log("tinyshakespeare.txt not found: pass --data PATH")
            return 2
        attention = "flash" if args.attention == "both" else args.attention
        from nanogpt_np.kernels import registry
        registry.set_precision("bfloat16" if args.dtype == "bfloat16" else "float32")
        res = shakespeare(path, args.iters, attention, tf32, log)
        log(json.dumps(res))
        if args.json:
            json.dump(res, open(args.json, "w"), indent=1)
        return 0

    T = 64 if args.small else 1024
    steps = args.steps or (6 if args.quick else 20)
    warmup = 2 if args.quick else 3
    attentions = ["matmul", "flash"] if args.attention == "both" else [args.attention]
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    configs = [(a, "float32") for a in attentions if "float32" in dtypes]
    if "bfloat16" in dtypes:
        configs.append(("flash" if "flash" in attentions else attentions[0], "bfloat16"))
    title = f"Training throughput on {name}, {'GPT-2 124M' if not args.small else 'toy model'}, T={T}"
    jsonl = open(args.json, "a") if args.json else None

    def emit(obj):
        """Append one JSON object to --json (JSON Lines) at once: a run cut short keeps what it measured."""
        if jsonl:
            jsonl.write(json.dumps(obj) + "\n")
            jsonl.flush()

    log(f"{title} (rows as they are measured)")
    log(TABLE_HEADER)
    rows = []
    for att, dt in configs:
        try:
            if args.batch or args.quick:
                r = ours_throughput(args.batch or 8, T, steps, warmup, att, tf32, log, dt)
            else:
                r = largest_batch(lambda B: ours_throughput(B, T, steps, warmup, att, tf32, log, dt),
                                  [32, 24, 16, 12, 8, 4], log)
        except Exception as e:
            log(f"nanogpt_np {att}/{dt} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append(r)
        log(table_row(r, name, T, args.peak_tflops))
        emit(r)
    if not rows:
        log("every nanogpt_np configuration failed")
        return 1
    torch_rows = []
    if not args.no_torch:
        try:
            import torch
            if torch.cuda.is_available():
                modes = [False] if (args.no_compile or args.quick) else [False, True]   # --quick: eager only
                for comp in modes:
                    if comp and args.budget_s and time.perf_counter() - t_start > args.budget_s - 100:
                        log("torch.compile skipped: not enough of the time budget left")
                        continue
                    try:
                        B = args.batch or (8 if args.quick else rows[0]["B"])
                        r = torch_throughput(B, T, steps, warmup, comp, log)
                        torch_rows.append(r)
                        log(table_row(r, name, T, args.peak_tflops))
                        emit(r)
                    except Exception as e:
                        log(f"PyTorch {'compile' if comp else 'eager'} failed: {type(e).__name__}: {str(e)[:200]}")
        except ImportError:
            log("PyTorch not installed: no comparison")
    g_att, g_dt = configs[-1]          # the last configuration asked for: bf16 + flash when it is among them
    graph = try_cuda_graph(args.batch or 8, T, log, g_att, g_dt, tf32) if args.graph else None
    if graph is not None:
        log(f"CUDA graph of a whole step: {json.dumps(graph)}")
        emit(dict(graph=graph))

    eager = next((r for r in torch_rows if "eager" in r["impl"]), None)
    out = [title, TABLE_HEADER] + [table_row(r, name, T, args.peak_tflops, eager) for r in rows + torch_rows]
    out.append("MFU: FLOPs/token = 6*N + 12*n_layer*n_embd*T; peak by the matmul precision (fp32/tf32/bf16).")
    if graph is not None:
        out.append(f"CUDA graph of a whole step: {json.dumps(graph)}")
    text = "\n".join(out)
    print()
    print(text)
    emit(dict(device=name, table=text))
    if jsonl:
        jsonl.close()
    return 0


TABLE_HEADER = ("| implementation | B | step ms | tokens/s | MFU | peak mem GiB | our launches/step | host share |"
                " vs torch eager |\n|---|---|---|---|---|---|---|---|---|")


def table_row(r, device_name, T, peak_override=None, eager=None):
    """One markdown row for a measured configuration (sets r["MFU"]); the ratio needs the torch eager row."""
    fpt = flops_per_token(r["n_params"], SIZE["n_layer"], SIZE["n_embd"], T)
    peak = peak_tflops(device_name, r["precision"], peak_override)
    mfu = fpt * r["tokens_per_s"] / (peak * 1e12) if peak else None
    r["MFU"] = mfu
    ratio = r["tokens_per_s"] / eager["tokens_per_s"] if eager else None
    launches = r.get("launches_per_step")
    host = r.get("host_share")
    cells = [r["impl"], str(r["B"]), f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
             "-" if mfu is None else f"{100 * mfu:.1f}%", f"{r['peak_mem_GiB']:.1f}",
             "-" if launches is None else f"{launches:.0f}", "-" if host is None else f"{host:.2f}",
             "-" if ratio is None else f"{ratio:.2f}x"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
