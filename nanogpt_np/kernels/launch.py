"""Launch-configuration arithmetic shared by the kernel wrappers. Pure Python: tested on the CPU.

Every function here returns plain ints/tuples, so tests/test_kernel_references.py can check that a grid covers
every element exactly once and that shared-memory requests stay within the default 48 KB.
"""
import math

import numpy as np

NULL = np.uint64(0)                 # a null pointer argument for a CuPy RawKernel launch
SMEM_DEFAULT = 48 * 1024            # shared memory a block may use without opting in


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def elementwise(n: int, block: int = 256):
    """(grid, block) for one thread per element."""
    return (max(1, ceil_div(n, block)),), (block,)


def rows_per_warp(n_rows: int, warps_per_block: int = 8):
    """(grid, block) for one warp per row."""
    return (max(1, ceil_div(n_rows, warps_per_block)),), (32 * warps_per_block,)


def layernorm_backward_config(N: int, C: int, num_sms: int, blocks_per_sm: int = 4, n_sums: int = 2):
    """-> (warps per block, rows per block, number of blocks, dynamic shared bytes).

    Each warp keeps n_sums private rows of C floats in shared memory (dw, db, and with n_sums=3 the column sum
    of dx): 4*n_sums*C bytes per warp, at most 48 KB, so at most 8 warps and at least 1. The grid aims at
    blocks_per_sm blocks per SM; each block takes a contiguous run of rows, the last one possibly shorter.
    Depends only on (N, C, num_sms, n_sums): the same device always sums in the same order.
    """
    per_warp = 4 * n_sums * C
    nw = max(1, min(8, SMEM_DEFAULT // per_warp))
    if per_warp * nw > SMEM_DEFAULT:
        raise ValueError(f"layernorm backward: C={C} needs more than 48 KB of shared memory per warp")
    target = max(1, num_sms * blocks_per_sm)
    rows_per_block = max(nw, ceil_div(N, target))
    nblocks = ceil_div(N, rows_per_block)
    return nw, rows_per_block, nblocks, per_warp * nw


def column_chunks(N: int, C: int, num_sms: int, ry: int = 8, blocks_per_sm: int = 8):
    """-> (grid (x, y), block (32, ry), rows per chunk) for a fused column sum over an (N, C) matrix."""
    gx = ceil_div(C, 32)
    want_y = max(1, ceil_div(num_sms * blocks_per_sm, gx))
    rows_per_chunk = max(ry, ceil_div(N, want_y))
    gy = ceil_div(N, rows_per_chunk)
    return (gx, gy), (32, ry), rows_per_chunk


def adamw_bias_corrections(beta1: float, beta2: float, step: int):
    """(1 - beta1^step, 1 - beta2^step), the Adam bias corrections for step >= 1."""
    if step < 1:
        raise ValueError("AdamW step counts from 1")
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


NORM_BLOCKS = 1024                  # fixed grid of the sum-of-squares pass: the sum order never changes


FLASH_QUERY_BLOCK = 128            # rows per block of flash_attention.cu's kernels (8 warps of 16): query rows of
                                   # the forward and dq, key rows of dkdv


def flash_padded_T(T: int, block: int = FLASH_QUERY_BLOCK) -> int:
    """Sequence length rounded up to the flash-attention query block: the row count of its L2 and D (rows past T
    read as zero). A multiple of 128, so also of the 64-row tiles the kernels stage in shared memory."""
    return ceil_div(T, block) * block


def flash_launch(Tp: int, batch_heads: int):
    """(grid, block) of the three flash-attention kernels: a block per 128 rows of one (batch, head), a warp per
    16 of its rows. Tp: flash_padded_T(T)."""
    return (Tp // FLASH_QUERY_BLOCK, batch_heads), (32 * FLASH_QUERY_BLOCK // 16,)


def attention_flops(B: int, T: int, C: int, causal: bool = True) -> float:
    """Matmul FLOPs of attention forward (QK^T and PV), halved for the causal mask."""
    f = 2 * 2 * B * T * T * C
    return f / 2 if causal else f


def device_bytes(*shapes_dtypes) -> int:
    """Total bytes of (shape, dtype) pairs: the minimal traffic a memory-bound kernel must move."""
    return int(sum(math.prod(s) * np.dtype(d).itemsize for s, d in shapes_dtypes))
