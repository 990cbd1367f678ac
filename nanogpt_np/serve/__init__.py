"""An OpenAI-style HTTP completions API (server.py) with continuous batching over one KV cache
(batching.py). Run it with `python -m nanogpt_np.serve --out_dir=out`."""
