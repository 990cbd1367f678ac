"""GPU embedding (token + position): encoder.cu behind the `embedding` op contract (see ops/embedding.py)."""
import numpy as np

from ..tensor import fresh_grads
from .compile import device_array, launch
from .launch import elementwise


def embedding_forward(wte, wpe, idx):
    """wte (V, C), wpe (Tmax, C), idx (B, T) int -> out (B, T, C). All float32 cupy arrays."""
    import cupy as cp
    B, T = idx.shape
    C = wte.shape[1]
    idx32 = device_array(idx, cp.int32)
    out = cp.empty((B, T, C), dtype=cp.float32)
    if C % 4 == 0 and wte.data.ptr % 16 == 0 and wpe.data.ptr % 16 == 0:     # float4 loads need 16-byte alignment
        grid, block = elementwise(B * T * C // 4)
        launch("encoder", "encoder_forward_f4", grid, block, (out, idx32, wte, wpe, np.int32(B * T), np.int32(T), np.int32(C)))
    else:
        grid, block = elementwise(B * T * C)
        launch("encoder", "encoder_forward", grid, block, (out, idx32, wte, wpe, np.int32(B * T), np.int32(T), np.int32(C)))
    return out, (idx32, wte.shape, wpe.shape)


def embedding_backward(dout, saved, dwte_into=None, dwpe_into=None):
    """dout (B, T, C) -> dwte (V, C), dwpe (Tmax, C); deterministic (no atomics).
    dwte_into / dwpe_into: float32 gradient buffers the sums are added into (then None is returned for them);
    into a fresh one (the step's first write, tensor.fresh_grads) dwpe is written, dwte added after a memset."""
    import cupy as cp
    idx32, wte_shape, wpe_shape = saved
    B, T, C = dout.shape
    dout = cp.ascontiguousarray(dout, dtype=cp.float32)
    flat = idx32.reshape(-1)
    order = cp.argsort(flat).astype(cp.int32)     # CuPy sorts with a (stable, deterministic) radix sort
    sorted_tok = flat[order]
    # the scatter-add touches only the rows of ids that occur: a fresh buffer (tensor.fresh_grads) is zeroed first
    dwte = cp.zeros(wte_shape, dtype=cp.float32) if dwte_into is None else _buffer(dwte_into, wte_shape, True)
    launch("encoder", "encoder_backward_wte", (B * T,), (min(256, 32 * (-(-C // 32))),),
           (dwte, dout, order, sorted_tok, np.int32(B * T), np.int32(C), np.int32(dwte_into is not None)))
    # the wpe kernel writes every row (zeros past T) unless it adds: into a fresh buffer it writes (no memset)
    add_wpe = dwpe_into is not None and not fresh_grads.should_overwrite(dwpe_into)
    dwpe = cp.empty(wpe_shape, dtype=cp.float32) if dwpe_into is None else _buffer(dwpe_into, wpe_shape)
    grid, block = elementwise(wpe_shape[0] * C)
    launch("encoder", "encoder_backward_wpe", grid, block,
           (dwpe, dout, np.int32(B), np.int32(T), np.int32(wpe_shape[0]), np.int32(C), np.int32(add_wpe)))
    return (None if dwte_into is not None else dwte), (None if dwpe_into is not None else dwpe)


def _buffer(into, shape, adds=False):
    """A gradient buffer the kernel writes or adds into: it must be exactly the table's float32, C-contiguous
    layout. adds: the kernel only adds into it, so a fresh buffer is zeroed first (fresh_grads.ready_to_add)."""
    assert into.shape == tuple(shape) and into.dtype == np.float32 and into.flags.c_contiguous, \
        (into.shape, into.dtype, shape)
    return fresh_grads.ready_to_add(into) if adds else into
