"""Files in and out: atomic writes (files.py), the safetensors format (safetensors.py), run directories
with their checkpoints (checkpoint.py), and Hugging Face GPT-2 folders (hf_gpt2.py). No pickle anywhere."""
