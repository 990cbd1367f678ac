"""bf16 conversion helpers (kernels/bf16.py) against an independent NumPy reference.

Round to nearest even, ties, carries into the exponent, overflow to inf, denormals, signed zeros, inf, NaN.
"""
import numpy as np
import pytest

from nanogpt_np.kernels.bf16 import bf16_reference_round, bf16_to_float32, float32_to_bf16, round_to_bf16


def f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def test_random_values_match_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).astype(np.float32),
                        f32(rng.integers(0, 2**32, 3000, dtype=np.uint64).astype(np.uint32))])
    np.testing.assert_array_equal(float32_to_bf16(x), bf16_reference_round(x))


def test_ties_round_to_even():
    # 1 + 2^-8 is exactly halfway between bf16 1.0 (0x3F80, even) and 1 + 2^-7 (0x3F81): rounds down to even.
    # 1 + 3*2^-8 is halfway between 0x3F81 (odd) and 0x3F82 (even): rounds up.
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], dtype=np.float32)
    np.testing.assert_array_equal(float32_to_bf16(x), np.array([0x3F80, 0x3F82, 0xBF80, 0x3F81], np.uint16))


def test_carry_into_exponent_and_overflow():
    x = f32([0x3FFFFFFF,      # just below 2.0: rounds up, carrying into the exponent -> 2.0 (0x4000)
             0x7F7FFFFF,      # float32 max: above the largest bf16 by more than half an ulp -> +inf
             0x7F7F7FFF,      # just below the midpoint: stays at the largest bf16 0x7F7F
             0x7F7F8000,      # exactly the midpoint, odd last bit -> rounds to even = inf
             0xFF7FFFFF])     # -float32 max -> -inf
    np.testing.assert_array_equal(float32_to_bf16(x), np.array([0x4000, 0x7F80, 0x7F7F, 0x7F80, 0xFF80], np.uint16))


def test_specials():
    x = f32([0x00000000, 0x80000000, 0x7F800000, 0xFF800000,
             0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF80FFFF,   # NaNs, incl. ones that would carry
             0x00000001, 0x00008000, 0x00018000, 0x807FFFFF])             # denormals
    got = float32_to_bf16(x)
    np.testing.assert_array_equal(got[:4], np.array([0x0000, 0x8000, 0x7F80, 0xFF80], np.uint16))
    np.testing.assert_array_equal(got[4:9], np.full(5, 0x7FFF, np.uint16))        # the GPU's canonical NaN
    assert np.isnan(bf16_to_float32(got[4:9])).all()
    np.testing.assert_array_equal(got[9:], bf16_reference_round(x[9:]))
    np.testing.assert_array_equal(got[9:], np.array([0x0000, 0x0000, 0x0002, 0x8080], np.uint16))


def test_round_trip_exact_and_idempotent():
    every = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    f = bf16_to_float32(every)
    finite = ~np.isnan(f)
    np.testing.assert_array_equal(float32_to_bf16(f)[finite], every[finite])   # bf16 -> f32 -> bf16 exact
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    r = round_to_bf16(x)
    np.testing.assert_array_equal(round_to_bf16(r), r)
    assert np.max(np.abs(r - x) / np.abs(x)) <= 2.0 ** -8                        # half a bf16 ulp, relative


def test_shapes_and_dtypes():
    x = np.ones((3, 4, 5), dtype=np.float64)           # converted to float32 first
    h = float32_to_bf16(x)
    assert h.shape == (3, 4, 5) and h.dtype == np.uint16
    assert bf16_to_float32(h).dtype == np.float32
    np.testing.assert_array_equal(bf16_to_float32(h), x.astype(np.float32))


# ------------------------------------------------------------- the device conversion in bf16.cu and adamw.cu

@pytest.mark.parametrize("source_name", ["bf16", "adamw"])
def test_device_conversion_matches_numpy(source_name, tmp_path):
    """The kernels' own f32 -> bf16 function, compiled for the host (integer bit operations only, so the host
    computes what the GPU computes), against kernels/bf16.py on every special case and random bit patterns.
    The NaN case failed before: the kernels kept the payload ((u >> 16) | 0x40), the NumPy side did not."""
    import ctypes
    from emulation import device_functions
    if device_functions.compiler() is None:
        pytest.skip("no host C++ compiler")
    lib = device_functions.build(tmp_path, source_name, ["f32_to_bf16_rne"], """
extern "C" void convert(const float* in, unsigned short* out, long n) {
    for (long i = 0; i < n; i++) out[i] = f32_to_bf16_rne(in[i]);
}
""")
    convert = lib.convert
    rng = np.random.default_rng(3)
    bits = np.concatenate([
        np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF80FFFF, 0x7FA00000, 0xFFFFFFFF,
                  0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F7F8000, 0x00008000, 0], np.uint32),
        rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    out = np.empty(x.shape, np.uint16)
    convert(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(x.size))
    np.testing.assert_array_equal(out, float32_to_bf16(x))
