"""Tiny Shakespeare at the character level -> data/shakespeare_char/ (as nanoGPT's shakespeare_char).

    python data/prepare_shakespeare_char.py                  # downloads the text (1.1 MB) once
    python data/prepare_shakespeare_char.py --input input.txt  # or use a local copy
Any option of `python -m nanogpt_np.data.prepare` may follow (e.g. --val_fraction 0.05).

Differences from nanoGPT: documents are the blank-line separated speeches, and val is ~10% of them
chosen by a seeded hash (nanoGPT takes the last 10% of the characters). De-duplication is off: short
repeated speeches ("ROMEO:\\nAy.") are part of the play, not web copies.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanogpt_np.data.prepare import download, main  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def shakespeare_text(out):
    """The path of the text: a local copy next to the repo or in out/, else a download to out/input.txt."""
    for local in (os.path.join(out, "input.txt"), os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")):
        if os.path.isfile(local):
            return local
    return download(URL, os.path.join(out, "input.txt"))


def run(argv, name, tokenizer_args):
    prog = os.path.basename(sys.argv[0])
    # our own two options; everything else goes to nanogpt_np.data.prepare (which also prints --help)
    own = argparse.ArgumentParser(prog=prog, add_help=False)
    own.add_argument("--input", help="a local copy of the text (default: download it)")
    own.add_argument("--out", default=os.path.join(REPO, "data", name))
    args, rest = own.parse_known_args(argv)
    if args.input is not None:
        path = args.input
    elif "-h" in rest or "--help" in rest:
        path = os.path.join(args.out, "input.txt")  # only shown: nothing is downloaded for --help
    else:
        try:
            path = shakespeare_text(args.out)
        except OSError as e:  # no network and no local copy: download() says to pass --input PATH
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    defaults = ["--text_split", "paragraph", "--dedup_exact", "false", "--dedup_near", "false", *tokenizer_args]
    main(defaults + rest, prog=prog, defaults={"input": [path], "out": args.out})


if __name__ == "__main__":
    run(sys.argv[1:], "shakespeare_char", ["--tokenizer", "char"])
