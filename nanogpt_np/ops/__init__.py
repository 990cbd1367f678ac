"""Coarse ops with hand-derived backward passes. One file per op family; see tensor.py for the tape.

Each file holds, side by side: the array-level forward and backward (NumPy-generic, the reference any fused
kernel is checked against), the derivation of the backward in a comment, and the Tensor-level op that
records itself on the tape.
"""
from .embedding import embedding
from .linear import linear, lm_head
from .layernorm import layernorm, residual_layernorm
from .gelu import gelu, bias_gelu
from .mlp import mlp
from .attention import attention, bias_attention
from .residual import add
from .dropout import dropout
from .cross_entropy import cross_entropy
from .lm_head_loss import lm_head_cross_entropy

__all__ = ["embedding", "linear", "lm_head", "layernorm", "residual_layernorm", "gelu", "bias_gelu", "mlp",
           "attention", "bias_attention", "add", "dropout", "cross_entropy", "lm_head_cross_entropy"]
