"""Time one training step of nanoGPT's CPU recipe in nanogpt_np and, when installed, in PyTorch eager.

    python benchmarks/train_cpu.py [--data PATH] [--steps 40] [--threads 1,2] [--ranks 2]

The recipe: 4 layers, 4 heads, 128 channels, block 64, batch 12, dropout 0, character-level tiny Shakespeare
(65 symbols). A step is forward + backward + gradient clipping + AdamW. Each implementation runs in its own
process with the BLAS / torch thread count fixed, starts from the same weights (copied from nanogpt_np's
init), sees the same batches, and reports the median step time after warm-up. The first-step losses are
printed too: they must agree, or the comparison would not be of the same model.

Ranks (needs mpi4py: pip install 'nanogpt_np[dist]'): `--ranks 2` also times nanogpt_np data-parallel,
`mpiexec -n 2` with one BLAS thread per rank, each rank computing 6 of the 12 rows and the gradients summed by
one MPI allreduce per step (the trainer's own accumulate_gradients and distributed/ code), against PyTorch
eager with as many threads as there are ranks: the same cores either way. The step time is rank 0's.
The header names the CPU and the OpenBLAS kernel (threadpoolctl) that ran. `--zero` adds, for each rank
count, ZeRO-1 (distributed/zero.py: reduce-scatter, AdamW on 1/N of the buffer, allgather) beside the plain form.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)


def batches(data_path, n, seed=0):
    import numpy as np
    text = Path(data_path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    tokens = np.array([stoi[c] for c in text[: int(0.9 * len(text))]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    B, T = RECIPE["batch_size"], RECIPE["block_size"]
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - T - 1, size=B)
        window = np.stack([tokens[s:s + T + 1] for s in starts])
        out.append((np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])))
    return len(chars), out


def run_numpy(vocab, data, steps, warmup, zero=False):
    """One process, or this rank of `mpiexec -n N` (rows [rank * B/N, (rank+1) * B/N) of each batch)."""
    from nanogpt_np import distributed
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW
    from nanogpt_np.trainer import accumulate_gradients
    world = distributed.connect()
    rows = slice(world.rank * RECIPE["batch_size"] // world.world_size,
                 (world.rank + 1) * RECIPE["batch_size"] // world.world_size)
    cfg = GPTConfig(vocab_size=vocab, block_size=RECIPE["block_size"], n_layer=RECIPE["n_layer"],
                    n_head=RECIPE["n_head"], n_embd=RECIPE["n_embd"])
    model = GPT(cfg, seed=0)
    if zero:                                         # ZeRO-1: reduce-scatter, AdamW on 1/N, allgather
        from nanogpt_np.distributed.zero import ZeroAdamW
        opt = ZeroAdamW(model, world, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    else:
        opt = AdamW(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    times, first_loss = [], None
    for i, (x, y) in enumerate(data[: warmup + steps]):
        t0 = time.perf_counter()
        model.zero_grad()
        loss = accumulate_gradients(model, [(x[rows], y[rows])], world)    # forward + backward of this rank's rows
        model.finish_gradients()
        if not zero:
            world.allreduce_sum_(model.flat_grads)  # with ranks: the one gradient allreduce of the step
        opt.step(grad_clip=1.0)                      # clips by the global norm, then AdamW
        times.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    world.assert_identical(model.flat_params, "weights")
    return times[warmup:], first_loss


def run_torch(vocab, data, steps, warmup, threads):
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_reference import TorchGPT, make_optimizer
    from nanogpt_np.model import GPT, GPTConfig
    torch.set_num_threads(int(threads))
    cfg = GPTConfig(vocab_size=vocab, block_size=RECIPE["block_size"], n_layer=RECIPE["n_layer"],
                    n_head=RECIPE["n_head"], n_embd=RECIPE["n_embd"])
    model = TorchGPT(vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    model.load_from_nanogpt(GPT(cfg, seed=0).state_dict())
    opt = make_optimizer(model, 1e-3, (0.9, 0.99), 0.1)
    times, first_loss = [], None
    for x, y in data[: warmup + steps]:
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        first_loss = loss.item() if first_loss is None else first_loss
    return times[warmup:], first_loss


def worker(args):
    vocab, data = batches(args.data, args.warmup + args.steps)
    if args.impl == "numpy":
        times, loss = run_numpy(vocab, data, args.steps, args.warmup, zero=args.zero)
    else:
        times, loss = run_torch(vocab, data, args.steps, args.warmup, args.threads)
    times.sort()
    if args.impl == "numpy" and os.environ.get("PMI_RANK", "0") != "0":
        return                                                # rank 0 reports for the job
    print(json.dumps({"median_ms": 1000 * times[len(times) // 2], "min_ms": 1000 * times[0], "first_loss": loss,
                      "blas": blas_kernel()}))


def blas_kernel():
    """The BLAS library and the kernel it chose for this CPU, e.g. 'openblas 0.3.31 SkylakeX' (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (pip install threadpoolctl)"
    return "; ".join(f"{i['internal_api']} {i.get('version', '?')} {i.get('architecture', '?')}"
                     for i in threadpool_info() if i.get("user_api") == "blas") or "none found"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def measure(impl, threads, ranks, args, zero=False):
    """Run one worker (under mpiexec when ranks > 1) with `threads` BLAS / torch threads per process."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--impl", impl, "--threads", str(threads), "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd + (["--zero"] if zero else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="tiny Shakespeare text file")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts to try")
    ap.add_argument("--ranks", default="2", help="comma-separated rank counts for nanogpt_np under mpiexec, one "
                                                 "thread each, vs PyTorch with that many threads ('' for none)")
    ap.add_argument("--zero", action="store_true", help="also time ZeRO-1 for each rank count")
    ap.add_argument("--impl", choices=["numpy", "torch"], help=argparse.SUPPRESS)   # worker mode
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: {args.data} not found; pass --data PATH to tiny Shakespeare")
    if args.impl:
        return worker(args)
    try:
        import torch  # noqa: F401
        impls = ["numpy", "torch"]
    except ImportError:
        impls = ["numpy"]
        print("PyTorch is not installed: timing nanogpt_np alone")
    rank_counts = [int(r) for r in args.ranks.split(",") if r.strip()]
    if rank_counts and (MPIEXEC is None or not _has_mpi4py()):
        print("mpi4py / mpiexec not found (pip install 'nanogpt_np[dist]'): no ranks rows")
        rank_counts = []
    tokens = RECIPE["batch_size"] * RECIPE["block_size"]
    print(f"CPU: {cpu_model()}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"recipe {RECIPE}, {args.steps} timed steps after {args.warmup} warm-up, median step time")
    print(f"{'cores':>5} | {'ranks':>5} | {'threads':>7} | {'implementation':<17} | {'ms/step':>8} | {'tokens/s':>9} | "
          f"{'first loss':>10} | vs torch")
    # (cores, ranks, threads per rank): each thread count alone, then each rank count with one thread per rank
    layouts = [(t, 1, int(t), False) for t in map(int, args.threads.split(","))]
    layouts += [(r, r, 1, zero) for r in rank_counts for zero in ([False, True] if args.zero else [False])]
    torch_rows, torch_printed, results = {}, set(), []
    for cores, ranks, threads, zero in layouts:
        r = measure("numpy", threads, ranks, args, zero)
        if "torch" in impls and cores not in torch_rows:
            torch_rows[cores] = measure("torch", cores, 1, args)
        t = torch_rows.get(cores)
        ratio = f"{t['median_ms'] / r['median_ms']:.2f}x" if t else "-"
        name = "nanogpt_np ZeRO-1" if zero else "nanogpt_np"
        print(f"{cores:>5} | {ranks:>5} | {threads:>7} | {name:<17} | {r['median_ms']:8.2f} | "
              f"{tokens / r['median_ms'] * 1000:9,.0f} | {r['first_loss']:10.5f} | {ratio}")
        if t and cores not in torch_printed:
            print(f"{cores:>5} | {1:>5} | {cores:>7} | {'pytorch eager':<17} | {t['median_ms']:8.2f} | "
                  f"{tokens / t['median_ms'] * 1000:9,.0f} | {t['first_loss']:10.5f} |")
            torch_printed.add(cores)
        results.append(((cores, ranks, threads, zero), r))
    print(f"BLAS: {r['blas']}")
    return results


def _has_mpi4py():
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


if __name__ == "__main__":
    main()
