"""Every op's hand-written backward against central finite differences, float64, fresh random inputs."""
import importlib

import numpy as np
import pytest

from gradcheck import check_op
from nanogpt_np import ops
from nanogpt_np.tensor import Tensor


def test_linear(rng):
    x, w, b = rng.standard_normal((2, 5, 7)), rng.standard_normal((7, 4)), rng.standard_normal(4)
    check_op(lambda x, w, b: ops.linear(x, w, b), [x, w, b], rng)


def test_linear_without_bias(rng):
    check_op(lambda x, w: ops.linear(x, w), [rng.standard_normal((6, 3)), rng.standard_normal((3, 5))], rng)


def test_lm_head(rng):
    check_op(ops.lm_head, [rng.standard_normal((2, 3, 8)), rng.standard_normal((11, 8))], rng)


def test_layernorm(rng):
    C = 9
    x = rng.standard_normal((3, 4, C)) * 3 + 1
    check_op(lambda x, w, b: ops.layernorm(x, w, b), [x, rng.standard_normal(C), rng.standard_normal(C)], rng)


def test_gelu(rng):
    check_op(ops.gelu, [rng.standard_normal((4, 13)) * 3], rng)


@pytest.mark.parametrize("B,T,n_head,hs", [(2, 5, 2, 3), (1, 7, 3, 2), (2, 1, 1, 4)])
def test_attention(rng, B, T, n_head, hs):
    qkv = rng.standard_normal((B, T, 3 * n_head * hs))
    check_op(lambda q: ops.attention(q, n_head), [qkv], rng)


@pytest.mark.parametrize("B,T,n_head,hs", [(2, 5, 2, 3), (1, 1, 1, 4)])
def test_bias_attention(rng, B, T, n_head, hs):
    """attention(x + b): the qkv bias moved into the attention op (its gradient is dx summed over rows)."""
    C3 = 3 * n_head * hs
    check_op(lambda x, b: ops.bias_attention(x, b, n_head), [rng.standard_normal((B, T, C3)), rng.standard_normal(C3)],
             rng)


def test_bias_attention_values(rng):
    x, b = rng.standard_normal((2, 4, 12)), rng.standard_normal(12)
    np.testing.assert_array_equal(ops.bias_attention(Tensor(x), Tensor(b), 2).data,
                                  ops.attention(Tensor(x + b), 2).data)


def test_attention_is_causal(rng):
    """Changing a later token must not change earlier outputs."""
    qkv = rng.standard_normal((1, 6, 12))
    out1 = ops.attention(Tensor(qkv.copy()), 2).data
    qkv[:, 4:] += 1.0
    out2 = ops.attention(Tensor(qkv), 2).data
    np.testing.assert_array_equal(out1[:, :4], out2[:, :4])
    assert not np.allclose(out1[:, 4:], out2[:, 4:])


def test_embedding(rng):
    V, Tmax, C, B, T = 7, 6, 5, 3, 4
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :2] = idx[1, 0]                       # repeated ids must add up
    check_op(lambda wte, wpe: ops.embedding(wte, wpe, idx), [rng.standard_normal((V, C)), rng.standard_normal((Tmax, C))], rng)


def test_residual_add(rng):
    check_op(ops.add, [rng.standard_normal((2, 3)), rng.standard_normal((2, 3))], rng)


def test_add_same_tensor_twice(rng):
    """x + x: the gradient of a tensor used twice is the sum of both uses."""
    from nanogpt_np.tensor import backward
    x = Tensor(rng.standard_normal((3, 2)), requires_grad=True)
    R = rng.standard_normal((3, 2))
    backward(ops.add(x, x), grad=R)
    np.testing.assert_allclose(x.grad, 2 * R)


def test_dropout(rng):
    p = 0.3
    seed = int(rng.integers(1 << 30))
    # the same seed on every call gives the same mask, so finite differences see a fixed function
    check_op(lambda x: ops.dropout(x, p, np.random.default_rng(seed)), [rng.standard_normal((5, 8))], rng)


def test_dropout_statistics(rng):
    x = np.ones((200, 200))
    y = ops.dropout(Tensor(x), 0.25, rng).data
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert abs(y.mean() - 1.0) < 0.03                 # inverted dropout keeps the expected value


@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy(rng, masked):
    N, V = 7, 5
    targets = rng.integers(0, V, size=N)
    if masked:
        targets[[1, 4]] = -1
    check_op(lambda z: ops.cross_entropy(z, targets), [rng.standard_normal((N, V)) * 2], rng)


def test_cross_entropy_value_and_mask(rng):
    """Against a direct float64 formula; masked rows do not count and get exactly zero gradient."""
    from nanogpt_np.tensor import backward
    N, V = 6, 4
    z = rng.standard_normal((N, V))
    t = rng.integers(0, V, size=N)
    t[2] = -1
    keep = t != -1
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = -logp[np.arange(N)[keep], t[keep]].mean()
    logits = Tensor(z, requires_grad=True)
    loss = ops.cross_entropy(logits, t)
    assert abs(loss.item() - expected) < 1e-12
    backward(loss)
    assert np.all(logits.grad[2] == 0.0)


def test_cross_entropy_all_masked_is_an_error():
    with pytest.raises(ValueError, match="masked"):
        ops.cross_entropy(Tensor(np.zeros((2, 3))), np.array([-1, -1]))


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 16])      # 3 does not divide N = 8; 16 > N: one chunk
@pytest.mark.parametrize("masked", [False, True])
def test_lm_head_cross_entropy(rng, chunk_rows, masked):
    """The chunked output layer + loss: gradients of x and wte against finite differences (R scales the loss,
    so the backward's d loss != 1 path is checked; the finite differences run the no-gradient forward)."""
    B, T, C, V = 2, 4, 6, 9
    targets = rng.integers(0, V, size=(B, T))
    if masked:
        targets[0, [1, 2]] = -1
        targets[1, 3] = -1
    check_op(lambda x, w: ops.lm_head_cross_entropy(x, w, targets, chunk_rows=chunk_rows),
             [rng.standard_normal((B, T, C)), rng.standard_normal((V, C))], rng)


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 64])
def test_lm_head_cross_entropy_equals_lm_head_then_cross_entropy(rng, chunk_rows):
    """Same loss, dx and dwte as ops.lm_head followed by ops.cross_entropy (float64), ignored rows included."""
    from nanogpt_np.tensor import backward
    N, C, V = 13, 5, 17
    x, w = rng.standard_normal((N, C)) * 2, rng.standard_normal((V, C))
    y = rng.integers(0, V, size=N)
    y[[0, 6, 7, 12]] = -1                         # ignored rows at chunk edges
    xs, ws = Tensor(x.copy(), requires_grad=True), Tensor(w.copy(), requires_grad=True)
    ref = ops.cross_entropy(ops.lm_head(xs, ws), y)
    backward(ref)
    xc, wc = Tensor(x.copy(), requires_grad=True), Tensor(w.copy(), requires_grad=True)
    got = ops.lm_head_cross_entropy(xc, wc, y, chunk_rows=chunk_rows)
    backward(got)
    assert abs(got.item() - ref.item()) < 1e-13 * abs(ref.item())
    np.testing.assert_allclose(xc.grad, xs.grad, rtol=0, atol=1e-14)
    np.testing.assert_allclose(wc.grad, ws.grad, rtol=0, atol=1e-14)
    assert np.all(xc.grad[[0, 6, 7, 12]] == 0.0)  # an ignored row's x gets no gradient


def test_lm_head_cross_entropy_round_logits(rng):
    """round_logits (the reference of the GPU's bf16 path) is the cross-entropy of the rounded logits: loss and
    dlogits from round_to_bf16(x @ wte.T), in float64 from there, turned into dx, dwte by the exact weights; and
    the rounding is real (a different loss than without it)."""
    from nanogpt_np.kernels.bf16 import round_to_bf16
    lmce = importlib.import_module("nanogpt_np.ops.lm_head_loss")
    ce = importlib.import_module("nanogpt_np.ops.cross_entropy")
    N, C, V = 11, 7, 23
    x, w = rng.standard_normal((N, C)) * 2, rng.standard_normal((V, C))
    y = rng.integers(0, V, size=N)
    y[[0, 5]] = -1
    loss, (dx, dwte) = lmce.lm_head_cross_entropy_forward(x, w, y, chunk_rows=4, round_logits=round_to_bf16)
    z = round_to_bf16(x @ w.T).astype(np.float64)                  # (N, V), bf16 values held in float64
    rloss, saved = ce.cross_entropy_forward(z, y, -1)
    (dz,) = ce.cross_entropy_backward(np.float64(1.0), saved)
    assert loss.dtype == np.float64 and abs(loss - rloss) < 1e-13 * abs(rloss)
    np.testing.assert_allclose(dx, dz @ w, rtol=0, atol=1e-14)
    np.testing.assert_allclose(dwte, dz.T @ x, rtol=0, atol=1e-14)
    plain, _ = lmce.lm_head_cross_entropy_forward(x, w, y, chunk_rows=4, with_grad=False)
    assert abs(plain - loss) > 1e-6 * abs(loss)


def test_lm_head_cross_entropy_without_gradients_and_errors(rng):
    """Under no_grad only the loss is computed (nothing recorded); the edge cases are cross_entropy's."""
    from nanogpt_np import tensor
    x, w = Tensor(rng.standard_normal((4, 3)), requires_grad=True), Tensor(rng.standard_normal((5, 3)))
    y = np.array([0, 4, -1, 2])
    with tensor.no_grad():
        loss = ops.lm_head_cross_entropy(x, w, y, chunk_rows=3)
    assert not tensor._tape and not loss.requires_grad
    assert abs(loss.item() - ops.cross_entropy(ops.lm_head(x, w), y).item()) < 1e-14
    tensor.clear_tape()
    with pytest.raises(ValueError, match="masked"):
        ops.lm_head_cross_entropy(x, w, np.array([-1, -1, -1, -1]))
    with pytest.raises(ValueError, match="targets"):
        ops.lm_head_cross_entropy(x, w, np.array([1, 5, 0, 0]))
    with pytest.raises(ValueError, match="chunk_rows"):
        ops.lm_head_cross_entropy(x, w, y, chunk_rows=0)


def test_residual_layernorm_both_outputs(rng):
    """Two outputs: h feeds a linear map, y is added on top, so both gradient paths are exercised."""
    C = 6
    M = Tensor(rng.standard_normal((C, C)))

    def op(x, r, w, b):
        h, y = ops.residual_layernorm(x, r, w, b)
        return ops.add(ops.linear(h, M), y)

    arrays = [rng.standard_normal((2, 3, C)), rng.standard_normal((2, 3, C)), rng.standard_normal(C), rng.standard_normal(C)]
    check_op(op, arrays, rng)


def test_residual_layernorm_with_bias_both_outputs(rng):
    """The bias of the matmul that made r, added inside: h = x + r + rb."""
    C = 6
    M = Tensor(rng.standard_normal((C, C)))

    def op(x, r, rb, w, b):
        h, y = ops.residual_layernorm(x, r, w, b, r_bias=rb)
        return ops.add(ops.linear(h, M), y)

    arrays = [rng.standard_normal((2, 3, C)), rng.standard_normal((2, 3, C)), rng.standard_normal(C),
              rng.standard_normal(C), rng.standard_normal(C)]
    check_op(op, arrays, rng)
    w, b = Tensor(rng.standard_normal(C)), Tensor(rng.standard_normal(C))
    check_op(lambda x, r, rb: ops.residual_layernorm(x, r, w, b, r_bias=rb)[0], arrays[:3], rng)   # only h used


@pytest.mark.parametrize("op_name", ["layernorm", "residual_layernorm"])
def test_layernorms_add_into_gradient_buffers(rng, op_name):
    """Parameters with gradient buffers (the model's flat_grads): the backward adds dw, db (and the residual
    bias's drb) into them on top of what they held (*_into, docs/CONTRACTS.md), the same numbers the tape gets
    without buffers, which check_op holds against finite differences. bf16_dr is a storage hint: no effect here."""
    from nanogpt_np.tensor import backward
    C = 7
    x, r = rng.standard_normal((2, 3, C)), rng.standard_normal((2, 3, C))
    params = [rng.standard_normal(C) for _ in range(3)]               # w, b, rb
    if op_name == "layernorm":
        params = params[:2]
        op = lambda x, w, b: ops.layernorm(x, w, b)
        arrays = [x] + params
    else:
        op = lambda x, r, w, b, rb: ops.add(*ops.residual_layernorm(x, r, w, b, r_bias=rb, bf16_dr=True))
        arrays = [x, r] + params
    check_op(op, arrays, rng)                                          # no buffers: returned and summed by the tape
    R = rng.standard_normal(x.shape)
    plain = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    backward(op(*plain), grad=R.copy())
    held = [rng.standard_normal(C) for _ in params]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    for t, h in zip(tensors[-len(params):], held):
        t.use_grad_buffer(h.copy())
    backward(op(*tensors), grad=R.copy())
    for t, p_, h in zip(tensors[-len(params):], plain[-len(params):], held):
        np.testing.assert_allclose(t.grad, h + p_.grad, rtol=1e-12, atol=1e-12)
    for t, p_ in zip(tensors[:-len(params)], plain[:-len(params)]):
        np.testing.assert_allclose(t.grad, p_.grad, rtol=1e-12, atol=1e-12)


def test_residual_layernorm_without_r_passes_x_through(rng):
    """r=None (the first block's ln_1): h is x itself, y = layernorm(x); both outputs used, so x's gradient is
    dh + layernorm's dx (summed by the op itself)."""
    C = 6
    M = Tensor(rng.standard_normal((C, C)))

    def op(x, w, b):
        h, y = ops.residual_layernorm(x, None, w, b)
        return ops.add(ops.linear(h, M), y)

    check_op(op, [rng.standard_normal((2, 3, C)), rng.standard_normal(C), rng.standard_normal(C)], rng)
    x, w, b = (Tensor(rng.standard_normal(s)) for s in ((3, C), C, C))
    h, y = ops.residual_layernorm(x, None, w, b)
    assert np.shares_memory(h.data, x.data) and np.array_equal(h.data, x.data)      # x itself, not a copy
    np.testing.assert_array_equal(y.data, ops.layernorm(x, w, b).data)
    with pytest.raises(ValueError, match="r_bias without r"):
        ops.residual_layernorm(x, None, w, b, r_bias=b)


def test_residual_layernorm_values(rng):
    x, r = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    h, y = ops.residual_layernorm(Tensor(x), Tensor(r), Tensor(w), Tensor(b))
    np.testing.assert_array_equal(h.data, x + r)
    np.testing.assert_allclose(y.data, ops.layernorm(Tensor(x + r), Tensor(w), Tensor(b)).data, rtol=1e-12)


def test_residual_layernorm_only_h_used(rng):
    """y unused: x and r still get h's gradient (w and b then get none, which is correct)."""
    w, b = Tensor(rng.standard_normal(4)), Tensor(rng.standard_normal(4))
    check_op(lambda x, r: ops.residual_layernorm(x, r, w, b)[0],
             [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))], rng)


def test_bias_gelu(rng):
    check_op(ops.bias_gelu, [rng.standard_normal((2, 5, 7)) * 2, rng.standard_normal(7)], rng)


def test_bias_gelu_bias_gradient_into_its_buffer(rng):
    """The bias's gradient ADDED into its gradient buffer (db_into, as the model's flat_grads): float64 finite
    differences of the loss give the buffer's increase; x's gradient is unchanged by the buffer."""
    from gradcheck import numerical_grad, relative_error
    from nanogpt_np.tensor import backward, clear_tape
    x0, b0 = rng.standard_normal((2, 5, 7)) * 2, rng.standard_normal(7)
    R, held = rng.standard_normal((2, 5, 7)), rng.standard_normal(7)
    x, b = Tensor(x0, requires_grad=True), Tensor(b0, requires_grad=True)
    buf = held.copy()
    b.use_grad_buffer(buf)
    backward(ops.bias_gelu(x, b), grad=R.copy())
    assert b.grad is buf                                       # added in place, not replaced

    def loss():
        clear_tape()
        return float((ops.bias_gelu(Tensor(x0), Tensor(b0)).data * R).sum())

    _, num_b = numerical_grad(loss, b0)
    _, num_x = numerical_grad(loss, x0)
    assert relative_error(buf - held, num_b) < 1e-6
    assert relative_error(x.grad.reshape(-1), num_x) < 1e-6


def _mlp_arrays(rng, C=5, H=12, N=(2, 3)):
    return (rng.standard_normal((*N, C)), rng.standard_normal((C, H)) * 0.5, rng.standard_normal(H),
            rng.standard_normal((H, C)) * 0.5, rng.standard_normal(C))


def test_mlp(rng):
    x, w_fc, b_fc, w_proj, b_proj = _mlp_arrays(rng)
    check_op(lambda x, w_fc, b_fc, w_proj: ops.mlp(x, w_fc, b_fc, w_proj), [x * 2, w_fc, b_fc, w_proj], rng)


def test_mlp_without_fc_bias_and_with_proj_bias(rng):
    x, w_fc, _, w_proj, b_proj = _mlp_arrays(rng)
    check_op(lambda x, w_fc, w_proj, b_proj: ops.mlp(x, w_fc, None, w_proj, b_proj), [x, w_fc, w_proj, b_proj], rng)
    check_op(lambda x, w_fc, w_proj: ops.mlp(x, w_fc, None, w_proj), [x, w_fc, w_proj], rng)


def test_mlp_gradcheck_catches_a_wrong_gelu_derivative(rng, monkeypatch):
    """Negative control: the gradcheck above fails when mlp's backward uses a wrong GELU derivative."""
    mlp_mod = importlib.import_module("nanogpt_np.ops.mlp")
    monkeypatch.setattr(mlp_mod, "bias_gelu_backward", lambda dy, saved, db_into=None: (dy, dy.sum(axis=0)))
    x, w_fc, b_fc, w_proj, _ = _mlp_arrays(rng)
    with pytest.raises(AssertionError, match="gradient mismatch"):
        check_op(lambda x, w_fc, b_fc, w_proj: ops.mlp(x, w_fc, b_fc, w_proj), [x * 2, w_fc, b_fc, w_proj], rng)


@pytest.mark.parametrize("fc_bias,proj_bias", [(True, False), (False, True), (True, True)])
def test_mlp_is_bit_for_bit_the_separate_ops(rng, fc_bias, proj_bias):
    """On the CPU the op composes the separate ops' references: float32 outputs and every gradient (added into
    gradient buffers, as in the model) are exactly those of linear, bias_gelu (or gelu), linear."""
    from nanogpt_np.tensor import backward
    x0, w_fc0, b_fc0, w_proj0, b_proj0 = [a.astype(np.float32) for a in _mlp_arrays(rng, C=8, H=32)]
    R = rng.standard_normal(x0.shape).astype(np.float32)

    def run(fn):
        ts = [Tensor(a.copy(), requires_grad=True) for a in (x0, w_fc0, b_fc0, w_proj0, b_proj0)]
        for t in ts[1:]:
            t.use_grad_buffer(np.zeros_like(t.data))
        x, w_fc, b_fc, w_proj, b_proj = ts
        y = fn(x, w_fc, b_fc if fc_bias else None, w_proj, b_proj if proj_bias else None)
        backward(y, grad=R.copy())
        return [y.data] + [t.grad for t in ts]

    def separate(x, w_fc, b_fc, w_proj, b_proj):
        m = ops.linear(x, w_fc)
        m = ops.bias_gelu(m, b_fc) if b_fc is not None else ops.gelu(m)
        return ops.linear(m, w_proj, b_proj)

    for a, b in zip(run(ops.mlp), run(separate)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_out_of_range_ids_are_errors():
    wte, wpe = Tensor(np.zeros((5, 3))), Tensor(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="token ids"):
        ops.embedding(wte, wpe, np.array([[0, -1]]))
    with pytest.raises(ValueError, match="token ids"):
        ops.embedding(wte, wpe, np.array([[0, 5]]))
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(Tensor(np.zeros((2, 5))), np.array([1, -2]))


@pytest.mark.parametrize("bad", ["w_fc rows", "w_proj rows", "b_fc", "b_proj"])
def test_mlp_refuses_shapes_that_do_not_chain(rng, bad):
    """A weight or bias of the wrong size is a clear ValueError, not a broadcast (a (1,) bias would silently be
    added to every column) or, on the GPU, a cuBLASLt matmul reading past the end of an array."""
    x, w_fc, b_fc, w_proj, b_proj = _mlp_arrays(rng)
    wrong = {"w_fc rows": dict(w_fc=w_fc[:-1]), "w_proj rows": dict(w_proj=w_proj[:-1]),
             "b_fc": dict(b_fc=b_fc[:1]), "b_proj": dict(b_proj=b_proj[:1])}[bad]
    args = {**dict(x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj), **wrong}
    with pytest.raises(ValueError, match="mlp: "):
        ops.mlp(*(Tensor(args[k]) for k in ("x", "w_fc", "b_fc", "w_proj", "b_proj")))
