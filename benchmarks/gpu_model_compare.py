"""Measured (a device run) beside predicted (benchmarks/gpu_model.py): per configuration and per category.

    python benchmarks/gpu_model_compare.py --measured OUT/train.jsonl --kernels OUT/kernels.json --out OUT/model_vs_measured.json

--measured (benchmarks/train_gpu.py --json): for every nanogpt_np row (precision, attention, B, T) the model
traces the same configuration and the table puts the measured step time and tokens/s beside the predicted
GPU, host and step time and tokens/s, with measured / predicted. train_gpu.py times forward + backward +
AdamW without the trainer's batch copies and loss.item() sync; the model traces trainer.train_step.

--kernels (benchmarks/kernels.py --json): every row of the kernel benchmark (one wrapper call at GPT-2 sizes,
timed with CUDA events) is traced here with the same call and sizes and costed by the model, row by row; the
rows of a category give that category's measured / predicted ratio, and the predicted category times of the
step are printed beside themselves scaled by it ("calibrated"). Caveat: an event-timed call of several short
launches includes the host's gaps between them; the model's figure is GPU time only.
Either input may be given alone. Nothing here claims a speed without the measured file.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_model as gm                                   # noqa: E402


def device_key(name):
    for key in ("h200", "a100", "h100"):
        if key in str(name).lower():
            return key
    return "h100"


def read_measured(path) -> dict:
    """train_gpu.py --json output: JSON Lines (one row per line as it was measured, a last line with the
    device) or, from older runs, one JSON object with "device" and "rows"."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    objects = [json.loads(line) for line in text.splitlines() if line.strip()]
    device = next((o["device"] for o in objects if "device" in o and "impl" not in o), "")
    return {"device": device, "rows": [o for o in objects if "impl" in o]}


def compare(measured: dict):
    dev = device_key(measured.get("device", ""))
    out = []
    for r in measured.get("rows", []):
        if not str(r.get("impl", "")).startswith("nanogpt_np"):
            continue
        prec = r.get("precision", "fp32")
        cfg = gm.StepConfig(**{**gm.PRESETS["gpt2"], "batch_size": r["B"], "block_size": r["T"]})
        cfg.dtype = "bfloat16" if prec == "bf16" else "float32"
        cfg.attention = "flash" if "flash" in r["impl"] else "matmul"
        cfg.tf32 = "on" if prec in ("tf32", "bf16") else "off"
        summary, _ = gm.model_step(cfg, dev)
        pred = gm.as_json(summary, cfg, dev)
        pred_step = max(pred["gpu_ms"], pred["host_ms"])
        out.append(dict(impl=r["impl"], config=cfg, device=gm.DEVICES[dev]["name"], measured_step_ms=r["step_ms"],
                        predicted_gpu_ms=pred["gpu_ms"], predicted_host_ms=pred["host_ms"],
                        predicted_step_ms=pred_step, measured_tokens_per_s=r["tokens_per_s"],
                        predicted_tokens_per_s=pred["tokens_per_s"], ratio_step=r["step_ms"] / pred_step,
                        measured_peak_GiB=r.get("peak_mem_GiB"), predicted_peak_GiB=pred["peak_bytes"] / 2 ** 30,
                        predicted_categories=pred["categories"],
                        report=gm.report(summary, cfg, dev, "1 and 2 layers, extrapolated")))
    return out


# kernels.py rows: (label prefix, category, build). build(sizes) runs inside a Tracer (where `import cupy` gives
# the fake), makes the same inputs kernels.py makes and returns the call kernels.py times.
def _f32(*shape):
    import cupy
    return cupy.empty(shape, dtype=cupy.float32)


def _encoder(z, backward):
    import cupy
    from nanogpt_np.kernels import encoder as k
    wte, wpe, idx = _f32(z.V, z.C), _f32(max(z.T, 1024), z.C), cupy.zeros((z.B, z.T), dtype=cupy.int64)
    if not backward:
        return lambda: k.embedding_forward(wte, wpe, idx)
    _, saved = k.embedding_forward(wte, wpe, idx)
    dout = _f32(z.B, z.T, z.C)
    return lambda: k.embedding_backward(dout, saved)


def _layernorm(z, kind):
    from nanogpt_np.kernels import layernorm as k
    x, res, w, b = _f32(z.N, z.C), _f32(z.N, z.C), _f32(z.C), _f32(z.C)
    if kind == "fwd":
        return lambda: k.layernorm_forward(x, w, b)
    if kind == "res":
        return lambda: k.residual_layernorm_forward(x, res, None, w, b)
    _, saved = k.residual_layernorm_forward(x, res, None, w, b)
    dy, dh = _f32(z.N, z.C), _f32(z.N, z.C)
    return lambda: k.residual_layernorm_backward((dh, dy), saved)


def _in_precision(precision, fn):
    """A call of fn with registry.precision() set to `precision` ("float32" or "bfloat16"), restored after."""
    from nanogpt_np.kernels import registry

    def call():
        old = registry.precision()
        registry.set_precision(precision)
        try:
            return fn()
        finally:
            registry.set_precision(old)
    return call


def _gelu(z, backward, bf16=False):
    """bf16: as the model runs it in bf16 precision (x and dy as bf16 bits, y and dx bf16, db into a buffer)."""
    import cupy
    from nanogpt_np.kernels import gelu as k
    x4, b4, d4 = _f32(z.N, 4 * z.C), _f32(4 * z.C), _f32(z.N, 4 * z.C)
    db_into = None
    if bf16:
        x4, d4 = cupy.zeros(x4.shape, dtype=cupy.uint16), cupy.zeros(d4.shape, dtype=cupy.uint16)
        db_into = _f32(4 * z.C)
    precision = "bfloat16" if bf16 else "float32"
    if not backward:
        return _in_precision(precision, lambda: k.bias_gelu_forward(x4, b4))
    _, saved = _in_precision(precision, lambda: k.bias_gelu_forward(x4, b4))()
    return _in_precision(precision, lambda: k.bias_gelu_backward(d4, saved, db_into=db_into))


def _cross_entropy(z):
    import cupy
    from nanogpt_np.kernels import cross_entropy as k
    logits, targets, one = _f32(z.N, z.V), cupy.zeros((z.N,), dtype=cupy.int64), cupy.ones((), dtype=cupy.float32)

    def call():                                   # kernels.py: d loss = 1 assumed, gradient to a new buffer
        k.set_assume_unit_dloss(True)
        try:
            _, saved = k.cross_entropy_forward(logits, targets, with_grad=True)
            return k.cross_entropy_backward(one, saved)
        finally:
            k.set_assume_unit_dloss(False)
    return call


def _adamw(z, bf16):
    import cupy
    from nanogpt_np.kernels import adamw as k
    p, g, m, v = _f32(z.P), _f32(z.P), _f32(z.P), _f32(z.P)
    pb = cupy.empty((z.P,), dtype=cupy.uint16) if bf16 else None
    kw = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1, grad_clip=1.0)
    return lambda: k.adamw_step(p, g, m, v, n_decay=z.P - 100_000, params_bf16=pb, **kw)


def _softmax(z, backward):
    import numpy as np
    from nanogpt_np.kernels.compile import launch
    from nanogpt_np.kernels.launch import rows_per_warp
    BH = z.B * z.NH
    S, dP = _f32(BH, z.T, z.T), _f32(BH, z.T, z.T)
    grid, block = rows_per_warp(BH * z.T, 8)
    kernel = "causal_softmax_backward" if backward else "causal_softmax_forward"
    args = (dP, S, dP) if backward else (S, S)
    return lambda: launch("softmax_attention", kernel, grid, block, args + (np.int32(BH), np.int32(z.T), np.float32(1 / 8)))


def _attention(z, flash, tf32):
    from nanogpt_np.kernels import flash_attention, precision, softmax_attention
    mod = flash_attention if flash else softmax_attention
    qkv, dout = _f32(z.B, z.T, 3 * z.C), _f32(z.B, z.T, z.C)

    def call():
        precision.set_tf32(tf32)
        _, saved = mod.attention_forward(qkv, z.NH)
        return mod.attention_backward(dout, saved)
    return call


def _mlp(z):
    """The MLP forward + backward in bf16 as the model runs it (kernels/mlp.py: cuBLASLt epilogues)."""
    import cupy
    from nanogpt_np.kernels import mlp
    x, w_fc, b_fc, w_proj = cupy.zeros((z.N, z.C), dtype=cupy.uint16), _f32(z.C, 4 * z.C), _f32(4 * z.C), _f32(4 * z.C, z.C)
    w_fc_h, w_proj_h = cupy.zeros(w_fc.shape, dtype=cupy.uint16), cupy.zeros(w_proj.shape, dtype=cupy.uint16)
    dy = cupy.zeros((z.N, z.C), dtype=cupy.uint16)
    bufs = dict(dw_fc_into=_f32(z.C, 4 * z.C), db_fc_into=_f32(4 * z.C), dw_proj_into=_f32(4 * z.C, z.C))

    def step():
        _, saved = mlp.mlp_forward(x, w_fc, b_fc, w_proj, None, w_fc_h, w_proj_h, bf16_out=True)
        return mlp.mlp_backward(dy, saved, **bufs)
    return _in_precision("bfloat16", step)


KERNEL_ROWS = [
    ("MLP fwd + bwd, bf16", "matmul", _mlp),
    ("encoder forward", "embedding", lambda z: _encoder(z, False)),
    ("encoder backward", "embedding", lambda z: _encoder(z, True)),
    ("layernorm forward", "layernorm", lambda z: _layernorm(z, "fwd")),
    ("residual + layernorm forward", "layernorm", lambda z: _layernorm(z, "res")),
    ("layernorm backward", "layernorm", lambda z: _layernorm(z, "bwd")),
    ("bias + GELU forward, bf16 in/out", "gelu", lambda z: _gelu(z, False, bf16=True)),    # before the
    ("bias + GELU backward, bf16 in/out", "gelu", lambda z: _gelu(z, True, bf16=True)),    # float32 prefixes
    ("bias + GELU forward", "gelu", lambda z: _gelu(z, False)),
    ("bias + GELU backward", "gelu", lambda z: _gelu(z, True)),
    ("cross-entropy fwd+bwd", "cross-entropy", _cross_entropy),
    ("AdamW + global norm", "adamw", lambda z: _adamw(z, False)),
    ("AdamW + bf16 weight copy", "adamw", lambda z: _adamw(z, True)),
    ("causal softmax forward", "attention", lambda z: _softmax(z, False)),
    ("causal softmax backward", "attention", lambda z: _softmax(z, True)),
    ("attention fwd+bwd, cuBLAS + fused softmax (fp32)", "attention", lambda z: _attention(z, False, False)),
    ("attention fwd+bwd, cuBLAS + fused softmax (tf32)", "attention", lambda z: _attention(z, False, True)),
    ("attention fwd+bwd, flash", "attention", lambda z: _attention(z, True, False)),
]


def predicted_call_ms(build, sizes, device):
    """GPU ms the model predicts for one wrapper call (traced shape-only, costed op by op)."""
    from emulation import trace_cupy
    dev = gm.DEVICES[device]
    with trace_cupy.Tracer(shape_only=True, sms=dev["sms"], compute_capability=dev["cc"]) as tr:
        call = build(sizes)
        tr.start()
        call()
        tr.stop()
    return sum(gm.op_cost(op, dev).gpu_s for op in tr.ops) * 1e3


def compare_kernels(measured: dict, device=None):
    """Row by row: measured ms (kernels.py) and predicted ms for the same call."""
    import types as _types
    device = device or device_key(measured.get("device", ""))
    B, T = measured.get("B", 8), measured.get("T", 1024)
    z = _types.SimpleNamespace(B=B, T=T, N=B * T, C=768, V=50257, NH=12, P=124_475_904)
    if measured.get("small"):
        z = _types.SimpleNamespace(B=2, T=64, N=128, C=128, V=1000, NH=2, P=100_000)
    rows = []
    for r in measured.get("rows", []):
        for prefix, category, build in KERNEL_ROWS:
            if str(r.get("kernel", "")).startswith(prefix) and r.get("ours_ms"):
                pred = predicted_call_ms(build, z, device)
                rows.append(dict(kernel=r["kernel"], category=category, measured_ms=r["ours_ms"],
                                 predicted_ms=pred, ratio=r["ours_ms"] / pred))
                break
    return rows, device


def category_ratios(krows, cfg=None):
    """measured / predicted per category, summed over the category's rows. With a step configuration, the
    attention rows are the ones of its attention (flash, or cuBLAS + softmax at its matmul precision)."""
    def wanted(r):
        if r["category"] != "attention" or cfg is None:
            return True
        if cfg.attention == "flash":
            return "flash" in r["kernel"]
        return "flash" not in r["kernel"] and ("cuBLAS" not in r["kernel"] or
                                               ("(tf32)" in r["kernel"]) == (cfg.tf32 == "on"))
    ratios = {}
    for cat in sorted({r["category"] for r in krows}):
        mine = [r for r in krows if r["category"] == cat and wanted(r)]
        if mine:
            ratios[cat] = sum(r["measured_ms"] for r in mine) / sum(r["predicted_ms"] for r in mine)
    return ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description="Put a device run (train_gpu.py and kernels.py JSON) beside the "
                                             "traced model's predictions, per configuration and per category.")
    ap.add_argument("--measured", help="train_gpu.py --json output (JSON Lines)")
    ap.add_argument("--kernels", help="kernels.py --json output")
    ap.add_argument("--out", help="write the comparison as JSON")
    a = ap.parse_args(argv)
    if not (a.measured or a.kernels):
        ap.error("give --measured and/or --kernels")
    result = {"predicted_by": "benchmarks/gpu_model.py"}
    rows = []
    if a.measured:
        rows = compare(read_measured(a.measured))
    print(f"{'configuration':<48}{'meas ms':>9}{'pred ms':>9}{'pred GPU':>9}{'pred host':>10}{'meas tok/s':>12}"
          f"{'pred tok/s':>12}{'meas/pred':>10}")
    for r in rows:
        print(f"{r['impl'][:47]:<48}{r['measured_step_ms']:>9.1f}{r['predicted_step_ms']:>9.1f}"
              f"{r['predicted_gpu_ms']:>9.1f}{r['predicted_host_ms']:>10.1f}{r['measured_tokens_per_s']:>12,.0f}"
              f"{r['predicted_tokens_per_s']:>12,.0f}{r['ratio_step']:>10.2f}")
    ratios = {}
    if a.kernels:
        with open(a.kernels, encoding="utf-8") as f:
            krows, device = compare_kernels(json.load(f))
        ratios = category_ratios(krows)
        print()
        print(f"Kernel benchmark rows, measured vs predicted for the same call ({gm.DEVICES[device]['name']} model)")
        print(f"{'kernels.py row':<58}{'category':<15}{'meas ms':>9}{'pred ms':>9}{'meas/pred':>10}")
        for r in krows:
            print(f"{r['kernel'][:57]:<58}{r['category']:<15}{r['measured_ms']:>9.3f}{r['predicted_ms']:>9.3f}"
                  f"{r['ratio']:>10.2f}")
        print("per category, measured / predicted: " + ", ".join(f"{c} {v:.2f}" for c, v in sorted(ratios.items())))
        result["kernels"] = krows
        result["category_ratio"] = ratios
    for r in rows:
        print()
        print(f"== {r['impl']}: predicted per category (measured peak {r['measured_peak_GiB']} GiB)")
        print(r["report"][r["report"].index("category"):])
        if ratios:
            ratios = category_ratios(krows, r["config"])
            cal = {c: v["gpu_s"] * 1e3 * ratios.get(c, 1.0) for c, v in r["predicted_categories"].items()}
            r["calibrated_category_ms"] = cal
            print("GPU ms per category, predicted -> calibrated by the kernel rows: " +
                  ", ".join(f"{c} {r['predicted_categories'][c]['gpu_s'] * 1e3:.2f} -> {cal[c]:.2f}"
                            for c in gm.CATEGORIES if c in ratios))
    result["configurations"] = [{k: (v.__dict__ if k == "config" else v) for k, v in r.items() if k != "report"}
                                for r in rows]
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
