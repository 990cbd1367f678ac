"""Measured (a device run of benchmarks/train_gpu.py) beside predicted (benchmarks/gpu_model.py), per configuration.

    python benchmarks/gpu_model_compare.py --measured gpu_check_out/train.json [--out gpu_check_out/model_vs_measured.json]

For every nanogpt_np row of train_gpu.py's JSON (precision, attention, B, T), the model traces the same
configuration on the CPU and the table puts the measured step time, tokens/s and peak memory beside the
predicted GPU time, host time, step time, tokens/s and peak, with measured / predicted. The predicted
per-category table of each configuration is printed below it, so a device profile can be set against it.
Differences in the step itself: train_gpu.py times forward + backward + AdamW without the trainer's batch
copies and loss.item() sync; the model traces trainer.train_step (one sync per step).
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
        out.append(dict(impl=r["impl"], device=gm.DEVICES[dev]["name"], measured_step_ms=r["step_ms"],
                        predicted_gpu_ms=pred["gpu_ms"], predicted_host_ms=pred["host_ms"],
                        predicted_step_ms=pred_step, measured_tokens_per_s=r["tokens_per_s"],
                        predicted_tokens_per_s=pred["tokens_per_s"], ratio_step=r["step_ms"] / pred_step,
                        measured_peak_GiB=r.get("peak_mem_GiB"), predicted_peak_GiB=pred["peak_bytes"] / 2 ** 30,
                        predicted_categories=pred["categories"],
                        report=gm.report(summary, cfg, dev, "1 and 2 layers, extrapolated")))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Put a device run of train_gpu.py beside the traced model's predictions.")
    ap.add_argument("--measured", required=True, help="train_gpu.py --json output")
    ap.add_argument("--out", help="write the comparison as JSON")
    a = ap.parse_args(argv)
    with open(a.measured, encoding="utf-8") as f:
        rows = compare(json.load(f))
    print(f"{'configuration':<48}{'meas ms':>9}{'pred ms':>9}{'pred GPU':>9}{'pred host':>10}{'meas tok/s':>12}"
          f"{'pred tok/s':>12}{'meas/pred':>10}")
    for r in rows:
        print(f"{r['impl'][:47]:<48}{r['measured_step_ms']:>9.1f}{r['predicted_step_ms']:>9.1f}"
              f"{r['predicted_gpu_ms']:>9.1f}{r['predicted_host_ms']:>10.1f}{r['measured_tokens_per_s']:>12,.0f}"
              f"{r['predicted_tokens_per_s']:>12,.0f}{r['ratio_step']:>10.2f}")
    for r in rows:
        print()
        print(f"== {r['impl']}: predicted per category (measured peak {r['measured_peak_GiB']} GiB)")
        print(r["report"][r["report"].index("category"):])
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump([{k: v for k, v in r.items() if k != "report"} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
