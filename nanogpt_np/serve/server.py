"""Serve a trained model over HTTP in the shape of OpenAI's completions API (standard library only).

    python -m nanogpt_np.serve --out_dir=RUN [--host 127.0.0.1 --port 8000 --max_batch 8 ...]

    POST /v1/completions   {"prompt": "def ", "max_tokens": 50, "temperature": 0.8, "stream": true, ...}
    GET  /v1/models        the one model served (its id is the run directory's name unless --model_name)
    GET  /health           status and load: active / waiting sequences, open connections (answered even
                           when --max_connections is reached, on a few extra connections)
    GET  /                 a small page to type a prompt and watch the tokens stream in
    GET  /settings         what the page reads at load: the model's context, the caps, defaults that fit them
    GET  /loss.svg         the served run's loss curve, drawn from its log.jsonl (see nanogpt_np/plot.py)

How a request flows:
    handler thread (one per connection, http.server.ThreadingHTTPServer)
        read the body (size-capped), parse JSON, validate every field      -> 4xx with an OpenAI error body
        tokenize the prompt(s); one batching.Sequence per choice            (n choices per prompt)
        submit them to the Scheduler                                        -> 503 when the queue is full
        wait for token events; turn tokens into text (UTF-8 safe), cut at stop strings,
        write server-sent events as they come (stream) or one JSON answer at the end
        a client that goes away cancels its sequences: their cache rows are free at the next step
    worker thread (batching.Scheduler): continuous batching over one KV cache, see batching.py

What is guaranteed: the same prompt, seed and sampling settings give the same tokens as
`python sample.py --seed=S` (choice j of each prompt uses seed S + j, as sample.py's j-th sample does;
top_k 0 or absent means no top-k, as sample.py's --top_k=0), bit for bit when the sequence decodes alone,
and up to float rounding in a batch (see batching.py; with --dtype=float64 a difference is practically
impossible). A completion stops at max_tokens, at a stop string, at <|endoftext|> (finish_reason "stop"),
when the context is full or when the request's time limit passes ("length"). There is no sliding window
when serving (sample.py rebuilds the cache from the last half of the context instead), so a completion holds
at most context - prompt_tokens + 1 tokens, and the two agree up to that point.

Errors are always JSON in OpenAI's shape, http.server's own refusals (a garbage request line) included.
Ctrl-C or SIGTERM shuts down gracefully: no new connections, every completion in flight ends with an explicit
"server_shutdown" error (an error event, then [DONE], in a stream; a 503 otherwise), a line on stderr, and
the exit status 128 + the signal (130 for Ctrl-C, 143 for SIGTERM). A second signal stops at once.

The parts, one concept per file:
    requests.py     what a client may ask for: the JSON body checked field by field (Limits, APIError)
    streaming.py    tokens -> text pieces (UTF-8 safe, stop strings) -> server-sent events
    batching.py     the worker thread: continuous batching over one KV cache
    page.html       the page at /, read once at start
    server.py       this file: the HTTP handler (routing, bodies, answers) and the command line
"""
import argparse
import json
import math
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .. import backend
from ..plot import PlotError, read_run, render_svg
from .batching import QueueFull, Scheduler, Sequence
from .requests import APIError, Limits, decode_json_body, parse_completion_request
from .streaming import Choice, ClientGone, EventStream, choice_pieces

PAGE_FILE = Path(__file__).with_name("page.html")
PAGE_MAX_TOKENS = 100           # the page asks for this many tokens unless the model's context is shorter
HEALTH_LANE = 4                 # connections past --max_connections that may still ask GET /health
HEALTH_LANE_TIMEOUT = 2.0       # seconds such a connection has to send its request
SHUTDOWN_GRACE = 5.0            # seconds in-flight requests get to send their error event and close

# ---------------------------------------------------------------------------------------------------------
# The HTTP side


class CompletionServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections and the model's state for the handlers.

    Connections: up to max_connections are served normally (one handler thread each). Past that, up to
    HEALTH_LANE more get a thread that answers GET /health and refuses anything else with a 503, so that a
    full server can still be watched; past those, a connection gets the 503 at once from the accepting thread.

    Shutdown (see stop_gracefully): stop accepting, cut every completion in flight with a "server_shutdown"
    error (an error event in a stream, a 503 otherwise), wait for them to be sent, stop the worker."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, scheduler, tokenizer, model_name, limits, max_connections=64,
                 idle_timeout=15.0, verbose=False, run_dir=None):
        self.page = PAGE_FILE.read_bytes()          # read once: a server never serves half an edited page
        self.run_dir = run_dir                      # for the loss curve (its log.jsonl), if any
        self._curve = (None, None)                  # (log.jsonl's mtime and size, the SVG drawn from it)
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.block_size = scheduler.block_size
        self.limits = limits
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.verbose = verbose
        self.created = int(time.time())
        self.connections = 0                       # served normally
        self.health_lane = 0                       # past the cap, waiting to ask for /health
        self.in_flight = 0                         # completions being generated
        self.cut_short = 0                         # completions ended by a shutdown
        self.stopping = threading.Event()          # set once a shutdown has begun
        self._conn_lock = threading.Lock()
        super().__init__(address, CompletionHandler)

    def too_many_connections(self) -> APIError:
        return APIError(503, f"too many connections (limit {self.max_connections}); retry later",
                        type_="server_error", code="too_many_connections")

    def process_request(self, request, client_address):
        with self._conn_lock:
            if self.connections < self.max_connections:
                self.connections += 1
                lane = "normal"
            elif self.health_lane < HEALTH_LANE:
                self.health_lane += 1
                lane = "health"
            else:
                lane = "refused"
        if lane == "normal":
            super().process_request(request, client_address)
        elif lane == "health":
            threading.Thread(target=self._answer_over_capacity, args=(request, client_address),
                             daemon=True).start()
        else:               # answer at once from the accepting thread, without starting a handler
            body = json.dumps(self.too_many_connections().body())
            try:
                request.settimeout(1.0)
                request.sendall((f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                                 + body).encode())
            except OSError:
                pass
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1

    def _answer_over_capacity(self, request, client_address):
        try:
            OverCapacityHandler(request, client_address, self)
        except Exception:                   # a client that vanished; nothing to answer
            pass
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self.health_lane -= 1

    def has_loss_curve(self) -> bool:
        return self.run_dir is not None and os.path.isfile(os.path.join(self.run_dir, "log.jsonl"))

    def loss_curve_svg(self) -> bytes:
        """The chart of the served run's log.jsonl (nanogpt_np.plot), drawn again only when the log changes."""
        if not self.has_loss_curve():
            raise APIError(404, "this model has no training log (log.jsonl) to draw", code="no_loss_curve")
        path = os.path.join(self.run_dir, "log.jsonl")
        stat = os.stat(path)
        key = (stat.st_mtime_ns, stat.st_size)
        with self._conn_lock:
            if self._curve[0] == key:
                return self._curve[1]
        try:
            svg = render_svg([read_run(self.run_dir, name=self.model_name)]).encode("utf-8")
        except PlotError as e:
            raise APIError(404, f"no loss curve: {e}", code="no_loss_curve") from None
        with self._conn_lock:
            self._curve = (key, svg)
        return svg

    def completion_started(self):
        with self._conn_lock:
            self.in_flight += 1

    def completion_ended(self, cut_short):
        with self._conn_lock:
            self.in_flight -= 1
            self.cut_short += bool(cut_short)

    def stop_gracefully(self, grace=SHUTDOWN_GRACE) -> int:
        """Stop accepting, end the completions in flight with an error, stop the worker.
        Call from a thread other than the one in serve_forever(). Returns how many completions were cut."""
        self.shutdown()                     # serve_forever() returns: nothing more is accepted
        self.server_close()                 # the listening socket closes: new connections are refused
        self.stopping.set()                 # every completion in flight sees it within one poll (50 ms)
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        self.scheduler.stop()
        return self.cut_short


class CompletionHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive; streams use chunked transfer encoding
    disable_nagle_algorithm = True         # send each small write (a token's event) at once (TCP_NODELAY)
    server_version = "nanogpt_np-serve"

    def setup(self):
        self.timeout = self.server.idle_timeout          # socket timeout: idle keep-alive, stalled readers
        super().setup()

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    # ----- routing -----
    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_HEAD(self):  # without this, http.server answers 501 with an HTML page
        self._route("HEAD")

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a garbage request line, an over-long header line, an unknown method)
        in the same JSON shape as every other error, instead of its HTML page."""
        self.close_connection = True
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.1"  # unparsed: still answer with a status line and headers
        reason = message or self.responses.get(code, ("error",))[0]
        if len(reason) > 200:
            reason = reason[:200] + "..."
        self.log_error("code %d, message %s", code, reason)
        self._reply_error(APIError(int(code), f"bad HTTP request: {reason}", code="bad_http_request"))

    def _route(self, method):
        self._body_handled = False             # set once the request body is read (or the connection doomed)
        self._streaming = False                # set once a 200 with an event stream has begun
        if method != "POST":                   # a body nobody reads would be taken for the next request
            self._discard_body()
            self._body_handled = True
        if self.server.stopping.is_set():
            self.close_connection = True
            if not self._body_handled:
                self._discard_body()
            self._reply_error(APIError(503, "the server is shutting down", type_="server_error",
                                       code="server_shutdown"))
            return
        path = self.path.split("?", 1)[0]
        routes = {"/": {"GET": self._page}, "/settings": {"GET": self._settings}, "/health": {"GET": self._health},
                  "/loss.svg": {"GET": self._loss_curve},
                  "/v1/models": {"GET": self._models}, "/v1/completions": {"POST": self._completions}}
        if path.startswith("/v1/models/"):
            routes[path] = {"GET": lambda: self._model(path[len("/v1/models/"):])}
        try:
            if path not in routes:
                raise APIError(404, f"no route {method} {path}; see GET /v1/models, POST /v1/completions",
                               code="not_found")
            if method not in routes[path]:
                raise APIError(405, f"{path} does not accept {method} (use {', '.join(routes[path])})",
                               code="method_not_allowed")
            routes[path][method]()
        except APIError as e:
            if not self._body_handled:
                self._discard_body()
            self._reply_error(e)
        except ClientGone:
            self.close_connection = True
        except Exception as e:              # a bug: answer 500 and keep serving the others
            self.log_error("%s", f"{type(e).__name__}: {e}")
            self.close_connection = True
            if not self._streaming:
                self._reply_error(APIError(500, "internal server error", type_="server_error"))

    def _reply_error(self, error):
        try:
            self._send_json(error.status, error.body())
        except ClientGone:
            self.close_connection = True

    # ----- plain endpoints -----
    def _page(self):
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def _settings(self):
        """What the page needs to know about the model it serves: its limits, and defaults that fit them."""
        server = self.server
        cap = server.limits.max_tokens_cap(server.block_size)
        self._send_json(200, {
            "model": server.model_name, "context_length": server.block_size,
            "vocab_size": server.tokenizer.vocab_size,
            "limits": {"max_tokens": cap, "max_n": server.limits.max_n},
            "loss_curve": server.has_loss_curve(),
            "defaults": {"max_tokens": min(PAGE_MAX_TOKENS, cap, server.block_size), "temperature": 0.8,
                         "top_k": min(200, server.tokenizer.vocab_size), "top_p": 1.0}})

    def _loss_curve(self):
        self._send(200, self.server.loss_curve_svg(), "image/svg+xml; charset=utf-8")

    def _health(self):
        stats = self.server.scheduler.stats()
        status = "ok" if stats.pop("worker_alive") else "error"
        self._send_json(200 if status == "ok" else 503,
                        {"status": status, "model": self.server.model_name, "device": backend.device(),
                         "connections": self.server.connections, "context_length": self.server.block_size,
                         **stats})

    def _model_card(self):
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "nanogpt_np"}

    def _models(self):
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, name):
        if name != self.server.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        self._send_json(200, self._model_card())

    # ----- completions -----
    def _read_json_body(self):
        limits = self.server.limits
        self._body_handled = True
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(400, f"bad Content-Length {length!r}") from None
        if length > limits.max_body_bytes:
            self.close_connection = True
            if length <= 16 * limits.max_body_bytes:    # read it away, or closing would reset the connection
                self._drain(length)                     # before the client reads the answer
            raise APIError(413, f"the body is {length} bytes; the limit is {limits.max_body_bytes}",
                           code="body_too_large")
        try:
            raw = self.rfile.read(length)
        except OSError:
            raise ClientGone() from None
        if len(raw) < length:
            raise ClientGone()
        return decode_json_body(raw)

    def _drain(self, length):
        try:
            while length > 0:
                got = self.rfile.read(min(length, 1 << 16))
                if not got:
                    break
                length -= len(got)
        except OSError:
            pass

    def _discard_body(self):
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.server.limits.max_body_bytes:
            try:
                self.rfile.read(int(length))
                return
            except OSError:
                pass
        if length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _completions(self):
        server = self.server
        body = self._read_json_body()
        req = parse_completion_request(body, server.tokenizer, server.block_size, server.model_name,
                                       server.limits)
        events = queue.Queue()
        deadline = time.monotonic() + server.limits.request_timeout
        stop_ids = () if server.tokenizer.eot_id is None else (server.tokenizer.eot_id,)
        seqs = []
        for p, (_, ids) in enumerate(req.prompts):
            for j in range(req.n):
                seqs.append(Sequence(ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                     seed=req.seed + j, stop_ids=stop_ids, deadline=deadline, events=events,
                                     index=p * req.n + j))
        try:
            server.scheduler.submit(seqs)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry later", type_="server_error",
                           code="server_busy") from None
        choices = [Choice(s.index, server.tokenizer, req.stop) for s in seqs]
        meta = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        pieces = choice_pieces(seqs, choices, events, self._client_gone, server.stopping)
        server.completion_started()
        try:
            if req.stream:
                self._stream(req, choices, pieces, meta)
            else:
                self._wait_all(req, choices, pieces, meta)
        finally:
            for s in seqs:                 # whatever happened, no sequence outlives its request
                s.cancel()
            server.completion_ended(cut_short=server.stopping.is_set() and
                                    any(c.finish_reason is None for c in choices))

    def _usage(self, req, choices):
        prompt_tokens = sum(len(ids) for _, ids in req.prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _prompt_text(self, req, choice):
        text, ids = req.prompts[choice.index // req.n]
        return text if text is not None else self.server.tokenizer.decode(ids)

    def _wait_all(self, req, choices, pieces, meta):
        for c, piece, _ in pieces:
            c.text += piece
        out = [{"text": (self._prompt_text(req, c) if req.echo else "") + c.text, "index": c.index,
                "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        self._send_json(200, {**meta, "choices": out, "usage": self._usage(req, choices)})

    def _stream(self, req, choices, pieces, meta):
        self._streaming = True
        self.send_response(200)
        for name, value in EventStream.HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        stream = EventStream(self.wfile)

        def chunk(index, text, reason):
            stream.send({**meta, "choices": [{"text": text, "index": index, "logprobs": None,
                                              "finish_reason": reason}]})

        if req.echo:
            for c in choices:
                chunk(c.index, self._prompt_text(req, c), None)
        try:
            for c, piece, reason in pieces:
                if piece or reason:
                    chunk(c.index, piece, reason)
        except APIError as e:        # headers are gone already: report the error as an event
            stream.send(e.body())
        if req.include_usage:
            stream.send({**meta, "choices": [], "usage": self._usage(req, choices)})
        stream.close()

    # ----- writing -----
    def _send_json(self, status, obj):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send(self, status, data, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has the headers only (HTTP says no body)
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            raise ClientGone() from None

    def _client_gone(self) -> bool:
        """True when the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class OverCapacityHandler(CompletionHandler):
    """A connection that came past --max_connections: GET /health is answered as usual (a full server can
    still be watched), anything else gets the 503; one request, then the connection closes."""

    def setup(self):
        self.timeout = min(HEALTH_LANE_TIMEOUT, self.server.idle_timeout)
        BaseHTTPRequestHandler.setup(self)      # not CompletionHandler.setup: its timeout is the idle one

    def _route(self, method):
        self.close_connection = True
        if method == "GET" and self.path.split("?", 1)[0] == "/health":
            super()._route(method)
        else:
            self._discard_body()
            self._reply_error(self.server.too_many_connections())


# ---------------------------------------------------------------------------------------------------------
# Start-up


def build_parser():
    p = argparse.ArgumentParser(prog="python -m nanogpt_np.serve",
                                description="Serve a trained run over HTTP (OpenAI-style /v1/completions).")
    p.add_argument("--out_dir", required=True, help="the run directory (model.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--model_name", default="", help="the model id clients send (default: the run's folder name)")
    p.add_argument("--max_batch", type=int, default=8, help="sequences decoded together (KV cache rows)")
    p.add_argument("--max_queue", type=int, default=256, help="sequences waiting for a slot before 503s")
    p.add_argument("--max_connections", type=int, default=64, help="open connections before 503s")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--max_tokens", type=int, default=0, help="cap on a request's max_tokens (0: the context)")
    p.add_argument("--max_n", type=int, default=8, help="cap on n (completions per prompt)")
    p.add_argument("--max_choices", type=int, default=16, help="cap on prompts x n in one request")
    p.add_argument("--request_timeout", type=float, default=60.0,
                   help="seconds a request may take, queueing included (then finish_reason 'length')")
    p.add_argument("--idle_timeout", type=float, default=15.0,
                   help="seconds an idle keep-alive connection (or a client that stops reading) is kept")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def make_server(args) -> CompletionServer:
    """Load the run and bind the socket (call serve_forever() on the result)."""
    from ..io.checkpoint import load_model, load_tokenizer_of_run
    for name in ("max_batch", "max_queue", "max_connections", "max_body_bytes", "max_n", "max_choices"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.max_tokens < 0:
        raise ValueError("--max_tokens must be >= 0")
    for name in ("request_timeout", "idle_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):  # inf/nan would never time out (or fail oddly)
            raise ValueError(f"--{name} must be a finite number of seconds > 0, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    backend.use_device(args.device)
    model = load_model(args.out_dir, dtype=args.dtype)
    tokenizer = load_tokenizer_of_run(args.out_dir)
    name = args.model_name or os.path.basename(os.path.normpath(os.path.abspath(args.out_dir)))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens or None, max_n=args.max_n,
                    max_choices=args.max_choices, request_timeout=args.request_timeout)
    scheduler = Scheduler(model, max_batch=args.max_batch, max_queue=args.max_queue)
    server = CompletionServer((args.host, args.port), scheduler, tokenizer, name, limits,
                              max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                              verbose=args.verbose, run_dir=args.out_dir)
    scheduler.start()
    return server


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..io.checkpoint import CheckpointError
    try:
        server = make_server(args)
    except (CheckpointError, backend.BackendError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # the KV cache holds max_batch sequences of the whole context
        print(f"error: not enough memory for --max_batch {args.max_batch} (a KV cache of {args.max_batch} "
              f"full-context sequences); try a smaller --max_batch", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}, not only on this machine; there is no authentication",
              file=sys.stderr)
    print(f"serving {server.model_name} ({backend.device()}, context {server.block_size}, max_batch "
          f"{args.max_batch}) on http://{host}:{port}/", file=sys.stderr, flush=True)
    signum, previous_handlers = serve_until_signal(server)
    name = signal.Signals(signum).name
    again = "Ctrl-C again" if signum == signal.SIGINT else "another SIGTERM or Ctrl-C"
    print(f"{name}: shutting down: no new connections, completions in flight end with an error ({again} "
          f"stops at once)", file=sys.stderr, flush=True)
    cut = server.stop_gracefully()
    print(f"stopped on {name}; {cut} completion(s) were cut short", file=sys.stderr, flush=True)
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    return 128 + signum             # the shell's convention for "ended by a signal": 130 Ctrl-C, 143 SIGTERM


def serve_until_signal(server):
    """Serve on a background thread until SIGINT (Ctrl-C) or SIGTERM; return (its number, the handlers
    that were in place). After the first signal both go back to their default action, so a second one ends
    the process at once. Call from the main thread (the only one Python delivers signals to)."""
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="accept",
                     daemon=True).start()
    while not received:
        time.sleep(0.1)             # the handler runs in this thread, between two sleeps
    return received[0], previous
