"""Test doubles for the GPU path, kept out of the installed package: a NumPy stand-in for CuPy
(`fake_cupy.py`) and a lane-by-lane NumPy replay of the flash-attention kernel (`flash_emulator.py`)."""
