import numpy as np


def rel_err(got, ref, scale=None):
    """Norm-wise relative error: max |got - ref| / max |ref| (elementwise relative error is meaningless near 0).

    scale: divide by this instead, e.g. the size of related nonzero outputs when `ref` is exactly zero (a
    gradient that vanishes mathematically: the kernel's rounding noise must be small against that scale)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "NaN/inf in the kernel output (an element was not written?)"
    if scale is None:
        scale = np.max(np.abs(ref)) if ref.size else 1.0
    if not ref.size:
        return 0.0
    err = float(np.max(np.abs(got - ref)))
    if scale == 0:                  # an all-zero reference and no scale given: only an exact match passes
        return 0.0 if err == 0 else float("inf")
    return err / scale


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]
