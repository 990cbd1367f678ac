"""The fake CuPy (tests/emulation/fake_cupy.py) held to real CuPy, and the host-side CuPy calls of the package.

The CPU tests of the GPU path run on the fake, so the fake must accept exactly what CuPy accepts: the same
function names, signatures and constants, and CuPy's kernel-argument rules (a device array passes its raw
pointer, whatever its strides; a host NumPy array passes its value when it has one element and is refused
otherwise). Where real CuPy is installed (it imports without a GPU), test_fake_matches_real_cupy compares the
two directly; without it that one test skips and the rest still pin the fake down to what CuPy 14 does.
"""
import numpy as np
import pytest


@pytest.fixture
def fake_cp(monkeypatch):
    from emulation import fake_cupy
    return fake_cupy.install(monkeypatch)


def test_set_tf32_uses_cupys_two_argument_set_compute_type(fake_cp):
    """precision.set_tf32 once called set_compute_type(compute_type): a TypeError on real CuPy at the first
    GPU test (the session fixture calls it)."""
    from cupy._core import _routines_linalg as lin
    from nanogpt_np.kernels import precision
    with pytest.raises(TypeError):
        lin.set_compute_type(lin.COMPUTE_TYPE_TF32)            # one argument: refused, as CuPy refuses it
    precision.set_tf32(True)
    assert lin.get_compute_type(np.float32) == lin.COMPUTE_TYPE_TF32 == 7
    precision.set_tf32(False)
    assert lin.get_compute_type(np.float32) == lin.COMPUTE_TYPE_DEFAULT == 1
