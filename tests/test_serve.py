"""The HTTP generation server, end to end: real servers (subprocesses) on free loopback ports, real HTTP clients.

Two servers are started once for the module:
  "trained": a tiny model trained for 30 steps (float32, as sample.py runs it): completions must equal
             sample.py's with the same seed, streaming must equal non-streaming, bad requests get 4xx.
  "long":    random weights with a 1024-token context (float64): long generations to batch 32 clients
             together (float64, so batched and alone agree to the last token, see batching.py) and to
             disconnect from in the middle of a stream.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanogpt_np.io.checkpoint import load_model, load_tokenizer_of_run, save_checkpoint
from nanogpt_np.tokenizers.char import CharTokenizer
from nanogpt_np.config import parse_args
from nanogpt_np.generate import generate_text
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.serve.requests import APIError, Limits, parse_completion_request
from nanogpt_np.serve.streaming import TextAssembler
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# ----- servers -----
class Server:
    def __init__(self, out_dir, log_path, *extra):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanogpt_np.serve", f"--out_dir={out_dir}", "--port=0",
                                      "--device=cpu", *extra], cwd=REPO, env=ENV, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:                                   # the server prints its address once it listens
            text = Path(log_path).read_text()
            if "on http://" in text:
                self.port = int(text.split("on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{text}")
            time.sleep(0.05)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """(status, parsed JSON or text) over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, (json.loads(raw) if "json" in ctype else raw.decode())
        finally:
            conn.close()

    def complete(self, **body):
        status, out = self.request("POST", "/v1/completions", body)
        assert status == 200, out
        return out

    def stream(self, **body):
        """The parsed events of a streamed completion (the last one is the string "[DONE]")."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
            events = []
            for block in resp.read().decode().split("\n\n"):
                if block.strip():
                    assert block.startswith("data: ")
                    data = block[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))
            return events
        finally:
            conn.close()

    def health(self):
        status, out = self.request("GET", "/health")
        assert status == 200
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    cfg = parse_args(["--model=tiny", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--device=cpu",
                      "--max_iters=30", "--lr_decay_iters=30", "--warmup_iters=3", "--eval_interval=30",
                      "--log_interval=10", "--learning_rate=3e-3", f"--out_dir={out}"])
    train(cfg, echo=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, trained_run):
    """Random weights, a 1024-token context, the trained run's tokenizer (so prompts are text)."""
    out = tmp_path_factory.mktemp("serve") / "long"
    tokenizer = load_tokenizer_of_run(trained_run)
    config = GPTConfig(block_size=1024, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32)
    save_checkpoint(out, GPT(config, seed=3), None, {}, {"step": 0}, tokenizer)
    return out


@pytest.fixture(scope="module")
def server(trained_run):
    s = Server(trained_run, trained_run.parent / "server.log", "--max_batch=4", "--max_connections=12",
               "--max_body_bytes=4096", "--max_n=4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def long_server(long_run):
    s = Server(long_run, long_run.parent / "long_server.log", "--dtype=float64", "--max_batch=8",
               "--max_connections=40", "--idle_timeout=5")
    yield s
    s.stop()


# ----- exactness -----
def test_completion_equals_sample_py(server, trained_run):
    """Choice i with seed S is sample.py's i-th sample with --seed=S (which samples with seed S + i)."""
    settings = dict(temperature=0.9, top_k=20, top_p=0.95, seed=123)
    out = server.complete(prompt="def ", max_tokens=25, n=2, **settings)
    cli = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={trained_run}", "--prompt=def ",
                          "--max_new_tokens=25", "--num_samples=2", "--device=cpu",
                          *[f"--{k}={v}" for k, v in settings.items()]],
                         capture_output=True, text=True, env=ENV, timeout=60, check=True)
    samples = cli.stdout.split("\n---------------\n")[:2]
    assert ["def " + c["text"] for c in out["choices"]] == samples          # sample.py prints the prompt first
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in out["choices"])
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 50, "total_tokens": 54}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == trained_run.name


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=5),
                                      dict(temperature=0.7, top_k=5, seed=6), dict(temperature=1.5, top_p=0.5,
                                                                                   seed=7)])
def test_completion_equals_generate_text(server, trained_run, settings):
    model, tokenizer = load_model(trained_run), load_tokenizer_of_run(trained_run)
    for prompt in ("", "class Foo:", "x" * 31):
        want = generate_text(model, tokenizer, prompt, 33 - max(1, len(prompt)), **settings)
        got = server.complete(prompt=prompt, max_tokens=32, **settings)["choices"][0]
        assert got["text"] == want and got["finish_reason"] == "length"    # stops when the context is full


def test_token_prompts_and_echo(server, trained_run):
    tokenizer = load_tokenizer_of_run(trained_run)
    ids = tokenizer.encode("import ")
    by_text = server.complete(prompt="import ", max_tokens=8, seed=1)
    by_ids = server.complete(prompt=[ids, ids], max_tokens=8, seed=1, echo=True)
    assert [c["text"] for c in by_ids["choices"]] == ["import " + by_text["choices"][0]["text"]] * 2
    assert by_ids["usage"]["prompt_tokens"] == 2 * len(ids)


def test_streaming_equals_non_streaming(server):
    body = dict(prompt="def f(x):", max_tokens=20, n=3, seed=42, temperature=1.0)
    whole = server.complete(**body)
    events = server.stream(**body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    texts, reasons = ["", "", ""], [None, None, None]
    for e in events[:-2]:
        assert e["object"] == "text_completion" and e["id"] == events[0]["id"]
        (c,) = e["choices"]
        assert reasons[c["index"]] is None          # nothing after a choice's finish_reason
        texts[c["index"]] += c["text"]
        reasons[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert reasons == [c["finish_reason"] for c in whole["choices"]]
    assert sum(1 for e in events[:-2] if e["choices"][0]["text"]) > 3        # it did come in pieces


def test_stop_strings(server):
    base = server.complete(prompt="def ", max_tokens=30, seed=9, temperature=1.0)["choices"][0]["text"]
    stop = base[10:12]                                            # two characters = two tokens
    want = base[:base.index(stop)]
    for stream in (False, True):
        body = dict(prompt="def ", max_tokens=30, seed=9, temperature=1.0, stop=[stop, "\x00never"])
        if stream:
            events = server.stream(**body)
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            reason = events[-2]["choices"][0]["finish_reason"]
        else:
            out = server.complete(**body)
            text, reason = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
            assert out["usage"]["completion_tokens"] == len(want) + len(stop)     # char tokens up to the stop
        assert (text, reason) == (want, "stop")


# ----- bad requests -----
BAD = [  # (body, status, param or None)
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b'{"prompt": "a", "max_tokens": NaN}', 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "a", "bogus": 1}, 400, "bogus"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["a", 1]}, 400, "prompt"),
    ({"prompt": [1, 100000]}, 400, "prompt"),
    ({"prompt": "x" * 33}, 400, "prompt"),                     # longer than the context
    ({"prompt": "\U0001F600"}, 400, "prompt"),                 # not in the character vocabulary
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 33}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "top_k": -1}, 400, "top_k"),
    ({"prompt": "a", "top_k": 2.5}, 400, "top_k"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "n": 5}, 400, "n"),
    ({"prompt": ["a"] * 5, "n": 4}, 400, "n"),
    ({"prompt": "a", "seed": -1}, 400, "seed"),
    ({"prompt": "a", "seed": "1"}, 400, "seed"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "stop": 3}, 400, "stop"),
    ({"prompt": "a", "echo": 1}, 400, "echo"),
    ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "a", "model": 3}, 400, "model"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "a" * 5000}, 413, None),                        # the server was started with 4096 bytes
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, param):
    got, out = server.request("POST", "/v1/completions", body)
    assert got == status, out
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"]
    assert out["error"]["param"] == param
    assert server.complete(prompt="a", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_bad_http(server):
    assert server.request("GET", "/nowhere")[0] == 404
    assert server.request("GET", "/v1/completions")[0] == 405
    assert server.request("DELETE", "/v1/models")[0] == 405
    # no Content-Length: 411 (sent by hand: http.client adds one)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    # a 400 on a keep-alive connection leaves the connection usable
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for body, status in ((b"{oops", 400), (json.dumps({"prompt": "a", "max_tokens": 1}).encode(), 200),
                         (b'{"prompt": 1}', 400), (json.dumps({"prompt": "b", "max_tokens": 1}).encode(), 200)):
        conn.request("POST", "/v1/completions", body=body)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status
    conn.close()
    assert server.health()["status"] == "ok"


def test_models_health_and_page(server, trained_run):
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == trained_run.name
    assert server.request("GET", f"/v1/models/{trained_run.name}")[1]["object"] == "model"
    assert server.request("GET", "/v1/models/other")[0] == 404
    health = server.health()
    assert health["status"] == "ok" and health["context_length"] == 32 and health["device"] == "cpu"
    status, page = server.request("GET", "/")
    assert status == 200 and "<textarea" in page and "/v1/completions" in page and "[DONE]" in page


def wait_for_status(server, path, status, seconds=10):
    """Ask GET path until it answers `status`; returns the last (status, body)."""
    deadline = time.monotonic() + seconds
    while True:
        got = server.request("GET", path)
        if got[0] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_connection_cap_keeps_health_answerable(server):
    """Past --max_connections (12) a request gets a 503 at once, but GET /health is still answered, on up
    to HEALTH_LANE extra connections; past those even /health gets the 503. Closing frees the places."""
    from nanogpt_np.serve.server import HEALTH_LANE
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(12)]
    try:
        status, out = wait_for_status(server, "/v1/models", 503)        # once the server has accepted all 12
        assert status == 503 and out["error"]["code"] == "too_many_connections"
        status, health = server.request("GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["connections"] == 12
        lane = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(HEALTH_LANE)]
        try:
            status, out = wait_for_status(server, "/health", 503)
            assert status == 503 and out["error"]["code"] == "too_many_connections"
        finally:
            for s in lane:
                s.close()
        assert wait_for_status(server, "/health", 200)[0] == 200         # the lane frees as its sockets close
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, out = server.request("GET", "/health")
        if status == 200 and out["connections"] == 1:
            break
        time.sleep(0.05)
    assert status == 200 and out["connections"] == 1


def raw_exchange(port, data):
    """Send bytes, read until the server closes: (status line, headers dict, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


@pytest.mark.parametrize("request_bytes,status", [
    (b"garbage\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra words\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"y" * 70000 + b"\r\n\r\n", 431),
])
def test_malformed_http_gets_a_json_error(server, request_bytes, status):
    """What http.server refuses itself (it would send an HTML page) comes back as JSON like every other error."""
    status_line, headers, body = raw_exchange(server.port, request_bytes)
    assert status_line.startswith(f"HTTP/1.1 {status} ")
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == "bad_http_request" and error["message"].startswith("bad HTTP request: ")
    assert b"<" not in body
    assert server.health()["status"] == "ok"


# ----- load -----
def test_32_concurrent_clients_are_batched_and_exact(long_server, long_run):
    model, tokenizer = load_model(long_run, dtype="float64"), load_tokenizer_of_run(long_run)
    jobs = [dict(prompt="def f" + "x" * (i % 7), max_tokens=24 + i % 9, seed=1000 + i,
                 temperature=[0, 0.8, 1.0, 1.2][i % 4], top_k=[None, 10][i % 2]) for i in range(32)]
    want = [generate_text(model, tokenizer, j["prompt"], j["max_tokens"], temperature=j["temperature"],
                          top_k=j["top_k"], seed=j["seed"]) for j in jobs]
    got = [None] * 32
    start = threading.Barrier(32)

    def client(i):
        start.wait()
        if i % 2:
            got[i] = long_server.complete(**jobs[i])["choices"][0]["text"]
        else:
            got[i] = "".join(e["choices"][0]["text"] for e in long_server.stream(**jobs[i])[:-1])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    health = long_server.health()
    assert health["max_batch_seen"] == 8 and health["active"] == 0 and health["waiting"] == 0


def test_disconnect_mid_stream_frees_the_slot(long_server):
    before = long_server.health()
    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", long_server.port), timeout=10)
        body = json.dumps({"prompt": "def ", "max_tokens": 1000, "stream": True, "seed": 1}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")         # headers (and maybe the first events)
        socks.append(s)
    # the headers go out before a stream is admitted to the batch: on a loaded machine wait for one to be decoding
    deadline = time.monotonic() + 10
    while long_server.health()["active"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert long_server.health()["active"] >= 1
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = long_server.health()
        if h["active"] == 0 and h["waiting"] == 0 and h["connections"] == 1:
            break
        time.sleep(0.02)
    assert (h["active"], h["waiting"], h["connections"]) == (0, 0, 1)
    print("tokens generated for the 3 disconnected streams:", h["tokens"] - before["tokens"])
    assert h["tokens"] - before["tokens"] < 3 * 1000 - 100        # the three were stopped early
    steps = h["decode_steps"]
    time.sleep(0.3)
    assert long_server.health()["decode_steps"] == steps           # nothing is generated for nobody
    assert long_server.complete(prompt="a", max_tokens=3)["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory, trained_run):
    """6 layers and a 2048-token context: 2000 tokens take seconds."""
    slow = tmp_path_factory.mktemp("serve") / "slow"
    tokenizer = load_tokenizer_of_run(trained_run)
    config = GPTConfig(block_size=2048, vocab_size=tokenizer.vocab_size, n_layer=6, n_head=2, n_embd=32)
    save_checkpoint(slow, GPT(config, seed=1), None, {}, {"step": 0}, tokenizer)
    return slow


def test_time_limit_and_full_queue(slow_run, tmp_path):
    """One slot, one place in the queue, 0.5 s per request: a long request is cut at its time limit
    (finish_reason "length"), a second waits its turn, a third finds the queue full (503)."""
    server = Server(slow_run, tmp_path / "slow.log", "--max_batch=1", "--max_queue=1", "--request_timeout=0.5")
    try:
        results = {}

        def call(name):
            results[name] = server.request("POST", "/v1/completions", {"prompt": "def ", "max_tokens": 2000})

        def wait_for(key):
            deadline = time.monotonic() + 5
            while server.health()[key] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)

        start = time.monotonic()
        first = threading.Thread(target=call, args=("first",))
        first.start()
        wait_for("active")
        second = threading.Thread(target=call, args=("second",))
        second.start()
        wait_for("waiting")
        status, busy = server.request("POST", "/v1/completions", {"prompt": "def ", "max_tokens": 5})
        first.join(30)
        second.join(30)
        assert status == 503 and busy["error"]["code"] == "server_busy"
        for name in ("first", "second"):
            status, out = results[name]
            assert status == 200 and out["choices"][0]["finish_reason"] == "length"
            assert out["usage"]["completion_tokens"] < 1500
        assert time.monotonic() - start < 10
        assert server.complete(prompt="a", max_tokens=3)["usage"]["completion_tokens"] == 3
    finally:
        server.stop()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_shutdown_ends_streams_with_an_error_event(slow_run, tmp_path, signame):
    """Ctrl-C (SIGINT) or SIGTERM while a stream and a plain request are in flight: the stream ends with an
    explicit server_shutdown error event (never a normal-looking finish_reason), the plain request gets a 503,
    stderr says so, and the process exits 128 + the signal's number."""
    import signal
    server = Server(slow_run, tmp_path / f"shutdown_{signame}.log")
    try:
        plain = {}
        thread = threading.Thread(target=lambda: plain.update(
            answer=server.request("POST", "/v1/completions", {"prompt": "def ", "max_tokens": 2000})))
        thread.start()
        body = json.dumps({"prompt": "def ", "max_tokens": 2000, "stream": True}).encode()
        stream = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = b""
        while b"data: {" not in reply:                  # the first event has come
            chunk = stream.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        while server.health()["active"] < 2 and time.monotonic() < deadline:    # both are generating
            time.sleep(0.02)
        assert server.health()["active"] == 2
        server.proc.send_signal(getattr(signal, signame))
        while chunk := stream.recv(65536):              # until the server closes the connection
            reply += chunk
        stream.close()
        assert reply.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")     # a complete chunked body
        events = [b.split(b"data: ", 1)[1] for b in reply.split(b"\n\n") if b"data: " in b]
        thread.join(30)
        assert events[-1] == b"[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "server_shutdown" and "cut short" in error["message"]
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
        status, out = plain["answer"]
        assert status == 503 and out["error"]["code"] == "server_shutdown"
        assert server.proc.wait(15) == 128 + getattr(signal, signame)
        log = Path(server.log_path).read_text()
        assert f"{signame}: shutting down" in log and f"stopped on {signame}; 2 completion(s) were cut short" in log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5)
    finally:
        server.stop()


# ----- a byte-level BPE model: <|endoftext|> stops, characters split across tokens -----
@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    from nanogpt_np.tokenizers.bpe import BPETokenizer
    from nanogpt_np.data.corpus import default_corpus_text
    out = tmp_path_factory.mktemp("serve") / "bpe"
    tokenizer = BPETokenizer.train(default_corpus_text()[:20000] + " héllo wörld, €uro 日本語", vocab_size=300)
    config = GPTConfig(block_size=256, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32)
    save_checkpoint(out, GPT(config, seed=5), None, {}, {"step": 0}, tokenizer)
    return out


def test_bpe_end_of_text_and_utf8(bpe_run, tmp_path):
    """Random weights: nearly uniform over 300 ids, so <|endoftext|> comes now and then and many byte tokens
    do not make whole characters. The server's text is the incremental UTF-8 decoding of the tokens that
    generate() gives, cut at <|endoftext|> (finish_reason "stop", the token counted but not shown)."""
    import codecs
    from nanogpt_np.generate import generate
    model, tokenizer = load_model(bpe_run, dtype="float64"), load_tokenizer_of_run(bpe_run)
    eot, prompt = tokenizer.eot_id, "héllo wörld, €"
    ids = tokenizer.encode(prompt)

    def expected(seed):
        tokens = list(generate(model, ids, 150, temperature=1.0, seed=seed, stop_ids=(eot,)))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        shown = [t for t in tokens if t != eot]
        text = "".join(decoder.decode(tokenizer.decode_bytes([t])) for t in shown) + decoder.decode(b"", True)
        return text, ("stop" if tokens[-1] == eot else "length"), len(tokens)

    cases = {}
    for seed in range(40):                       # one seed that meets <|endoftext|>, one that does not
        text, reason, n = expected(seed)
        cases.setdefault(reason, (seed, text, n))
        if len(cases) == 2:
            break
    assert set(cases) == {"stop", "length"}
    server = Server(bpe_run, tmp_path / "bpe.log", "--dtype=float64")
    try:
        for reason, (seed, text, n) in cases.items():
            body = dict(prompt=prompt, max_tokens=150, temperature=1.0, seed=seed)
            out = server.complete(**body)
            assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (text, reason)
            assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n,
                                    "total_tokens": len(ids) + n}
            events = server.stream(**body)
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
            assert events[-2]["choices"][0]["finish_reason"] == reason
        assert "\ufffd" in "".join(t for _, t, _ in cases.values())    # some bytes did not make a character
    finally:
        server.stop()


# ----- pieces, without HTTP -----
class ByteTokenizer:
    """One token per byte, so a character can be split across tokens."""
    vocab_size, eot_id = 256, None

    def decode_bytes(self, ids):
        return bytes(ids)


def assemble(tokens, stop):
    a = TextAssembler(ByteTokenizer(), stop)
    pieces = [a.add(t) for t in tokens]
    if not a.stopped:
        pieces.append(a.finish())
    return pieces, a.stopped


def test_text_assembler_utf8_and_stops():
    text = "héllo wörld, €uro"
    tokens = list(text.encode())
    pieces, stopped = assemble(tokens, [])
    assert "".join(pieces) == text and not stopped and all("\ufffd" not in p for p in pieces)
    for stop in (["wö"], ["ö"], ["xyz", "d, €"], ["lo w", "llo"]):
        pieces, stopped = assemble(tokens, stop)
        first = min(text.index(s) for s in stop if s in text)
        assert "".join(pieces) == text[:first] and stopped
    pieces, stopped = assemble(list(b"abcab"), ["abd"])              # a held-back prefix is released at the end
    assert "".join(pieces) == "abcab" and not stopped and pieces[1] == "" and pieces[-1] == "ab"


def test_parse_completion_request_defaults():
    tok = CharTokenizer("abc \n")
    req = parse_completion_request({"prompt": "ab"}, tok, 8, "m", Limits())
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.n, req.stream) == (8, 1.0, 1.0, None, 1, False)
    assert req.prompts == [("ab", [0, 1])] and req.stop == [] and 0 <= req.seed < 2**48
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": "ab", "max_tokens": 9}, tok, 8, "m", Limits())
    assert e.value.status == 400 and "1 to 8" in e.value.message
    req = parse_completion_request({"prompt": "", "top_k": 0, "stop": "a"}, tok, 8, "m", Limits(max_tokens=4))
    assert req.prompts == [("", [4])] and req.top_k is None and req.stop == ["a"]     # "" starts from "\n"


def test_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanogpt_np.serve", f"--out_dir={tmp_path / 'nothing'}"],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# ----- the scheduler alone (in this process: the test thread runs no model while the worker lives) -----
def run_scheduler(model, sequences, max_batch=4):
    from nanogpt_np.serve.batching import Scheduler
    scheduler = Scheduler(model, max_batch=max_batch).start()
    try:
        scheduler.submit(sequences)
        order, tokens = [], {s.index: [] for s in sequences}
        while len(order) < len(sequences):
            index, kind, value = sequences[0].events.get(timeout=30)
            if kind == "token":
                tokens[index].append(value)
            else:
                order.append((index, value))
        assert scheduler.stats()["active"] == 0
        return order, tokens
    finally:
        scheduler.stop()


def test_scheduler_limits_cancel_and_fifo():
    import queue
    from nanogpt_np.serve.batching import Sequence
    model = GPT(GPTConfig(block_size=1024, vocab_size=20, n_layer=1, n_head=2, n_embd=16), seed=1)
    events = queue.Queue()
    now = time.monotonic()

    def seq(index, **kw):
        return Sequence(**{**dict(prompt_ids=[1, 2, 3], max_tokens=5, seed=index, events=events, index=index), **kw})

    cancelled = seq(1)
    cancelled.cancel()
    order, tokens = run_scheduler(model, [
        seq(0, max_tokens=7),
        cancelled,                                                   # cancelled while waiting: never runs
        seq(2, deadline=now - 1),                                    # out of time while waiting
        seq(3, max_tokens=100000, deadline=now + 0.05),              # out of time while running
        seq(4, stop_ids=range(20)),                                  # every token is a stop token
        seq(5, prompt_ids=[1] * 1018, max_tokens=100),               # the context fills: 1024 - 1018 + 1
    ])
    reasons = dict(order)
    assert reasons == {0: "length", 1: "cancelled", 2: "length", 3: "length", 4: "stop", 5: "length"}
    assert [len(tokens[i]) for i in (0, 1, 2, 4, 5)] == [7, 0, 0, 1, 7] and len(tokens[3]) < 1000
    # one slot: first come, first served
    order, _ = run_scheduler(model, [seq(i, max_tokens=3 + i % 2) for i in range(5)], max_batch=1)
    assert [i for i, _ in order] == [0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_gpu_server_matches_cpu_server(long_run, long_server, tmp_path):
    """Skipped without CuPy and a GPU. The same requests, 8 at once, on a CUDA server and the CPU server
    (both float64): the same text."""
    from nanogpt_np import backend
    if not backend.cuda_available():
        pytest.skip("no CUDA GPU with CuPy")
    gpu = Server(long_run, tmp_path / "gpu.log", "--device=cuda", "--dtype=float64", "--max_batch=8")
    try:
        assert gpu.health()["device"] == "cuda"
        jobs = [dict(prompt="def g" + "y" * i, max_tokens=40, seed=i, temperature=[0, 1.0][i % 2]) for i in range(8)]
        got = [None] * 8

        def client(i):
            got[i] = gpu.complete(**jobs[i])["choices"][0]["text"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == [long_server.complete(**j)["choices"][0]["text"] for j in jobs]
        events = gpu.stream(**jobs[1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == got[1]
    finally:
        gpu.stop()


PAGE_HARNESS = """
// node harness.js BASE_URL PAGE_SCRIPT VALUES_JSON: runs the page's script with a stand-in for the DOM, waits
// for it to load the model's settings, sets the inputs named in VALUES_JSON, presses Generate and prints what
// the page showed.
const [base, src, values] = [process.argv[2], process.argv[3], JSON.parse(process.argv[4])];
const realFetch = fetch;
globalThis.fetch = (url, options) => realFetch(base + url, options);
const els = {};
const el = id => els[id] || (els[id] = {value: "", textContent: "", disabled: false, innerHTML: "", children: [],
                                        append(c) { this.children.push(c); }});
el("prompt").value = "def "; el("seed").value = ""; el("go").disabled = true;    // as page.html starts
el("curve").hidden = true;
globalThis.document = {getElementById: el, createElement: () => ({}),
                       createTextNode: t => ({data: t, appendData(x) { this.data += x; }})};
eval(src);
(async () => {
  for (let i = 0; i < 200 && els["go"].disabled; i++) await new Promise(r => setTimeout(r, 50));
  const loaded = {};
  for (const id of ["max_tokens", "temperature", "top_k", "top_p"]) loaded[id] = {value: el(id).value, max: el(id).max};
  loaded.ready = !els["go"].disabled;
  for (const [id, value] of Object.entries(values)) el(id).value = value;
  await els["go"].onclick();
  const curve = {src: el("curve").src, hidden: el("curve").hidden};
  console.log(JSON.stringify({model: els["model"].textContent, context: els["context"].textContent, loaded, curve,
                              text: els["out"].children[1].data, status: els["status"].textContent}));
})();
"""


def run_page(server, values):
    """The page's script run by Node against `server`; skipped without Node 18+ (it needs fetch)."""
    import shutil
    from nanogpt_np.serve.server import PAGE_FILE
    node = shutil.which("node")
    if node is None or int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout[1:]
                           .split(".")[0]) < 18:
        pytest.skip("needs Node 18+ (fetch)")
    script = PAGE_FILE.read_text().split("<script>")[1].split("</script>")[0]
    harness = Path(server.log_path).parent / "page_harness.js"
    harness.write_text(PAGE_HARNESS)
    r = subprocess.run([node, str(harness), f"http://127.0.0.1:{server.port}", script, json.dumps(values)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_page_streams_with_node(server, trained_run):
    """The page's script, run by Node with a stand-in for the DOM, streams the same text as the API."""
    got = run_page(server, {"max_tokens": "20", "temperature": "0.8", "top_k": "200", "top_p": "1", "seed": "7"})
    want = server.complete(prompt="def ", max_tokens=20, temperature=0.8, top_k=200, top_p=1, seed=7)
    assert got["model"] == trained_run.name and got["text"] == want["choices"][0]["text"]
    assert got["status"].startswith("finished: length, 20 tokens")


def test_page_defaults_fit_the_model(server, trained_run):
    """The served model has a 32-token context: the page's defaults come from it and the first Generate,
    untouched, succeeds (it used to send max_tokens 100 and get an error)."""
    settings = server.request("GET", "/settings")[1]
    assert settings["model"] == trained_run.name and settings["context_length"] == 32
    assert settings["limits"]["max_tokens"] == 32 and settings["defaults"]["max_tokens"] == 32
    assert settings["defaults"]["top_k"] <= settings["vocab_size"]
    got = run_page(server, {})
    assert got["loaded"]["ready"] and got["context"] == 32
    assert got["loaded"]["max_tokens"] == {"value": 32, "max": 32}
    assert got["loaded"]["top_k"]["value"] == settings["defaults"]["top_k"]
    assert got["status"].startswith("finished: length"), got["status"]
    assert len(got["text"]) > 0
    assert settings["loss_curve"] and got["curve"] == {"src": "/loss.svg", "hidden": False}   # the run's curve


def test_loss_curve_of_the_served_run(server, trained_run):
    """GET /loss.svg: the served run's log.jsonl drawn by nanogpt_np.plot (train, validation, learning rate)."""
    import xml.etree.ElementTree as ET
    from nanogpt_np.plot import read_run, render_svg
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/loss.svg")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("image/svg+xml")
    root = ET.fromstring(body)
    kinds = sorted(p.get("data-series") for p in root.iter("{http://www.w3.org/2000/svg}path")
                   if p.get("class") == "series")
    assert kinds == ["lr", "train", "val"]
    assert body.decode() == render_svg([read_run(trained_run, name=trained_run.name)])


def test_settings_follow_the_max_tokens_cap(small_run, tmp_path):
    """--max_tokens caps what the page offers; a request with the page's defaults is accepted."""
    s = Server(small_run, tmp_path / "capped.log", "--max_tokens=5")
    try:
        settings = s.request("GET", "/settings")[1]
        assert settings["context_length"] == 8 and settings["limits"]["max_tokens"] == 5
        assert settings["defaults"]["max_tokens"] == 5
        out = s.complete(prompt="ab", **settings["defaults"])
        assert out["usage"]["completion_tokens"] == 5
        assert s.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 6})[0] == 400
        assert settings["loss_curve"] is False                         # saved without training: no log.jsonl
        status, out = s.request("GET", "/loss.svg")
        assert status == 404 and out["error"]["code"] == "no_loss_curve"
    finally:
        s.stop()


def test_openai_python_client(server, trained_run):
    """OpenAI's own Python client, unchanged, against this server (skipped when `openai` is not installed)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [trained_run.name]
    settings = dict(model=trained_run.name, prompt="def ", max_tokens=12, seed=3, temperature=0.8, n=2,
                    extra_body={"top_k": 50})
    whole = client.completions.create(**settings)
    want = server.complete(**{k: v for k, v in settings.items() if k != "extra_body"}, top_k=50)
    assert [c.text for c in whole.choices] == [c["text"] for c in want["choices"]]
    assert whole.usage.completion_tokens == 24
    texts = ["", ""]
    for chunk in client.completions.create(**settings, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**{**settings, "temperature": -1})


def test_deeply_nested_json_is_a_400(server):
    got, out = server.request("POST", "/v1/completions", b"[" * 4000)  # under --max_body_bytes
    assert got == 400 and out["error"]["code"] == "invalid_json"
    assert server.complete(prompt="a", max_tokens=1)["choices"]


def test_head_gets_an_openai_style_405(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("HEAD", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Content-Type") == "application/json"
        assert resp.read() == b""  # headers only; the connection stays usable
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "small"
    tok = CharTokenizer.from_text("abc \n")
    save_checkpoint(out, GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8)),
                    None, {}, {"step": 0}, tok)
    return out


@pytest.mark.parametrize("flag,message", [("--port=70000", "--port must be in 0..65535"),
                                          ("--port=-1", "--port must be in 0..65535"),
                                          ("--request_timeout=inf", "--request_timeout must be a finite"),
                                          ("--request_timeout=nan", "--request_timeout must be a finite"),
                                          ("--max_batch=1000000000000", "try a smaller --max_batch")])
def test_main_refuses_bad_options_in_one_line(small_run, capsys, flag, message):
    from nanogpt_np.serve.server import main
    assert main([f"--out_dir={small_run}", "--device=cpu", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_package_data_ships_every_non_python_file():
    """setup.cfg's package_data must name every file the package reads at run time (the page, the kernels),
    or a non-editable install would lack them."""
    import configparser
    import fnmatch
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["nanogpt_np"].split(",")]
    package = REPO / "nanogpt_np"
    data = [f.relative_to(package).as_posix() for f in package.rglob("*")
            if f.is_file() and f.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in f.parts]
    assert "serve/page.html" in data
    assert [f for f in data if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
