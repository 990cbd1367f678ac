"""Benchmark of the BPE tokenizer: encoding speed (one process, every core) and training time.

    python benchmarks/tokenizer.py                       # ~5 MB: tiny Shakespeare, repeated
    python benchmarks/tokenizer.py --corpus stdlib       # ~5 MB of Python's standard library sources
    python benchmarks/tokenizer.py --corpus zipf         # ~5 MB with ~130k distinct words (stress case)
    python benchmarks/tokenizer.py --corpus PATH --mb 0  # a file of your own, whole

Measures, on the same text:
  * encoding with GPT-2's vocabulary (../shared/data/gpt2, if present) and with the 8192-token one
    trained here: the first call (cold chunk cache) and the best of --repeats (warm cache), on one
    process, and with encode_files_parallel on every core (fresh tokenizer, so cold caches);
  * training to --vocab-size tokens (best of --train-repeats), on one process and with the chunk
    counting on every core;
  * the same with tiktoken and Hugging Face tokenizers when they are installed (optional; skipped
    cleanly otherwise). HF training runs in a subprocess with RAYON_NUM_THREADS=1 (one thread).
MB are 10**6 bytes of UTF-8 text. Timings on a shared machine are noisy: repeat the run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanogpt_np.tokenizers.bpe import BPETokenizer, encode_files_parallel  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"


def load_corpus(name: str, mb: float) -> str:
    if name == "shakespeare":
        base = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    elif name == "stdlib":  # diverse text (many distinct words) that every Python install has
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
        parts, size = [], 0
        for f in files:
            if "test" in f.parts:
                continue
            try:
                parts.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
            size += len(parts[-1])
            if mb and size > mb * 1e6 * 1.1:
                break
        base = "\n".join(parts)
    elif name == "zipf":  # stress case: ~130k distinct words (random letter strings, Zipf-distributed)
        import numpy as np
        rng = np.random.default_rng(0)
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        p = 1 / np.arange(1, 27)
        words = ["".join(rng.choice(letters, size=rng.integers(2, 12), p=p / p.sum())) for _ in range(300_000)]
        base = " ".join(words[i] for i in rng.zipf(1.1, size=1_000_000) % len(words))
    else:
        base = Path(name).read_text(encoding="utf-8")
    if not mb:
        return base
    target = int(mb * 1e6)
    text = base
    while len(text.encode("utf-8")) < target:
        text += "\n" + base
    return text.encode("utf-8")[:target].decode("utf-8", errors="ignore")


def best_of(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, result


def bench_ours(name, make_tokenizer, text, mb, repeats, processes):
    rows = {}
    tok = make_tokenizer()
    start = time.perf_counter()
    ids = tok.encode_ordinary(text)
    cold = time.perf_counter() - start
    warm, _, _ = best_of(lambda: tok.encode_ordinary(text), repeats)
    rows["1 process, cold cache"] = mb / cold
    rows["1 process, warm cache"] = mb / warm

    # a fresh tokenizer each time (cold caches in every worker); building it is not timed
    par_times = []
    for _ in range(repeats):
        fresh = make_tokenizer()
        start = time.perf_counter()
        out = encode_files_parallel(fresh, [text], processes=processes, allowed_special="none")
        par_times.append(time.perf_counter() - start)
    assert out[0].tolist() == ids, "parallel encoding differs from serial"
    rows[f"{processes} processes, cold caches"] = mb / min(par_times)
    for label, value in rows.items():
        print(f"  {name:<12} encode {label:<26} {value:6.1f} MB/s")
    return rows, ids


def bench_tiktoken(text, mb, repeats, processes, expected_ids):
    try:
        import tiktoken
    except ImportError:
        print("  tiktoken not installed: skipped")
        return {}
    from nanogpt_np.tokenizers.bpe import token_str_to_bytes
    encoder = json.loads((GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    ranks = {token_str_to_bytes(t): i for t, i in encoder.items() if t != "<|endoftext|>"}
    enc = tiktoken.Encoding("gpt2-local", pat_str=BPETokenizer.GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    one, _, ids = best_of(lambda: enc.encode_ordinary(text), repeats)
    assert ids == expected_ids, "tiktoken's ids differ from ours"
    pieces = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    many, _, _ = best_of(lambda: enc.encode_ordinary_batch(pieces, num_threads=processes), repeats)
    rows = {"1 thread": mb / one, f"{processes} threads (batch of 100k-char pieces)": mb / many}
    for label, value in rows.items():
        print(f"  {'tiktoken':<12} encode {label:<26} {value:6.1f} MB/s")
    return rows


HF_SCRIPT = r"""
import json, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
text = open(sys.argv[1], encoding="utf-8", newline="").read()
vocab_size, gpt2_dir = int(sys.argv[2]), sys.argv[3]
result = {}
def new_bpe(model):
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
times = []
for _ in range(int(sys.argv[4])):
    tok = new_bpe(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    tok.train_from_iterator([text], trainer=trainer)
    times.append(time.perf_counter() - start)
result["train_s"] = min(times)
if gpt2_dir:
    tok = new_bpe(models.BPE.from_file(gpt2_dir + "/encoder.json", gpt2_dir + "/vocab.bpe"))
    times = []
    for _ in range(3):
        start = time.perf_counter(); ids = tok.encode(text).ids; times.append(time.perf_counter() - start)
    result["encode_s"] = min(times)
print(json.dumps(result))
"""


def bench_hf(text, vocab_size, train_repeats, mb):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("  HF tokenizers not installed: skipped")
        return {}
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", newline="", delete=False) as f:
        f.write(text)
    try:
        env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        gpt2 = str(GPT2_DIR) if (GPT2_DIR / "encoder.json").is_file() else ""
        out = subprocess.run([sys.executable, "-c", HF_SCRIPT, f.name, str(vocab_size), gpt2, str(train_repeats)],
                             env=env, capture_output=True, text=True)
    finally:
        os.remove(f.name)
    if out.returncode != 0:
        print("  HF tokenizers failed:", out.stderr.strip().splitlines()[-1:])
        return {}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {'HF':<12} train to {vocab_size} tokens, 1 thread      {result['train_s']:6.2f} s")
    if "encode_s" in result:
        print(f"  {'HF':<12} encode 1 thread (GPT-2 vocab)      {mb / result['encode_s']:6.1f} MB/s")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="shakespeare", help="shakespeare | stdlib | zipf | PATH")
    parser.add_argument("--mb", type=float, default=5.0, help="repeat/cut the corpus to this many MB (0: as is)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()

    text = load_corpus(args.corpus, args.mb)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"corpus {args.corpus}: {mb:.2f} MB, {len(text)} characters; {platform.machine()} "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")

    train_s, train_times, trained = best_of(lambda: BPETokenizer.train(text, args.vocab_size), args.train_repeats)
    print(f"  {'ours':<12} train to {args.vocab_size} tokens, 1 process     {train_s:6.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in train_times)}; vocab {trained.vocab_size})")
    par_s, par_times, par = best_of(lambda: BPETokenizer.train(text, args.vocab_size, processes=args.processes),
                                    args.train_repeats)
    assert par.merges == trained.merges
    print(f"  {'ours':<12} train, counting on {args.processes} processes      {par_s:6.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in par_times)})")
    hf = bench_hf(text, args.vocab_size, args.train_repeats, mb)
    if hf:
        print(f"  ours / HF training time: {train_s / hf['train_s']:.1f}x")

    description = trained.to_dict()
    bench_ours(f"ours {args.vocab_size // 1024}k", lambda: BPETokenizer.from_dict(description), text, mb,
               args.repeats, args.processes)
    if (GPT2_DIR / "encoder.json").is_file():
        gpt2 = BPETokenizer.from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
        gpt2_description = gpt2.to_dict()
        _, ids = bench_ours("ours GPT-2", lambda: BPETokenizer.from_dict(gpt2_description), text, mb,
                            args.repeats, args.processes)
        bench_tiktoken(text, mb, args.repeats, args.processes, ids)
    else:
        print("  GPT-2 files not found: GPT-2 encoding skipped")


if __name__ == "__main__":
    main()
