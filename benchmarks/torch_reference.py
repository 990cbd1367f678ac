"""The same GPT-2 architecture in PyTorch, as the baseline the benchmarks compare against.

Optional: import this only after checking that torch is installed. It mirrors nanogpt_np.model.GPT: pre-LN
blocks, tanh GELU, tied embedding and head, causal attention through F.scaled_dot_product_attention (what
nanoGPT uses), AdamW with decay on 2-D parameters only. Weights can be copied from a nanogpt_np model, so both
start from the same point (linear weights are stored (in, out) there and (out, in) in torch.nn.Linear).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias=True):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def load_from_nanogpt(self, params: dict):
        """Copy weights from a nanogpt_np state dict (GPT-2 names, linear weights (in, out))."""
        rename = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
        with torch.no_grad():
            for name, value in params.items():
                target = name
                for a, b in rename.items():
                    target = target.replace(a, b)
                t = torch.from_numpy(value.copy())
                if target.endswith(".weight") and value.ndim == 2 and target not in ("wte.weight", "wpe.weight"):
                    t = t.T                                              # (in, out) -> (out, in)
                self.get_parameter(target).copy_(t)


def make_optimizer(model, lr, betas, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def flops_per_token(n_params_no_pos, n_layer, n_embd, block_size):
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's 6 * L * T * C * 2."""
    return 6 * n_params_no_pos + 12 * n_layer * n_embd * block_size


__all__ = ["TorchGPT", "make_optimizer", "flops_per_token", "math"]
