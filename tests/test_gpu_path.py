"""The GPU path's host side on the fake CuPy: no per-step generator set-up, no host sync per layer in KV-cache
decoding, and the kernel choices said out loud (flash fallback, bf16 -> flash)."""
import logging

import numpy as np
import pytest

from nanogpt_np import backend
from nanogpt_np.kernels import registry


@pytest.fixture
def fake_gpu(monkeypatch):
    from emulation import fake_cupy
    cp = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(backend, "_cupy", cp)
    monkeypatch.setattr(backend, "_device", "cuda")
    yield cp
    registry.set_attention("matmul")
    registry.set_precision("float32")


def _model(**kw):
    from nanogpt_np.model import GPT, GPTConfig
    cfg = dict(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg), seed=1)


def test_dropout_generator_is_made_once_and_reseeded(fake_gpu):
    """The trainer reseeds dropout every step. On the GPU that used to build a new cupy.random.default_rng
    (~270k cuRAND XORWOW states set up per step); now one Philox generator is reseeded in place. Same seed,
    same masks, so --resume stays exact."""
    model = _model(dropout=0.3)
    rng = model.dropout_rng
    masks = []
    for seed in (11, 12, 11):
        model.reseed_dropout(seed)
        assert model.dropout_rng is rng
        masks.append(np.asarray(rng.random((4, 5), dtype=np.float32)))
    np.testing.assert_array_equal(masks[0], masks[2])
    assert not np.array_equal(masks[0], masks[1])
    assert masks[0].dtype == np.float32 and ((masks[0] >= 0) & (masks[0] < 1)).all()


def test_kv_cache_decoding_never_reads_the_device(fake_gpu, monkeypatch):
    """KV-cache attention used int(lengths.max()) on a device copy of the lengths: a host sync per layer per
    token. The lengths live on the host; no device value may be read back during a cached forward."""
    from emulation import fake_cupy
    from nanogpt_np.generate import KVCache
    model = _model()
    idx = np.array([[3, 5, 7, 9, 11]])
    full = np.asarray(model(backend.to_device(idx))[0].data)
    cache = KVCache(model.config, batch_size=1)

    def sync(*a, **k):
        raise AssertionError("a device value was read back to the host (a sync)")
    with monkeypatch.context() as m:
        for name in ("__int__", "__float__", "__index__", "__bool__", "item", "tolist"):
            m.setattr(fake_cupy.ndarray, name, sync, raising=False)
        got = [model(backend.to_device(idx[:, :3]), kv_cache=cache)[0].data]
        for t in (3, 4):
            got.append(model(backend.to_device(idx[:, t:t + 1]), kv_cache=cache)[0].data)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_with_the_bf16_residual_stream(fake_gpu, monkeypatch):
    """bf16 precision: the residual stream h is bf16 bits from the first ln_1 on, in the full forward and in
    KV-cache decoding alike; cached decoding gives the full forward's logits (to bf16 noise: the two paths round
    q, k, v differently), and both are near the float32 CPU model's."""
    from nanogpt_np import ops
    from nanogpt_np.generate import KVCache
    registry.configure(dtype="bfloat16")
    model = _model(n_embd=128)
    idx = np.array([[3, 5, 7, 9, 11]])
    stream_dtypes = []
    spy_on = ops.residual_layernorm

    def spy(*args, **kwargs):
        h, y = spy_on(*args, **kwargs)
        stream_dtypes.append(h.data.dtype)
        return h, y
    monkeypatch.setattr(ops, "residual_layernorm", spy)
    full = np.asarray(model(backend.to_device(idx))[0].data)
    assert stream_dtypes == [np.uint16] * (2 * model.config.n_layer + 1)
    cache = KVCache(model.config, batch_size=1)
    got = [model(backend.to_device(idx[:, :3]), kv_cache=cache)[0].data]
    for t in (3, 4):
        got.append(model(backend.to_device(idx[:, t:t + 1]), kv_cache=cache)[0].data)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    scale = np.abs(full).max()
    assert np.abs(got - full).max() < 1e-2 * scale              # measured: 2.8e-3
    monkeypatch.setattr(backend, "_device", "cpu")
    cpu = _model(n_embd=128)
    want = cpu(idx)[0].data
    assert np.abs(full - want).max() < 1e-2 * scale             # measured: 3.0e-3


def test_flash_fallback_is_logged_once(fake_gpu, caplog):
    """Head size 32: flash cannot run and the matmul kernels are used: one warning, not one per call."""
    from nanogpt_np.kernels import flash_attention
    flash_attention._fallbacks_logged.discard((96, 3))
    fwd, _ = registry.lookup("attention_flash")
    qkv = fake_gpu.asarray(np.random.default_rng(0).standard_normal((1, 5, 3 * 96)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="nanogpt_np.kernels.flash_attention"):
        for _ in range(3):
            out, saved = fwd(qkv, 3)
    assert saved[1][0] == "matmul"
    lines = [r.getMessage() for r in caplog.records if "flash attention needs head size 64" in r.getMessage()]
    assert len(lines) == 1 and "n_head 3 gives 32" in lines[0]


def test_bfloat16_configuration_chooses_flash_and_says_so(fake_gpu, monkeypatch):
    """precision.py's policy: bf16 training uses the flash kernel. configure(dtype="bfloat16") used to leave
    attention on matmul without a word."""
    monkeypatch.delenv("NANOGPT_ATTENTION", raising=False)
    registry.set_attention("matmul")
    registry.configure(dtype="bfloat16")
    assert registry.attention_kind() == "flash"
    assert "attention flash" in registry.describe() and "bf16" in registry.describe()
    registry.configure(attention="matmul", dtype="float32")
    assert registry.describe().startswith("GPU kernels: attention matmul")


@pytest.mark.parametrize("given, expected", [([], "COMPUTE_TYPE_TF32"), (["--tf32=false"], "COMPUTE_TYPE_DEFAULT")])
def test_trainer_turns_tf32_on_for_float32_matmuls_unless_told(fake_gpu, given, expected):
    """issue 15 item 5: the trainer left CuPy's float32 matmuls in exact FP32 (a third of TF32's speed on an
    H100); now --tf32 (default true) chooses, and the trainer's line says which."""
    from nanogpt_np.config import parse_args
    from nanogpt_np.run_setup import setup_device
    lines = []
    fake_gpu._core._routines_linalg.compute_types.clear()
    assert setup_device(parse_args(["--device=cuda", *given]), echo=lines.append) == "cuda"
    linalg = fake_gpu._core._routines_linalg
    assert linalg.compute_types[np.dtype(np.float32).char] == getattr(linalg, expected)
    assert ("TF32" in lines[-1]) == (expected == "COMPUTE_TYPE_TF32")


def test_train_gpu_quick_skips_torch_compile_and_reports_rows_as_measured(fake_gpu, monkeypatch, capsys, tmp_path):
    """--quick (the device check) must not spend minutes in torch.compile, and each row is printed and appended
    to --json the moment it is measured, so a run cut short keeps its rows."""
    import json
    import os
    import sys
    import types
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(bench)
    import train_gpu
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True), __version__="0")
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    compiled = []

    def torch_throughput(B, T, steps, warmup, compile_, log):
        compiled.append(compile_)
        return dict(impl="PyTorch eager", B=B, T=T, step_ms=1.0, tokens_per_s=B * T * 1e3, peak_mem_GiB=0.0,
                    n_params=1000, precision="bf16")
    monkeypatch.setattr(train_gpu, "torch_throughput", torch_throughput)
    rows_seen = []
    real_ours = train_gpu.ours_throughput

    def ours(*a, **k):                    # what has been written when the next configuration starts
        rows_seen.append(len(open(tmp_path / "t.jsonl").read().splitlines()) if (tmp_path / "t.jsonl").exists() else 0)
        return real_ours(*a, **k)
    monkeypatch.setattr(train_gpu, "ours_throughput", ours)
    assert train_gpu.main(["--small", "--quick", "--steps", "1", "--batch", "2", "--json", str(tmp_path / "t.jsonl")]) == 0
    assert compiled == [False]
    assert rows_seen == [0, 1, 2]
    out = capsys.readouterr().out
    assert out.index("| nanogpt_np (tf32 matmuls, matmul attention) |") < out.index("(bf16 matmuls, flash attention)")
    lines = [json.loads(x) for x in open(tmp_path / "t.jsonl")]
    assert [x.get("impl", "")[:10] for x in lines[:4]] == ["nanogpt_np"] * 3 + ["PyTorch ea"] and "table" in lines[-1]
    backend.use_device("cpu")
