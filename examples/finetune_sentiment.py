"""Worked example: fine-tune a small pre-trained run on a labelled task, with metrics before and after.

Everything is made offline, on the CPU, in a few minutes:

  1. pre-train a small character-level model on the embedded corpus (Python's own documentation):
         python train.py --preset=quick --out_dir=OUT/pretrained
  2. make a labelled sentiment task from word lists (synthetic film/book reviews, label positive/negative;
     in a quarter of them the two adjectives disagree and the one after "but" decides the label), written as
     JSON Lines {"prompt": "the film was dull and bland.\\nSentiment:", "completion": " negative\\n"};
     every example fits in the model's context (block_size 64), so no example is truncated
  3. evaluate the pre-trained run on the task and on held-out corpus text:
         python -m nanogpt_np.eval.evaluate --out_dir=OUT/pretrained --task=OUT/test.jsonl --file=OUT/heldout.txt
  4. fine-tune it on the task's training examples (loss on the completion tokens only):
         python train.py --init_from=OUT/pretrained --dataset=OUT/train.jsonl --preset=finetune ...
  5. evaluate the fine-tuned run the same way, and print both side by side.

    python examples/finetune_sentiment.py                 # everything, into out-sentiment/
    python examples/finetune_sentiment.py --out=/tmp/s --pretrain_iters=400

If this checkout's train.py cannot read .jsonl task files yet, step 4 runs the same fine-tuning loop here
(TaskLoader + AdamW + the warmup/cosine schedule + early stopping) and saves a normal run directory.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

POSITIVE = ["great", "wonderful", "delightful", "charming", "brilliant", "moving", "funny", "beautiful",
            "clever", "enjoyable", "superb", "gripping"]
NEGATIVE = ["boring", "dull", "awful", "clumsy", "tedious", "predictable", "bland", "confusing", "painful",
            "weak", "messy", "lifeless"]
THINGS = ["film", "movie", "book", "story", "show", "play", "album", "novel"]
TEMPLATES = ["the {thing} was {a} and {b}.", "a {a}, {b} {thing}.", "what a {a} {thing}, so {b}."]


def make_reviews(n, seed):
    """n (review, label) pairs. Labels are balanced; 1 in 4 reviews is mixed ("X but Y": Y decides)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        positive = bool(rng.integers(2))
        same, other = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
        thing = str(rng.choice(THINGS))
        if rng.random() < 0.25:
            text = f"the {thing} was {rng.choice(other)} but {rng.choice(same)}."
        else:
            a, b = rng.choice(same, size=2, replace=False)
            text = str(rng.choice(TEMPLATES)).format(thing=thing, a=a, b=b)
        out.append((text, "positive" if positive else "negative"))
    return out


def write_task(path, reviews):
    with open(path, "w", encoding="utf-8") as f:
        for text, label in reviews:
            f.write(json.dumps({"prompt": f"{text}\nSentiment:", "completion": f" {label}\n"}) + "\n")


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def trainer_reads_tasks() -> bool:
    import inspect
    from nanogpt_np import trainer
    return "task_data" in inspect.getsource(trainer)


def finetune_here(init_dir, train_path, out_dir, iters, lr, batch_size, seed=1337):
    """The fine-tuning loop, for a trainer that cannot read task files yet (same steps as train.py)."""
    from nanogpt_np.io.checkpoint import load_model, load_tokenizer_of_run, save_checkpoint
    from nanogpt_np.optim import AdamW, clip_grad_norm, lr_at
    from nanogpt_np.data.task_data import task_loaders, task_val_loss
    from nanogpt_np.tensor import backward
    model, tok = load_model(init_dir), load_tokenizer_of_run(init_dir)
    loader, val_loader = task_loaders(train_path, tok, model.config.block_size, batch_size, 0.1, seed)
    opt = AdamW(model, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    best, bad, patience, eval_every = math.inf, 0, 3, 50
    for step in range(1, iters + 1):
        model.zero_grad()
        x, y = loader.next_batch()
        _, loss = model.forward(x, y)
        backward(loss)
        model.finish_gradients()
        clip_grad_norm(model.flat_grads, 1.0)
        opt.step(lr_at(step - 1, lr=lr, min_lr=lr / 10, warmup_iters=20, decay_iters=iters))
        if step % eval_every == 0 or step == iters:
            val = task_val_loss(model, val_loader)
            print(f"step {step:5d} | loss {loss.item():.4f} | val loss {val:.4f}", flush=True)
            if val < best:
                best, bad = val, 0
                save_checkpoint(out_dir, model, opt, {"init_from": init_dir, "dataset": train_path},
                                {"step": step, "best_val_loss": val}, tok)
            else:
                bad += 1
                if bad >= patience:
                    print("early stopping")
                    break


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out-sentiment")
    ap.add_argument("--pretrain_iters", type=int, default=300)
    ap.add_argument("--finetune_iters", type=int, default=300)
    ap.add_argument("--finetune_lr", type=float, default=1e-3)
    ap.add_argument("--n_train", type=int, default=600)
    ap.add_argument("--n_test", type=int, default=200)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    pre, ft = os.path.join(out, "pretrained"), os.path.join(out, "finetuned")
    train_path, test_path = os.path.join(out, "train.jsonl"), os.path.join(out, "test.jsonl")
    heldout = os.path.join(out, "heldout.txt")

    # 1. pre-train (skipped when the run exists)
    from nanogpt_np.io.run_dir import latest_checkpoint
    if latest_checkpoint(pre) is None:
        run([sys.executable, "train.py", "--preset=quick", f"--max_iters={args.pretrain_iters}", "--device=cpu",
             f"--out_dir={pre}"])
    # 2. the task, and held-out corpus text (the corpus' last 5%, which the quick preset holds out)
    write_task(train_path, make_reviews(args.n_train, seed=1))
    write_task(test_path, make_reviews(args.n_test, seed=2))
    from nanogpt_np.data.corpus import default_corpus_text
    text = default_corpus_text()
    with open(heldout, "w", encoding="utf-8") as f:
        f.write(text[len(text) - len(text) // 20:])

    from nanogpt_np.io.checkpoint import load_tokenizer_of_run, read_model_config
    from nanogpt_np.data.task_data import load_task_data
    block = read_model_config(pre).block_size
    for path in (train_path, test_path):       # a cut example would be learned at other positions than asked
        data = load_task_data(path, load_tokenizer_of_run(pre), block)
        print(f"{path}: {len(data.x)} examples, longest {int(data.lengths.max())} of {block} positions, "
              f"{data.n_truncated} truncated")

    evaluate = [sys.executable, "-m", "nanogpt_np.eval.evaluate", f"--task={test_path}", f"--file={heldout}",
                "--max_tokens=20000"]
    # 3. before
    run(evaluate + [f"--out_dir={pre}", f"--out={os.path.join(out, 'eval_before.json')}"])
    # 4. fine-tune
    if trainer_reads_tasks():
        run([sys.executable, "train.py", f"--init_from={pre}", f"--dataset={train_path}", "--preset=finetune",
             f"--learning_rate={args.finetune_lr}", f"--min_lr={args.finetune_lr / 10}",
             f"--max_iters={args.finetune_iters}", "--batch_size=16", "--device=cpu", f"--out_dir={ft}",
             "--overwrite"])                                       # a rerun replaces the earlier fine-tuning
    else:
        print("(train.py cannot read task files in this checkout: fine-tuning with the same loop here)")
        finetune_here(pre, train_path, ft, args.finetune_iters, args.finetune_lr, batch_size=16)
    # 5. after
    run(evaluate + [f"--out_dir={ft}", f"--out={os.path.join(out, 'eval_after.json')}"])

    before = json.load(open(os.path.join(out, "eval_before.json")))
    after = json.load(open(os.path.join(out, "eval_after.json")))
    print(f"\n{'':28s}{'before':>10s}{'after':>10s}")
    for name, key in (("task accuracy", ("task", "accuracy")), ("task macro F1", ("task", "macro_f1")),
                      ("task loss (completion)", ("task", "task_loss")),
                      ("held-out loss", ("file", "loss")), ("held-out bits/byte", ("file", "bits_per_byte"))):
        print(f"{name:28s}{before[key[0]][key[1]]:10.4f}{after[key[0]][key[1]]:10.4f}")
    print("\nexamples after fine-tuning:")
    for s in after["task"]["samples"][:3]:
        print(f"  {s['prompt']!r} -> {s['output']!r} (reference {s['reference']!r})")


if __name__ == "__main__":
    main()
