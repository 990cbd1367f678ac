"""The MLP op on the GPU (ops/mlp.py gives its meaning and the backward's derivation).

bf16 precision, when cuBLASLt is there and accepts the shapes (kernels/cublaslt.py): the GELU rides on the
matmuls' epilogues, so it costs no pass over the (N, H) arrays of its own:
    forward   c_fc:       one cuBLASLt matmul, epilogue GELU_AUX_BIAS: h = gelu(x W_fc + b_fc) and the aux
                          pre = x W_fc + b_fc, both bf16 (h for mlp.c_proj, pre for the backward)
              mlp.c_proj: y = h W_proj, a gemm as in kernels/linear.py (bf16_out, b_proj as there)
    backward  mlp.c_proj: dW_proj += h.T dy (gemm, beta = 1; beta = 0 as the step's first write), db_proj as in
                          linear
              its dx:     one cuBLASLt matmul, epilogue DGELU_BGRAD: dpre = (dy W_proj.T) * gelu'(pre), bf16,
                          and db_fc = dpre summed over the rows (float32, a small temporary added into b_fc's
                          gradient buffer: the *_into contract, docs/CONTRACTS.md)
              c_fc:       dW_fc += x.T dpre, dx = dpre W_fc.T (float32, for the layernorm backward)
Otherwise (float32 precision, no cuBLASLt, a shape it refuses): the separate ops' kernels exactly as before
(linear, bias_gelu or gelu, linear, each through the registry with the model's former bf16 hints), so the float32
path is bit for bit what it was. If the forward used the epilogue but the backward's matmul is refused (its
own description): DGELU without the bias gradient, which is then summed from the bf16 dpre (column_sum_bf16);
if that is refused too, the backward widens to float32 and uses the unbiased gelu_backward kernel.
"""
from . import cublaslt, precision, registry
from .gelu import gelu_backward
from ..ops.reductions import add_into
from .linear import _bias_grad, _matmul_operands, _weight_grad, linear_forward


def _pair(name):
    """The GPU pair of a separate op, or its reference when that kernel is off (what ops/dispatch would pick)."""
    pair = registry.lookup(name)
    if pair is not None:
        return pair
    import importlib
    mod, f, b = {"linear": ("linear", "linear_forward", "linear_backward"),
                 "bias_gelu": ("gelu", "bias_gelu_forward", "bias_gelu_backward"),
                 "gelu": ("gelu", "gelu_forward", "gelu_backward")}[name]
    mod = importlib.import_module(f"nanogpt_np.ops.{mod}")
    return getattr(mod, f), getattr(mod, b)


def _use_epilogues():
    return (registry.bf16_activations() and not registry.is_disabled("mlp_epilogue")
            and registry.lookup("linear") is not None and cublaslt.available())


def mlp_forward(x, w_fc, b_fc, w_proj, b_proj=None, w_fc_bf16=None, w_proj_bf16=None, bf16_out=False):
    """x (N, C) -> (y (N, C'), saved): saved starts with "epilogue" or "separate", the path the backward takes."""
    if _use_epilogues():
        xm, wf = _matmul_operands(x, w_fc, w_fc_bf16)                        # bf16 (N, C), (C, H)
        got = cublaslt.gelu_gemm(xm, wf, b_fc)
        if got is not None:
            h, pre = got                                                     # gelu(pre), pre: (N, H) bf16
            y, (_, wp, _) = linear_forward(h, w_proj, b_proj, w_bf16=w_proj_bf16, bf16_out=bf16_out)
            return y, ("epilogue", xm, wf, pre, h, wp, b_fc is not None, b_proj is not None)
    return _separate_forward(x, w_fc, b_fc, w_proj, b_proj, w_fc_bf16, w_proj_bf16, bf16_out)


def mlp_backward(dy, saved, dw_fc_into=None, db_fc_into=None, dw_proj_into=None, db_proj_into=None):
    """dy (N, C') -> dx (N, C), dw_fc, db_fc, dw_proj, db_proj (None when added into its buffer, or no bias)."""
    if saved[0] == "separate":
        return _separate_backward(dy, saved, dw_fc_into, db_fc_into, dw_proj_into, db_proj_into)
    _, xm, wf, pre, h, wp, has_fc_bias, has_proj_bias = saved
    dym = precision.as_bf16(dy)                                              # (N, C) bf16
    dw_proj = _weight_grad(h, dym, dw_proj_into)                            # h.T @ dy
    db_proj = _bias_grad(dy, db_proj_into) if has_proj_bias else None
    got = cublaslt.dgelu_gemm(dym, wp, pre, has_fc_bias)
    if got is not None:
        dpre, db = got                                                       # (N, H) bf16, (H,) float32
    elif has_fc_bias and (got := cublaslt.dgelu_gemm(dym, wp, pre, False)) is not None:
        dpre, db = got[0], precision.column_sum_bf16(got[0])                 # DGELU without the bias gradient
    else:                                                                    # refused: float32, unbiased GELU
        dh = precision.gemm(dym, wp, trans_b=True)                           # (N, H) float32
        (dpre,) = gelu_backward(dh, (precision.to_float32(pre),))
        db = precision.sum_rows(dpre) if has_fc_bias else None
        dpre = precision.as_bf16(dpre)
    db_fc = add_into(db_fc_into, db) if has_fc_bias else None               # into the gradient buffer, if any
    dw_fc = _weight_grad(xm, dpre, dw_fc_into)                              # x.T @ dpre
    dx = precision.gemm(dpre, wf, trans_b=True)                              # (N, H) @ (H, C), float32
    return dx, dw_fc, db_fc, dw_proj, db_proj


def _separate_forward(x, w_fc, b_fc, w_proj, b_proj, w_fc_bf16, w_proj_bf16, bf16_out):
    """linear, bias_gelu (or gelu), linear: the kernels and hints of the separate ops. bias_gelu reads bf16 (the
    unbiased gelu does not), so c_fc writes its output, and mlp.c_proj its input gradient, as bf16 with a bias."""
    mlp_bf16 = b_fc is not None
    linear_fwd, _ = _pair("linear")
    pre, fc_saved = linear_fwd(x, w_fc, None, w_bf16=w_fc_bf16, bf16_out=mlp_bf16)
    if b_fc is not None:
        h, gelu_saved = _pair("bias_gelu")[0](pre, b_fc)
    else:
        h, gelu_saved = _pair("gelu")[0](pre)
    y, proj_saved = linear_fwd(h, w_proj, b_proj, w_bf16=w_proj_bf16, bf16_out=bf16_out)
    return y, ("separate", fc_saved, gelu_saved, proj_saved, b_fc is not None)


def _separate_backward(dy, saved, dw_fc_into, db_fc_into, dw_proj_into, db_proj_into):
    _, fc_saved, gelu_saved, proj_saved, has_fc_bias = saved
    _, linear_bwd = _pair("linear")
    dh, dw_proj, db_proj = linear_bwd(dy, proj_saved, dw_into=dw_proj_into, db_into=db_proj_into,
                                      bf16_dx=has_fc_bias)
    if has_fc_bias:
        dpre, db_fc = _pair("bias_gelu")[1](dh, gelu_saved, db_into=db_fc_into)
    else:
        (dpre,), db_fc = _pair("gelu")[1](dh, gelu_saved), None
    dx, dw_fc, _ = linear_bwd(dpre, fc_saved, dw_into=dw_fc_into)
    return dx, dw_fc, db_fc, dw_proj, db_proj
