"""Tiny Shakespeare with a BPE tokenizer -> data/shakespeare_bpe/.

    python data/prepare_shakespeare_bpe.py                       # trains a 1024-token BPE on the train split
    python data/prepare_shakespeare_bpe.py --vocab_size 2048
    python data/prepare_shakespeare_bpe.py --tokenizer gpt2 --gpt2_dir DIR   # GPT-2's tokenizer, as nanoGPT's shakespeare
    python data/prepare_shakespeare_bpe.py --input input.txt     # a local copy instead of the download
Any option of `python -m nanogpt_np.data.prepare` may follow. Documents, split and de-duplication as in
prepare_shakespeare_char.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_shakespeare_char import run  # noqa: E402

if __name__ == "__main__":
    run(sys.argv[1:], "shakespeare_bpe", ["--tokenizer", "bpe", "--vocab_size", "1024"])
