"""From generated tokens to what the client reads: text that is safe to send, and server-sent events.

    TextAssembler    one choice's tokens -> text pieces. Bytes of a character split across tokens wait for
                     the rest of the character; text that might begin a stop string waits until it is known
                     not to; at a stop string the completion ends just before it.
    Choice           one completion of a request: its assembler, its text and token count, how it ended
    choice_pieces    the scheduler's events for all choices of one request -> (choice, new text, finish
                     reason or None), until every choice has finished
    EventStream      server-sent events over HTTP/1.1 chunked transfer encoding, the shape OpenAI streams in:

                         data: {"id": "cmpl-...", "choices": [{"text": "de", "index": 0, ...}]}\n\n
                         data: {...}\n\n
                         data: [DONE]\n\n

The non-streaming answer uses the same pieces and joins them, so a streamed completion and a whole one are
the same text by construction.
"""
import codecs
import json
import queue
import time

from .requests import APIError


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


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


class Choice:
    """One completion being generated (request choice `index`): its text so far, its token count, how it ended."""

    def __init__(self, index, tokenizer, stop):
        self.index = index
        self.assembler = TextAssembler(tokenizer, stop)
        self.text = ""                # filled by the non-streaming answer
        self.tokens = 0               # tokens generated, <|endoftext|> included
        self.finish_reason = None     # "stop" or "length" once it has ended


def choice_pieces(seqs, choices, events, client_gone, stopping=None, poll_seconds=0.05, check_client_every=0.1):
    """Yield (choice, new text, finish_reason or None) until every choice has finished.

    seqs[i] is the batching.Sequence of choices[i]; `events` is the queue they all report to. A few times a
    second `client_gone()` is asked whether the client is still there (raises ClientGone if not). When the
    threading.Event `stopping` is set (the server is shutting down) an APIError "server_shutdown" is raised,
    so that a cut completion never looks like one that ended normally."""
    open_choices = len(choices)
    next_check = time.monotonic() + check_client_every
    while open_choices:
        if stopping is not None and stopping.is_set():
            raise APIError(503, "the server is shutting down: this completion was cut short",
                           type_="server_error", code="server_shutdown")
        try:
            index, kind, value = events.get(timeout=poll_seconds)
        except queue.Empty:
            index = None
        if time.monotonic() >= next_check:
            if client_gone():
                raise ClientGone()
            next_check = time.monotonic() + check_client_every
        if index is None:
            continue
        c = choices[index]
        if c.finish_reason is not None:
            continue                    # tokens after a stop string (the worker had not seen the cancel)
        if kind == "token":
            c.tokens += 1
            if value in seqs[index].stop_ids:
                continue                # <|endoftext|>: counted, never shown; "done" follows
            piece = c.assembler.add(value)
            if c.assembler.stopped:
                seqs[index].cancel()
                c.finish_reason = "stop"
                open_choices -= 1
                yield c, piece + c.assembler.finish(), "stop"
            elif piece:
                yield c, piece, None
        else:
            if value == "error":
                raise APIError(500, "generation failed on the server", type_="server_error")
            reason = "length" if value in ("length", "cancelled") else value
            c.finish_reason = reason
            open_choices -= 1
            yield c, c.assembler.finish(), reason


class EventStream:
    """Writes server-sent events to a response whose headers said Transfer-Encoding: chunked."""

    HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "Transfer-Encoding": "chunked"}

    def __init__(self, wfile):
        self.wfile = wfile

    def send(self, obj) -> None:
        """One event: a JSON object."""
        self._write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def close(self) -> None:
        """The [DONE] event, then the empty chunk that ends a chunked body."""
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:                 # BrokenPipe, ConnectionReset, socket timeout (client stopped reading)
            raise ClientGone() from None
