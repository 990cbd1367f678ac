"""The embedded default corpus (Python's own documentation, no download) -> data/pydocs/.

    python data/prepare_pydocs.py                                   # character level, like train.py's default
    python data/prepare_pydocs.py --tokenizer bpe --vocab_size 512
Any option of `python -m nanogpt_np.data.prepare` may follow. Each help() topic and each module's docstrings
is one document; val is ~10% of the documents by a seeded hash. train.py builds this corpus in memory
when data/pydocs/ does not exist, so preparing it is optional (it makes the split by document and the
cleaning report visible).
"""
import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanogpt_np.data.prepare import main  # noqa: E402


def write_corpus_jsonl(path):
    from nanogpt_np.data.corpus import default_corpus_documents  # imported here: builds ~1 MB of text
    with open(path, "w", encoding="utf-8") as f:
        for doc in default_corpus_documents():
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    own = argparse.ArgumentParser(add_help=False)  # --out here; every other option goes to nanogpt_np.data.prepare
    own.add_argument("--out", default=os.path.join(REPO, "data", "pydocs"))
    args, rest = own.parse_known_args(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "pydocs.jsonl")
        if "-h" not in rest and "--help" not in rest:
            write_corpus_jsonl(src)
        # html never: the docs talk about HTML tags (html module) and must keep them as text
        main(["--tokenizer", "char", "--html", "never"] + rest, prog="prepare_pydocs.py",
             defaults={"input": [src], "out": args.out})
