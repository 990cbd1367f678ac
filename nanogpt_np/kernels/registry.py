"""Op name -> GPU (forward, backward) pair, or None when the reference composition (CuPy + cuBLAS) is used.

    from nanogpt_np.kernels import registry
    pair = registry.lookup("layernorm")      # None on a name without a kernel (linear: cuBLAS via CuPy matmul)

Importing a wrapper module is cheap; its CUDA module is compiled on the first launch (compile.module) and
cached for the process (and on disk by CuPy). Names:

  contract ops (ops/*.py):   embedding, layernorm, gelu, cross_entropy, attention
  fused extras:              residual_layernorm, bias_gelu (meaning: kernels/references.py)
  attention variants:        attention_matmul (cuBLAS + fused softmax), attention_flash (bf16 tensor cores)
  optimizer:                 adamw -> (adamw_step, global_grad_norm), not a forward/backward pair

`attention` resolves to the default variant, set_attention("matmul" | "flash") or the environment variable
NANOGPT_ATTENTION changes it. `disable(name)` / `enable(name)` switch single kernels off for A/B checks.
"""
import importlib
import os

_TABLE = {
    "embedding": ("encoder", "embedding_forward", "embedding_backward"),
    "layernorm": ("layernorm", "layernorm_forward", "layernorm_backward"),
    "residual_layernorm": ("layernorm", "residual_layernorm_forward", "residual_layernorm_backward"),
    "gelu": ("gelu", "gelu_forward", "gelu_backward"),
    "bias_gelu": ("gelu", "bias_gelu_forward", "bias_gelu_backward"),
    "cross_entropy": ("cross_entropy", "cross_entropy_forward", "cross_entropy_backward"),
    "attention_matmul": ("softmax_attention", "attention_forward", "attention_backward"),
    "attention_flash": ("flash_attention", "attention_forward", "attention_backward"),
    "adamw": ("adamw", "adamw_step", "global_grad_norm"),
}

# The default until a GPU benchmark says otherwise: the matmul form is exact float32 (TF32 if enabled);
# flash runs its matmuls in bf16 (set_attention("flash") or NANOGPT_ATTENTION=flash).
_attention = os.environ.get("NANOGPT_ATTENTION", "matmul")
_disabled = set()
_cache = {}


def names():
    return sorted(set(_TABLE) | {"attention"})


def set_attention(kind: str) -> None:
    global _attention
    if kind not in ("matmul", "flash"):
        raise ValueError("attention kind must be 'matmul' or 'flash'")
    _attention = kind


def attention_kind() -> str:
    return _attention


def disable(name: str) -> None:
    _disabled.add(name)


def enable(name: str) -> None:
    _disabled.discard(name)


def resolve(name: str):
    """The table key an op name maps to (attention -> attention_<kind>), or None."""
    if name == "attention":
        name = "attention_" + _attention
    return name if name in _TABLE else None


def lookup(name: str):
    """(forward, backward) for op `name` on the GPU, or None to use the reference."""
    if name in _disabled:
        return None
    key = resolve(name)
    if key is None or key in _disabled:
        return None
    pair = _cache.get(key)
    if pair is None:
        mod_name, f, b = _TABLE[key]
        mod = importlib.import_module(f"{__package__}.{mod_name}")
        pair = (getattr(mod, f), getattr(mod, b))
        _cache[key] = pair
    return pair
