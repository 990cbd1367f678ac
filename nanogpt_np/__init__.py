"""nanogpt_np: a GPT you can read, trained on NumPy (CPU) or CuPy (GPU)."""
__version__ = "0.1.0"
