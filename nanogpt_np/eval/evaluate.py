"""Evaluate a trained model: language-model metrics on a held-out text, and task metrics by generation.

    python -m nanogpt_np.eval.evaluate --out_dir=RUN --file=heldout.txt
    python -m nanogpt_np.eval.evaluate --out_dir=RUN --task=test.jsonl [--metric=labels|text|auto]

RUN is a nanogpt_np run directory (its newest checkpoint is evaluated) or a Hugging Face GPT-2
directory. The results are printed and written as JSON to RUN/eval.json (or --out=PATH).

On a text file (--file):
    loss            mean cross-entropy per predicted token, in nats
    perplexity      exp(loss)
    bits_per_byte   total cross-entropy / (ln 2 * UTF-8 bytes of the predicted tokens): comparable across
                    tokenizers (a char model and a BPE model on the same text), unlike loss per token
The text is cut into windows of block_size + 1 tokens that overlap by one, so every token but the first is
predicted exactly once, with at most block_size - 1 tokens of context (less at the start of each window).

On a task file (--task, JSON Lines of {"prompt", "completion"}): each prompt is completed greedily (the most
likely token each step, no sampling) until the end-of-text token or max_new_tokens (by default the longest
reference completion in tokens, plus one). Then:
    labels  (classification, e.g. sentiment): the prediction is the first line of the output, stripped and
            lower-cased (metrics.normalize_label), as is the reference; exact-match accuracy and macro F1
            over the reference labels.
    text    (free text): corpus BLEU on whitespace tokens (no smoothing, and add-one smoothing for n > 1),
            plus exact-match accuracy of the stripped output.
    auto    labels when the references hold few distinct values (at most 50, and at most half as many as
            there are examples), text otherwise.
It also reports task_loss: the cross-entropy of the reference completions given the prompts (teacher forcing,
the same masked loss fine-tuning minimises).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import backend
from . import metrics
from ..tensor import no_grad

__all__ = ["load_for_eval", "lm_metrics", "task_loss", "greedy_complete", "task_metrics", "run_evaluation",
           "main"]


class EvalError(ValueError):
    """A user mistake: a missing run, an unreadable file; printed as one line by the command."""


# ----------------------------------------------------------------------------------------------- loading

def load_for_eval(path, dtype: str = "float32"):
    """(model in eval mode, tokenizer, source description) from a run directory or a GPT-2 directory."""
    from ..io.hf_gpt2 import has_gpt2_config, import_gpt2_dir
    from ..model import GPT
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise EvalError(f"no run directory at {path}")
    if has_gpt2_config(path):  # a GPT-2 config.json: import_gpt2_dir names whatever file is missing
        config, params, tokenizer = import_gpt2_dir(path)
        model = GPT(config, dtype=dtype)
        model.load_params(params, source=path)
        kind = "gpt2-dir"
    else:
        from ..io.checkpoint import load_model, load_tokenizer_of_run
        model = load_model(path, dtype=dtype)
        tokenizer = load_tokenizer_of_run(path)
        kind = "run"
    if tokenizer.vocab_size > model.config.vocab_size:
        raise EvalError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size} embedding rows")
    model.eval()
    return model, tokenizer, kind


def _logits(model, idx: np.ndarray):
    """(B, T) host ids -> (B, T, V) logits on the model's device (no tape recorded)."""
    with no_grad():
        logits, _ = model.forward(backend.to_device(np.ascontiguousarray(idx, dtype=np.int64)))
    return logits.data


def _summed_loss(model, x: np.ndarray, y: np.ndarray) -> float:
    """Sum (not mean) of the cross-entropy over the targets of y that are not -1."""
    n = int((y >= 0).sum())
    if n == 0:
        return 0.0
    with no_grad():
        _, loss = model.forward(backend.to_device(x), backend.to_device(y))
    return loss.item() * n


# ----------------------------------------------------------------------------------------------- LM metrics

def lm_metrics(model, tokenizer, text: str, batch_size: int = 8, max_tokens: Optional[int] = None) -> Dict:
    """loss, perplexity and bits per byte of `text` (see the module docstring for how it is windowed)."""
    ids = np.array(tokenizer.encode(text, allowed_special="none"), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EvalError(f"the text is {len(ids)} token(s) long; at least 2 are needed to predict anything")
    if ids.max() >= model.config.vocab_size:
        raise EvalError(f"token id {int(ids.max())} is outside the model's vocabulary ({model.config.vocab_size})")
    T = model.config.block_size
    starts = list(range(0, len(ids) - 1, T))
    full = [s for s in starts if s + T + 1 <= len(ids)]
    total, n_pred = 0.0, 0
    for i in range(0, len(full), batch_size):                      # full windows, batched
        win = np.stack([ids[s:s + T + 1] for s in full[i:i + batch_size]])   # (b, T+1)
        total += _summed_loss(model, win[:, :-1], win[:, 1:])
        n_pred += win[:, 1:].size
    if len(full) < len(starts):                                    # the shorter last window
        win = ids[starts[-1]:][None, :]                            # (1, L)
        total += _summed_loss(model, win[:, :-1], win[:, 1:])
        n_pred += win.shape[1] - 1
    n_bytes = len(tokenizer.decode_bytes(ids[1:].tolist()))       # the bytes of the predicted tokens
    loss = total / n_pred
    return {"loss": loss, "perplexity": metrics.perplexity(loss),
            "bits_per_byte": metrics.bits_per_byte(total, n_bytes), "tokens": int(n_pred), "bytes": n_bytes}


# ----------------------------------------------------------------------------------------------- task metrics

def task_loss(model, tokenizer, examples, batch_size: int = 16) -> Dict:
    """Mean cross-entropy of the completion tokens given their prompts (the fine-tuning objective)."""
    from ..data.task_data import load_task_data
    data = load_task_data(examples, tokenizer, model.config.block_size)
    total, n = 0.0, 0
    for i in range(0, len(data.x), batch_size):
        L = int(data.lengths[i:i + batch_size].max())
        x, y = data.x[i:i + batch_size, :L], data.y[i:i + batch_size, :L]
        total += _summed_loss(model, x, y)
        n += int((y >= 0).sum())
    return {"task_loss": total / n, "task_tokens": n}


def greedy_complete(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_id: Optional[int] = None,
                    batch_size: int = 16) -> List[List[int]]:
    """Complete every prompt greedily; returns the new ids of each (without the stop token).

    Prompts of equal length are batched together (no padding, so no attention mask is needed). Each step runs
    the model on the whole (cropped) context: simple and exact, at the cost of recomputing the prefix.
    """
    T = model.config.block_size
    out: List[Optional[List[int]]] = [None] * len(prompts)
    by_len: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise EvalError(f"prompt {i} is empty: greedy completion needs at least one token of context")
        by_len.setdefault(len(p), []).append(i)
    for length, members in sorted(by_len.items()):
        for j in range(0, len(members), batch_size):
            rows = members[j:j + batch_size]
            ctx = np.array([prompts[i] for i in rows], dtype=np.int64)    # (b, L)
            new = [[] for _ in rows]
            done = np.zeros(len(rows), dtype=bool)
            for _ in range(max_new_tokens):
                logits = _logits(model, ctx[:, -T:])                        # (b, L', V)
                nxt = backend.to_numpy(logits[:, -1, :].argmax(axis=-1)).astype(np.int64)   # (b,)
                for k, t in enumerate(nxt.tolist()):
                    if not done[k]:
                        if stop_id is not None and t == stop_id:
                            done[k] = True
                        else:
                            new[k].append(t)
                if done.all():
                    break
                ctx = np.concatenate([ctx, nxt[:, None]], axis=1)
            for k, i in enumerate(rows):
                out[i] = new[k]
    return out  # type: ignore[return-value]


def _choose_kind(references: List[str]) -> str:
    distinct = len(set(metrics.normalize_label(r) for r in references))
    return "labels" if distinct <= min(50, max(2, len(references) // 2)) else "text"


def task_metrics(model, tokenizer, examples, kind: str = "auto", max_new_tokens: Optional[int] = None,
                 batch_size: int = 16, n_show: int = 5) -> Dict:
    """Generation-based metrics on prompt/completion examples (see the module docstring)."""
    if kind not in ("auto", "labels", "text"):
        raise EvalError(f"--metric must be auto, labels or text, got {kind!r}")
    from ..data.task_data import _encode
    refs = [ex.completion for ex in examples]
    prompts = [_encode(tokenizer, ex.prompt, ex.where) for ex in examples]
    if max_new_tokens is None:
        max_new_tokens = max(len(_encode(tokenizer, r, ex.where)) for r, ex in zip(refs, examples)) + 1
    eot = getattr(tokenizer, "eot_id", None)
    t0 = time.perf_counter()
    outputs = greedy_complete(model, prompts, max_new_tokens, stop_id=eot, batch_size=batch_size)
    texts = [tokenizer.decode(o) for o in outputs]
    kind = _choose_kind(refs) if kind == "auto" else kind
    result: Dict = {"kind": kind, "examples": len(examples), "max_new_tokens": max_new_tokens,
                    "seconds": round(time.perf_counter() - t0, 3)}
    if kind == "labels":
        pred = [metrics.normalize_label(t) for t in texts]
        gold = [metrics.normalize_label(r) for r in refs]
        labels = sorted(set(gold))
        result.update(accuracy=metrics.accuracy(pred, gold), macro_f1=metrics.macro_f1(pred, gold, labels),
                      f1_per_label=metrics.f1_per_label(pred, gold, labels),
                      invalid_predictions=sum(p not in labels for p in pred))
    else:
        pred = [t.strip() for t in texts]
        gold = [r.strip() for r in refs]
        result.update(bleu=metrics.corpus_bleu(pred, gold), bleu_add1=metrics.corpus_bleu(pred, gold, smoothing="add1"),
                      exact_match=metrics.accuracy(pred, gold))
    result["samples"] = [{"prompt": ex.prompt, "reference": r, "output": t}
                         for ex, r, t in list(zip(examples, refs, texts))[:n_show]]
    result.update(task_loss(model, tokenizer, examples, batch_size))
    return result


# ----------------------------------------------------------------------------------------------- command

def run_evaluation(out_dir, file: Optional[str] = None, task: Optional[str] = None, metric: str = "auto",
                   max_new_tokens: Optional[int] = None, batch_size: int = 8, max_tokens: Optional[int] = None,
                   max_examples: Optional[int] = None, out: Optional[str] = None, device: str = "cpu",
                   log=print) -> Dict:
    """Evaluate and write the JSON results (default out_dir/eval.json). Returns the results dict."""
    from ..data.task_data import read_task_file
    if file is None and task is None:
        raise EvalError("nothing to evaluate: give --file=TEXT and/or --task=FILE.jsonl")
    # range checks before the model is loaded (a batch of 0 would loop on nothing, max_tokens 1 predicts nothing)
    for name, value, low in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 2),
                             ("max_examples", max_examples, 1), ("max_new_tokens", max_new_tokens, 1)):
        if value is not None and value < low:
            raise EvalError(f"--{name} must be >= {low}, got {value}")
    backend.use_device(device)
    model, tokenizer, kind = load_for_eval(out_dir)
    results: Dict = {"out_dir": os.fspath(out_dir), "source": kind, "config": model.config.to_dict()}
    step = _step_of(out_dir)
    if step is not None:
        results["step"] = step
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read {file}: {e}") from None
        try:
            r = lm_metrics(model, tokenizer, text, batch_size=batch_size, max_tokens=max_tokens)
        except EvalError:
            raise
        except ValueError as e:  # e.g. a character the model's tokenizer does not know: say which file
            raise EvalError(f"{file}: {e}") from None
        results["file"] = {"path": os.fspath(file), **r}
        log(f"{file}: loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | bits/byte "
            f"{r['bits_per_byte']:.4f} | {r['tokens']:,} tokens, {r['bytes']:,} bytes")
    if task is not None:
        examples = read_task_file(task, need_completion=True)[:max_examples]
        r = task_metrics(model, tokenizer, examples, metric, max_new_tokens, batch_size=max(batch_size, 16))
        results["task"] = {"path": os.fspath(task), **r}
        if r["kind"] == "labels":
            log(f"{task}: accuracy {r['accuracy']:.4f} | macro F1 {r['macro_f1']:.4f} | task loss "
                f"{r['task_loss']:.4f} | {r['examples']} examples ({r['invalid_predictions']} not a label)")
        else:
            log(f"{task}: BLEU {r['bleu']:.4f} (add-one {r['bleu_add1']:.4f}) | exact match "
                f"{r['exact_match']:.4f} | task loss {r['task_loss']:.4f} | {r['examples']} examples")
    out = out or os.path.join(os.fspath(out_dir), "eval.json")
    from ..io.files import atomic_write_json
    atomic_write_json(out, results)
    log(f"wrote {out}")
    return results


def _step_of(out_dir) -> Optional[int]:
    """The step of the run's checkpoint (None for a GPT-2 folder)."""
    from ..io.checkpoint import read_state
    try:
        return int(read_state(out_dir).get("step"))
    except (ValueError, TypeError):          # CheckpointError is a ValueError
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanogpt_np.eval.evaluate",
                                 description="Evaluate a run: LM metrics on a text file, task metrics on a JSONL file.")
    ap.add_argument("--out_dir", required=True, help="run directory (or a Hugging Face GPT-2 directory)")
    ap.add_argument("--file", help="held-out plain text: loss, perplexity, bits per byte")
    ap.add_argument("--task", help="JSONL of prompt/completion pairs: generation-based metrics")
    ap.add_argument("--metric", default="auto", choices=["auto", "labels", "text"])
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of --file")
    ap.add_argument("--max_examples", type=int, default=None, help="score only the first N task examples")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--out", default=None, help="where to write the JSON (default OUT_DIR/eval.json)")
    args = ap.parse_args(argv)
    try:
        run_evaluation(args.out_dir, args.file, args.task, args.metric, args.max_new_tokens, args.batch_size,
                       args.max_tokens, args.max_examples, args.out, args.device)
    except (ValueError, backend.BackendError) as e:     # EvalError, CheckpointError, TaskDataError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
