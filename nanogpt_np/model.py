"""GPT-2, built from the ops in ops/.

    idx (B, T) -> token + position embedding -> n_layer x Block -> ln_f -> logits (B, T, V) via wte^T
    (with targets, the loss comes from ln_f's output directly, a chunk of logits at a time: ops/lm_head_loss.py)
    Block (pre-LN):  x = x + c_proj(attention(c_attn(ln_1(x))))
                     x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    (each residual add and the layernorm after it are one op, residual_layernorm: the first add with ln_2, the
    second with the next block's ln_1, or ln_f after the last block; each linear layer's bias is added inside
    the op that follows it: c_attn's in bias_attention, both c_proj's in residual_layernorm, c_fc's in the mlp
    op (on the GPU in bf16 with the GELU, on c_fc's matmul epilogue): the same math, in fewer passes over memory
    where a fused GPU kernel exists; see _block)

Parameter names and shapes are those of GPT-2's published checkpoints (without the "transformer." prefix), and
linear weights are stored (in, out) like GPT-2's Conv1D, so weights move to and from GPT-2 files unrenamed.

All parameters live as views into one flat buffer (`flat_params`), and all their gradients into another
(`flat_grads`). The optimizer then updates everything with a handful of whole-buffer operations (one fused
kernel on the GPU), and clipping gradients is one operation too. Parameters that get weight decay (the 2-D
matrices) come first in the buffer: `flat_params[:n_decay]`.

A step's gradients: zero_grad(), then forward and backward over the micro-batches (each op adds its gradients
into the parameters' parts of flat_grads), then finish_gradients() before anything reads flat_grads as a whole
(the optimizer and the trainer call it). On the CPU zero_grad zeroes the whole buffer. On the GPU it zeroes only
the 1-D parameters' part and marks the matrices' gradients "fresh" instead (tensor.fresh_grads): the first op to
write one in the step overwrites it (a gemm with beta = 0), so 0.5 GB (GPT-2 small) is neither memset nor read
back as zeros; finish_gradients() zeroes any matrix nobody wrote.

With bf16 matmuls on the GPU (--dtype=bfloat16) the linear layers read a bf16 copy of the weights,
`flat_params_bf16` (one uint16 buffer like flat_params; each parameter's `data_bf16` is a view into it). It can
never be read stale: every writer of flat_params calls `params_written()` (init, load_params, the optimizer),
which marks the copy out of date unless the writer refreshed it too (the fused AdamW kernel writes both), and
every forward starts by rebuilding an out-of-date copy (`_refresh_bf16_copy`, one conversion pass).
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import backend, ops
from .ops.attention import attention_with_cache
from .tensor import Tensor, fresh_grads, no_grad


@dataclass
class GPTConfig:
    block_size: int = 256       # the longest context the model sees (rows of wpe)
    vocab_size: int = 50257     # rows of wte
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768           # C; must divide by n_head
    dropout: float = 0.0        # after the embedding and after each residual branch
    bias: bool = True           # biases in linear layers and layernorms (GPT-2: True)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {', '.join(unknown)}")
        return cls(**d)


# Sizes from tiny (tests, CPU) to GPT-2 XL. vocab_size and block_size are set by the data / checkpoint.
MODEL_PRESETS = {
    "tiny":        dict(n_layer=2, n_head=2, n_embd=32),
    "small-cpu":   dict(n_layer=4, n_head=4, n_embd=128),      # nanoGPT's CPU recipe
    "baby":        dict(n_layer=6, n_head=6, n_embd=384),      # nanoGPT's Shakespeare char recipe
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),    # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),   # 1558M
}


def parameter_shapes(config: GPTConfig) -> dict:
    """GPT-2 parameter names -> shapes, in GPT-2's checkpoint order."""
    C, V, T = config.n_embd, config.vocab_size, config.block_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.bias:   # layernorms keep their weight; linear layers and layernorms lose their bias
        shapes = {k: s for k, s in shapes.items() if not k.endswith(".bias")}
    return shapes


def gpt2_init(name: str, shape, config: GPTConfig, rng: np.random.Generator) -> np.ndarray:
    """GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit layernorm scale.
    The projections that write into the residual stream (c_proj) get std 0.02 / sqrt(2 * n_layer), so the
    variance of the residual stream does not grow with depth (2 such writes per block)."""
    if ".ln_" in name or name.startswith("ln_f"):
        return np.ones(shape) if name.endswith(".weight") else np.zeros(shape)
    if name.endswith(".bias"):
        return np.zeros(shape)
    std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
    return rng.normal(0.0, std, size=shape)


class GPT:
    """GPT-2 language model. `params` maps GPT-2 names to Tensors whose data/grad are views into flat buffers."""

    def __init__(self, config: GPTConfig, seed: int = 0, dtype="float32"):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.training = True
        xp = backend.xp()
        shapes = parameter_shapes(config)
        # Layout of the flat buffers: decayed (2-D) parameters first, then the rest, each group in GPT-2 order.
        ordered = [n for n, s in shapes.items() if len(s) >= 2] + [n for n, s in shapes.items() if len(s) < 2]
        self.n_decay = sum(math.prod(shapes[n]) for n in ordered if len(shapes[n]) >= 2)
        total = sum(math.prod(s) for s in shapes.values())
        self.flat_params = xp.zeros(total, dtype=self.dtype)
        self.flat_grads = xp.zeros(total, dtype=self.dtype)
        self.params = {}
        self._offsets = {}
        offset = 0
        for name in ordered:
            size = math.prod(shapes[name])
            t = Tensor(self.flat_params[offset:offset + size].reshape(shapes[name]), requires_grad=True, name=name)
            t.use_grad_buffer(self.flat_grads[offset:offset + size].reshape(shapes[name]))
            self.params[name] = t
            self._offsets[name] = (offset, size)
            offset += size
        self.params = {name: self.params[name] for name in shapes}     # GPT-2 order for iteration and files
        # the matrices' gradient buffers (flat_grads[:n_decay]): on the GPU, overwritten by their step's first writer
        self._matrix_grads = [self.params[name].grad for name in ordered if len(shapes[name]) >= 2]
        self.flat_params_bf16 = None     # the bf16 copy of flat_params, made by the first forward that needs it
        self._bf16_current = False
        rng = np.random.default_rng(seed)
        for name, t in self.params.items():
            t.data[...] = backend.to_device(gpt2_init(name, t.shape, config, rng).astype(self.dtype))
        self.params_written()
        self.dropout_rng = _device_rng(seed + 1)

    # ----- parameters -----
    def num_params(self, include_position=True) -> int:
        n = int(self.flat_params.size)
        return n if include_position else n - math.prod(self.params["wpe.weight"].shape)

    def params_written(self, bf16_copy_refreshed=False) -> None:
        """Every writer of flat_params calls this afterwards. The bf16 copy of the weights is then out of date
        (the next forward rebuilds it), unless the writer also wrote the copy (bf16_copy_refreshed=True: the
        fused AdamW kernel with params_bf16=flat_params_bf16)."""
        self._bf16_current = bf16_copy_refreshed and self.flat_params_bf16 is not None

    def _refresh_bf16_copy(self) -> None:
        """At the start of every forward: with bf16 matmuls on the GPU, make the bf16 copy of the weights if
        there is none yet (and point each parameter's data_bf16 at its part), and rebuild it when out of date."""
        if not backend.is_gpu_array(self.flat_params) or self.dtype != np.float32:
            return
        from .kernels import precision, registry          # GPU only
        if registry.precision() != "bfloat16":
            return
        if self.flat_params_bf16 is None:
            self.flat_params_bf16 = backend.xp().empty(self.flat_params.shape, dtype=np.uint16)
            for name, t in self.params.items():
                offset, size = self._offsets[name]
                t.data_bf16 = self.flat_params_bf16[offset:offset + size].reshape(t.shape)
            self._bf16_current = False
        if not self._bf16_current:
            precision.to_bf16(self.flat_params, out=self.flat_params_bf16)
            self._bf16_current = True

    def zero_grad(self) -> None:
        """Start a step's gradients. On the CPU: zero the flat gradient buffer. On the GPU: zero only the 1-D
        parameters' part, flat_grads[n_decay:] (one cudaMemsetAsync over its bytes: all-zero bytes are 0.0f), and
        mark the matrices' buffers fresh (tensor.fresh_grads: their first writer overwrites them, a gemm with
        beta = 0), so the big part of the buffer is neither memset nor read back as zeros. Host work only, and
        the same calls every step."""
        if backend.is_gpu_array(self.flat_grads):
            rest = self.flat_grads[self.n_decay:]
            rest.data.memset_async(0, rest.nbytes)
            fresh_grads.mark(self._matrix_grads)
        else:
            self.flat_grads[...] = 0

    def finish_gradients(self) -> None:
        """Call before reading flat_grads as a whole (all-reduce, clipping, AdamW): zero any matrix gradient that
        nothing wrote this step (still fresh). After a full backward every matrix has been written: no GPU work."""
        fresh_grads.finish(self._matrix_grads)

    def state_dict(self) -> dict:
        """GPT-2 name -> host numpy array (a copy)."""
        return {name: backend.to_numpy(t.data).copy() for name, t in self.params.items()}

    def load_params(self, tensors: dict, source: str = "weights") -> None:
        """Copy arrays into the parameters, checking that names and shapes match exactly."""
        expected = {n: t.shape for n, t in self.params.items()}
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
            raise ValueError(f"{source} do not match this model: " + "; ".join(parts))
        for name, shape in expected.items():
            got = tuple(tensors[name].shape)
            if got != tuple(shape):
                raise ValueError(f"{source}: tensor {name} has shape {got}, the model expects {tuple(shape)}")
        for name in expected:
            kind = np.asarray(tensors[name]).dtype.kind
            if kind != "f":
                raise ValueError(f"{source}: tensor {name} holds {np.asarray(tensors[name]).dtype} values, "
                                 f"not floating point (bf16 must be converted to float32 first)")
        check_finite({name: tensors[name] for name in expected}, source)
        for name, t in self.params.items():
            t.data[...] = backend.to_device(np.asarray(tensors[name]).astype(self.dtype, copy=False))
        self.params_written()

    def reseed_dropout(self, seed: int) -> None:
        """Reseed the dropout generator (the trainer does it every step from (seed, step), so resuming needs no
        saved RNG state). On the GPU the one generator is reseeded in place, which costs nothing."""
        if isinstance(self.dropout_rng, _GpuDropoutRng):
            self.dropout_rng.seed(seed)
        else:
            self.dropout_rng = _device_rng(seed)

    def train(self, mode: bool = True) -> "GPT":
        self.training = mode
        return self

    def eval(self) -> "GPT":
        return self.train(False)

    # ----- forward -----
    def forward(self, idx, targets=None, ignore_index: int = -1, kv_cache=None):
        """idx (B, T) integer token ids; targets (B, T) or None.
        Returns (logits Tensor (B, T, V), None) without targets, and (None, loss Tensor (0-d)) with targets:
        the loss is computed without materialising the logits (ops/lm_head_loss.py); for logits and a loss
        together, call without targets and apply ops.cross_entropy to the logits.

        With a kv_cache (generate.KVCache), idx holds only the new tokens of each sequence: they are placed
        after the positions the cache already holds, attend to everything before them, and are added to the
        cache (inference only; nothing is recorded for backward)."""
        cfg, p = self.config, self.params
        B, T = idx.shape
        self._refresh_bf16_copy()
        positions = None
        if kv_cache is not None:
            if int(kv_cache.lengths.max()) + T > cfg.block_size:
                raise ValueError(f"the KV cache would grow past block_size {cfg.block_size}")
            positions = backend.to_device(kv_cache.lengths[:, None] + np.arange(T)[None, :])   # (B, T)
        elif T > cfg.block_size:
            raise ValueError(f"sequence length {T} is longer than block_size {cfg.block_size}")
        x = ops.embedding(p["wte.weight"], p["wpe.weight"], idx, positions)  # (B, T, C)
        x = ops.dropout(x, cfg.dropout, self.dropout_rng, self.training)
        # Every block ends with a residual add, and a layernorm follows it (the next block's ln_1, or ln_f): the
        # two are one op, done by the block (one pass over the residual stream). The first ln_1 has no add before
        # it: the same op with r=None passes x through (h is x), so that in the backward x's two gradients (from
        # ln_1 and from the residual stream) are summed in the layernorm's own pass.
        # With bf16 matmuls on the GPU the residual stream x is bf16 from here on (h is x rounded once to bf16),
        # and so is its gradient: each block boundary rounds the stream once, which halves the bytes of the most
        # often moved array of the step (kernels/layernorm.py). x, and its gradient, has one consumer each: the
        # next residual_layernorm (the tape refuses to add two bf16 gradients).
        x, xn = ops.residual_layernorm(x, None, p["h.0.ln_1.weight"], self._bias("h.0.ln_1"), cfg.layer_norm_eps)
        for i in range(cfg.n_layer):
            next_ln = f"h.{i + 1}.ln_1" if i + 1 < cfg.n_layer else "ln_f"
            x, xn = self._block(i, x, xn, next_ln, kv_cache, positions)
        if kv_cache is not None:
            kv_cache.lengths += T
        x = xn                                                               # ln_f(x) (B, T, C)
        if targets is None:
            return ops.lm_head(x, p["wte.weight"]), None                   # logits (B, T, V)
        # the loss without the (B, T, V) logits: the output layer and cross-entropy, a chunk of rows at a time
        return None, ops.lm_head_cross_entropy(x, p["wte.weight"], targets, ignore_index)

    __call__ = forward

    def _bias(self, prefix):
        return self.params.get(prefix + ".bias") if self.config.bias else _zeros_like_weight(self, prefix)

    def _block(self, i, x, xn, next_ln, kv_cache=None, positions=None):
        """Block i on the residual stream x (B, T, C), given xn = ln_1(x) (the op before made it). Returns the new
        stream x + attn + mlp and next_ln of it (the layernorm named next_ln: the next block's ln_1, or ln_f)."""
        cfg, p, h = self.config, self.params, f"h.{i}."
        # Where the linear layers' biases are added (the same sums, each inside an op that reads the data anyway):
        #   attn.c_attn -> bias_attention (the GPU adds it as it loads each tile of q, k, v)
        #   attn.c_proj, mlp.c_proj -> residual_layernorm (x + r + bias, then the next layernorm)
        #   mlp.c_fc    -> mlp (gelu(m @ W + bias), one op with mlp.c_proj)
        # Active dropout sits between a c_proj and its residual add, so then the c_proj biases stay in linear;
        # with a KV cache (inference) attention_with_cache reads the biased qkv from linear.
        dropout_on = self.training and cfg.dropout > 0
        fuse_proj = cfg.bias and not dropout_on
        a = xn
        # bf16 matmuls (GPU): c_attn writes qkv as bf16, which flash attention reads in place, and c_proj
        # writes the attention's output gradient as bf16, which its backward reads (bf16_out / bf16_dx)
        qkv_bf16 = kv_cache is None
        if kv_cache is None and cfg.bias:
            a = ops.linear(a, p[h + "attn.c_attn.weight"], bf16_out=True)                 # (B, T, 3C)
            a = ops.bias_attention(a, p[h + "attn.c_attn.bias"], cfg.n_head)              # (B, T, C)
        elif kv_cache is None:
            a = ops.attention(ops.linear(a, p[h + "attn.c_attn.weight"], bf16_out=True), cfg.n_head)
        else:
            a = ops.linear(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
            a = Tensor(attention_with_cache(a.data, cfg.n_head, kv_cache.k[i], kv_cache.v[i], kv_cache.lengths,
                                            positions))
        proj_bias = p.get(h + "attn.c_proj.bias")
        # with its bias fused downstream, c_proj may write bf16 too: residual_layernorm reads a bf16 residual
        a = ops.linear(a, p[h + "attn.c_proj.weight"], None if fuse_proj else proj_bias, bf16_dx=qkv_bf16,
                       bf16_out=fuse_proj)
        a = ops.dropout(a, cfg.dropout, self.dropout_rng, self.training)
        # x = x + a (+ c_proj's bias) and m = ln_2(x) in one op (one pass over memory on the GPU). Without dropout
        # `a` comes straight from c_proj, which may then read its gradient as bf16 (bf16_dr): in bf16 that is the
        # very array that carries the stream's gradient back (both bf16, no copy). With dropout, a's gradient is
        # float32 (dropout's output is float32) and the backward writes it beside the bf16 one, in the same pass.
        x, m = ops.residual_layernorm(x, a, p[h + "ln_2.weight"], self._bias(h + "ln_2"), cfg.layer_norm_eps,
                                      r_bias=proj_bias if fuse_proj else None, bf16_dr=not dropout_on)
        # the MLP, gelu(m @ W_fc + b_fc) @ W_proj, is one op (ops/mlp.py): in bf16 precision on the GPU the GELU
        # and c_fc's bias ride on the two matmuls' epilogues (cuBLASLt), so the GELU costs no pass of its own
        proj_bias = p.get(h + "mlp.c_proj.bias")
        m = ops.mlp(m, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias"), p[h + "mlp.c_proj.weight"],
                    None if fuse_proj else proj_bias, bf16_out=fuse_proj)                  # (B, T, C)
        m = ops.dropout(m, cfg.dropout, self.dropout_rng, self.training)
        # the same at the block's end: x = x + m (+ c_proj's bias) and next_ln(x), one op
        return ops.residual_layernorm(x, m, p[next_ln + ".weight"], self._bias(next_ln), cfg.layer_norm_eps,
                                      r_bias=proj_bias if fuse_proj else None, bf16_dr=not dropout_on)

    def loss_on(self, idx, targets) -> float:
        """The loss on one batch without recording anything for backward (evaluation)."""
        with no_grad():
            _, loss = self.forward(idx, targets)
        return loss.item()


def check_finite(tensors: dict, source: str = "weights") -> None:
    """ValueError naming the first tensor that holds NaN or inf. Such weights would load without a word and
    fail much later ("probabilities contain NaN"); a diverged or corrupted checkpoint is refused at load."""
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise ValueError(f"{source}: tensor {name} holds {n_nan} NaN and {n_inf} infinite values (of "
                             f"{a.size}); these weights are unusable (a run that diverged, or a damaged file)")


def _zeros_like_weight(model, prefix):
    """A constant zero shift for layernorms of a bias=False model (kept out of the parameters)."""
    w = model.params[prefix + ".weight"]
    return Tensor(backend.xp_of(w.data).zeros_like(w.data))


# curand.h's CURAND_RNG_PSEUDO_PHILOX4_32_10 (checked against CuPy's curand module in tests/test_fake_cupy.py)
CURAND_PHILOX4_32_10 = 161


class _GpuDropoutRng:
    """Uniform numbers for dropout masks on the GPU, from one cuRAND generator kept for the whole run.

    Philox4x32-10 is counter-based: reseeding it sets a seed and resets an offset, with no per-thread state
    to initialise. (A new cupy.random.default_rng every step, as before, set up ~270k XORWOW states each time.)
    Same seeds, same masks: the trainer's per-step reseed keeps --resume exact."""

    def __init__(self, seed):
        self._rs = backend.xp().random.RandomState(seed, method=CURAND_PHILOX4_32_10)

    def seed(self, seed):
        self._rs.seed(seed)

    def random(self, shape, dtype=None):
        return self._rs.random_sample(shape, dtype=np.float32 if dtype is None else dtype)


def _device_rng(seed):
    """A random generator on the current device (numpy's PCG64 on the CPU, cuRAND's Philox on the GPU)."""
    if backend.device() == "cuda":
        return _GpuDropoutRng(seed)
    return np.random.default_rng(seed)
