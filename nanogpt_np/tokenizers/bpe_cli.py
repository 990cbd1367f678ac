"""Command line for the BPE tokenizer.

    python -m nanogpt_np.tokenizers.bpe_cli train  --input corpus.txt [more.txt ...] --vocab-size 8192 --output tok.json
    python -m nanogpt_np.tokenizers.bpe_cli encode --tokenizer tok.json --input corpus.txt --output corpus.bin
    python -m nanogpt_np.tokenizers.bpe_cli encode --tokenizer ../shared/data/gpt2 --text "hello world"
    python -m nanogpt_np.tokenizers.bpe_cli decode --tokenizer tok.json 31373 995        (or --input corpus.bin)
    python -m nanogpt_np.tokenizers.bpe_cli show   --tokenizer tok.json "Hello, world!"

--tokenizer takes anything nanogpt_np.tokenizers.load.load_tokenizer reads (a tokenizer.json, or a directory
with GPT-2's encoder.json + vocab.bpe). encode writes an llm.c token shard when --output ends in .bin,
otherwise the ids as text, one line per input. Every error is printed as one line on stderr, exit code 1.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import regex

from .bpe import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, DisallowedSpecialTokenError, encode_files_parallel


def _load(path):
    from .load import load_tokenizer
    return load_tokenizer(path)


def _processes(value) -> int:
    """--processes: at least 1; more than the cores only adds overhead (100000 used to hang)."""
    if value is None:
        return os.cpu_count() or 1
    if value < 1:
        raise ValueError(f"--processes must be >= 1, got {value}")
    return min(value, os.cpu_count() or 1)


def cmd_train(args) -> None:
    specials = [] if args.no_special else (args.special or [ENDOFTEXT])
    # checked before the (long) training: a bad regex or special token would only fail at its end
    try:
        regex.compile(args.pattern)
    except regex.error as e:
        raise ValueError(f"--pattern {args.pattern!r} is not a valid regex: {e}") from None
    for special in specials:
        if not special:
            raise ValueError("--special: a special token cannot be the empty string")
    if len(set(specials)) != len(specials):
        raise ValueError(f"--special: the same token is given twice ({specials})")
    if args.vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size must be at least 256 (one id per byte) + {len(specials)} special "
                         f"tokens, got {args.vocab_size}")
    start = time.perf_counter()
    processes = _processes(args.processes)
    tok = BPETokenizer.train_from_files(args.input, args.vocab_size, pattern=args.pattern, special_tokens=specials,
                                        verbose=not args.quiet, processes=processes)
    tok.save(args.output)
    if args.gpt2_dir:
        tok.save_gpt2_files(args.gpt2_dir)
    print(f"trained {tok.vocab_size} tokens ({len(tok.merges)} merges) in {time.perf_counter() - start:.1f}s "
          f"-> {args.output}", file=sys.stderr)


def _allowed(value):
    return value if value in ("all", "none", "none_raise") else set(value.split(","))


def cmd_encode(args) -> None:
    args.processes = _processes(args.processes)
    tok = _load(args.tokenizer)
    allowed = _allowed(args.allowed_special)
    inputs = [args.text] if args.text is not None else [Path(p) for p in args.input]
    if args.output and args.output.endswith(".bin"):
        from ..data.shards import ShardWriter, dtype_for_vocab
        with ShardWriter(args.output, dtype=dtype_for_vocab(tok.vocab_size)) as writer:
            encode_files_parallel(tok, inputs, args.processes, allowed, args.append_eot,
                                  on_document=lambda index, ids: writer.write(ids))
        print(f"{writer.n_tokens} tokens -> {args.output}", file=sys.stderr)
        return
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        encode_files_parallel(tok, inputs, args.processes, allowed, args.append_eot,
                              on_document=lambda index, ids: out.write(" ".join(map(str, ids.tolist())) + "\n"))
    finally:
        if out is not sys.stdout:
            out.close()


def _read_ids(args):
    if args.ids:
        try:
            return [int(x) for x in args.ids]
        except ValueError as e:
            raise ValueError(f"ids must be integers: {e}") from None
    if args.input.endswith(".bin"):
        from ..data.shards import read_tokens
        return read_tokens(args.input)
    with open(args.input, "r", encoding="utf-8") as f:
        try:
            return [int(x) for x in f.read().split()]
        except ValueError as e:
            raise ValueError(f"{args.input}: ids must be integers separated by whitespace: {e}") from None


def cmd_decode(args) -> None:
    tok = _load(args.tokenizer)
    data = tok.decode_bytes(_read_ids(args))
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)  # the exact bytes, whatever the terminal's encoding
        sys.stdout.flush()


def cmd_show(args) -> None:
    """Print the text cut at token borders, then one line per token: id, bytes."""
    tok = _load(args.tokenizer)
    ids = tok.encode(args.text, _allowed(args.allowed_special))
    pieces = [tok.decode_bytes([i]) for i in ids]
    print("|".join(p.decode("utf-8", errors="replace") for p in pieces))
    print(f"{len(ids)} tokens for {len(args.text.encode('utf-8'))} bytes")
    for i, piece in zip(ids, pieces):
        try:
            shown = repr(piece.decode("utf-8"))
        except UnicodeDecodeError:
            shown = repr(piece) + "  (part of a character)"
        print(f"{i:>8}  {shown}")


TOKENIZER_HELP = "a tokenizer.json, or a directory with encoder.json + vocab.bpe (GPT-2's files)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_np.tokenizers.bpe_cli", description="Byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="learn a tokenizer from text files")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in total: 256 bytes + merges + special tokens")
    p.add_argument("--output", required=True, help="tokenizer JSON file to write")
    p.add_argument("--special", action="append", help=f"a special token (repeatable; default {ENDOFTEXT})")
    p.add_argument("--no-special", action="store_true", help="no special tokens at all")
    p.add_argument("--pattern", default=GPT2_PATTERN, help="pre-split regex (default: GPT-2's)")
    p.add_argument("--gpt2-dir", help="also write encoder.json + vocab.bpe into this directory")
    p.add_argument("--processes", type=int, default=None, help="processes counting chunks (default: every core)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="text -> ids")
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="UTF-8 text files (one document each)")
    source.add_argument("--text", help="a string to encode")
    p.add_argument("--output", help="FILE.bin: llm.c token shard; other names: ids as text (default: stdout)")
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: every core)")
    p.add_argument("--allowed-special", default="none_raise",
                   help="all | none (as plain text) | none_raise (default: refuse) | comma-separated tokens")
    p.add_argument("--append-eot", action="store_true", help="put <|endoftext|> after each document")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="ids -> text (raw bytes on stdout)")
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("--input", help="FILE.bin (llm.c shard) or a text file of ids")
    p.add_argument("--output", help="write the bytes here instead of stdout")
    p.add_argument("ids", nargs="*", help="ids on the command line")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("show", help="token-by-token view of a string")
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("--allowed-special", default="all")
    p.add_argument("text")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "decode" and not args.ids and not args.input:
        parser.error("decode needs ids or --input")
    try:
        args.func(args)
    except DisallowedSpecialTokenError as e:  # the library's message names the Python argument
        found = re.search(r"special token ('[^']*'|\"[^\"]*\")", str(e))
        special = found.group(1) if found else "<|endoftext|>"
        print(f"error: the text contains the special token {special}; pass --allowed-special all to encode "
              f"it as a special token, or --allowed-special none to encode it as plain text", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # TokenizerError is a ValueError; OSError: missing file etc.
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
