"""What a client may ask for: the body of POST /v1/completions, decoded and checked field by field.

Everything here is plain Python with no sockets, so every rule can be tested without a server:

    decode_json_body(raw bytes)            -> the JSON value, or APIError 400 (bad UTF-8, bad JSON, NaN, too deep)
    parse_completion_request(body, ...)    -> a CompletionRequest, or APIError 4xx for the first bad field
    Limits                                 the caps the server was started with (body size, max_tokens, n ...)
    APIError                               an error in OpenAI's shape, with its HTTP status

Defaults follow OpenAI's: max_tokens 16, temperature 1, top_p 1, n 1, a random seed. Fields OpenAI has but
this server does not implement (logprobs, best_of, suffix, penalties, logit_bias) are accepted only at their
"off" value; any other unknown field is a 400.
"""
import json
import math
import os

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

    def max_tokens_cap(self, block_size) -> int:
        """The largest max_tokens a request may ask for."""
        return self.max_tokens or block_size


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

    cap = limits.max_tokens_cap(block_size)
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
# The body as JSON


def decode_json_body(raw: bytes):
    """The request body as a JSON value; NaN and Infinity (which Python's json accepts) are refused."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # e.g. '[' * 100000: the parser recurses once per level
        raise APIError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")
