"""Central finite differences in float64, the referee for every hand-written backward."""
import numpy as np

from nanogpt_np.tensor import Tensor, backward, clear_tape


def numerical_grad(f, x, eps=1e-6, max_elements=None, rng=None):
    """d f / d x by central differences. f() -> float reads x in place. Checks a random subset of
    `max_elements` entries when given (returns them as (flat_indices, values))."""
    flat = x.reshape(-1)
    idx = np.arange(flat.size)
    if max_elements is not None and flat.size > max_elements:
        idx = (rng or np.random.default_rng()).choice(flat.size, size=max_elements, replace=False)
    out = np.empty(len(idx))
    for k, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        f_plus = f()
        flat[i] = old - eps
        f_minus = f()
        flat[i] = old
        out[k] = (f_plus - f_minus) / (2 * eps)
    return idx, out


def relative_error(a, b):
    """max |a - b| / max(|a|, |b|, tiny), the figure the tests bound by 1e-6."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-12))


def check_op(op, arrays, rng, max_elements=60, tol=1e-6):
    """Gradient-check `op(*tensors) -> Tensor` for every input array (float64) against finite differences
    of the scalar sum(op(...) * R) with a fixed random R. Returns the worst relative error."""
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = op(*tensors)
    R = rng.standard_normal(out.shape)
    backward(out, grad=R.copy())

    def scalar():
        clear_tape()
        return float((op(*[Tensor(t.data) for t in tensors]).data * R).sum())

    worst = 0.0
    for t in tensors:
        assert t.grad is not None, "an input received no gradient"
        idx, num = numerical_grad(scalar, t.data, max_elements=max_elements, rng=rng)
        ana = t.grad.reshape(-1)[idx]
        err = relative_error(ana, num)
        assert err < tol, f"gradient mismatch: relative error {err:.2e} for input of shape {t.shape}"
        worst = max(worst, err)
    return worst
