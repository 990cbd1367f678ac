"""Throughput of the data pipeline (ingest -> clean -> dedup -> split -> tokenize -> shards), in MB/s.

    python benchmarks/data.py                      # tiny Shakespeare from ../shared/data/ (skips if absent)
    python benchmarks/data.py --input my.txt --copies 2 --processes 1,4

The corpus is a few MB: the text's paragraphs (one document each) in `--copies` variants, copy k with
the words of every line rotated by k places, so the copies are different documents (a line of one or
two words stays the same, so some exact and near duplicates remain, as in real data). It is written as
plain text and as JSON Lines + gzip. Each configuration runs the whole pipeline once per process
count; MB/s is input bytes (uncompressed text) over wall time, tokenizer training included in `total`
and listed apart. CPU seconds of the main process and of the worker processes are listed too: on a busy
machine they say more than wall time (with N idle cores the wall time can approach
max(main CPU, workers CPU / N)). Prints a markdown table for benchmarks/RESULTS.md.
"""
import argparse
import gzip
import json
import os
import platform
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from nanogpt_np.data.loader import BatchLoader  # noqa: E402
from nanogpt_np.data.prepare import PrepareConfig, find_gpt2_dir, prepare  # noqa: E402
from nanogpt_np.data.shards import read_tokens  # noqa: E402

DEFAULT_INPUT = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")


def rotate_words(line: str, k: int) -> str:
    words = line.split(" ")
    k %= max(len(words), 1)
    return " ".join(words[k:] + words[:k])


def make_corpus(text: str, copies: int, tmp: str):
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    docs = ["\n".join(rotate_words(line, k) for line in p.split("\n")) for k in range(copies) for p in paragraphs]
    txt = os.path.join(tmp, "corpus.txt")
    with open(txt, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    jsonl = os.path.join(tmp, "corpus.jsonl.gz")
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return txt, jsonl, len(docs)


def cpu_seconds():
    """(CPU seconds of this process, of its finished child processes): user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def run(label, inputs, out, processes, text_bytes, **kw):
    cfg = PrepareConfig(inputs=[inputs], out_dir=out, processes=processes, progress=False, **kw)
    c0, t0 = cpu_seconds(), time.perf_counter()
    m = prepare(cfg)
    wall, c1 = time.perf_counter() - t0, cpu_seconds()
    main_cpu, worker_cpu = c1[0] - c0[0], c1[1] - c0[1]
    t = m["report"]["timing"]
    tokens = m["train"]["tokens"] + m["val"]["tokens"]
    return (f"| {label} | {processes} | {text_bytes / 1e6:.2f} | {t['clean_s']:.2f} | {t['tokenizer_s']:.2f} | "
            f"{t['tokenize_s']:.2f} | {wall:.2f} | **{text_bytes / 1e6 / wall:.2f}** | "
            f"{(text_bytes / 1e6) / max(wall - t['tokenizer_s'], 1e-9):.2f} | {main_cpu:.2f} | {worker_cpu:.2f} | {tokens:,} |")


def loader_rate(path: str) -> str:
    tokens = read_tokens(path)
    loader = BatchLoader(tokens, batch_size=64, block_size=256, seed=0)
    loader.next_batch()
    n, t0 = 200, time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    dt = time.perf_counter() - t0
    return (f"BatchLoader.next_batch (B=64, T=256) from a memory-mapped shard: {dt / n * 1e3:.3f} ms/batch "
            f"({n * 64 * 256 / dt / 1e6:.1f} M tokens/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=DEFAULT_INPUT)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--processes", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--vocab_size", type=int, default=1024)
    args = ap.parse_args()
    if not os.path.isfile(args.input):
        print(f"skipped: {args.input} not found (pass --input PATH to a text file)")
        return 0
    with open(args.input, encoding="utf-8") as f:
        text = f.read()
    process_counts = sorted({int(p) for p in args.processes.split(",")})
    try:
        gpt2_dir = find_gpt2_dir()
    except FileNotFoundError:
        gpt2_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        txt, jsonl, n_docs = make_corpus(text, args.copies, tmp)
        size = os.path.getsize(txt)
        print(f"corpus: {args.input} x{args.copies} variants = {n_docs} documents, {size / 1e6:.2f} MB "
              f"(jsonl.gz {os.path.getsize(jsonl) / 1e6:.2f} MB); {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}\n")
        print("| configuration | processes | MB in | clean+dedup s | tokenizer s | tokenize s | total s | MB/s | "
              "MB/s w/o tokenizer training | main CPU s | workers CPU s | tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        configs = [
            ("text, char, no dedup", txt, dict(text_split="paragraph", tokenizer="char",
                                                dedup_exact=False, dedup_near=False)),
            ("text, char, exact+near dedup", txt, dict(text_split="paragraph", tokenizer="char")),
            ("jsonl.gz, char, exact+near dedup", jsonl, dict(tokenizer="char")),
            (f"text, BPE {args.vocab_size} (trained), exact+near dedup", txt,
             dict(text_split="paragraph", tokenizer="bpe", vocab_size=args.vocab_size)),
        ]
        if gpt2_dir:
            configs.append(("text, GPT-2 BPE, exact+near dedup", txt,
                            dict(text_split="paragraph", tokenizer="gpt2", gpt2_dir=gpt2_dir)))
        last_out = None
        for i, (label, path, kw) in enumerate(configs):
            for p in process_counts:
                last_out = os.path.join(tmp, f"out{i}_{p}")
                print(run(label, path, last_out, p, size, **kw), flush=True)
        print()
        print(loader_rate(os.path.join(last_out, "train.bin")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
