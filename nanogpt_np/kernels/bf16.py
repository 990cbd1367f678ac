"""bfloat16 stored as uint16, converted with NumPy-generic code (works on numpy and cupy arrays).

bfloat16 is the top half of a float32: 1 sign bit, 8 exponent bits, 7 mantissa bits. Converting a float32
to bf16 therefore keeps the high 16 bits, rounded to nearest with ties to even:

    bits  = float32 bits as uint32
    lsb   = (bits >> 16) & 1            # the last bit that survives
    bits += 0x7FFF + lsb                # adds half an ulp (a tie rounds up only when lsb is 1 -> even)
    bf16  = bits >> 16

+-inf survive unchanged (0x7F800000 + 0x7FFF does not carry into the exponent) and values that round above
the largest bf16 become inf, as IEEE rounding says. NaN must not be rounded (a NaN whose mantissa sits in the
low half would carry into inf): every NaN becomes the canonical NaN 0x7FFF (sign and payload dropped). That
is what the GPU's own conversion gives (cvt.rn.bf16.f32 / __float2bfloat16_rn; NVIDIA's cuda_bf16.hpp returns
0x7FFF for a NaN on GPUs without the instruction), so bf16.cu, adamw.cu and flash_attention.cu's
cvt.rn.bf16x2.f32 all agree with this file; tests/gpu checks it against the instruction itself.

bf16 -> float32 is exact: shift the 16 bits back up.

The same two formulas are in bf16.cu for the GPU (and in flash_attention.cu via cvt.rn.bf16x2.f32, which
rounds the same way).
"""
import numpy as np

from .. import backend

CANONICAL_NAN = 0x7FFF          # the bf16 bits every NaN converts to (as the GPU's cvt.rn.bf16.f32 does)


def float32_to_bf16(x):
    """float32 array -> uint16 array of bf16 bits (round to nearest even, any NaN -> canonical NaN 0x7FFF)."""
    xp = backend.xp_of(x)
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    bits = x.view(xp.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + (0x7FFF + lsb)) >> 16).astype(xp.uint16)   # uint32 wraps only for NaN-like bits
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return xp.where(nan, xp.uint16(CANONICAL_NAN), rounded)


def bf16_to_float32(h):
    """uint16 array of bf16 bits -> float32 array (exact)."""
    xp = backend.xp_of(h)
    h = xp.asarray(h, dtype=xp.uint16)
    return (h.astype(xp.uint32) << 16).view(xp.float32)


def widen_bf16(a):
    """bf16 bits (uint16, as a GPU matmul in bf16 precision writes its output or input gradient) -> float32
    values, exactly; any other array as it is. Lets a NumPy reference stand in for a kernel that reads bf16."""
    return bf16_to_float32(a) if a.dtype == np.uint16 else a


def round_to_bf16(x):
    """float32 -> float32 holding the nearest bf16 value (what a bf16 round trip gives)."""
    return bf16_to_float32(float32_to_bf16(x))


def bf16_reference_round(x):
    """Slow, independent reference for tests: nearest bf16 by comparing both neighbours in float64.

    Works from the value, not the bit trick: truncate to the bf16 below (toward zero), take the next bf16 away
    from zero, and pick the nearer one, the one with an even last bit on a tie. Values beyond the largest bf16
    by at least half an ulp become inf. NaN -> the canonical NaN 0x7FFF.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    for i, (v, b) in enumerate(zip(x.ravel(), x.view(np.uint32).ravel())):
        b = int(b)
        if np.isnan(v):
            out.flat[i] = CANONICAL_NAN
            continue
        if np.isinf(v):
            out.flat[i] = b >> 16
            continue
        lo = b >> 16                      # truncation toward zero (same sign): the bf16 below |v|
        exp = (lo >> 7) & 0xFF
        ulp = 2.0 ** (max(exp, 1) - 127 - 7)          # bf16 spacing at this exponent (denormals: exp 0)
        a = abs(float(v))                             # float64 holds every float32 and the midpoints exactly
        below = abs(float(np.array([lo << 16], dtype=np.uint32).view(np.float32)[0]))
        d_below, d_above = a - below, below + ulp - a  # the bf16 above is below + ulp (inf past the largest)
        out.flat[i] = lo if d_below < d_above or (d_below == d_above and lo % 2 == 0) else lo + 1
    return out
