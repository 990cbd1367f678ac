"""Where a training step's time goes, op by op, in nanogpt_np (and, when installed, in PyTorch).

    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_cpu.py [--steps 40]

Each op family's forward and backward are timed by wrapping the pairs that ops/dispatch.py hands out, on
nanoGPT's CPU recipe (4 layers, 128 channels, block 64, batch 12, 65 symbols). With PyTorch installed the same
step is profiled with torch.profiler and its top operators are printed below, for a side-by-side reading.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanogpt_np import optim  # noqa: E402
from nanogpt_np.ops import dispatch  # noqa: E402

SPENT = collections.defaultdict(float)


def _timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        SPENT[name] += time.perf_counter() - t0
        return out
    return wrapper


def _install_timers():
    original = dispatch.implementation

    def implementation(name, array, forward, backward):
        f, b = original(name, array, forward, backward)
        return _timed(name + " forward", f), _timed(name + " backward", b)

    for family in ("embedding", "linear", "layernorm", "gelu", "mlp", "attention", "cross_entropy", "lm_head_loss"):
        sys.modules[f"nanogpt_np.ops.{family}"].implementation = implementation
    optim.adamw_update = _timed("adamw", optim.adamw_update)
    optim.clip_grad_norm = _timed("clip_grad_norm", optim.clip_grad_norm)


def profile_numpy(steps):
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.tensor import backward
    _install_timers()
    model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128), seed=0)
    opt = optim.AdamW(model, lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (12, 64)), rng.integers(0, 65, (12, 64))

    def step():
        model.zero_grad()
        _, loss = model(x, y)
        backward(loss)
        opt.step(1e-3, 1.0)

    for _ in range(5):
        step()
    SPENT.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    total = (time.perf_counter() - t0) / steps * 1e3
    print(f"nanogpt_np: {total:.1f} ms/step")
    for name, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {seconds / steps * 1e3:7.2f} ms")
    print(f"  {'(tape, Python, the rest)':28s} {total - sum(SPENT.values()) / steps * 1e3:7.2f} ms")


def profile_torch(steps):
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("PyTorch is not installed: no side-by-side profile")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_reference import TorchGPT, make_optimizer
    torch.set_num_threads(1)
    model = TorchGPT(65, 64, 4, 4, 128)
    opt = make_optimizer(model, 1e-3, (0.9, 0.99), 0.1)
    rng = np.random.default_rng(0)
    x, y = (torch.from_numpy(rng.integers(0, 65, (12, 64))) for _ in range(2))

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\nPyTorch eager, 1 thread, top operators over {steps} steps (divide by {steps} for per-step):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    profile_numpy(args.steps)
    profile_torch(args.steps)
