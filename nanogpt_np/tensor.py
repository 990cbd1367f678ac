"""A Tensor that remembers how it was made, and a tape that replays it backwards.

How autograd works here, in four lines:
  1. Every op computes its output array and, if gradients are wanted, records one entry on the tape:
     (output tensor, input tensors, a backward function `dout -> (d_input_0, d_input_1, ...)`).
  2. The tape is a plain Python list, so it is already in the order the ops ran (a topological order).
  3. `backward(loss)` seeds d(loss)/d(loss) = 1 and walks the tape in reverse: each entry turns the gradient
     of its output into gradients of its inputs, which are summed into the inputs' `.grad` (an op may sum
     one into a parameter's gradient buffer itself: see Tensor).
  4. Gradients of intermediate tensors are freed as soon as they have been used.

Ops are coarse (a whole layernorm, a whole attention), so a step records about ten tape entries per block
(some 120 for GPT-2 small), not thousands; each op's backward is derived by hand in its file under `ops/`.
"""
import threading
from contextlib import contextmanager

from . import backend

_tape = []              # [(out, inputs, backward_fn)], in the order the ops ran
_state = threading.local()   # per thread: grad_enabled, switched off by no_grad() for evaluation and sampling


class Tensor:
    """An array plus the gradient of the loss with respect to it.

    `data` is a numpy or cupy array. `grad` is None until backward() reaches this tensor. A parameter's
    `grad` may be preset to a view into a larger buffer (see model.py); gradients are then summed into
    that buffer in place, which is how gradient accumulation over micro-batches works.

    Gradient buffers and the ops: an op's backward_fn may add an input's gradient into that input's buffer
    itself (`grad_buffer()`; ops/linear.py does, a gemm with beta = 1 on the GPU) and return None for it: the
    tape then adds nothing for that input. Same sum, one pass less, no temporary array. It must not do so for a
    tensor without a buffer (grad_buffer() is None): its gradient is returned as usual. The incoming gradient
    already carries any loss scale (backward(loss, grad=...)), so both ways add exactly the same thing.
    On the GPU a matrix's buffer may be "fresh" at the start of a step (not zeroed): its first writer overwrites
    it, a writer that can only add zeroes it first (tensor.fresh_grads; accumulate_grad does the same).

    `data_bf16`: a bf16 copy of `data` (uint16 bits) that the tensor's owner keeps current, or None. model.py
    keeps one for every parameter while matmuls run in bf16 on the GPU; the linear ops hand it to their kernel.
    """
    __slots__ = ("data", "grad", "requires_grad", "name", "_grad_is_buffer", "data_bf16")

    def __init__(self, data, requires_grad=False, name=None):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._grad_is_buffer = False
        self.data_bf16 = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def use_grad_buffer(self, buffer):
        """Sum this tensor's gradients into `buffer` (same shape), in place, from now on."""
        assert buffer.shape == self.data.shape, (buffer.shape, self.data.shape)
        self.grad = buffer
        self._grad_is_buffer = True

    def grad_buffer(self):
        """The buffer this tensor's gradients are summed into, or None (no buffer, or no gradient wanted).
        An op may add the gradient into it directly and return None for this input (see the class docstring)."""
        return self.grad if (self._grad_is_buffer and self.requires_grad) else None

    def accumulate_grad(self, g):
        """grad += g. Buffers are updated in place; other tensors get a new array (so no aliasing bugs).
        A bf16 gradient (uint16 bits, written by a GPU kernel for a bf16 reader) cannot be summed as integers:
        it may only reach a tensor that receives one gradient (ops/linear.py's bf16_dx)."""
        if getattr(g, "dtype", None) == "uint16" and (self._grad_is_buffer or self.grad is not None):
            raise TypeError(f"a bf16 gradient cannot be added to another gradient of {self!r}")
        if self._grad_is_buffer:
            fresh_grads.add(self.grad, g)
        elif self.grad is None:
            self.grad = g
        else:
            self.grad = self.grad + g

    def item(self) -> float:
        """The value of a one-element tensor as a Python float (copies it to the host)."""
        return float(backend.to_numpy(self.data).reshape(()))

    def __repr__(self):
        name = f" {self.name!r}" if self.name else ""
        return f"Tensor{name}(shape={tuple(self.shape)}, dtype={self.dtype}, requires_grad={self.requires_grad})"


class FreshGradBuffers:
    """Fresh gradient buffers: the first write of a step overwrites a parameter's gradient instead of adding to
    zeros (GPU only). The process has one, `fresh_grads`.

    A step's gradients are sums (over the ops that use a parameter, over the micro-batches), so the flat gradient
    buffer is zeroed at the start of the step and every writer adds into it. On the GPU that costs twice for the
    big matrices: the memset writes all of them (0.5 GB for GPT-2 small), and each weight-gradient gemm then
    reads the zeros back (beta = 1). A gemm can just as well write its product over the buffer (beta = 0): the same
    numbers (0 + x = x), no memset, no read.

    So on the GPU, model.zero_grad() zeroes only the small 1-D parameters' part of the buffer and marks the
    matrices' buffers FRESH: they hold nothing of this step yet (their bytes are left over from the last step).
    A host-side set, no GPU work. Every writer of a buffer that may be fresh asks first:

        a writer that writes all of it (a gemm, the wpe column sums)   should_overwrite(buffer)
            True once, for the step's first write: write over it (beta = 0); then the buffer is no longer fresh
        an array added into all of it (the tape, ops.reductions.add_into)   add(buffer, g)
            buffer += g, or a copy instead of += as the first write
        a writer that can only add, or writes part of it (the wte scatter-add)   ready_to_add(buffer)
            zeroes a fresh buffer first (a memset of that buffer alone), so it never adds to stale bytes
        anything reading the whole flat buffer (the all-reduce, clipping, AdamW)   model.finish_gradients()
            zeroes whatever nobody wrote this step (nothing, after a full backward: no GPU work)

    Correctness never depends on the order of the ops: whoever comes first overwrites or zeroes, the others add.
    Gradient accumulation needs nothing more (micro-step 0 overwrites, the later ones find the flag cleared and
    add), nor does the tied wte (the output layer writes it, the embedding's scatter-add adds to it), nor a CUDA
    graph: its capture runs the same host code as an eager step, so it records the same beta = 0 gemms and
    memsets, and every replay repeats them.

    The flags are keyed by the buffer itself (the Tensor's `.grad` view, the same object every step, which the
    ops hand to their backward as `*_into`). On the CPU nothing is ever marked: zero_grad zeroes the whole buffer
    and every question above answers "add", so the NumPy references keep their meaning exactly.
    """

    def __init__(self):
        self._fresh = {}        # id(buffer) -> buffer: the gradient buffers that hold nothing of this step yet

    def mark(self, buffers) -> None:
        """Declare these gradient buffers empty for the step now starting (their contents are stale)."""
        for buffer in buffers:
            self._fresh[id(buffer)] = buffer

    def is_fresh(self, buffer) -> bool:
        return id(buffer) in self._fresh

    def should_overwrite(self, buffer) -> bool:
        """Ask right before writing ALL of `buffer`: True if this is the step's first write (it was fresh: write
        over it, a gemm with beta = 0), False if it already holds this step's gradient (add to it, beta = 1)."""
        return self._fresh.pop(id(buffer), None) is not None

    def add(self, buffer, g) -> None:
        """buffer += g, done as buffer[...] = g when this is the step's first write of a fresh buffer (0 + g is g:
        the stale bytes are never read). The tape and ops.reductions.add_into add this way."""
        if self.should_overwrite(buffer):
            buffer[...] = g
        else:
            buffer += g

    def ready_to_add(self, buffer):
        """For a writer that can only add into `buffer` (or writes only part of it): zero it first if it is
        fresh. Returns the buffer, which now holds this step's gradient so far (zero or more)."""
        if self.should_overwrite(buffer):
            if backend.is_gpu_array(buffer):
                assert buffer.flags.c_contiguous                  # one range of bytes (a parameter's slice)
                buffer.data.memset_async(0, buffer.nbytes)      # all-zero bytes are 0.0f
            else:
                buffer[...] = 0
        return buffer

    def finish(self, buffers) -> None:
        """Zero those of `buffers` still fresh (nobody wrote them this step), so the gradients can be read."""
        for buffer in buffers:
            if self.is_fresh(buffer):
                self.ready_to_add(buffer)


fresh_grads = FreshGradBuffers()


def grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextmanager
def no_grad():
    """Run ops without recording them (evaluation, sampling): saves the memory of saved activations.
    The switch is per thread, so a server thread sampling under no_grad() does not affect training."""
    previous = grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


def record(out, inputs, backward_fn):
    """Put one op on the tape if any input needs a gradient. Returns `out` for convenience.

    backward_fn(dout) must return one gradient per input, in order (None for inputs that need none).
    An op with several outputs passes a tuple of Tensors as `out`; its backward_fn then receives a tuple of
    their gradients (None for an output that did not lead to the loss).
    """
    if grad_enabled() and any(t.requires_grad for t in inputs):
        for o in (out if isinstance(out, tuple) else (out,)):
            o.requires_grad = True
        _tape.append((out, tuple(inputs), backward_fn))
    return out


def backward(loss: Tensor, grad=None) -> None:
    """Fill `.grad` of every tensor that led to `loss`, then clear the tape.

    `loss` is normally a one-element tensor (its gradient is seeded with 1). For any other tensor pass
    `grad`, the gradient of some scalar with respect to it (the gradient checks do this)."""
    global _tape
    if grad is None:
        if loss.data.size != 1:
            raise ValueError(f"backward() needs a scalar loss or an explicit grad, got shape {loss.shape}")
        grad = backend.xp_of(loss.data).ones_like(loss.data)
    loss.grad = grad
    tape, _tape = _tape, []
    for out, inputs, backward_fn in reversed(tape):
        outs = out if isinstance(out, tuple) else (out,)
        if all(o.grad is None for o in outs):     # this op did not lead to the loss
            continue
        grads = backward_fn(tuple(o.grad for o in outs) if isinstance(out, tuple) else out.grad)
        for t, g in zip(inputs, grads):
            if g is not None and t.requires_grad:
                t.accumulate_grad(g)
        for o in outs:
            if not o._grad_is_buffer:
                o.grad = None         # free the intermediate gradient as soon as it is used


def clear_tape() -> None:
    """Drop everything recorded (for example after a forward pass whose backward is not wanted)."""
    _tape.clear()
