"""benchmarks/gpu_model.py, the traced performance model of a GPU step (PREDICTED numbers; no GPU here).

What is checked: the shape-only trace is the trace the arithmetic gives; each layer issues the launches the
model's structure implies; the 1-and-2-layer extrapolation equals a full 12-layer trace; the matmul FLOPs are
6 * (matmul parameters) * tokens; the printed table has every category.
"""
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_model as gm                                       # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=128, vocab_size=97, batch_size=2, block_size=64)   # head size 64 (flash)
MODES = [("matmul", "float32"), ("flash", "bfloat16")]


def _key(op):
    return (op.kind, op.name, op.family, op.phase, op.inputs, op.outputs, op.alloc, op.args)


@pytest.mark.parametrize("attention,dtype", MODES)
def test_shape_only_trace_is_the_arithmetic_trace(attention, dtype):
    """Skipping the arithmetic changes nothing the model sees: same ops, shapes, dtypes, allocations, peak."""
    cfg = gm.StepConfig(**TINY, attention=attention, dtype=dtype)
    fast = gm.trace_step(cfg, shape_only=True, steps=2)
    slow = gm.trace_step(cfg, shape_only=False, steps=2)
    assert [_key(o) for o in fast.ops] == [_key(o) for o in slow.ops]
    assert fast.peak == slow.peak and len(fast.ops) > 100


# Launches and cuBLAS calls each op of a block issues on the GPU path (from the kernel wrappers in
# nanogpt_np/kernels/*.py and ops/linear.py); the number of calls per block comes from running a block.
def _per_call(attention, dtype):
    ln = {"fwd": ["layernorm_forward"], "bwd": ["layernorm_backward", "layernorm_param_reduce"]}
    # kernels/linear.py: one gemm forward, two backward (dw added into the gradient buffer), and the bias
    # gradient as a one-row gemm; in bf16 the weight's bf16 copy is the model's, and x and dy are rounded only
    # when they arrive as float32 (_activation_casts below)
    linear = {"fwd": ["gemm"], "bwd": ["gemm", "gemm", "gemm?bias"]}
    # flash: with bf16 matmuls c_attn writes qkv as bf16 and the kernels read it in place (the bias added per
    # tile); a float32 qkv is first rounded to bf16 by qkv_to_bf16.
    # the matmul attention's products (kernels/softmax_attention.py -> batched_gemm.py): one strided batched gemm
    # per batch row b (q, k, v are read in place from qkv, where the batch rows are not one stride apart), two
    # products forward (S = Q K^T, Y = P V) and four backward (dP, dV, dQ, dK)
    B = TINY["batch_size"]
    att = ({"fwd": ["causal_softmax_forward"] + ["gemm"] * 2 * B,
            "bwd": ["causal_softmax_backward"] + ["gemm"] * 4 * B} if attention == "matmul" else
           {"fwd": (["qkv_to_bf16"] if dtype != "bfloat16" else []) + ["flash_attention_forward"],
            "bwd": ["flash_attention_backward_prep", "flash_attention_backward_dkdv", "flash_attention_backward_dq"]})
    # bias gradients: one-row gemms (ops/reductions.sum_rows, not CuPy's matmul: a CUDA graph can capture them);
    # with flash in bf16 the gemm sums the partial column sums the flash backward kernels wrote
    att_bias = ["gemm"]
    # residual_layernorm: the residual bias's gradient is summed in the layernorm backward's own pass
    return {"layernorm": ln, "residual_layernorm": ln,
            "linear": linear, "attention": att, "bias_attention": {"fwd": att["fwd"], "bwd": att["bwd"] + att_bias},
            # in bf16 the GELU reads c_fc's bf16 output and mlp.c_proj's bf16 dx; db is added into its buffer
            "bias_gelu": ({"fwd": ["gelu_forward_bf16x4"], "bwd": ["bias_gelu_backward_bf16", "column_sum_finish"]}
                          if dtype == "bfloat16" else
                          {"fwd": ["gelu_forward_f4"], "bwd": ["bias_gelu_backward", "column_sum_finish"]}),
            # the MLP (kernels/mlp.py). bf16: c_fc's cuBLASLt matmul with the GELU epilogue and mlp.c_proj's gemm;
            # backward dW_proj, the cuBLASLt dx matmul with the dGELU + bias-gradient epilogue, dW_fc and dx (the
            # bias gradient is added into its buffer by a CuPy add, not counted here). float32: the separate
            # kernels, c_fc, bias_gelu, mlp.c_proj, as before
            "mlp": ({"fwd": ["gemm", "gemm"], "bwd": ["gemm"] * 4} if dtype == "bfloat16" else
                    {"fwd": ["gemm", "gelu_forward_f4", "gemm"],
                     "bwd": ["gemm", "gemm", "bias_gelu_backward", "column_sum_finish", "gemm", "gemm"]}),
            "add": {"fwd": [], "bwd": []}, "dropout": {"fwd": [], "bwd": []}}


def _activation_casts(attention, dtype):
    """f32_to_bf16 launches per block for matmul inputs that arrive as float32 (the others are written in bf16
    by their producers; the gradients entering the two c_proj matmuls from the residual stream by the layernorm
    backward): the matmul attention's output (forward) and dqkv (backward)."""
    if dtype != "bfloat16":
        return {"fwd": 0, "bwd": 0}
    m = int(attention == "matmul")
    return {"fwd": m, "bwd": m}


def _calls_per_block():
    """{op name: [called with a bias?, ...]} for one block of the tiny model, counted on the CPU."""
    from nanogpt_np import model as model_mod
    from nanogpt_np import ops
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.tensor import Tensor, clear_tape
    calls = []
    cfg = GPTConfig(**{k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}, block_size=64)
    m = GPT(cfg, seed=0)
    saved = {n: getattr(ops, n) for n in _per_call("matmul", "float32")}
    try:
        for name, fn in saved.items():
            def counting(*a, _n=name, _fn=fn, **k):
                calls.append((_n, (_n == "linear" and len(a) > 2 and a[2] is not None)
                              or (_n == "residual_layernorm" and k.get("r_bias") is not None)))
                return _fn(*a, **k)
            setattr(model_mod.ops, name, counting)
        x = Tensor(np.zeros((1, 8, cfg.n_embd), np.float32))
        m._block(0, x, x, "ln_f")
    finally:
        for name, fn in saved.items():
            setattr(model_mod.ops, name, fn)
        clear_tape()
    return calls


@pytest.mark.parametrize("attention,dtype", MODES)
def test_launches_per_layer_follow_the_model_structure(attention, dtype):
    cfg = gm.StepConfig(**TINY, attention=attention, dtype=dtype)
    trace = gm.trace_step(cfg, shape_only=True, steps=2)
    table = _per_call(attention, dtype)
    calls = _calls_per_block()
    assert Counter(n for n, _ in calls) == Counter(residual_layernorm=2, linear=2, bias_attention=1, mlp=1,
                                                   dropout=2)
    assert not any(has_bias for n, has_bias in calls if n == "linear")      # every bias is added in a fused op
    for layer in range(cfg.n_layer):
        for stage in ("fwd", "bwd"):
            expected = Counter()
            expected["f32_to_bf16"] += _activation_casts(attention, dtype)[stage]
            for name, has_bias in calls:
                for k in table[name][stage]:
                    if k.endswith("?bias"):                 # a bias gradient, when the call has a bias
                        if has_bias:
                            expected[k[:-len("?bias")]] += 1
                    else:
                        expected[k] += 1
            got = Counter(o.name if o.kind == "kernel" else o.kind for o in trace.ops
                          if o.phase == (stage, layer) and o.kind in ("kernel", "gemm", "matmul"))
            assert got == expected, (layer, stage)


def _compare(a, b, rel=1e-9):
    for cat in gm.CATEGORIES:
        ra, rb = a.rows[cat], b.rows[cat]
        for f in ("gpu_ops", "host_ops"):
            assert getattr(ra, f) == pytest.approx(getattr(rb, f), abs=1e-6), (cat, f)
        for f in ("flops", "bytes_min", "bytes_written", "gpu_s", "alloc"):
            assert getattr(ra, f) == pytest.approx(getattr(rb, f), rel=rel, abs=1e-12), (cat, f)


@pytest.mark.parametrize("attention,dtype", MODES)
def test_extrapolation_matches_a_full_12_layer_trace(attention, dtype):
    cfg = gm.StepConfig(**dict(TINY, n_layer=12), attention=attention, dtype=dtype)
    full, _ = gm.model_step(cfg, full=True)
    extrapolated, traces = gm.model_step(cfg)
    assert [t.n_layer for t in traces] == [1, 2]
    _compare(extrapolated, full)
    assert extrapolated.peak == pytest.approx(full.peak, rel=1e-9)
    assert extrapolated.params == full.params and extrapolated.syncs == full.syncs


def test_extrapolation_check_can_fail():
    cfg = gm.StepConfig(**dict(TINY, n_layer=12))
    full, _ = gm.model_step(cfg, full=True)
    s1 = gm.summarize(gm.trace_step(cfg, 1, steps=2))
    s3 = gm.summarize(gm.trace_step(cfg, 3, steps=2))          # a wrong pair: 1 and 3 layers as if 1 and 2
    with pytest.raises(AssertionError):
        _compare(gm.extrapolate(s1, s3, 12), full)


@pytest.mark.parametrize("attention,dtype", MODES)
def test_matmul_flops_are_six_times_parameters_times_tokens(attention, dtype):
    """Every weight matrix (the tied head included) costs 2 FLOPs per token forward and 4 backward. The only
    extra matmul FLOPs are the float32 bias gradients (matrix-vector products): within 0.5%."""
    cfg = gm.StepConfig(n_layer=3, n_head=4, n_embd=256, vocab_size=1000, batch_size=2, block_size=128,
                        attention=attention, dtype=dtype)
    s, _ = gm.model_step(cfg, full=True)
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    matrices = L * 12 * C * C + V * C
    analytic = 6 * matrices * cfg.tokens
    assert s.rows["matmul"].flops == pytest.approx(analytic, rel=5e-3)
    assert s.rows["matmul"].flops >= analytic
    # attention's own matmuls: QK^T and PV forward, four products backward, 2*T*T*HS FLOPs each per head
    if attention == "matmul":
        att = 6 * 2 * cfg.batch_size * cfg.n_head * cfg.block_size ** 2 * (C // cfg.n_head) * L
        att += 2 * cfg.tokens * 3 * C * L             # c_attn's bias gradient (a matrix-vector product) is here now
        got = sum(c.flops for op, c in s.ops if c.category == "attention" and op.kind in ("matmul", "gemm"))
        assert got == pytest.approx(att, rel=1e-9)


def test_report_prints_every_category_and_is_labelled_predicted(capsys, tmp_path):
    out_json = tmp_path / "model.json"
    args = [f"--{k}={v}" for k, v in TINY.items()] + ["--dtype=bfloat16", "--attention=flash", "--ops",
                                                      f"--json={out_json}"]
    assert gm.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("PREDICTED")
    table = out[out.index("category"):out.index("predicted GPU time")]
    for cat in gm.CATEGORIES:
        assert f"\n{cat} " in table, cat
    for line in ("predicted GPU time per step", "predicted host time per step", "predicted tokens/s",
                 "predicted bytes per step", "predicted peak memory"):
        assert line in out
    assert "flash_attention_forward" in out and "cublasGemmEx" in out          # --ops lists the ops
    import json
    d = json.loads(out_json.read_text())
    assert d["predicted"] is True and set(d["categories"]) == set(gm.CATEGORIES) and d["tokens_per_s"] > 0


def test_every_kernel_of_the_step_has_a_traffic_formula():
    import re
    from nanogpt_np.kernels import compile as kc
    names = set()
    for src in kc.SOURCES:
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", kc.source(src)))
    fake = type("Op", (), {})
    for k in sorted(names):
        op = fake()
        op.name, op.args = k, {"scalars": [1] * 16, "null": [False] * 16, "grid": (1, 1, 1)}
        if k.startswith("flash_attention_") and k != "flash_attention_backward_prep":
            op.args["scalars"] = [64] * 16
        flops, bmin, bw, engine = gm.kernel_traffic(op)
        assert bmin > 0 and bw >= bmin * 0.5 and engine in ("memory", "flash"), k
    with pytest.raises(KeyError):
        op.name = "no_such_kernel"
        gm.kernel_traffic(op)


def test_flash_costs_qkv_read_in_place_and_the_bias_add():
    """The flash kernels read q, k, v from the bf16 qkv (B, T, 3C), rows t < T only (not padded heads), plus the
    qkv bias when one is passed; adding that bias costs ALU instructions, none without it."""
    B, T, NH = 2, 100, 2
    Tp, C, BH = 128, NH * 64, B * NH
    fake = type("Op", (), {})

    def fwd_op(with_bias):
        op = fake()
        # (out, out_bf16, L2, qkv, bias, T, Tp, NH, scale_log2): out written as bf16 (out NULL)
        op.name = "flash_attention_forward"
        op.args = {"scalars": [None] * 5 + [T, Tp, NH, 0.18], "grid": (Tp // 64, BH, 1),
                   "null": [True, False, False, False, not with_bias, False, False, False, False]}
        return op

    flops, bmin, bw, engine = gm.kernel_traffic(fwd_op(True))
    qkv_bytes, out_bytes, l2_bytes = 3 * B * T * C * 2, B * T * C * 2, BH * Tp * 4
    assert engine == "flash" and bmin == qkv_bytes + 3 * C * 4 + out_bytes + l2_bytes
    assert gm.kernel_traffic(fwd_op(False))[1] == bmin - 3 * C * 4
    assert gm.flash_bias_instructions(fwd_op(False)) == 0
    # Q fragments once per block (2 tiles' worth), K and V tiles once per (block, key tile): 2 * 3 tile loads of
    # 64 x 64, each also read and written once more in shared memory (the bias added after cp.async lands it)
    per_value, tile_value = gm.BIAS_INSTR_PER_VALUE, gm.BIAS_INSTR_PER_VALUE + gm.BIAS_TILE_EXTRA_PER_VALUE
    assert gm.flash_bias_instructions(fwd_op(True)) == 64 * 64 * BH * (per_value * 2 + tile_value * 2 * 3)


def test_compare_script_puts_measured_beside_predicted(tmp_path, capsys):
    """Per configuration (train_gpu.py JSON) and per category (kernels.py JSON: each row's call traced here)."""
    import json
    import gpu_model_compare as cmp
    measured = {"device": "NVIDIA H100 80GB HBM3", "rows": [
        {"impl": "nanogpt_np (bf16 matmuls, flash attention)", "B": 1, "T": 64, "step_ms": 10.0,
         "tokens_per_s": 6400.0, "peak_mem_GiB": 2.0, "precision": "bf16"},
        {"impl": "PyTorch eager", "B": 1, "T": 64, "step_ms": 5.0, "tokens_per_s": 12800.0}]}
    labels = [p for p, _, _ in cmp.KERNEL_ROWS]
    kernels = {"device": "NVIDIA H100 80GB HBM3", "small": True,
               "rows": [{"kernel": label + " (as kernels.py labels it)", "ours_ms": 0.1} for label in labels]}
    src, ksrc, out = tmp_path / "train.json", tmp_path / "kernels.json", tmp_path / "cmp.json"
    src.write_text(json.dumps(measured))
    ksrc.write_text(json.dumps(kernels))
    assert cmp.main(["--measured", str(src), "--kernels", str(ksrc), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    (row,) = d["configurations"]
    assert row["device"] == "H100 SXM" and row["ratio_step"] == pytest.approx(10.0 / row["predicted_step_ms"])
    assert len(d["kernels"]) == len(labels) and all(r["predicted_ms"] > 0 for r in d["kernels"])
    assert set(d["category_ratio"]) == {"embedding", "layernorm", "gelu", "cross-entropy", "adamw", "attention",
                                        "matmul"}          # the MLP row (cuBLAS + cuBLASLt) calibrates the matmuls
    for r in d["kernels"]:                          # every row's ratio is its measured / its prediction
        assert r["ratio"] == pytest.approx(0.1 / r["predicted_ms"])
    assert set(row["calibrated_category_ms"]) == set(gm.CATEGORIES)
    assert "calibrated by the kernel rows" in capsys.readouterr().out


def test_compare_script_reads_train_gpu_json_lines(tmp_path):
    """train_gpu.py --json writes JSON Lines (each row as it is measured, the device last): the same comparison."""
    import json
    import gpu_model_compare as cmp
    rows = [{"impl": "nanogpt_np (bf16 matmuls, flash attention)", "B": 1, "T": 64, "step_ms": 10.0,
             "tokens_per_s": 6400.0, "peak_mem_GiB": 2.0, "precision": "bf16"},
            {"impl": "PyTorch eager", "B": 1, "T": 64, "step_ms": 5.0, "tokens_per_s": 12800.0}]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows)
                   + json.dumps({"device": "NVIDIA H100 80GB HBM3", "table": "..."}) + "\n")
    measured = cmp.read_measured(src)
    assert measured["device"] == "NVIDIA H100 80GB HBM3" and measured["rows"] == rows
    (row,) = cmp.compare(measured)
    assert row["device"] == "H100 SXM" and row["ratio_step"] == pytest.approx(10.0 / row["predicted_step_ms"])


def _step_values(backend):
    """Loss, gradients and updated weights of one step of the tiny model on whatever backend is selected."""
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.optim import AdamW
    from nanogpt_np.tensor import backward
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=128)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=1e-3)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 97, (2, 64)), rng.integers(0, 97, (2, 64))
    model.zero_grad()
    _, loss = model(backend.to_device(x), backend.to_device(y))
    backward(loss)
    opt.step(grad_clip=1.0)
    return float(loss.item()), backend.to_numpy(model.flat_grads).copy(), backend.to_numpy(model.flat_params).copy()


def test_tracing_with_arithmetic_leaves_the_step_bit_identical(monkeypatch):
    """The recorder only watches: the traced step computes exactly what the plain fake CuPy computes."""
    from emulation import fake_cupy, trace_cupy
    from nanogpt_np import backend
    with monkeypatch.context() as mp:
        fc = fake_cupy.install(mp)
        mp.setattr(backend, "_cupy", fc)
        mp.setattr(backend, "_device", "cuda")
        plain = _step_values(backend)
    with monkeypatch.context() as mp:
        with trace_cupy.Tracer(shape_only=False, sms=5) as tr:        # the plain fake reports 5 SMs
            mp.setattr(backend, "_cupy", sys.modules["cupy"])
            mp.setattr(backend, "_device", "cuda")
            tr.start()
            traced = _step_values(backend)
            tr.stop()
    assert len(tr.ops) > 100
    assert plain[0] == traced[0]
    np.testing.assert_array_equal(plain[1], traced[1])
    np.testing.assert_array_equal(plain[2], traced[2])


@pytest.mark.parametrize("old_numpy", [False, True])
def test_reshape_copy_detection(monkeypatch, old_numpy):
    """The tracer tells a reshape CuPy does as a view from one that copies, with or without reshape(copy=)."""
    from emulation import trace_cupy
    if old_numpy:
        real = np.reshape

        def reshape_without_copy_argument(a, shape, **kw):
            if "copy" in kw:
                raise TypeError("reshape() got an unexpected keyword argument 'copy'")
            return real(a, shape)
        monkeypatch.setattr(np, "reshape", reshape_without_copy_argument)
    a = np.zeros((4, 6))
    assert trace_cupy._reshape_without_copy(a, (24,)).base is a
    with pytest.raises(ValueError):
        trace_cupy._reshape_without_copy(a.T, (24,))


def test_one_host_transfer_per_step_and_zero_grad_is_one_memset():
    """The host side of a GPU step (issue 15): the micro-batches' losses come back in one transfer per step
    (not one sync per micro-batch), the gradient buffer's 1-D parameters' part is zeroed by one memset (the
    matrices' gradients are overwritten by their first gemm: FreshGradBuffers in nanogpt_np/tensor.py, so never
    memset, not even by finish_gradients after a full backward), and AdamW's per-step scalars go to the device
    in one small copy (ndarray.set)."""
    from nanogpt_np.model import GPTConfig, parameter_shapes
    cfg = gm.StepConfig(**TINY, grad_accum_steps=3)
    trace = gm.trace_step(cfg, shape_only=True, steps=2)
    d2h = [op for op in trace.ops if op.kind == "d2h"]
    assert len(d2h) == 1, [op.name for op in d2h]
    assert gm.summarize(trace).syncs == 1
    memsets = [op for op in trace.ops if op.name == "memset_async"]
    assert len(memsets) == 1 and memsets[0].phase == ("step", None)
    (shape, dtype, nbytes), = memsets[0].outputs
    shapes = parameter_shapes(GPTConfig(**{k: v for k, v in TINY.items() if k != "batch_size"}))
    assert len(shape) == 1 and np.dtype(dtype) == np.float32
    assert shape[0] == sum(math.prod(s) for s in shapes.values() if len(s) == 1) == trace.params - sum(
        math.prod(s) for s in shapes.values() if len(s) == 2)
    assert [op.name for op in trace.ops if op.kind == "h2d" and op.name == "ndarray.set"] == ["ndarray.set"]
    assert not [op for op in trace.ops if op.kind == "fill" and op.outputs == memsets[0].outputs]


@pytest.mark.parametrize("accum", [1, 2])
def test_weight_gradient_gemms_overwrite_on_the_first_write_and_are_costed_without_reading_c(accum):
    """The matrices' gradients are not memset (FreshGradBuffers in nanogpt_np/tensor.py): the first gemm into each
    writes over it (beta = 0), which the model costs without reading C; the gemms of the later micro-steps add
    (beta = 1) and read it. In TINY the head's gemm is one chunk (beta = 0; with accum > 1 the tape adds its
    dwte, d loss not being 1), so every other beta = 1 gemm is a bias sum (one row)."""
    n_block_gemms = 4 * TINY["n_layer"]                       # c_attn, c_proj, c_fc, mlp.c_proj
    trace = gm.trace_step(gm.StepConfig(**TINY, grad_accum_steps=accum), shape_only=True, steps=2)
    gemms = [op for op in trace.ops if op.kind == "gemm" and min(op.args["m"], op.args["n"]) > 1]
    weight = {m * n for m, n in [(128, 384), (128, 128), (128, 512), (512, 128)]}
    adds = [op for op in gemms if op.args["beta"] != 0]
    assert len(adds) == (accum - 1) * n_block_gemms, [(op.args["m"], op.args["n"]) for op in adds]
    assert all(op.args["m"] * op.args["n"] in weight for op in adds)
    first = [op for op in gemms if op.args["beta"] == 0 and op.phase[0] == "bwd" and op.args["k"] == 128
             and op.args["m"] * op.args["n"] in weight]
    assert len(first) >= n_block_gemms
    for op in first[:1] + adds[:1]:
        a, c = op.args, gm.op_cost(op, gm.DEVICES["h100"])
        size = {14: 2, 0: 4}
        ab = a["m"] * a["k"] * size[a["Atype"]] + a["k"] * a["n"] * size[a["Btype"]]
        assert c.bytes_written == ab + a["m"] * a["n"] * size[a["Ctype"]] * (2 if a["beta"] else 1)


def test_cuda_graph_mode_predicts_the_host_work_outside_the_graph():
    """--cuda_graph: the traced last step is one graph launch plus the batch and AdamW-scalar uploads and the
    loss transfer; the GPU time is the eager step's, the host time far below the eager step's."""
    cfg = gm.StepConfig(**TINY, attention="flash", dtype="bfloat16")
    summary = gm.summarize(gm.trace_step(cfg, shape_only=True, steps=2))
    lines, d = gm.graph_mode(summary, cfg, "h100")
    assert d["ops_outside_graph"] == {"d2h": 1, "graph": 1, "h2d": 3}, d
    assert d["gpu_ms"] == summary.total().gpu_s * 1e3
    assert d["host_ms"] < summary.total().host_s * 1e3 / 5
    assert any("PREDICTED with --cuda_graph" in line for line in lines)
@pytest.mark.parametrize("attention,dtype", MODES)
def test_gemms_make_no_other_cublas_host_calls(attention, dtype, monkeypatch):
    """precision.gemm runs on the project's own cuBLAS handle, whose pointer mode is set once, when it is made:
    a step makes no cuBLAS host calls besides the gemms (it used to make three per gemm: get the pointer mode,
    set it, set it back). On a thread without a handle yet, the first step makes one, once."""
    import threading
    from nanogpt_np.kernels import precision
    cfg = gm.StepConfig(**TINY, attention=attention, dtype=dtype)
    trace = gm.trace_step(cfg, shape_only=True, steps=2)
    assert sum(o.kind == "gemm" for o in trace.ops) >= 4 * cfg.n_layer * 3
    # cuBLASLt's matmuls (kernels/cublaslt.py) set their bias and aux pointers on their cached descriptor: two
    # host calls each, nothing else
    lt_calls = sum(o.name == "cublasLtMatmul" for o in trace.ops)
    assert lt_calls == (2 * cfg.n_layer if dtype == "bfloat16" else 0)      # c_fc forward, mlp.c_proj dx
    assert [o.name for o in trace.ops if o.kind == "host"] == ["cublasLtMatmulDescSetAttribute"] * 2 * lt_calls
    monkeypatch.setattr(precision, "_local", threading.local())          # no handle yet: the step makes one
    first = gm.trace_step(cfg, shape_only=True, steps=1)
    names = [o.name for o in first.ops if o.kind == "host"]
    assert [n for n in names if not n.startswith("cublasLt")] == ["cublasCreate", "cublasSetPointerMode",
                                                                  "cublasSetStream", "cublasSetWorkspace"]
    # cuBLASLt (a fresh fake has no state either): one handle, one heuristic per description (c_fc forward,
    # mlp.c_proj dx: the layers share them), the rest are descriptor attributes
    lt_names = [n for n in names if n.startswith("cublasLt")]
    if dtype == "bfloat16":
        assert lt_names.count("cublasLtCreate") == 1 and lt_names.count("cublasLtMatmulAlgoGetHeuristic") == 2
    assert set(lt_names) <= {"cublasLtCreate", "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmulDescSetAttribute"}


def test_a_strided_batched_gemm_costs_its_batch():
    """A gemmStridedBatchedEx of `batch` products costs batch times one product's FLOPs and bytes, in one launch;
    attention's products stay in the attention row, the linear layers' in the matmul row."""
    from emulation.trace_cupy import Op
    dev = gm.DEVICES["h100"]
    args = dict(m=64, n=1024, k=1024, Atype=0, Btype=0, Ctype=0, beta=0.0, compute=77)
    one = gm.op_cost(Op("gemm", "cublasGemmEx", "matmul", ("fwd", 0), args=args), dev)
    many = gm.op_cost(Op("gemm", "cublasGemmStridedBatchedEx", "attention", ("fwd", 0), args=dict(args, batch=12)),
                      dev)
    assert one.category == "matmul" and many.category == "attention"
    assert many.gpu_ops == one.gpu_ops == 1
    assert many.flops == 12 * one.flops == 12 * 2.0 * 64 * 1024 * 1024
    assert many.bytes_written == 12 * one.bytes_written == 12 * 4 * (64 * 1024 + 1024 * 1024 + 64 * 1024)
    assert many.gpu_s > 5 * one.gpu_s                  # one launch floor, not twelve: a little less than 12x
