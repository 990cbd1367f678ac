"""Tiny Shakespeare at the character level -> data/shakespeare_char/ (as nanoGPT's shakespeare_char).

    python data/prepare_shakespeare_char.py                  # downloads the text (1.1 MB) once
    python data/prepare_shakespeare_char.py --input input.txt  # or use a local copy
Any option of `python -m nanogpt_np.prepare` may follow (e.g. --val_fraction 0.05).

Differences from nanoGPT: documents are the blank-line separated speeches, and val is ~10% of them
chosen by a seeded hash (nanoGPT takes the last 10% of the characters). De-duplication is off: short
repeated speeches ("ROMEO:\\nAy.") are part of the play, not web copies.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanogpt_np.prepare import download, main  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def shakespeare_text(argv, out):
    """(path of the text, remaining argv): --input PATH, a local copy next to the repo, or a download."""
    if "--input" in argv:
        i = argv.index("--input")
        return argv[i + 1], argv[:i] + argv[i + 2:]
    for local in (os.path.join(out, "input.txt"), os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")):
        if os.path.isfile(local):
            return local, argv
    return download(URL, os.path.join(out, "input.txt")), argv


def run(argv, name, tokenizer_args):
    out = os.path.join(REPO, "data", name)
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
    path, argv = shakespeare_text(argv, out)
    defaults = ["--input", path, "--out", out, "--text_split", "paragraph",
                "--dedup_exact", "false", "--dedup_near", "false", *tokenizer_args]
    main(defaults + argv, prog=os.path.basename(sys.argv[0]))


if __name__ == "__main__":
    run(sys.argv[1:], "shakespeare_char", ["--tokenizer", "char"])
