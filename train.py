"""Train a GPT. With no arguments: a small model on the embedded corpus (Python's own docs), on the CPU.

    python train.py                                   # defaults (see nanogpt_np/config.py)
    python train.py --preset=quick                    # a one-minute run
    python train.py --dataset=shakespeare_char --max_iters=2000 --out_dir=out-shakespeare
    python train.py --out_dir=out --resume            # continue an interrupted run exactly
    python train.py --help                            # every setting and its default
"""
import sys

from nanogpt_np.trainer import main

if __name__ == "__main__":
    sys.exit(main())
