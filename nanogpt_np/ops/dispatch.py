"""Choose, per call, between an op's NumPy-generic reference and a fused CUDA kernel.

Each op family in this package defines `NAME_forward(...) -> (out, saved)` and `NAME_backward(dout, saved)`.
Written with `xp = backend.xp_of(x)`, the reference pair runs on numpy and on cupy alike. On the GPU a fused
kernel may replace it: `nanogpt_np.kernels.registry.lookup(NAME)` returns a pair with the same calling
convention (its `saved` may hold different things), or None when there is no kernel for NAME.
"""
from .. import backend

_use_kernels = True


def set_use_kernels(flag: bool) -> None:
    """Turn the fused GPU kernels off (for A/B checks against the reference composition)."""
    global _use_kernels
    _use_kernels = bool(flag)


def implementation(name, array, reference_forward, reference_backward):
    """The (forward, backward) pair to use for an op whose main input is `array`."""
    if _use_kernels and backend.is_gpu_array(array):
        from ..kernels import registry      # imported only on the GPU path
        fused = registry.lookup(name)
        if fused is not None:
            return fused
    return reference_forward, reference_backward
