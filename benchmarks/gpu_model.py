"""Where does a GPU training step's time go? A traced performance model, run on the CPU. PREDICTED, not measured.

    python benchmarks/gpu_model.py --preset=gpt2                       # GPT-2 124M, B=8, T=1024, float32, H100
    python benchmarks/gpu_model.py --preset=gpt2 --dtype=bfloat16 --attention=flash
    python benchmarks/gpu_model.py --preset=gpt2 --device=a100 --tf32=on --ops    # every op of the step
    python benchmarks/gpu_model.py --n_layer=4 --n_embd=256 --n_head=4 --batch_size=4 --block_size=256

How it works:
1. Trace. One optimizer step of the trainer (`trainer.train_step`, configured by `run_setup.setup_device` as
   `train.py --device=cuda` would) runs on the fake CuPy (tests/emulation/fake_cupy.py) with a recorder
   (tests/emulation/trace_cupy.py): every kernel launch, cuBLAS call, CuPy elementwise/reduction/matmul op,
   copy, host<->device transfer and pool allocation, with shapes and dtypes. Nothing is computed ("shape-only":
   arrays are untouched zero pages), so a GPT-2 step traces in a fraction of a second; the op sequence is the
   one the arithmetic gives (a test checks it). Models with n_layer >= 2 are traced at 1 and 2 layers and every
   total is extrapolated linearly per layer (exact when every block issues the same ops, which a test checks
   against a full 12-layer trace); --full (and --ops) trace all layers.
2. Cost each op on the chosen device (assumptions printed first): matmuls at a fraction of the datasheet peak
   of their precision, memory-bound ops at a fraction of the memory bandwidth, a floor per launch, our flash
   kernels at a stated fraction of the bf16 peak. Bytes are counted two ways: the minimum (each input read once,
   each output written once) and as written (what the code moves: second passes, CuPy's operand copies).
3. Host: the project's own Python time per op is measured here (on this CPU, in the shape-only trace, with the
   tracer's own time taken out) and CuPy's per-call overhead is added from the stated assumptions. The step
   runs at max(GPU, host); tokens/s = B * T * grad_accum_steps / that.

Nothing here measures a GPU. benchmarks/gpu_model_compare.py puts a device run (benchmarks/kernels.py and
train_gpu.py JSON) beside these predictions, category by category.
"""
import argparse
import importlib
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
for _p in (REPO, os.path.join(REPO, "tests")):         # the package, and the fake CuPy under tests/emulation
    if _p not in sys.path:
        sys.path.insert(0, _p)

from nanogpt_np.kernels import cublaslt_ctypes as lt      # noqa: E402
from nanogpt_np.model import GPT                         # noqa: E402

# ------------------------------------------------------------------------------------------ assumptions

# Datasheet peaks, dense (no sparsity), TFLOP/s, and memory bandwidth, TB/s.
#   H100 SXM5: BF16 989.4, TF32 494.7, FP32 (non-tensor) 66.9, 3.35 TB/s
#     (NVIDIA H100 datasheet, sparse figures halved; tabulated at glennklockwood.com/garden/processors/h100)
#   H200 SXM: the same GH100 compute, HBM3e 4.8 TB/s (NVIDIA H200 datasheet; pingdo.net/ai-infrastructure/h100-vs-h200-hbm3e)
#   A100 SXM4 80GB: BF16 312, TF32 156, FP32 19.5, 2.039 TB/s
#     (NVIDIA A100 datasheet; tabulated at glennklockwood.com/garden/processors/A100)
DEVICES = {
    "h100": dict(name="H100 SXM", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12, bw=3.35e12, sms=132, cc="90"),
    "h200": dict(name="H200 SXM", bf16=989.4e12, tf32=494.7e12, fp32=66.9e12, bw=4.8e12, sms=132, cc="90"),
    "a100": dict(name="A100 SXM 80GB", bf16=312e12, tf32=156e12, fp32=19.5e12, bw=2.039e12, sms=108, cc="80"),
}
SOURCES = ("H100 SXM / H200: NVIDIA datasheets (dense = sparse / 2), as tabulated at "
           "glennklockwood.com/garden/processors/h100; H200 4.8 TB/s: pingdo.net/ai-infrastructure/h100-vs-h200-hbm3e; "
           "A100: NVIDIA A100 datasheet via glennklockwood.com/garden/processors/A100")

MATMUL_EFF = 0.70        # cuBLAS matmuls: fraction of the precision's dense peak
GELU_EPILOGUE_FLOPS = 20   # a cuBLASLt GELU / dGELU epilogue, per output element (tanh and a few mul-adds), on the
                           # FP32 pipes at MATMUL_EFF, overlapped with the products (op_cost); not counted in the
                           # op's FLOPs, which stay the tensor-core products'

FLASH_EFF = 0.25         # our flash-attention kernels (mma.sync m16n8k16 with ldmatrix and cp.async double
                         # buffering, not measured on a GPU yet): fraction of the bf16 peak (assumed, kept as it
                         # was before those: FlashAttention-2 itself reaches ~35-50% on H100)
MEM_EFF = 0.80           # memory-bound kernels: fraction of the datasheet bandwidth
LAUNCH_FLOOR_S = 3e-6    # no kernel takes less (launch + ramp-up + tail)
PCIE_BPS = 25e9          # host <-> device copies (pageable memory)
# CuPy's own host cost per call, on top of the project's Python (measured). Assumed, from CuPy's benchmarks
# (cupy/cupy#3298: ~11 us CPU time per elementwise ufunc call before that PR's speed-up) and
# cupy/cupy#8191 (matmul's CPU launch overhead above PyTorch's):
HOST_US = dict(elementwise=7.0, reduction=9.0, matmul=20.0, kernel=5.0, gemm=3.0, alloc=1.5, view=1.0,
               host=0.5, memset=4.0, h2d=10.0, d2h=15.0, graph=20.0)
# graph: one cudaGraphLaunch of the whole captured step (--cuda_graph), assumed; its kernels' GPU time is the
# eager step's (the model's launch floor is on the GPU side and stays).

CATEGORIES = ("matmul", "attention", "layernorm", "gelu", "cross-entropy", "embedding", "adamw", "casts",
              "elementwise/copies", "allocations")
FAMILY_CATEGORY = {"attention": "attention", "layernorm": "layernorm", "gelu": "gelu",
                   "cross-entropy": "cross-entropy", "embedding": "embedding", "adamw": "adamw", "casts": "casts"}

PRESETS = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, batch_size=8, block_size=1024)}


@dataclass
class StepConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    batch_size: int = 8
    block_size: int = 1024
    grad_accum_steps: int = 1
    dtype: str = "float32"
    attention: str = "matmul"
    tf32: str = "trainer"            # "trainer" (what setup_device leaves), "on" or "off"
    cuda_graph: bool = False         # trace the trainer's --cuda_graph step (host work outside the graph)

    @property
    def tokens(self):
        return self.batch_size * self.block_size * self.grad_accum_steps


# ------------------------------------------------------------------------------------------ tracing

@dataclass
class Trace:
    config: StepConfig
    n_layer: int
    ops: list
    peak: int                  # bytes live on the device at the step's high point
    tail_py_s: float           # the project's Python after the last op
    params: int


def trace_step(cfg: StepConfig, n_layer=None, device="h100", shape_only=True, steps=5) -> Trace:
    """Run `steps` trainer steps on the fake GPU; return the ops of the last one (Python times: the minimum per
    op over the steps after the first, which warms caches)."""
    from emulation import trace_cupy
    from nanogpt_np import backend, trainer
    from nanogpt_np.config import TrainConfig
    from nanogpt_np.kernels import adamw as k_adamw
    from nanogpt_np.kernels import cross_entropy as k_ce
    from nanogpt_np.kernels import registry
    from nanogpt_np import model as model_mod
    from nanogpt_np.model import GPTConfig
    o_att = importlib.import_module("nanogpt_np.ops.attention")      # (nanogpt_np.ops.attention is also a function)
    o_red = importlib.import_module("nanogpt_np.ops.reductions")
    from nanogpt_np.optim import AdamW

    n_layer = cfg.n_layer if n_layer is None else n_layer
    dev = DEVICES[device]
    saved_state = (backend._device, backend._cupy, registry.attention_kind(), registry.precision(),
                   k_ce._inplace, k_ce._assume_unit_dloss)
    caches = (k_adamw._scratch, o_red._ones_cache, o_att._mask_cache)        # per-process caches of device arrays
    saved_caches = [dict(c) for c in caches]
    for c in caches:
        c.clear()
    runs = []
    try:
        with trace_cupy.Tracer(shape_only=shape_only, sms=dev["sms"], compute_capability=dev["cc"]) as tr:
            from nanogpt_np import distributed, run_setup
            tcfg = TrainConfig(device="cuda", dtype=cfg.dtype, batch_size=cfg.batch_size, block_size=cfg.block_size,
                               grad_accum_steps=cfg.grad_accum_steps, dropout=0.0, grad_clip=1.0,
                               cuda_graph=cfg.cuda_graph)
            run_setup.setup_device(tcfg, echo=lambda line: None)   # the trainer's own GPU configuration (quietly)
            registry.set_attention(cfg.attention)
            if cfg.tf32 != "trainer":
                registry.configure(tf32=cfg.tf32 == "on")
            gcfg = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0)
            if shape_only:                                       # values are never read: skip drawing them
                model_mod.gpt2_init, init = (lambda name, shape, *a: np.zeros(shape, np.float32)), model_mod.gpt2_init
            try:
                model = GPT(gcfg, seed=0)
            finally:
                if shape_only:
                    model_mod.gpt2_init = init
            model.__class__ = _PhasedGPT                         # marks forward/backward phases and layers
            opt = AdamW(model, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
            _phase(model, "zero_grad", tr, ("step", None))
            _phase(opt, "step", tr, ("optimizer", None))
            rng = np.random.default_rng(0)
            batch = (rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)),
                     rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)))
            run = types.SimpleNamespace(cfg=tcfg, model=model, optimizer=opt, step=0, world=distributed.SINGLE,
                                        loader=types.SimpleNamespace(next_batch=lambda: batch), graphed_step=None)
            if cfg.cuda_graph:        # step 1 eager, 2 captured and replayed, then replays: the last is one
                from nanogpt_np.cuda_graph import GraphedStep
                run.graphed_step = GraphedStep(run)
            for _ in range(steps):
                tr.phase = ("step", None)
                tr.start()
                trainer.train_step(run, 6e-4)
                tail = time.perf_counter() - tr._resumed
                tr.stop()
                run.step += 1
                runs.append((tr.ops, tr.peak, tail))
            params = model.num_params()
            del run, model, opt
    finally:
        backend._device, backend._cupy = saved_state[:2]
        registry.set_attention(saved_state[2])
        registry.set_precision(saved_state[3])
        k_ce.set_inplace(saved_state[4])
        k_ce.set_assume_unit_dloss(saved_state[5])
        for c, s in zip(caches, saved_caches):
            c.clear()
            c.update(s)
    ops, peak, tail = runs[-1]
    later = [r for r in runs[1:] if len(r[0]) == len(ops)] or [runs[-1]]
    for i, op in enumerate(ops):
        op.py_s = min(r[0][i].py_s for r in later)
    return Trace(cfg, n_layer, ops, peak, min(r[2] for r in later), params)


def _phase(obj, method, tr, phase):
    """Wrap obj.method (an instance attribute) so the ops it issues carry `phase`."""
    inner = getattr(obj, method)

    def wrapped(*a, **k):
        tr.phase = phase
        return inner(*a, **k)
    setattr(obj, method, wrapped)


class _PhasedGPT(GPT):
    """The model, unchanged, except that it tells the tracer which phase and layer issue each op. Backward
    functions recorded on the tape by a block are wrapped to set ("bwd", layer) when the tape replays them."""

    def forward(self, idx, targets=None, ignore_index=-1, kv_cache=None):
        from emulation import trace_cupy
        from nanogpt_np import tensor
        tr, start = trace_cupy._tracer, len(tensor._tape)
        tr.phase = ("fwd", None)
        out = super().forward(idx, targets, ignore_index, kv_cache)
        _tag_tape(start, ("bwd", None))
        tr.phase = ("step", None)
        return out

    __call__ = forward

    def _block(self, i, x, *args, **kwargs):
        from emulation import trace_cupy
        from nanogpt_np import tensor
        tr, start = trace_cupy._tracer, len(tensor._tape)
        tr.phase = ("fwd", i)
        out = super()._block(i, x, *args, **kwargs)     # (the new stream, the next layernorm of it)
        _tag_tape(start, ("bwd", i))
        tr.phase = ("fwd", None)
        return out


def _tag_tape(start, phase):
    from emulation import trace_cupy
    from nanogpt_np import tensor
    for j in range(start, len(tensor._tape)):
        out, inputs, fn = tensor._tape[j]
        if getattr(fn, "phase", None) is not None:
            continue

        def tagged(*a, _fn=fn, _phase=phase):
            trace_cupy._tracer.phase = _phase          # kept after the call: the gradient sums that follow belong here
            return _fn(*a)
        tagged.phase = phase
        tensor._tape[j] = (out, inputs, tagged)


# ------------------------------------------------------------------------------------------ costing

@dataclass
class Cost:
    category: str
    gpu_ops: int = 0           # device work items (kernels, cuBLAS calls, copies)
    flops: float = 0.0
    bytes_min: float = 0.0
    bytes_written: float = 0.0
    gpu_s: float = 0.0
    host_ops: int = 0
    host_s: float = 0.0        # CuPy's per-call overhead (assumed) + the project's Python (measured)
    py_s: float = 0.0          # of which: the project's Python
    alloc: float = 0.0         # bytes allocated from the pool
    t_compute: float = 0.0     # of one op: its FLOPs at the assumed rate,
    t_memory: float = 0.0      # its bytes at the assumed bandwidth,
    t_extra: float = 0.0       # and extra passes (CuPy's operand copies); gpu_s = max(floor, compute, memory) + extra
    note: str = ""

    ADDITIVE = ("gpu_ops", "flops", "bytes_min", "bytes_written", "gpu_s", "host_ops", "host_s", "py_s", "alloc")

    def add(self, other, scale=1.0):
        for f in self.ADDITIVE:
            setattr(self, f, getattr(self, f) + scale * getattr(other, f))


def _gpu_time(c):
    return max(LAUNCH_FLOOR_S, c.t_compute, c.t_memory) + c.t_extra if c.gpu_ops else 0.0


def category_of(op):
    if op.kind == "alloc":
        return "allocations"
    if op.kind == "cast" or op.family == "casts" or (op.kind == "kernel" and op.name in ("f32_to_bf16", "bf16_to_f32")):
        return "casts"
    if op.kind == "gemm":              # cuBLAS calls are matmul work (also those of the chunked lm_head + loss),
        return "attention" if op.family == "attention" else "matmul"    # except attention's own products
    if op.family == "matmul":          # linear layers: the bias add and bias-gradient sum are elementwise work
        return "elementwise/copies" if op.kind in ("elementwise", "reduction", "copy", "fill") else "matmul"
    return FAMILY_CATEGORY.get(op.family, "elementwise/copies")


def _nb(descs):
    return sum(d[2] for d in descs)


def _mem_time(nbytes, dev):
    return max(LAUNCH_FLOOR_S, nbytes / (dev["bw"] * MEM_EFF))


def op_cost(op, dev) -> Cost:
    c = Cost(category_of(op), py_s=op.py_s)
    lib = HOST_US.get(op.kind, HOST_US["elementwise"])
    c.host_ops, c.host_s = 1, lib * 1e-6
    if op.kind == "alloc":
        c.alloc = op.alloc
    elif op.kind in ("view", "host", "graph"):
        pass
    elif op.kind in ("h2d", "d2h"):
        n = _nb(op.inputs)
        c.gpu_ops, c.bytes_min, c.bytes_written = 1, n, n
        c.t_memory = n / PCIE_BPS
        c.note = "sync" if op.kind == "d2h" else ""
    elif op.kind == "matmul":
        _matmul_cost(op, dev, c)
    elif op.kind == "gemm":           # gemmEx, or gemmStridedBatchedEx: `batch` products of that size, one launch
        a = op.args
        size = {14: 2, 0: 4}
        batch = a.get("batch", 1)
        flops = 2.0 * a["m"] * a["n"] * a["k"] * batch
        nb = a["m"] * a["k"] * size[a["Atype"]] + a["k"] * a["n"] * size[a["Btype"]] + a["m"] * a["n"] * size[a["Ctype"]]
        nb += a["m"] * a["n"] * size[a["Ctype"]] if a["beta"] != 0 else 0
        epilogue_flops = 0.0
        if a.get("epilogue") is not None:          # cublasLtMatmul: the GELU epilogue's extra traffic and math
            nb += a["m"] * a["n"] * size[a["aux"]] if a.get("aux") is not None else 0   # aux written or read
            nb += a["m"] * size[a["bias"]] if a.get("bias") is not None else 0          # bias read or written
            epilogue_flops = GELU_EPILOGUE_FLOPS * a["m"] * a["n"] * batch
        nb *= batch
        peak = dev["bf16"] if a["Atype"] == 14 else dev["tf32"] if a.get("compute") == 77 else dev["fp32"]
        c.gpu_ops, c.flops, c.bytes_min, c.bytes_written = 1, flops, nb, nb
        c.t_compute, c.t_memory = flops / (peak * MATMUL_EFF), nb / (dev["bw"] * MEM_EFF)
        # the epilogue's math runs on the FP32 pipes while the tensor cores multiply the next tile (Hopper's
        # ping-pong kernels): overlapped, so the longer of the two (not overlapped would be their sum: +0.24 ms on
        # GPT-2 124M, B=8, T=1024)
        c.t_compute = max(c.t_compute, epilogue_flops / (dev["fp32"] * MATMUL_EFF))
    elif op.kind == "kernel":
        flops, bmin, bw, engine = kernel_traffic(op)
        c.gpu_ops, c.flops, c.bytes_min, c.bytes_written = 1, flops, bmin, bw
        c.t_compute = flops / (dev["bf16"] * FLASH_EFF) if engine == "flash" else 0.0
        if engine == "flash":           # the qkv bias added to every loaded q, k, v value, on the FP32/INT pipes
            c.t_compute += flash_bias_instructions(op) / (dev["fp32"] / 2)        # (not overlapped: an upper bound)
        c.t_memory = bw / (dev["bw"] * MEM_EFF)
    else:     # CuPy elementwise / reduction / copy / cast / fill / memset / gather / scatter / sort: memory-bound
        nin, nout = _nb(op.inputs), _nb(op.outputs)
        if op.kind == "gather":
            nin = nout + _nb(op.inputs[1:])                      # the rows it reads, and the index
        elif op.kind == "scatter":
            nout = 2 * _nb(op.inputs[-1:])                       # read-modify-write of the rows it adds into
        elif op.kind in ("fill", "memset"):
            nin = 0
        elif op.kind == "sort":
            nin, nout = 4 * nin, 4 * nout                        # a radix sort: a few passes
        c.gpu_ops, c.bytes_min, c.bytes_written = 1, nin + nout, nin + nout
        c.flops = sum(math.prod(d[0]) for d in op.outputs)
        c.t_memory = (nin + nout) / (dev["bw"] * MEM_EFF)
    c.gpu_s = _gpu_time(c)
    return c


def _matmul_cost(op, dev, c):
    (sa, ta, na), (sb, tb, nbb) = op.inputs[:2]
    (so, to, no), = op.outputs
    K = sa[-1]
    flops = 2.0 * math.prod(so) * K
    dt = np.dtype(ta)
    peak = dev["tf32"] if (dt == np.float32 and op.args.get("tf32")) else dev["fp32"]
    if dt == np.float64:
        peak = dev["fp32"] / 2
    nb = na + nbb + no
    copies = sum(n for (_, _, n), copied in zip(op.inputs, op.args.get("copies", ())) if copied)
    c.gpu_ops = 1 + sum(op.args.get("copies", ()))
    c.flops, c.bytes_min, c.bytes_written = flops, nb, nb + 2 * copies
    c.t_compute, c.t_memory = flops / (peak * MATMUL_EFF), nb / (dev["bw"] * MEM_EFF)
    if copies:                                  # CuPy copies a non-contiguous operand before cuBLAS
        c.t_extra = sum(_mem_time(2 * n, dev) for (_, _, n), copied in zip(op.inputs, op.args["copies"]) if copied)
        c.host_s += (HOST_US["elementwise"] + HOST_US["alloc"]) * 1e-6 * sum(op.args["copies"])
        c.host_ops += 2 * sum(op.args["copies"])
        c.alloc += copies
        c.note = f"CuPy copies {copies / 1e6:.0f} MB of operands"


BIAS_INSTR_PER_VALUE = 3    # unpack the bf16, add the float32 bias, half a cvt.rn.bf16x2 (+ the bias load)
BIAS_TILE_EXTRA_PER_VALUE = 0.25   # tiles only: cp.async lands the raw bf16 in shared memory, so the bias is added
                                   # there: one 16-byte shared load and store more per 8 values


def flash_bias_instructions(op):
    """Instructions the flash kernels spend adding the qkv bias (given one) to the q, k, v values they load:
    every 64 x 64 tile or fragment loaded with the bias, counted per block as flash_attention.cu loads them
    (a tile once, in its [row][d] layout: ldmatrix .trans reads it transposed, so there are no transposed copies)."""
    k, s, null, grid = op.name, op.args["scalars"], op.args["null"], op.args["grid"]
    fwd = k == "flash_attention_forward"
    if null[4 if fwd else 3]:
        return 0
    Tp = s[6] if fwd else s[8]
    BH, nt = grid[1], Tp // 64
    per_block, per_tile = {"flash_attention_forward": (1, 2),        # Q fragments; K, V tiles
                           "flash_attention_backward_dkdv": (2, 1),  # K, V fragments; Q tiles (dO has no bias)
                           "flash_attention_backward_dq": (1, 2)}[k]  # Q fragments; K, V tiles
    # fragments: each row once (nt 64-row tiles' worth); tiles: as many as the blocks load
    return 64 * 64 * BH * (BIAS_INSTR_PER_VALUE * per_block * nt + (BIAS_INSTR_PER_VALUE + BIAS_TILE_EXTRA_PER_VALUE)
                           * per_tile * flash_tile_loads(k, Tp, grid))


def flash_tile_loads(k, Tp, grid):
    """64-row tiles one (batch, head) of a flash kernel loads into shared memory: a block of Tp / grid[0] rows
    (128: queries in the forward and dq, keys in dkdv) loads the causal tiles of its last query row (dkdv: the
    query tiles at or after its first key; the same count, mirrored), each once for all its warps; so 128-row
    blocks load each tile half as often as 64-row ones."""
    nt, nb = Tp // 64, grid[0]
    per = nt // nb                                                  # 64-row tiles per block
    return sum((i + 1) * per for i in range(nb))                    # block i: tiles 0 .. (i+1)*per - 1


def kernel_traffic(op):
    """(FLOPs, minimum bytes, bytes as the kernel moves them, engine) of one of our kernels, from its launch."""
    k, s, null, grid = op.name, op.args["scalars"], op.args["null"], op.args["grid"]
    f4 = 4
    if k in ("encoder_forward", "encoder_forward_f4"):
        BT, T, C = s[4], s[5], s[6]
        nb = BT * C * f4 + BT * 4 + BT * C * f4 + T * C * f4
        return BT * C, nb, nb + (BT - T) * C * f4, "memory"          # wpe rows are re-read for every sequence
    if k == "encoder_backward_wpe":
        B, T, Tmax, C, acc = s[2:7]                                  # acc: added into a buffer (reads its T rows)
        nb = B * T * C * f4 + (T if acc else Tmax) * C * f4 + acc * T * C * f4
        return B * T * C, nb, nb, "memory"
    if k == "encoder_backward_wte":
        BT, C, acc = s[4], s[5], s[6]                                # acc: each touched row read before the add
        nb = 2 * BT * C * f4 + 2 * BT * 4 + acc * BT * C * f4        # (at most BT distinct rows)
        return BT * C, nb, nb, "memory"
    if k == "layernorm_forward":
        N, C = s[13], s[14]
        nbytes = lambda f32, bf16: f4 if not null[f32] else 2 if not null[bf16] else 0   # a float32 or bf16 pair
        res = nbytes(8, 9)                                          # the residual, float32 or bf16 bits (or none)
        h = nbytes(4, 5)                                            # h written (float32, or bf16 in bf16 precision)
        nb = N * C * (nbytes(6, 7) + res + h + nbytes(0, 1)) + 2 * N * f4 + 2 * C * f4    # x read, y written
        return 8 * N * C, nb, nb, "memory"
    if k == "layernorm_backward":
        n_sums, N, C = s[12], s[13], s[14]
        nbytes = lambda f32, bf16: f4 if not null[f32] else 2 if not null[bf16] else 0
        dh_out = (0 if null[0] else f4) + (0 if null[1] else 2)    # dh written as float32, bf16, or both
        nb = N * C * (nbytes(3, 4) + nbytes(5, 6) + nbytes(10, 11) + dh_out) + 2 * N * f4 \
            + n_sums * grid[0] * C * f4                             # dy, h, dres read; partial rows written
        return 10 * N * C, nb, nb, "memory"
    if k == "layernorm_param_reduce":
        nblocks, C = s[4], s[5]
        n_sums = 2 + (not null[2])                                  # dw, db (and the residual bias's sum)
        nb = n_sums * nblocks * C * f4 + 2 * n_sums * C * f4        # partials read; each total added into its buffer
        return n_sums * nblocks * C, nb, nb, "memory"
    if k in ("gelu_forward", "gelu_forward_f4", "gelu_forward_bf16x", "gelu_forward_bf16x4"):
        n = s[4] * (4 if k.endswith("4") else 1)
        x_bytes = 2 if "bf16x" in k else f4                          # x float32, or bf16 bits from c_fc's gemm
        nb = n * (x_bytes + (2 if null[0] else f4))                 # reads x, writes float32 or bf16
        return 15 * n, nb, nb, "memory"
    if k == "gelu_backward":
        n = s[3]
        return 20 * n, 3 * n * f4, 3 * n * f4, "memory"
    if k in ("bias_gelu_backward", "bias_gelu_backward_bf16"):
        N, C = s[6], s[7]
        in_bytes = 2 if k.endswith("bf16") else f4                  # dout and x: float32, or bf16 bits
        nb = N * C * (2 * in_bytes + (2 if null[0] else f4)) + grid[1] * C * f4
        return 20 * N * C, nb, nb, "memory"
    if k == "column_sum_finish":
        nchunks, C, add_into = s[2], s[3], s[4]
        nb = nchunks * C * f4 + C * f4 * (1 + add_into)              # add_into: reads the buffer, adds, writes
        return nchunks * C, nb, nb, "memory"
    if k == "cross_entropy_fused":
        V, N = s[5], grid[0]
        grad = not null[1]
        bmin = N * V * f4 * (1 + grad) + N * (8 + 4)
        return 4 * N * V, bmin, bmin + N * V * f4 * grad, "memory"   # the gradient pass reads the row again
    if k == "cross_entropy_fused_bf16":                              # the same on bf16 logits, bf16 gradient
        V, N = s[5], grid[0]
        grad = not null[1]
        bmin = N * V * 2 * (1 + grad) + N * (8 + 4)
        return 4 * N * V, bmin, bmin + N * V * 2 * grad, "memory"   # the gradient pass reads the row again
    if k == "scale_by_device_scalar":
        n = s[2]
        return n, 2 * n * f4, 2 * n * f4, "memory"
    if k == "sumsq_partial":
        n = s[2]
        return 2 * n, n * f4, n * f4, "memory"
    if k == "norm_and_scale":
        return 2 * s[2], s[2] * f4, s[2] * f4, "memory"
    if k == "adamw_update":
        n = s[6]
        nb = 7 * n * f4 + (0 if null[4] else 2 * n)
        return 12 * n, nb, nb, "memory"
    if k in ("causal_softmax_forward", "causal_softmax_backward"):
        BH, T = (s[2], s[3]) if k.endswith("forward") else (s[3], s[4])
        half = BH * T * (T + 1) // 2 * f4
        reads = 1 if k.endswith("forward") else 2
        return 5 * half // f4, (reads + 1) * half, reads * half + BH * T * T * f4, "memory"   # writes full rows
    if k == "qkv_to_bf16":                                          # float32 qkv (+ bias) -> bf16, same layout
        n, C3 = 2 * s[3], s[4]
        nb = n * (f4 + 2) + (0 if null[2] else C3 * f4)
        return n, nb, nb, "memory"
    if k.startswith("flash_attention_") and k != "flash_attention_backward_prep":
        fwd = k == "flash_attention_forward"
        T, Tp, NH = s[5:8] if fwd else s[7:10]
        o4 = 2 if null[0] else f4                                   # out / dqkv written as float32 or bf16
        BH = grid[1]
        nt = Tp // 64
        tiles = nt * (nt + 1) // 2                                  # causal: 64x64 products at or below the diagonal
        loads = flash_tile_loads(k, Tp, grid)                       # tiles loaded (re-read) per (batch, head)
        C = NH * 64
        B = BH // NH
        part = B * T * C * 2            # one of q, k, v: its third of the bf16 qkv (B, T, 3C), rows t < T only
        # (read in place: 128-byte row pieces 3C * 2 bytes apart, whole 32-byte sectors, so no extra bytes)
        bias = 0 if null[4 if fwd else 3] else 3 * C * f4           # the qkv bias, once (then from cache)
        head = part                                                 # dO: bf16 (B, T, C), read in place too
        # the qkv bias gradient's partial column sums (B * Tp/64, 3C) float32: dkdv writes 2 of the 3 thirds
        sums = 0 if fwd or null[12] else B * nt * C * f4 * (2 if k == "flash_attention_backward_dkdv" else 1)
        matmuls = {"flash_attention_forward": 2, "flash_attention_backward_dkdv": 4,
                   "flash_attention_backward_dq": 3}[k]
        flops = 2.0 * 64 * 64 * 64 * tiles * BH * matmuls
        if fwd:
            bmin = 3 * part + bias + B * T * C * o4 + BH * Tp * f4
            bw = part + bias + B * T * C * o4 + BH * Tp * f4 + 2 * part * loads / nt   # K, V re-read per query block
        elif k == "flash_attention_backward_dkdv":
            bmin = 3 * part + head + bias + 2 * BH * Tp * f4 + 2 * B * T * C * o4 + sums
            bw = 2 * part + bias + 2 * B * T * C * o4 + sums + (part + head + 2 * BH * Tp * f4) * loads / nt
        else:
            bmin = 3 * part + head + bias + 2 * BH * Tp * f4 + B * T * C * o4 + sums
            bw = part + head + bias + B * T * C * o4 + sums + BH * Tp * f4 * 2 + 2 * part * loads / nt
        return flops, bmin, bw, "flash"
    if k == "flash_attention_backward_prep":
        B, T, Tp, NH = s[6:10]
        d4 = 2 if null[2] else f4 + 2                               # dO read as bf16, or float32 + its bf16 copy written
        o4 = 2 if null[4] else f4                                   # O read as float32 or bf16
        nb = B * T * NH * 64 * (d4 + o4) + B * NH * Tp * f4         # + D
        return 2 * B * T * NH * 64, nb, nb, "memory"
    if k == "bf16_column_sum_partial":
        N, C = s[2], s[3]
        return N * C, N * C * 2 + grid[1] * C * f4, N * C * 2 + grid[1] * C * f4, "memory"
    if k in ("f32_to_bf16", "bf16_to_f32"):
        n = s[2]
        return 0, 6 * n, 6 * n, "memory"
    raise KeyError(f"gpu_model: no traffic formula for kernel {k} (add one to kernel_traffic)")


# ------------------------------------------------------------------------------------------ summaries

@dataclass
class Summary:
    rows: dict                       # category -> Cost
    peak: float
    syncs: int
    py_tail_s: float
    params: int
    ops: list = field(default_factory=list)

    def total(self):
        t = Cost("total")
        for r in self.rows.values():
            t.add(r)
        t.host_s += self.py_tail_s
        t.py_s += self.py_tail_s
        return t


def summarize(trace: Trace, device="h100") -> Summary:
    dev = DEVICES[device]
    rows = {c: Cost(c) for c in CATEGORIES}
    syncs = 0
    costs = []
    for op in trace.ops:
        c = op_cost(op, dev)
        c.host_s += op.py_s
        rows[c.category].add(c)
        syncs += op.kind == "d2h"
        costs.append((op, c))
    return Summary(rows, trace.peak, syncs, trace.tail_py_s, trace.params, costs)


def extrapolate(s1: Summary, s2: Summary, n_layer: int) -> Summary:
    """An n_layer model from the 1- and 2-layer traces: the blocks' ops of the 2-layer trace (layer 0, a block
    whose output feeds another block, n_layer - 1 times; layer 1, the last block, whose output feeds only ln_f
    (model.py fuses each block's last residual add with the layernorm after it), once), and every other op (embedding, head, loss, flat-buffer ops such as AdamW) with
    its bytes, FLOPs and times extrapolated linearly, op by op: c1 + (n_layer - 1) * (c2 - c1)."""
    k = n_layer - 1
    rest1 = [(op, c) for op, c in s1.ops if op.phase[1] is None]
    rest2 = [(op, c) for op, c in s2.ops if op.phase[1] is None]
    if [(o.kind, o.name) for o, _ in rest1] != [(o.kind, o.name) for o, _ in rest2]:
        raise ValueError("the 1- and 2-layer traces differ outside the blocks: trace every layer (--full)")
    rows = {cat: Cost(cat) for cat in CATEGORIES}
    for op, c in s2.ops:
        if op.phase[1] is not None:
            rows[c.category].add(c, k if op.phase[1] == 0 else 1)
    for (_, c1), (_, c2) in zip(rest1, rest2):
        c = Cost(c1.category)
        for f in Cost.ADDITIVE + ("t_compute", "t_memory", "t_extra"):
            setattr(c, f, getattr(c1, f) + k * (getattr(c2, f) - getattr(c1, f)))
        c.host_ops, c.host_s, c.py_s = c2.host_ops, c2.host_s, c2.py_s     # host cost per call: size-independent
        c.gpu_s = _gpu_time(c)
        rows[c.category].add(c)
    lin = lambda a, b: a + k * (b - a)
    return Summary(rows, lin(s1.peak, s2.peak), int(round(lin(s1.syncs, s2.syncs))),
                   lin(s1.py_tail_s, s2.py_tail_s), int(round(lin(s1.params, s2.params))))


def model_step(cfg: StepConfig, device="h100", full=False, shape_only=True):
    """(Summary, traces) for cfg on `device`: extrapolated from 1 and 2 layers unless full (or n_layer < 3)."""
    if full or cfg.n_layer < 3:
        tr = trace_step(cfg, device=device, shape_only=shape_only)
        return summarize(tr, device), [tr]
    t1 = trace_step(cfg, 1, device=device, shape_only=shape_only)
    t2 = trace_step(cfg, 2, device=device, shape_only=shape_only)
    return extrapolate(summarize(t1, device), summarize(t2, device), cfg.n_layer), [t1, t2]


# ------------------------------------------------------------------------------------------ printing

def assumptions(cfg: StepConfig, device):
    d = DEVICES[device]
    return [
        "PREDICTED by a model, not measured on a GPU. Assumptions:",
        f"  device {d['name']}: bf16 {d['bf16'] / 1e12:.1f}, TF32 {d['tf32'] / 1e12:.1f}, FP32 {d['fp32'] / 1e12:.1f} "
        f"TFLOP/s dense; {d['bw'] / 1e12:.2f} TB/s; {d['sms']} SMs",
        f"  sources: {SOURCES}",
        f"  cuBLAS matmuls at {MATMUL_EFF:.0%} of the peak of their precision (float32 matmuls: TF32 when CuPy's "
        f"compute type is TF32, else FP32); our flash kernels at {FLASH_EFF:.0%} of the bf16 peak",
        f"  memory-bound ops at {MEM_EFF:.0%} of the bandwidth; at least {LAUNCH_FLOOR_S * 1e6:.0f} us per launch; "
        f"host<->device {PCIE_BPS / 1e9:.0f} GB/s",
        "  host: the project's Python measured on this CPU (shape-only trace, tracer time excluded) + CuPy per call "
        "(assumed, us): " + ", ".join(f"{k} {v:g}" for k, v in HOST_US.items()),
        "  CuPy copies non-contiguous operands of batched matmuls (cupy/_core/_routines_linalg.pyx: matmul -> "
        "ascontiguousarray); 2-D transposes go to cuBLAS as flags",
        "  step time = max(GPU, host) (host enqueues ahead of the GPU; host syncs (device->host copies: the "
        "trainer's one loss transfer per step) are counted, not modelled); tokens/s = B * T * grad_accum / step time",
        f"  step: trainer.train_step, configured by run_setup.setup_device; {cfg.dtype}, attention={cfg.attention}, "
        f"TF32={cfg.tf32}, B={cfg.batch_size}, T={cfg.block_size}, grad_accum={cfg.grad_accum_steps}",
    ]


def report(summary: Summary, cfg: StepConfig, device, how) -> str:
    lines = assumptions(cfg, device)
    lines.append(f"  traced: {how}")
    lines.append("")
    lines.append(f"PREDICTED GPU step on {DEVICES[device]['name']}: GPT n_layer={cfg.n_layer} n_head={cfg.n_head} "
                 f"n_embd={cfg.n_embd} vocab={cfg.vocab_size} ({summary.params / 1e6:.1f}M parameters)")
    head = (f"{'category':<20}{'GPU ops':>8}{'GFLOP':>10}{'GB min':>9}{'GB written':>11}{'GPU ms':>9}"
            f"{'host ops':>9}{'host ms':>9}{'alloc GB':>9}")
    lines += [head, "-" * len(head)]
    for cat in CATEGORIES:
        r = summary.rows[cat]
        lines.append(f"{cat:<20}{r.gpu_ops:>8.0f}{r.flops / 1e9:>10.1f}{r.bytes_min / 1e9:>9.2f}"
                     f"{r.bytes_written / 1e9:>11.2f}{r.gpu_s * 1e3:>9.2f}{r.host_ops:>9.0f}{r.host_s * 1e3:>9.2f}"
                     f"{r.alloc / 1e9:>9.2f}")
    t = summary.total()
    lines.append("-" * len(head))
    lines.append(f"{'total':<20}{t.gpu_ops:>8.0f}{t.flops / 1e9:>10.1f}{t.bytes_min / 1e9:>9.2f}"
                 f"{t.bytes_written / 1e9:>11.2f}{t.gpu_s * 1e3:>9.2f}{t.host_ops:>9.0f}{t.host_s * 1e3:>9.2f}"
                 f"{t.alloc / 1e9:>9.2f}")
    step = max(t.gpu_s, t.host_s)
    bound = "host-bound" if t.host_s > t.gpu_s else "GPU-bound"
    lines += [
        "",
        f"predicted GPU time per step   {t.gpu_s * 1e3:9.2f} ms",
        f"predicted host time per step  {t.host_s * 1e3:9.2f} ms  (project Python measured here {t.py_s * 1e3:.2f} ms"
        f" + CuPy calls assumed {(t.host_s - t.py_s) * 1e3:.2f} ms; {summary.syncs} host sync(s) per step)",
        f"predicted step                {step * 1e3:9.2f} ms  ({bound})",
        f"predicted tokens/s            {cfg.tokens / step:9,.0f}",
        f"predicted bytes per step      {t.bytes_written / 1e9:9.2f} GB as written ({t.bytes_min / 1e9:.2f} GB minimum)",
        f"predicted peak memory         {summary.peak / 1e9:9.2f} GB (live arrays; CuPy's pool rounds up and caches)",
    ]
    return "\n".join(lines)


EPILOGUE_NAMES = {getattr(lt, "EPILOGUE_" + name): name for name in ("GELU_AUX_BIAS", "GELU_AUX", "DGELU_BGRAD", "DGELU")}


def op_lines(summary: Summary):
    out = [f"{'#':>5} {'phase':<12}{'category':<20}{'kind':<12}{'name':<32}{'GPU us':>9}{'host us':>9}  shapes"]
    for i, (op, c) in enumerate(summary.ops):
        stage, layer = op.phase
        phase = stage + ("" if layer is None else f" h.{layer}")
        shapes = " ".join(f"{s}{np.dtype(d).name}" for s, d, _ in op.inputs[:3])
        if op.kind == "kernel":
            shapes = f"grid {op.args['grid']} block {op.args['block']}"
        elif op.kind == "gemm":
            a = op.args
            shapes = f"m={a['m']} n={a['n']} k={a['k']} beta={a['beta']:g}" + (f" batch={a['batch']}" if "batch" in a else "")
            shapes += f" epilogue={EPILOGUE_NAMES.get(a['epilogue'], a['epilogue'])}" if a.get("epilogue") else ""
        if op.outputs and op.kind not in ("kernel", "gemm"):
            shapes += " -> " + " ".join(f"{s}{np.dtype(d).name}" for s, d, _ in op.outputs[:1])
        out.append(f"{i:>5} {phase:<12}{c.category:<20}{op.kind:<12}{op.name[:31]:<32}{c.gpu_s * 1e6:>9.1f}"
                   f"{c.host_s * 1e6:>9.1f}  {shapes}{'  ' + c.note if c.note else ''}")
    return out


def as_json(summary: Summary, cfg: StepConfig, device):
    t = summary.total()
    step = max(t.gpu_s, t.host_s)
    return {"predicted": True, "device": DEVICES[device]["name"], "config": cfg.__dict__,
            "categories": {c: {k: getattr(r, k) for k in ("gpu_ops", "flops", "bytes_min", "bytes_written", "gpu_s",
                                                           "host_ops", "host_s", "alloc")}
                           for c, r in summary.rows.items()},
            "gpu_ms": t.gpu_s * 1e3, "host_ms": t.host_s * 1e3, "python_ms": t.py_s * 1e3,
            "tokens_per_s": cfg.tokens / step, "bytes_written": t.bytes_written, "bytes_min": t.bytes_min,
            "peak_bytes": summary.peak, "syncs": summary.syncs}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Traced performance model of one GPU training step (PREDICTED, "
                                            "not measured): where a step's time, bytes and host calls go.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2",
                   help="starting point (gpt2: GPT-2 124M, B=8, T=1024); the flags below override it")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "block_size", "grad_accum_steps"):
        p.add_argument("--" + name, type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--attention", choices=("matmul", "flash"), default="matmul")
    p.add_argument("--tf32", choices=("trainer", "on", "off"), default="trainer",
                   help="float32 matmuls on TF32: as the trainer leaves it (default), or forced")
    p.add_argument("--device", choices=sorted(DEVICES), default="h100")
    p.add_argument("--ops", action="store_true", help="list every op of the step (traces every layer)")
    p.add_argument("--full", action="store_true", help="trace every layer instead of extrapolating from 1 and 2")
    p.add_argument("--arithmetic", action="store_true",
                   help="compute for real while tracing (slow: small configs only; checks shape-only mode)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="also predict the trainer's --cuda_graph mode: the same GPU work, and as host time per "
                        "step the graph launch plus the host work outside the graph (traced)")
    p.add_argument("--json", help="also write the totals to this JSON file")
    return p.parse_args(argv)


def graph_mode(summary: Summary, cfg: StepConfig, device, shape_only=True):
    """The --cuda_graph prediction: GPU time as the eager step's (`summary`); host time from a trace of the
    trainer's GraphedStep at one layer (its host work outside the graph does not depend on the depth).
    Returns (lines, dict)."""
    gcfg = StepConfig(**{**cfg.__dict__, "cuda_graph": True})
    trace = trace_step(gcfg, 1, device=device, shape_only=shape_only)
    g = summarize(trace, device)
    host = g.total()
    kinds = {}
    for op in trace.ops:
        kinds[op.kind] = kinds.get(op.kind, 0) + 1
    gpu = summary.total().gpu_s
    step = max(gpu, host.host_s)
    d = {"host_ms": host.host_s * 1e3, "host_ops": host.host_ops, "python_ms": host.py_s * 1e3,
         "gpu_ms": gpu * 1e3, "tokens_per_s": cfg.tokens / step, "ops_outside_graph": kinds}
    lines = [
        "",
        "PREDICTED with --cuda_graph (the step captured once, then one graph launch per step):",
        f"  host work per step outside the graph: {host.host_ops:.0f} calls "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); graph launch assumed {HOST_US['graph']:g} us",
        f"predicted GPU time per step   {gpu * 1e3:9.2f} ms  (the eager step's kernels)",
        f"predicted host time per step  {host.host_s * 1e3:9.2f} ms  (project Python measured here "
        f"{host.py_s * 1e3:.2f} ms + CuPy calls assumed {(host.host_s - host.py_s) * 1e3:.2f} ms; "
        f"{g.syncs} host sync(s) per step)",
        f"predicted step                {step * 1e3:9.2f} ms  ({'host-bound' if host.host_s > gpu else 'GPU-bound'})",
        f"predicted tokens/s            {cfg.tokens / step:9,.0f}",
    ]
    return lines, d


def main(argv=None):
    a = parse_args(argv)
    cfg = StepConfig(**PRESETS[a.preset])
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "block_size", "grad_accum_steps"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    cfg.dtype, cfg.attention, cfg.tf32 = a.dtype, a.attention, a.tf32
    t0 = time.perf_counter()
    full = a.full or a.ops
    summary, traces = model_step(cfg, a.device, full=full, shape_only=not a.arithmetic)
    how = (f"all {cfg.n_layer} layers" if len(traces) == 1 else
           f"1 and 2 layers, extrapolated to {cfg.n_layer}") + \
          f" ({'with arithmetic' if a.arithmetic else 'shape-only'}, {time.perf_counter() - t0:.1f} s on this CPU)"
    print(report(summary, cfg, a.device, how))
    graph = None
    if a.cuda_graph:
        lines, graph = graph_mode(summary, cfg, a.device, shape_only=not a.arithmetic)
        print("\n".join(lines))
    if a.ops:
        print()
        print("\n".join(op_lines(summary)))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({**as_json(summary, cfg, a.device), **({"cuda_graph": graph} if graph else {})}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
