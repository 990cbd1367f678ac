"""Sample from a trained model: python sample.py --out_dir=out --prompt="def " --max_new_tokens=200"""
import sys

from nanogpt_np.sample import main

if __name__ == "__main__":
    sys.exit(main())
