"""Fused CUDA kernels for the GPU backend (CuPy).

Each op family has a small, commented CUDA C file (`<family>.cu`) and a Python wrapper (`<family>.py`) that
sizes the launch and exposes the same `(forward, backward)` pair as the NumPy op in `nanogpt_np/ops/`.
`registry.lookup(name)` is the only entry point the rest of the package uses; nothing here imports CuPy until a
kernel is actually asked for, so the CPU path never needs it. See README.md in this folder.
"""
