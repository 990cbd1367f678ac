"""Serve a trained model over HTTP in the shape of OpenAI's completions API (standard library only).

    python -m nanogpt_np.serve --out_dir=RUN [--host 127.0.0.1 --port 8000 --max_batch 8 ...]

    POST /v1/completions   {"prompt": "def ", "max_tokens": 50, "temperature": 0.8, "stream": true, ...}
    GET  /v1/models        the one model served (its id is the run directory's name unless --model_name)
    GET  /health           status and load: active / waiting sequences, open connections
    GET  /                 a small page to type a prompt and watch the tokens stream in

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

Defaults follow OpenAI's: max_tokens 16, temperature 1, top_p 1, n 1, a random seed. Fields OpenAI has but
this server does not implement (logprobs, best_of, suffix, penalties, logit_bias) are accepted only at their
"off" value; any other unknown field is a 400.
"""
import argparse
import codecs
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .. import backend
from .batching import QueueFull, Scheduler, Sequence

# ---------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Validating a completion request

# OpenAI fields we accept only at their "off" value (so that clients sending defaults still work).
_UNSUPPORTED_UNLESS_DEFAULT = {
    "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
}
_KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                 "stream_options", "echo", "user"} | set(_UNSUPPORTED_UNLESS_DEFAULT)


class Limits:
    """Caps that protect the server; every one is a command-line option."""

    def __init__(self, max_body_bytes=1 << 20, max_tokens=None, max_n=8, max_choices=16, max_stop=4,
                 request_timeout=60.0):
        self.max_body_bytes = max_body_bytes
        self.max_tokens = max_tokens              # None: the model's context length
        self.max_n = max_n
        self.max_choices = max_choices            # prompts x n in one request
        self.max_stop = max_stop
        self.request_timeout = request_timeout


class CompletionRequest:
    """A validated request: token ids per prompt and the settings of every choice."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _bad(message, param, code=None):
    return APIError(400, message, param=param, code=code)


def parse_completion_request(body, tokenizer, block_size, model_name, limits: Limits) -> CompletionRequest:
    """Check every field of a decoded JSON body; raise APIError (4xx) for the first problem found."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}", unknown[0], "unknown_field")
    for name, allowed in _UNSUPPORTED_UNLESS_DEFAULT.items():
        if name in body and body[name] not in allowed:
            raise _bad(f"{name} is not supported by this server (leave it out)", name, "unsupported")

    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad("model must be a string", "model")
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    cap = limits.max_tokens or block_size
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(16, cap)             # OpenAI's default
    if not _is_int(max_tokens) or not 1 <= max_tokens <= cap:
        raise _bad(f"max_tokens must be an integer from 1 to {cap}, got {max_tokens!r}", "max_tokens")

    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad(f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad(f"top_k must be a non-negative integer (0 = no top-k), got {top_k!r}", "top_k")
    top_k = top_k or None

    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= limits.max_n:
        raise _bad(f"n must be an integer from 1 to {limits.max_n}, got {n!r}", "n")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}", "seed")
    if seed is None:            # a fresh seed, so that choice i still uses seed + i
        seed = int.from_bytes(os.urandom(6), "little")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise _bad('stream_options must be {"include_usage": true|false}', "stream_options")
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        include_usage = options.get("include_usage", False)
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise _bad("echo must be true or false", "echo")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > limits.max_stop or \
            not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of up to {limits.max_stop} of them", "stop")

    prompts = _parse_prompts(body.get("prompt", ""), tokenizer, block_size)
    if len(prompts) * n > limits.max_choices:
        raise _bad(f"{len(prompts)} prompt(s) x n={n} asks for more than {limits.max_choices} completions",
                   "n")
    return CompletionRequest(prompts=prompts, max_tokens=max_tokens, temperature=float(temperature),
                             top_p=float(top_p), top_k=top_k, n=n, seed=seed, stream=stream,
                             include_usage=include_usage, echo=echo, stop=stop)


def _parse_prompts(prompt, tokenizer, block_size):
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids.
    Returns [(text, ids)] (text is None for token prompts). The empty prompt starts like sample.py."""
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        items = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                     for p in prompt):
        items = prompt
    else:
        raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                   "token ids (none of them empty lists)", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if item:
                try:
                    ids = tokenizer.encode(item, allowed_special="all")
                except ValueError as e:
                    raise _bad(f"the prompt cannot be tokenized: {e}", "prompt") from None
            else:
                ids = _start_ids(tokenizer)
            text = item
        else:
            ids, text = list(item), None
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise _bad(f"prompt token ids must be in 0..{tokenizer.vocab_size - 1}", "prompt")
        if len(ids) > block_size:
            raise _bad(f"the prompt is {len(ids)} tokens long; this model's context is {block_size} tokens",
                       "prompt", "context_length_exceeded")
        prompts.append((text, ids))
    return prompts


def _start_ids(tokenizer):
    """What an empty prompt conditions on (as sample.py): <|endoftext|> when there is one, else a newline."""
    if getattr(tokenizer, "eot_id", None) is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n")


# ---------------------------------------------------------------------------------------------------------
# Tokens -> text, with stop strings


class TextAssembler:
    """Turns one choice's tokens into text pieces that are safe to send.

    Bytes of a character split across tokens wait for the rest of the character (incremental UTF-8
    decoder, as generate.stream_text). Text that might be the start of a stop string waits until it is known
    not to be; when a stop string appears, the text before it is the end of the completion."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""            # everything decoded (after a stop: cut at the stop string)
        self.sent = 0             # how much of self.text has been handed out
        self.stopped = False      # a stop string was found

    def add(self, token) -> str:
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release()

    def finish(self) -> str:
        """The rest of the text once no more tokens will come."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        piece = self._release()
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return piece + rest

    def _release(self) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            end = len(self.text)
        else:               # hold back the longest end of the text that could begin a stop string
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
            end = len(self.text) - hold
        piece = self.text[self.sent:end]
        self.sent = end
        return piece


# ---------------------------------------------------------------------------------------------------------
# The HTTP side


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class CompletionServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections and the model's state for the handlers."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, scheduler, tokenizer, model_name, limits, max_connections=64,
                 idle_timeout=15.0, verbose=False):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.block_size = scheduler.block_size
        self.limits = limits
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.verbose = verbose
        self.created = int(time.time())
        self.connections = 0
        self._conn_lock = threading.Lock()
        super().__init__(address, CompletionHandler)

    def process_request(self, request, client_address):
        with self._conn_lock:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if full:            # answer at once from the accepting thread, without starting a handler
            body = json.dumps(APIError(503, f"too many connections (limit {self.max_connections}); retry "
                                            "later", type_="server_error", code="too_many_connections").body())
            try:
                request.settimeout(1.0)
                request.sendall((f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                                 + body).encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1


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

    def _route(self, method):
        self._body_handled = False             # set once the request body is read (or the connection doomed)
        self._streaming = False                # set once a 200 with an event stream has begun
        if method != "POST":                   # a body nobody reads would be taken for the next request
            self._discard_body()
            self._body_handled = True
        path = self.path.split("?", 1)[0]
        routes = {"/": {"GET": self._page}, "/health": {"GET": self._health},
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
        self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")

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
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # e.g. '[' * 100000: the parser recurses once per level
            raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None

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
        choices = [{"text": "", "index": s.index, "logprobs": None, "finish_reason": None,
                    "assembler": TextAssembler(server.tokenizer, req.stop), "tokens": 0} for s in seqs]
        meta = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": server.model_name}
        try:
            if req.stream:
                self._stream(req, seqs, choices, events, meta)
            else:
                self._wait_all(req, seqs, choices, events, meta)
        finally:
            for s in seqs:                 # whatever happened, no sequence outlives its request
                s.cancel()

    def _usage(self, req, choices):
        prompt_tokens = sum(len(ids) for _, ids in req.prompts)
        completion = sum(c["tokens"] for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _events(self, seqs, choices, events):
        """Yield (choice, new text, finish_reason or None) until every choice has finished."""
        open_choices = len(choices)
        next_check = time.monotonic() + 0.1
        while open_choices:
            try:
                index, kind, value = events.get(timeout=0.05)
            except queue.Empty:
                index = None
            if time.monotonic() >= next_check:          # a few times a second: is the client still there?
                if self._client_gone():
                    raise ClientGone()
                next_check = time.monotonic() + 0.1
            if index is None:
                continue
            c = choices[index]
            if c["finish_reason"] is not None:
                continue                    # tokens after a stop string (the worker had not seen the cancel)
            if kind == "token":
                if value in seqs[index].stop_ids:
                    c["tokens"] += 1
                    continue                # <|endoftext|>: counted, never shown; "done" follows
                c["tokens"] += 1
                piece = c["assembler"].add(value)
                if c["assembler"].stopped:
                    seqs[index].cancel()
                    c["finish_reason"] = "stop"
                    open_choices -= 1
                    yield c, piece + c["assembler"].finish(), "stop"
                elif piece:
                    yield c, piece, None
            else:
                if value == "error":
                    raise APIError(500, "generation failed on the server", type_="server_error")
                reason = "length" if value in ("length", "cancelled") else value
                c["finish_reason"] = reason
                open_choices -= 1
                yield c, c["assembler"].finish(), reason

    def _prompt_text(self, req, choice):
        text, ids = req.prompts[choice["index"] // req.n]
        return text if text is not None else self.server.tokenizer.decode(ids)

    def _wait_all(self, req, seqs, choices, events, meta):
        for c, piece, _ in self._events(seqs, choices, events):
            c["text"] += piece
        out = [{"text": (self._prompt_text(req, c) if req.echo else "") + c["text"], "index": c["index"],
                "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices]
        self._send_json(200, {**meta, "choices": out, "usage": self._usage(req, choices)})

    def _stream(self, req, seqs, choices, events, meta):
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(index, text, reason):
            self._send_event({**meta, "choices": [{"text": text, "index": index, "logprobs": None,
                                                   "finish_reason": reason}]})

        if req.echo:
            for c in choices:
                chunk(c["index"], self._prompt_text(req, c), None)
        try:
            for c, piece, reason in self._events(seqs, choices, events):
                if piece or reason:
                    chunk(c["index"], piece, reason)
        except APIError as e:        # headers are gone already: report the error as an event
            self._send_event(e.body())
        if req.include_usage:
            self._send_event({**meta, "choices": [], "usage": self._usage(req, choices)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")                      # the last chunk of the chunked encoding

    # ----- writing -----
    def _send_event(self, obj):
        self._write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _write_chunk(self, data: bytes):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:                 # BrokenPipe, ConnectionReset, socket timeout (client stopped reading)
            raise ClientGone() from None

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


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


# ---------------------------------------------------------------------------------------------------------
# The page at /


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nanogpt_np</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 50rem; margin: 2rem auto; padding: 0 1rem; }
 textarea { width: 100%; height: 6rem; font-family: monospace; }
 #out { white-space: pre-wrap; font-family: monospace; border: 1px solid #ccc; padding: .5rem; min-height: 6rem; }
 #out .prompt { color: #888; }
 label { margin-right: 1rem; }
 input[type=number] { width: 5rem; }
</style></head>
<body>
<h1>nanogpt_np</h1>
<p>Model <b id="model">?</b>. Type a prompt and watch the completion stream in.</p>
<textarea id="prompt">def </textarea>
<p>
 <label>max_tokens <input id="max_tokens" type="number" value="100" min="1"></label>
 <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0" max="2"></label>
 <label>top_k <input id="top_k" type="number" value="200" min="0"></label>
 <label>top_p <input id="top_p" type="number" value="1" step="0.05" min="0.05" max="1"></label>
 <label>seed <input id="seed" type="number" value="" placeholder="random"></label>
</p>
<p><button id="go">Generate</button> <button id="stop" disabled>Stop</button> <span id="status"></span></p>
<div id="out"></div>
<script>
const $ = id => document.getElementById(id);
fetch("/v1/models").then(r => r.json()).then(j => { $("model").textContent = j.data[0].id; });
let controller = null;
$("stop").onclick = () => controller && controller.abort();
$("go").onclick = async () => {
  const body = {prompt: $("prompt").value, stream: true, stream_options: {include_usage: true},
                max_tokens: +$("max_tokens").value, temperature: +$("temperature").value,
                top_k: +$("top_k").value, top_p: +$("top_p").value};
  if ($("seed").value !== "") body.seed = +$("seed").value;
  const out = $("out");
  out.innerHTML = "";
  const p = document.createElement("span"); p.className = "prompt"; p.textContent = body.prompt; out.append(p);
  const text = document.createTextNode(""); out.append(text);
  controller = new AbortController();
  $("go").disabled = true; $("stop").disabled = false; $("status").textContent = "generating...";
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) { const j = await r.json(); throw new Error(j.error.message); }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", status = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {          // one server-sent event per blank line
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        for (const c of j.choices) {
          text.appendData(c.text);
          if (c.finish_reason) status = "finished: " + c.finish_reason;
        }
        if (j.usage) status += ", " + j.usage.completion_tokens + " tokens in " +
                               ((performance.now() - t0) / 1000).toFixed(2) + " s";
      }
    }
    $("status").textContent = status;
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    $("go").disabled = false; $("stop").disabled = true; controller = null;
  }
};
</script>
</body></html>
"""


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
                              verbose=args.verbose)
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
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.scheduler.stop()
    return 0
