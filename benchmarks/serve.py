"""Serving throughput and latency: continuous batching against one request at a time.

    python benchmarks/serve.py [--out_dir=RUN] [--device=cpu] [--max_tokens=32] [--levels=1,8,32]

Starts `python -m nanogpt_np.serve` twice on a free loopback port: once with --max_batch=32 (batched) and once
with --max_batch=1 (one at a time, the others wait in the queue). For each number of concurrent clients, every
client thread sends completions one after another (non-streaming, http.client, a fresh seed each) until
the level's request count is done; each level runs --repeats times. Reported: the median requests/s and
completion tokens/s over the runs, and p50/p99 latency per request over all of them (from sending the request
to the last byte of the answer).

Without --out_dir the model is the "small-cpu" preset (4 layers, 4 heads, 128 wide, context 256) with random
weights and the embedded corpus's character tokenizer: speed does not depend on what the weights learned.
Every request asks for exactly --max_tokens tokens (a character tokenizer has no end-of-text token).
"""
import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_run(out_dir):
    from nanogpt_np.tokenizers.char import CharTokenizer
    from nanogpt_np.io.checkpoint import save_checkpoint
    from nanogpt_np.data.corpus import default_corpus_text
    from nanogpt_np.model import MODEL_PRESETS, GPT, GPTConfig
    tokenizer = CharTokenizer.from_text(default_corpus_text())
    config = GPTConfig(block_size=256, vocab_size=tokenizer.vocab_size, **MODEL_PRESETS["small-cpu"])
    save_checkpoint(out_dir, GPT(config, seed=0), None, {}, {"step": 0}, tokenizer)


class Server:
    def __init__(self, out_dir, log_path, *extra):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanogpt_np.serve", f"--out_dir={out_dir}", "--port=0",
                                      *extra], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 120
        while "on http://" not in Path(log_path).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + Path(log_path).read_text())
            time.sleep(0.05)
        self.port = int(Path(log_path).read_text().split("on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def complete(self, body, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {out}")
            return out
        finally:
            conn.close()

    def health(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load_level(server, clients, requests, max_tokens, prompt):
    """`clients` threads share `requests` completions; returns (wall seconds, latencies, completion tokens)."""
    latencies, tokens, lock = [], [0], threading.Lock()
    counter = iter(range(requests))
    barrier = threading.Barrier(clients)

    def client():
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            out = server.complete({"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": i})
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens[0] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, tokens[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="", help="a run to serve (default: small-cpu preset, random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--levels", default="1,8,32", help="numbers of concurrent clients")
    p.add_argument("--requests_per_client", type=int, default=2, help="requests per client (at least 16 in all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per level (the median rate is reported)")
    p.add_argument("--modes", default="batched,one-at-a-time")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    tmp = tempfile.TemporaryDirectory()
    out_dir = args.out_dir
    if not out_dir:
        out_dir = os.path.join(tmp.name, "small-cpu")
        make_run(out_dir)
    from nanogpt_np.io.checkpoint import read_model_config
    config = read_model_config(out_dir).to_dict()
    prompt = "def main(argv):\n    "                        # 21 characters
    print(f"# model {config['n_layer']} layers x {config['n_embd']} wide, context {config['block_size']}, "
          f"device {args.device}; {platform.machine()} with {os.cpu_count()} CPUs, numpy {np.__version__}; "
          f"prompt {len(prompt)} chars, max_tokens {args.max_tokens}")
    print("| mode | clients | runs x requests | requests/s (median) | tokens/s (median) | p50 latency (s) | "
          "p99 latency (s) | largest batch so far |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    modes = {"batched": ["--max_batch=32"], "one-at-a-time": ["--max_batch=1"]}
    for mode in args.modes.split(","):
        server = Server(out_dir, os.path.join(tmp.name, f"{mode}.log"), f"--device={args.device}",
                        "--max_connections=64", "--request_timeout=600", *modes[mode])
        try:
            server.complete({"prompt": prompt, "max_tokens": 4})          # warm up
            for clients in levels:
                requests = max(16, clients * args.requests_per_client)
                rates, token_rates, latencies = [], [], []
                for _ in range(args.repeats):       # a shared machine is noisy: the median of a few runs
                    wall, lat, tokens = load_level(server, clients, requests, args.max_tokens, prompt)
                    rates.append(requests / wall)
                    token_rates.append(tokens / wall)
                    latencies += lat
                largest = server.health()["max_batch_seen"]
                print(f"| {mode} | {clients} | {args.repeats} x {requests} | {np.median(rates):.1f} | "
                      f"{np.median(token_rates):.0f} | {np.percentile(latencies, 50):.3f} | "
                      f"{np.percentile(latencies, 99):.3f} | {largest} |", flush=True)
        finally:
            server.stop()
    tmp.cleanup()


if __name__ == "__main__":
    main()
