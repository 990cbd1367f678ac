"""Fresh gradient buffers: the first write of a step overwrites a parameter's gradient instead of adding to zeros.

A step's gradients are sums (over the ops that use a parameter, over the micro-batches), so the flat gradient
buffer is zeroed at the start of the step and every writer adds into it. On the GPU that costs twice for the
big matrices: the memset writes all of them (0.5 GB for GPT-2 small), and each weight-gradient gemm then reads
the zeros back (beta = 1). A gemm can just as well write its product over the buffer (beta = 0): the same
numbers (0 + x = x), no memset, no read.

So on the GPU, model.zero_grad() zeroes only the small 1-D parameters' part of the buffer and marks the matrices'
buffers FRESH: they hold nothing of this step yet (their bytes are left over from the last step). A host-side
set, no GPU work. Every writer of a buffer that may be fresh asks first:

    a writer that writes all of it (a gemm, the wpe column sums)      should_overwrite(buffer)
        True once, for the step's first write: write over it (beta = 0); then the buffer is no longer fresh
    a writer that can only add (the wte scatter-add, the tape's +=)   ready_to_add(buffer)
        zeroes a fresh buffer first (a memset of that buffer alone), so it never adds to stale bytes
    anything reading the whole flat buffer (the all-reduce, clipping, AdamW)   model.finish_gradients()
        zeroes whatever nobody wrote this step (nothing, after a full backward: no GPU work)

Correctness never depends on the order of the ops: whoever comes first overwrites or zeroes, the others add.
Gradient accumulation needs nothing more (micro-step 0 overwrites, the later ones find the flag cleared and
add), nor does the tied wte (the output layer writes it, the embedding's scatter-add adds to it), nor a CUDA
graph: its capture runs the same host code as an eager step, so it records the same beta = 0 gemms and memsets,
and every replay repeats them.

The flags are keyed by the buffer itself (the Tensor's `.grad` view, the same object every step, which the ops
hand to their backward as `*_into`). On the CPU nothing is ever marked: zero_grad zeroes the whole buffer and
every question above answers "add", so the NumPy references keep their meaning exactly.
"""
from . import backend

_fresh = {}        # id(buffer) -> buffer: the gradient buffers that hold nothing of this step yet


def mark_fresh(buffers) -> None:
    """Declare these gradient buffers empty for the step now starting (their contents are stale)."""
    for buffer in buffers:
        _fresh[id(buffer)] = buffer


def is_fresh(buffer) -> bool:
    return id(buffer) in _fresh


def should_overwrite(buffer) -> bool:
    """Ask right before writing ALL of `buffer`: True if this is the step's first write (it was fresh: write over
    it, a gemm with beta = 0), False if it already holds this step's gradient (add to it, beta = 1)."""
    return _fresh.pop(id(buffer), None) is not None


def ready_to_add(buffer):
    """For a writer that can only add into `buffer` (or writes only part of it): zero it first if it is fresh.
    Returns the buffer, which now holds this step's gradient so far (zero or more)."""
    if should_overwrite(buffer):
        if backend.is_gpu_array(buffer):
            assert buffer.flags.c_contiguous                  # one range of bytes (a parameter's slice)
            buffer.data.memset_async(0, buffer.nbytes)      # all-zero bytes are 0.0f
        else:
            buffer[...] = 0
    return buffer


def finish(buffers) -> None:
    """Zero those of `buffers` still fresh (nobody wrote them this step), so the gradients can be read."""
    for buffer in buffers:
        if is_fresh(buffer):
            ready_to_add(buffer)
