"""Weight gradients summed straight into the flat gradient buffer, and the model's bf16 copy of its weights.

1. ops/linear.py hands a parameter's gradient buffer to the backward (dw_into), which adds into it (a gemm with
   beta = 1 on the GPU) and returns None. The gradients must be those of the other branch of the same contract,
   where the backward returns dw and the tape adds it: parameters without buffers. Checked on the CPU and on the
   fake GPU (float32 and bf16), over 2 micro-batches weighted as the trainer weights them, with the tied wte
   (its gradient comes from the embedding, added by the tape, and from the head, added by the gemm).
2. model.flat_params_bf16: after anything writes the weights (load_params, the optimizer, fused or not), the
   next forward equals that of a fresh model holding the same weights.
"""
import math

import numpy as np
import pytest

from nanogpt_np import backend
from nanogpt_np.kernels import registry
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.optim import AdamW
from nanogpt_np.tensor import backward

CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture(params=["cpu", "gpu-float32", "gpu-bfloat16"])
def device(request, monkeypatch):
    """The CPU, or the fake GPU (tests/emulation/fake_cupy.py, NumPy kernel emulations) in one precision."""
    if request.param != "cpu":
        from emulation import fake_cupy
        fake = fake_cupy.install(monkeypatch)
        monkeypatch.setattr(backend, "_cupy", fake)
        monkeypatch.setattr(backend, "_device", "cuda")
        monkeypatch.setattr(registry, "_precision", request.param.split("-")[1])
    return request.param


def _batches(seed):
    r = np.random.default_rng(seed)
    out = []
    for n_masked in (0, 5):                               # micro-batches with different numbers of targets
        x, y = r.integers(0, CFG.vocab_size, (2, 16)), r.integers(0, CFG.vocab_size, (2, 16))
        y[0, :n_masked] = -1
        out.append((x, y))
    return out


def _gradients(model, batches, use_buffers=True):
    """{name: gradient} summed over the micro-batches, each weighted by its share of the targets (trainer)."""
    if not use_buffers:                                    # the other branch: the tape sums returned gradients
        for t in model.params.values():
            t.grad, t._grad_is_buffer = None, False
    model.zero_grad()
    counts = [int((y != -1).sum()) for _, y in batches]
    for (x, y), n in zip(batches, counts):
        _, loss = model(backend.to_device(x), backend.to_device(y))
        backward(loss, grad=backend.xp_of(loss.data).full((), n / sum(counts), loss.dtype))
    return {name: backend.to_numpy(t.grad).astype(np.float64) for name, t in model.params.items()}


def _compare(got, want, tol=1e-6):
    worst = max(np.abs(got[n] - want[n]).max() / max(np.abs(want[n]).max(), 1e-30) for n in want)
    assert worst < tol, worst


def test_buffer_gradients_equal_returned_gradients(device):
    batches = _batches(1)
    got = _gradients(GPT(CFG, seed=4), batches)
    want = _gradients(GPT(CFG, seed=4), batches, use_buffers=False)
    _compare(got, want)
    assert np.abs(got["wte.weight"]).max() > 0 and np.abs(got["h.0.attn.c_attn.weight"]).max() > 0


def test_linear_weight_gradients_go_into_the_buffer_not_through_the_tape(device, monkeypatch):
    """The tape adds nothing for a linear weight that has a buffer: the op did (and a second add would double)."""
    from nanogpt_np.tensor import Tensor
    added = []
    original = Tensor.accumulate_grad
    monkeypatch.setattr(Tensor, "accumulate_grad", lambda t, g: (added.append(t.name), original(t, g))[1])
    model = GPT(CFG, seed=4)
    x, y = _batches(1)[0]
    model.zero_grad()
    _, loss = model(backend.to_device(x), backend.to_device(y))
    backward(loss)
    assert not any(n and (n.endswith("attn.weight") or n.endswith("proj.weight") or n.endswith("c_fc.weight")
                          or n.endswith("c_attn.bias")) for n in added), added      # c_attn.bias: bias_attention
    # wte: the embedding adds its part directly (so does wpe); the chunked head + loss computes its part in the
    # forward, before d loss is known, so the tape adds that one scaled; a plain lm_head adds its part directly
    assert added.count("wte.weight") == 1 and added.count("wpe.weight") == 0
    added.clear()
    model.zero_grad()
    logits, _ = model(backend.to_device(x))
    backward(logits, grad=backend.xp_of(logits.data).ones_like(logits.data))
    assert added.count("wte.weight") == 0 and added.count("wpe.weight") == 0


def test_flash_attention_bias_gradient_goes_into_the_buffer(device, monkeypatch):
    """Head size 64, flash attention: bias_attention adds the c_attn bias gradient into its buffer (db_into; in
    bf16 a gemm of the backward kernels' per-tile column sums, beta = 1), equal to the tape's branch."""
    if device == "cpu":
        pytest.skip("flash attention is a GPU kernel")
    monkeypatch.setattr(registry, "_attention", "flash")
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=128, dropout=0.0)
    batches = _batches(2)
    got = _gradients(GPT(cfg, seed=5), batches)
    want = _gradients(GPT(cfg, seed=5), batches, use_buffers=False)
    _compare(got, want)
    assert np.abs(got["h.0.attn.c_attn.bias"]).max() > 0


def test_negative_control_overwriting_instead_of_adding_is_caught(device, monkeypatch):
    """If the backward wrote its gradient into the buffer instead of adding to it (beta = 0), the wte and the
    second micro-batch would lose what was there: the comparison above must fail."""
    lin = __import__("nanogpt_np.ops.linear", fromlist=["add_into"])

    def overwrite(buffer, g):
        if buffer is None:
            return g
        buffer[...] = g
        return None
    monkeypatch.setattr(lin, "add_into", overwrite)
    if device != "cpu":
        from nanogpt_np.kernels import precision
        gemm = precision.gemm
        monkeypatch.setattr(precision, "gemm", lambda *a, **k: gemm(*a, **{**k, "beta": 0.0}))
    batches = _batches(1)
    got = _gradients(GPT(CFG, seed=4), batches)
    want = _gradients(GPT(CFG, seed=4), batches, use_buffers=False)
    with pytest.raises(AssertionError):
        _compare(got, want)


def _summed_loss_gradients(model, batches):
    """{name: gradient} of the plain sum of the micro-batches' losses (each backward seeded with d loss = 1)."""
    model.zero_grad()
    for x, y in batches:
        _, loss = model(backend.to_device(x), backend.to_device(y))
        backward(loss)
    return {name: backend.to_numpy(t.grad).astype(np.float64) for name, t in model.params.items()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_head_gradient_added_in_the_forward_when_d_loss_is_one(device, monkeypatch, overwrite):
    """The trainer declares d loss = 1 (registry.configure(loss_is_root=True)); the GPU's chunked head + loss then
    adds its part of dwte into wte's buffer already in the forward (kernels/lm_head_loss.py: dwte_into) and the
    tape adds nothing for it. The gradients must equal those computed the other way; over two micro-batches, so
    that a first chunk that overwrote the buffer (beta = 0, the negative control) would lose the first one's part."""
    from nanogpt_np.kernels import cross_entropy, lm_head_loss
    from nanogpt_np.tensor import Tensor
    batches = _batches(2)
    want = _summed_loss_gradients(GPT(CFG, seed=4), batches)
    monkeypatch.setattr(cross_entropy, "_assume_unit_dloss", True)
    if overwrite:
        if device == "cpu":
            pytest.skip("the CPU reference never adds in the forward")
        gemm = lm_head_loss.precision.gemm
        monkeypatch.setattr(lm_head_loss.precision, "gemm",
                            lambda a, b, **k: gemm(a, b, **{**k, "beta": 0.0} if k.get("trans_a") else k))
    added = []
    original = Tensor.accumulate_grad
    monkeypatch.setattr(Tensor, "accumulate_grad", lambda t, g: (added.append(t.name), original(t, g))[1])
    got = _summed_loss_gradients(GPT(CFG, seed=4), batches)
    if overwrite:
        with pytest.raises(AssertionError):
            _compare(got, want)
        return
    _compare(got, want)
    assert added.count("wte.weight") == (2 if device == "cpu" else 0)      # the CPU's tape adds the head's part


# ---------------------------------------------------------------------------------- the bf16 copy of the weights

def _logits(model, x):
    logits, _ = model(backend.to_device(x))
    return backend.to_numpy(logits.data).astype(np.float64)


def _fresh(weights):
    fresh = GPT(CFG, seed=99)
    fresh.load_params(weights)
    return fresh


@pytest.mark.parametrize("fused", [True, False])
def test_forward_after_writes_equals_a_fresh_model(device, fused):
    """load_params, then optimizer steps (the fused kernel writes the copy; the array-code AdamW does not): each
    time the next forward equals that of a fresh model loaded with the same weights."""
    if not fused:
        registry.disable("adamw")
    try:
        x, _ = _batches(2)[0]
        model = GPT(CFG, seed=4)
        _logits(model, x)                                             # makes the bf16 copy (bf16 on the GPU)
        weights = GPT(CFG, seed=5).state_dict()
        model.load_params(weights)
        np.testing.assert_array_equal(_logits(model, x), _logits(_fresh(weights), x))
        opt = AdamW(model, lr=1e-2)
        for batches in (_batches(3), _batches(4)):
            _gradients(model, batches)
            opt.step()
            np.testing.assert_array_equal(_logits(model, x), _logits(_fresh(model.state_dict()), x))
    finally:
        registry.enable("adamw")
    if device == "gpu-bfloat16":
        assert model.flat_params_bf16 is not None and model.params["wte.weight"].data_bf16 is not None
    else:
        assert model.flat_params_bf16 is None


def test_fused_step_refreshes_the_copy_without_a_conversion_pass(device, monkeypatch):
    if device != "gpu-bfloat16":
        pytest.skip("the bf16 copy exists with bf16 matmuls on the GPU only")
    from nanogpt_np.kernels import precision
    model = GPT(CFG, seed=4)
    opt = AdamW(model, lr=1e-2)
    x, _ = _batches(2)[0]
    _gradients(model, _batches(3))                     # first forward: one conversion of the whole buffer
    conversions = []
    to_bf16 = precision.to_bf16
    monkeypatch.setattr(precision, "to_bf16", lambda a, out=None: (conversions.append(a.size), to_bf16(a, out))[1])
    opt.step()
    _logits(model, x)
    assert model.flat_params.size not in conversions   # the AdamW kernel wrote the copy as it updated


def test_negative_control_a_write_without_params_written_is_stale(device):
    """Writing flat_params behind the model's back (no params_written()) leaves the bf16 copy stale: the check
    above would see it. (With float32 matmuls there is no copy, and nothing can be stale.)"""
    if device != "gpu-bfloat16":
        pytest.skip("the bf16 copy exists with bf16 matmuls on the GPU only")
    x, _ = _batches(2)[0]
    model = GPT(CFG, seed=4)
    _logits(model, x)
    weights = GPT(CFG, seed=5).state_dict()
    for name, t in model.params.items():
        t.data[...] = backend.to_device(weights[name])          # no params_written()
    assert not np.array_equal(_logits(model, x), _logits(_fresh(weights), x))
    model.params_written()
    np.testing.assert_array_equal(_logits(model, x), _logits(_fresh(weights), x))


def test_a_bf16_gradient_is_never_summed_as_integers():
    """A bf16 gradient (uint16 bits, ops/linear.py's bf16_dx) may only reach a tensor that gets one gradient:
    summing bit patterns as integers would be silently wrong, so accumulate_grad refuses; a first one is kept."""
    from nanogpt_np.tensor import Tensor
    t = Tensor(np.zeros(3, np.float32), requires_grad=True)
    bits = np.array([0x3F80, 0x4000, 0x4040], np.uint16)           # 1, 2, 3 in bf16
    t.accumulate_grad(bits)
    assert t.grad is bits
    with pytest.raises(TypeError, match="bf16 gradient"):
        t.accumulate_grad(bits)
    p = Tensor(np.zeros(3, np.float32), requires_grad=True)
    p.use_grad_buffer(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="bf16 gradient"):
        p.accumulate_grad(bits)


# ------------------------------------------------------- fresh buffers: the step's first write overwrites (GPU)
# On the GPU, zero_grad() zeroes only the 1-D parameters' part of flat_grads and marks the matrices' gradient
# buffers fresh (FreshGradBuffers, nanogpt_np/tensor.py): their first writer overwrites them (a gemm, beta = 0),
# a writer that can only add zeroes a fresh buffer first, and finish_gradients() zeroes what nobody wrote. The
# gradient buffer is poisoned with NaN before each step, so a missed overwrite (an add to stale bytes) or a missed
# zero shows; the result must equal, bit for bit, that of the old way (the whole buffer memset, every write adds).

def _old_zero_grad(model):
    """zero_grad as it was: the whole flat buffer memset on the GPU, nothing fresh, every writer adds."""
    if backend.is_gpu_array(model.flat_grads):
        model.flat_grads.data.memset_async(0, model.flat_grads.nbytes)
    else:
        model.flat_grads[...] = 0


def _step_gradients(model, batches, *, old=False, unit_dloss=False, poison=True):
    """flat_grads (a host copy) after one step's zero_grad, forward and backward over the micro-batches (each
    weighted by its share of the targets, as the trainer does; with unit_dloss each seeded with 1, the sum of the
    losses, as under the trainer's loss_is_root) and finish_gradients. poison: NaN in the buffer first."""
    from nanogpt_np.kernels import cross_entropy
    if poison:
        model.flat_grads[...] = np.nan
    _old_zero_grad(model) if old else model.zero_grad()
    counts = [int((y != -1).sum()) for _, y in batches]
    previous = cross_entropy.assume_unit_dloss()
    cross_entropy.set_assume_unit_dloss(unit_dloss)
    try:
        for (x, y), n in zip(batches, counts):
            _, loss = model(backend.to_device(x), backend.to_device(y))
            backward(loss, grad=None if unit_dloss else backend.xp_of(loss.data).full((), n / sum(counts),
                                                                                      loss.dtype))
    finally:
        cross_entropy.set_assume_unit_dloss(previous)
    model.finish_gradients()
    return backend.to_numpy(model.flat_grads).copy()


def _assert_identical(got, want):
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    assert np.isfinite(got).all(), f"{int(np.isnan(got).sum())} NaN: a stale (poisoned) value was read"
    np.testing.assert_array_equal(got, want)         # equal values (0.0 == -0.0: beta = 0 may keep a -0.0)


@pytest.mark.parametrize("attention", ["matmul", "flash"])
@pytest.mark.parametrize("accum,unit_dloss", [(1, False), (2, False), (1, True), (2, True)])
def test_fresh_buffers_give_the_gradients_of_zeroed_ones_bit_for_bit(device, monkeypatch, accum, unit_dloss,
                                                                     attention):
    """float32 and bf16, one and two micro-batches, the head's gradient added in the forward (unit d loss, the
    trainer's loss_is_root) or in the backward, matmul and flash attention: identical gradients, and after a
    full backward nothing is left fresh (finish_gradients has no work)."""
    from nanogpt_np.tensor import fresh_grads
    if device == "cpu" and attention == "flash":
        pytest.skip("flash attention is a GPU kernel")
    monkeypatch.setattr(registry, "_attention", attention)
    cfg = CFG if attention == "matmul" else GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2,
                                                      n_embd=128, dropout=0.0)
    batches = _batches(6)[:accum]
    want = _step_gradients(GPT(cfg, seed=4), batches, old=True, unit_dloss=unit_dloss)
    model = GPT(cfg, seed=4)
    got = _step_gradients(model, batches, unit_dloss=unit_dloss)
    _assert_identical(got, want)
    again = _step_gradients(model, batches, unit_dloss=unit_dloss, poison=False)   # a second step: the buffer
    _assert_identical(again, want)                                                 # holds the first one's
    assert not any(fresh_grads.is_fresh(b) for b in model._matrix_grads)


def test_zero_grad_marks_the_matrices_fresh_on_the_gpu_only(device, monkeypatch):
    """GPU: one memset of the 1-D parameters' part, the matrices (flat_grads[:n_decay]) fresh, no GPU work for
    them; then a step's writers clear every flag. CPU: the whole buffer zeroed, nothing fresh."""
    from nanogpt_np.tensor import fresh_grads
    model = GPT(CFG, seed=4)
    model.flat_grads[...] = np.nan
    model.zero_grad()
    flat = backend.to_numpy(model.flat_grads)
    fresh = [fresh_grads.is_fresh(t.grad) for t in model.params.values()]
    if device == "cpu":
        assert not any(fresh) and not flat.any()
        return
    assert fresh == [t.grad.ndim == 2 for t in model.params.values()]
    assert np.isnan(flat[:model.n_decay]).all() and not flat[model.n_decay:].any()
    assert sum(math.prod(t.shape) for t in model.params.values() if t.grad.ndim == 2) == model.n_decay
    model.finish_gradients()                     # nobody wrote them: zeroed now (a memset per matrix)
    assert not backend.to_numpy(model.flat_grads).any() and not any(map(fresh_grads.is_fresh, model._matrix_grads))


def test_the_first_write_overwrites_and_an_adder_zeroes_first(device):
    from nanogpt_np.tensor import fresh_grads
    xp = backend.xp()
    a, b = xp.full((3, 4), np.nan, dtype=np.float32), xp.full((5,), np.nan, dtype=np.float32)
    fresh_grads.mark([a, b])
    assert fresh_grads.is_fresh(a) and fresh_grads.should_overwrite(a) and not fresh_grads.is_fresh(a)
    assert not fresh_grads.should_overwrite(a)                     # once per step
    assert fresh_grads.ready_to_add(b) is b and not backend.to_numpy(b).any() and not fresh_grads.is_fresh(b)
    b += 1.0
    fresh_grads.ready_to_add(b)                                    # no longer fresh: kept
    assert (backend.to_numpy(b) == 1.0).all()
    assert np.isnan(backend.to_numpy(a)).all()                      # the overwriting writer's job, not the flags'


def test_finish_gradients_zeroes_a_matrix_nobody_wrote(device):
    """A step whose loss does not reach a matrix (here: only a plain lm_head's logits, so no block's weights)
    leaves its buffer fresh; finish_gradients zeroes it, and without it the stale bytes would be read."""
    from nanogpt_np.tensor import fresh_grads
    model = GPT(CFG, seed=4)
    model.flat_grads[...] = np.nan
    model.zero_grad()
    x, _ = _batches(1)[0]
    h = model.params["h.0.mlp.c_fc.weight"]
    xp = backend.xp()
    from nanogpt_np import ops
    from nanogpt_np.tensor import Tensor
    out = ops.linear(Tensor(xp.ones((3, CFG.n_embd), dtype=np.float32)), model.params["h.1.mlp.c_fc.weight"])
    backward(out, grad=xp.ones(out.shape, dtype=np.float32))
    written = backend.to_numpy(model.params["h.1.mlp.c_fc.weight"].grad)
    assert (written == 3.0).all()                                   # overwritten (beta = 0 on the GPU): 0 + 3
    if device != "cpu":
        assert fresh_grads.is_fresh(h.grad) and np.isnan(backend.to_numpy(h.grad)).all()
    model.finish_gradients()
    flat = backend.to_numpy(model.flat_grads)
    assert np.isfinite(flat).all() and not backend.to_numpy(h.grad).any()
    assert not any(map(fresh_grads.is_fresh, model._matrix_grads))


def _embedding_only_gradients(model):
    """wte's and wpe's gradients from a backward through the embedding alone (out summed with weights 1):
    the wte scatter-add is then the first writer of its fresh buffer (in the model the output head is)."""
    from nanogpt_np import ops
    x, _ = _batches(7)[0]
    model.flat_grads[...] = np.nan
    model.zero_grad()
    out = ops.embedding(model.params["wte.weight"], model.params["wpe.weight"], backend.to_device(x))
    backward(out, grad=backend.xp_of(out.data).ones(out.shape, dtype=out.dtype))
    model.finish_gradients()
    counts = np.bincount(x.reshape(-1), minlength=CFG.vocab_size).astype(np.float32)     # rows never used: 0
    return (backend.to_numpy(model.params["wte.weight"].grad), backend.to_numpy(model.params["wpe.weight"].grad),
            counts, x.shape)


def test_the_wte_scatter_add_zeroes_a_fresh_buffer_first(device):
    dwte, dwpe, counts, (B, T) = _embedding_only_gradients(GPT(CFG, seed=4))
    np.testing.assert_array_equal(dwte, np.repeat(counts[:, None], CFG.n_embd, axis=1))
    want_wpe = np.zeros((CFG.block_size, CFG.n_embd), np.float32)
    want_wpe[:T] = B
    np.testing.assert_array_equal(dwpe, want_wpe)


@pytest.mark.parametrize("writer", ["gemm", "wpe", "wte"])
def test_negative_control_a_writer_that_ignores_the_flag_is_caught(device, monkeypatch, writer):
    """A weight-gradient gemm that adds (beta = 1) into a fresh buffer, the wpe kernel adding instead of writing,
    or the wte scatter-add not zeroing a fresh buffer first: the poisoned bytes show (NaN) or the gradient is lost,
    and the comparisons above fail."""
    from nanogpt_np.tensor import fresh_grads
    from nanogpt_np.kernels import encoder, linear
    if device == "cpu":
        pytest.skip("nothing is fresh on the CPU")

    class IgnoresTheFlag:                      # asks fresh_grads (clearing the flag), then adds regardless
        should_overwrite = staticmethod(lambda buffer: fresh_grads.should_overwrite(buffer) and False)
        ready_to_add = staticmethod(lambda buffer: (fresh_grads.should_overwrite(buffer), buffer)[1])
    if writer == "wte":
        monkeypatch.setattr(encoder, "fresh_grads", type("OnlyWpeAsked", (IgnoresTheFlag,), {
            "should_overwrite": staticmethod(fresh_grads.should_overwrite)}))
        dwte, dwpe, _, _ = _embedding_only_gradients(GPT(CFG, seed=4))
        assert np.isnan(dwte).any() and np.isfinite(dwpe).all()
        with pytest.raises(AssertionError):
            test_the_wte_scatter_add_zeroes_a_fresh_buffer_first(device)
        return
    batches = _batches(6)
    want = _step_gradients(GPT(CFG, seed=4), batches, old=True)
    monkeypatch.setattr(linear if writer == "gemm" else encoder, "fresh_grads", IgnoresTheFlag)
    model = GPT(CFG, seed=4)
    got = _step_gradients(model, batches)
    offset, size = model._offsets["h.0.attn.c_attn.weight" if writer == "gemm" else "wpe.weight"]
    assert np.isnan(got[offset:offset + size]).any()                 # added to the poison
    with pytest.raises(AssertionError):
        _assert_identical(got, want)
