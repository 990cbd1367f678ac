"""Optional: the whole model and AdamW against PyTorch in float64 (skipped when torch is not installed).

The finite-difference checks are the referee for every gradient; this is a second, independent one: the
same architecture written with torch.nn (benchmarks/torch_reference.py), the same weights and batch.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_reference import TorchGPT, make_optimizer  # noqa: E402

from nanogpt_np.model import GPT, GPTConfig  # noqa: E402
from nanogpt_np.optim import AdamW  # noqa: E402
from nanogpt_np.tensor import backward  # noqa: E402

RENAME = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}


def torch_name(name):
    for a, b in RENAME.items():
        name = name.replace(a, b)
    return name


def test_loss_gradients_and_adamw_match_pytorch(rng):
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    ours = GPT(cfg, seed=int(rng.integers(1000)), dtype="float64")
    ours.flat_params[...] = rng.standard_normal(ours.flat_params.shape) * 0.2
    theirs = TorchGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd).double()
    theirs.load_from_nanogpt(ours.state_dict())
    opt_ours = AdamW(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt_theirs = make_optimizer(theirs, 1e-2, (0.9, 0.99), 0.1)
    for _ in range(3):
        x = rng.integers(0, cfg.vocab_size, size=(3, 8))
        y = rng.integers(0, cfg.vocab_size, size=(3, 8))
        y[0, :4] = -1                                          # masked targets too
        ours.zero_grad()
        _, loss = ours(x, y)
        backward(loss)
        norm = opt_ours.step(grad_clip=0.05)                 # small: clipping engages
        opt_theirs.zero_grad()
        t_loss = theirs(torch.from_numpy(x), torch.from_numpy(y))
        t_loss.backward()
        t_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        assert float(t_norm) > 0.05
        for name, p in ours.params.items():
            g = theirs.get_parameter(torch_name(name)).grad.numpy()
            g = g.T if g.ndim == 2 and name not in ("wte.weight", "wpe.weight") else g
            np.testing.assert_allclose(p.grad, g, rtol=1e-10, atol=1e-13, err_msg=name)   # both after clipping
        opt_theirs.step()
        assert abs(loss.item() - t_loss.item()) < 1e-12
        assert abs(float(norm) - float(t_norm)) < 1e-10
    for name, p in ours.params.items():
        w = theirs.get_parameter(torch_name(name)).detach().numpy()
        w = w.T if w.ndim == 2 and name not in ("wte.weight", "wpe.weight") else w
        np.testing.assert_allclose(p.data, w, rtol=1e-9, atol=1e-12, err_msg=name)
