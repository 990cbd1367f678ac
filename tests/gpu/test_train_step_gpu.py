"""A whole training step on the GPU (fused kernels) matches the CPU step on the same weights and batch:
loss, every gradient (flat buffer), and the parameters after one AdamW step with clipping."""
import numpy as np
import pytest

from .helpers import rel_err


def _step(model_cls, cfg, params, x, y, device, attention="matmul", dtype="float32"):
    from nanogpt_np import backend
    from nanogpt_np.kernels import registry
    from nanogpt_np.optim import AdamW, clip_grad_norm
    from nanogpt_np.tensor import backward
    backend.use_device(device)
    registry.set_attention(attention)
    registry.set_precision(dtype)
    model = model_cls(cfg, seed=0)
    model.flat_params[...] = backend.to_device(params)
    opt = AdamW(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.zero_grad()
    _, loss = model(backend.to_device(x), backend.to_device(y))
    backward(loss)
    model.finish_gradients()
    grads = backend.to_numpy(model.flat_grads).copy()
    norm = clip_grad_norm(model.flat_grads, 1.0)
    opt.step()
    return float(loss.item()), grads, norm, backend.to_numpy(model.flat_params).copy()


@pytest.mark.parametrize("attention,dtype,tol", [("matmul", "float32", 1e-4), ("flash", "float32", 3e-2),
                                                 ("flash", "bfloat16", 5e-2)])
def test_training_step_matches_cpu(cp, attention, dtype, tol):
    from nanogpt_np import backend
    from nanogpt_np.kernels import precision
    from nanogpt_np.model import GPT, GPTConfig
    precision.set_tf32(False)
    cfg = GPTConfig(vocab_size=97, block_size=80, n_layer=2, n_head=2, n_embd=128, dropout=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 97, size=(3, 70))
    y = rng.integers(0, 97, size=(3, 70))
    y[0, :5] = -1                                            # a few masked targets
    backend.use_device("cpu")
    params = GPT(cfg, seed=0).flat_params.copy()
    try:
        l_cpu, g_cpu, n_cpu, p_cpu = _step(GPT, cfg, params, x, y, "cpu")
        l_gpu, g_gpu, n_gpu, p_gpu = _step(GPT, cfg, params, x, y, "cuda", attention, dtype)
    finally:
        backend.use_device("cuda")
        from nanogpt_np.kernels import registry
        registry.set_attention("matmul")
        registry.set_precision("float32")
    assert abs(l_gpu - l_cpu) / abs(l_cpu) < tol * 0.1
    assert rel_err(g_gpu, g_cpu) < tol
    assert abs(n_gpu - n_cpu) / n_cpu < tol
    assert rel_err(p_gpu, p_cpu) < tol
    # the update itself (about lr per element on the first Adam step): elements whose gradient is ~0 may flip,
    # so compare on average rather than element by element
    du = np.abs((p_gpu - params) - (p_cpu - params))
    assert du.mean() < (1e-2 if dtype == "float32" else 5e-2) * 1e-3
