"""Prepare any corpus: text files or folders, JSON, JSON Lines, CSV, gzip-compressed or not.

    python data/prepare.py --input corpus.jsonl.gz --field text --tokenizer bpe --vocab_size 4096 --out data/mine
    python data/prepare.py --input my_texts/ --text_split paragraph --tokenizer char --out data/mine
    python data/prepare.py --help            # every option
Then: python train.py --dataset=mine
This is a thin wrapper around `python -m nanogpt_np.data.prepare`; see nanogpt_np/prepare.py and data/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_np.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    main(prog="data/prepare.py")
