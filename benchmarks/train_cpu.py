"""Time one training step of nanoGPT's CPU recipe in nanogpt_np and, when installed, in PyTorch eager.

    python benchmarks/train_cpu.py [--data PATH] [--steps 40] [--threads 1,2]

The recipe: 4 layers, 4 heads, 128 channels, block 64, batch 12, dropout 0, character-level tiny Shakespeare
(65 symbols). A step is forward + backward + gradient clipping + AdamW. Each implementation runs in its own
process with the BLAS / torch thread count fixed, starts from the same weights (copied from nanogpt_np's
init), sees the same batches, and reports the median step time after warm-up. The first-step losses are
printed too: they must agree, or the comparison would not be of the same model.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
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


def run_numpy(vocab, data, steps, warmup):
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW
    from nanogpt_np.tensor import backward
    cfg = GPTConfig(vocab_size=vocab, block_size=RECIPE["block_size"], n_layer=RECIPE["n_layer"],
                    n_head=RECIPE["n_head"], n_embd=RECIPE["n_embd"])
    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    times, first_loss = [], None
    for i, (x, y) in enumerate(data[: warmup + steps]):
        t0 = time.perf_counter()
        model.zero_grad()
        _, loss = model(x, y)
        backward(loss)
        opt.step(grad_clip=1.0)                      # clips by the global norm, then AdamW
        times.append(time.perf_counter() - t0)
        first_loss = loss.item() if first_loss is None else first_loss
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
        times, loss = run_numpy(vocab, data, args.steps, args.warmup)
    else:
        times, loss = run_torch(vocab, data, args.steps, args.warmup, args.threads)
    times.sort()
    print(json.dumps({"median_ms": 1000 * times[len(times) // 2], "min_ms": 1000 * times[0], "first_loss": loss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="tiny Shakespeare text file")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts to try")
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
    tokens = RECIPE["batch_size"] * RECIPE["block_size"]
    print(f"recipe {RECIPE}, {args.steps} timed steps after {args.warmup} warm-up, median step time")
    print(f"{'threads':>7} | {'implementation':<15} | {'ms/step':>8} | {'tokens/s':>9} | {'first loss':>10} | vs torch")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        row = {}
        for impl in impls:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
            out = subprocess.run([sys.executable, __file__, "--impl", impl, "--threads", str(threads),
                                  "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 env=env, capture_output=True, text=True, check=True)
            row[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        for impl in impls:
            r = row[impl]
            ratio = f"{row['torch']['median_ms'] / r['median_ms']:.2f}x" if "torch" in row else "-"
            name = "nanogpt_np" if impl == "numpy" else "pytorch eager"
            print(f"{threads:>7} | {name:<15} | {r['median_ms']:8.2f} | {tokens / r['median_ms'] * 1000:9,.0f} | "
                  f"{r['first_loss']:10.5f} | {ratio if impl == 'numpy' else ''}")
        results.append((threads, row))
    return results


if __name__ == "__main__":
    main()
