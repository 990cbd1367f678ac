import numpy as np


def rel_err(got, ref):
    """Norm-wise relative error: max |got - ref| / max |ref| (elementwise relative error is meaningless near 0)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "NaN/inf in the kernel output (an element was not written?)"
    scale = max(np.max(np.abs(ref)), 1e-30) if ref.size else 1.0
    return float(np.max(np.abs(got - ref)) / scale) if ref.size else 0.0


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]
