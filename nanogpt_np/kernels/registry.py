"""Op name -> GPU (forward, backward) pair, or None when the reference composition (CuPy + cuBLAS) is used.

    from nanogpt_np.kernels import registry
    pair = registry.lookup("layernorm")      # None on a name without a kernel

Importing a wrapper module is cheap; its CUDA module is compiled on the first launch (compile.module) and
cached for the process (and on disk by CuPy). Names:

  contract ops (ops/*.py):   embedding, layernorm, gelu, cross_entropy, attention, bias_attention,
                             linear, lm_head,
                             lm_head_cross_entropy (chunked output layer + loss; bf16 or float32 gemms by precision)
  fused extras:              residual_layernorm, bias_gelu (meaning: kernels/references.py)
  mlp:                       c_fc + GELU + mlp.c_proj (ops/mlp.py); in bf16 the GELU rides on cuBLASLt epilogues
                             (kernels/mlp.py; disable("mlp_epilogue") keeps the separate kernels)
  attention variants:        attention_matmul (cuBLAS + fused softmax), attention_flash (bf16 tensor cores),
                             and bias_attention_matmul / bias_attention_flash (the qkv bias added inside)
  optimizer:                 adamw -> (adamw_step, global_grad_norm), not a forward/backward pair
  linear, lm_head:           one cuBLAS gemm per product (kernels/linear.py), float32/TF32 by default,
                             bf16 with float32 accumulation after set_precision("bfloat16")

`attention` resolves to the default variant, set_attention("matmul" | "flash") or the environment variable
NANOGPT_ATTENTION changes it. `disable(name)` / `enable(name)` switch single kernels off for A/B checks.
"""
import importlib
import os

import numpy as np

# The NumPy-generic reference of each kernel: used instead when an array is not float32 (the float64
# gradient checks run on the GPU too) - the guard below keeps the kernels from misreading other dtypes.
_REFERENCE = {
    "embedding": ("nanogpt_np.ops.embedding", "embedding_forward", "embedding_backward"),
    "layernorm": ("nanogpt_np.ops.layernorm", "layernorm_forward", "layernorm_backward"),
    "residual_layernorm": ("nanogpt_np.kernels.references", "residual_layernorm_forward", "residual_layernorm_backward"),
    "gelu": ("nanogpt_np.ops.gelu", "gelu_forward", "gelu_backward"),
    "bias_gelu": ("nanogpt_np.kernels.references", "bias_gelu_forward", "bias_gelu_backward"),
    "cross_entropy": ("nanogpt_np.ops.cross_entropy", "cross_entropy_forward", "cross_entropy_backward"),
    "lm_head_cross_entropy": ("nanogpt_np.ops.lm_head_loss", "lm_head_cross_entropy_forward",
                              "lm_head_cross_entropy_backward"),
    "attention_matmul": ("nanogpt_np.ops.attention", "attention_forward", "attention_backward"),
    "attention_flash": ("nanogpt_np.ops.attention", "attention_forward", "attention_backward"),
    "bias_attention_matmul": ("nanogpt_np.ops.attention", "bias_attention_forward", "bias_attention_backward"),
    "bias_attention_flash": ("nanogpt_np.ops.attention", "bias_attention_forward", "bias_attention_backward"),
    "linear": ("nanogpt_np.ops.linear", "linear_forward", "linear_backward"),
    "lm_head": ("nanogpt_np.ops.linear", "lm_head_forward", "lm_head_backward"),
    "mlp": ("nanogpt_np.ops.mlp", "mlp_forward", "mlp_backward"),
}

_TABLE = {
    "embedding": ("encoder", "embedding_forward", "embedding_backward"),
    "layernorm": ("layernorm", "layernorm_forward", "layernorm_backward"),
    "residual_layernorm": ("layernorm", "residual_layernorm_forward", "residual_layernorm_backward"),
    "gelu": ("gelu", "gelu_forward", "gelu_backward"),
    "bias_gelu": ("gelu", "bias_gelu_forward", "bias_gelu_backward"),
    "cross_entropy": ("cross_entropy", "cross_entropy_forward", "cross_entropy_backward"),
    "lm_head_cross_entropy": ("lm_head_loss", "lm_head_cross_entropy_forward", "lm_head_cross_entropy_backward"),
    "attention_matmul": ("softmax_attention", "attention_forward", "attention_backward"),
    "attention_flash": ("flash_attention", "attention_forward", "attention_backward"),
    "bias_attention_matmul": ("softmax_attention", "bias_attention_forward", "bias_attention_backward"),
    "bias_attention_flash": ("flash_attention", "bias_attention_forward", "bias_attention_backward"),
    "adamw": ("adamw", "adamw_step", "global_grad_norm"),
    "linear": ("linear", "linear_forward", "linear_backward"),
    "lm_head": ("linear", "lm_head_forward", "lm_head_backward"),
    "mlp": ("mlp", "mlp_forward", "mlp_backward"),
}

# The default until a GPU benchmark says otherwise: the matmul form is exact float32 (TF32 if enabled);
# flash runs its matmuls in bf16 (set_attention("flash") or NANOGPT_ATTENTION=flash).
_attention = os.environ.get("NANOGPT_ATTENTION", "matmul")
_tf32 = False                 # float32 matmuls on TF32 tensor cores (configure(tf32=...); CuPy's default is off)
_precision = "float32"        # "bfloat16": linear and lm_head multiply in bf16 (kernels/linear.py)
_disabled = set()
_cache = {}


def names():
    return sorted(set(_TABLE) | {"attention", "bias_attention"})


def set_attention(kind: str) -> None:
    global _attention
    if kind not in ("matmul", "flash"):
        raise ValueError("attention kind must be 'matmul' or 'flash'")
    _attention = kind


def attention_kind() -> str:
    return _attention


def configure(*, attention=None, dtype=None, tf32=None, loss_is_root=None, logits_reusable=None) -> None:
    """One call for the trainer to set the GPU options (None leaves an option as it is):
    attention "matmul" | "flash" (None with dtype="bfloat16": flash, unless NANOGPT_ATTENTION says otherwise);
    dtype "float32" | "bfloat16" (matmul precision of linear/lm_head);
    tf32 (CuPy's float32 matmuls on TF32 tensor cores); loss_is_root (the loss's incoming gradient is 1, so the
    cross-entropy backwards (cross_entropy, lm_head_cross_entropy) skip their scaling pass; false with gradient accumulation that scales the seed);
    logits_reusable=False lets the cross-entropy gradient overwrite the logits buffer (training steps)."""
    if attention is None and dtype == "bfloat16" and "NANOGPT_ATTENTION" not in os.environ:
        attention = "flash"          # bf16 training: flash attention, as precision.py's policy says
    if attention is not None:
        set_attention(attention)
    if dtype is not None:
        set_precision(dtype)
    if tf32 is not None:
        global _tf32
        from .precision import set_tf32
        set_tf32(tf32)
        _tf32 = bool(tf32)
    if loss_is_root is not None or logits_reusable is not None:
        from . import cross_entropy
        if loss_is_root is not None:
            cross_entropy.set_assume_unit_dloss(loss_is_root)
        if logits_reusable is not None:
            cross_entropy.set_inplace(not logits_reusable)


def describe() -> str:
    """One line saying which GPU kernels are in use (the trainer prints it)."""
    att = ("flash (bf16 tensor cores, head size 64; other head sizes fall back to matmul)"
           if _attention == "flash" else "matmul (cuBLAS + fused softmax)")
    mm = ("bf16 (fp32 accumulation; inputs written in bf16 by the kernels before them)" if bf16_activations()
          else "bf16 (fp32 accumulation)") if _precision == "bfloat16" else f"float32 (cuBLAS{', TF32' if _tf32 else ''})"
    off = f", disabled: {', '.join(sorted(_disabled))}" if _disabled else ""
    return f"GPU kernels: attention {att}; linear/lm_head matmuls {mm}{off}"


def set_precision(dtype: str) -> None:
    """'float32' (default) or 'bfloat16': with bfloat16 the ops "linear" and "lm_head" run their matmuls in
    bf16 with float32 accumulation (master weights, optimizer state and all other kernels stay float32)."""
    global _precision
    if dtype not in ("float32", "bfloat16"):
        raise ValueError("precision must be 'float32' or 'bfloat16'")
    _precision = dtype


def precision() -> str:
    return _precision


def bf16_activations() -> bool:
    """True when the matmuls of linear, lm_head and lm_head_cross_entropy read bf16 (precision "bfloat16" and
    their kernels on). The kernels whose output only feeds such a matmul (layernorm, GELU, flash attention; in
    the backward the GELU and attention input gradients) then write bf16 bits (uint16) themselves, so no separate
    float32 -> bf16 conversion pass is needed; precision.as_bf16 passes them through unchanged."""
    return _precision == "bfloat16" and not _disabled & {"linear", "lm_head", "lm_head_cross_entropy"}


def disable(name: str) -> None:
    _disabled.add(name)


def enable(name: str) -> None:
    _disabled.discard(name)


def is_disabled(name: str) -> bool:
    """Whether disable(name) switched it off (also for switches that are not ops: "mlp_epilogue", the cuBLASLt
    GELU epilogues of kernels/mlp.py)."""
    return name in _disabled


def resolve(name: str):
    """The table key an op name maps to (attention -> attention_<kind>), or None."""
    if name in ("attention", "bias_attention"):
        name += "_" + _attention
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
        if key in _REFERENCE:
            pair = _guarded(key, pair)
        _cache[key] = pair
    return pair


def _is_float32(a) -> bool:
    return getattr(a, "dtype", None) is not None and a.dtype.itemsize == 4 and a.dtype.kind == "f"


def _is_kernel_input(a) -> bool:
    """float32, or bf16 bits (uint16: an activation a kernel wrote in bf16 for the next matmul)."""
    return _is_float32(a) or (getattr(a, "dtype", None) is not None and a.dtype == np.uint16)


def _guarded(key, pair):
    """Wrap a kernel pair so that a non-float32 first input goes to the NumPy-generic reference instead.
    The saved state is tagged, so the backward follows the forward's choice."""
    kernel_fwd, kernel_bwd = pair

    def forward(*args, **kwargs):
        if _is_kernel_input(args[0]):
            out, saved = kernel_fwd(*args, **kwargs)
            return out, (True, saved)
        mod_name, f, _ = _REFERENCE[key]
        out, saved = getattr(importlib.import_module(mod_name), f)(*args, **kwargs)
        return out, (False, saved)

    def backward(dout, saved, **kwargs):
        used_kernel, saved = saved
        if used_kernel:
            return kernel_bwd(dout, saved, **kwargs)
        mod_name, _, b = _REFERENCE[key]
        return getattr(importlib.import_module(mod_name), b)(dout, saved, **kwargs)

    forward.__name__, backward.__name__ = f"{key}_forward", f"{key}_backward"
    forward.kernel, backward.kernel = kernel_fwd, kernel_bwd          # the raw kernel pair (benchmarks)
    return forward, backward
