"""--cuda_graph: the GPU training step captured once as a CUDA graph, then replayed every step.

Eagerly, Python issues a step's ~700 launches, cuBLAS calls and allocations one by one (milliseconds of host
time per step). A CUDA graph records the work a stream is given once (Stream.begin_capture / end_capture) and
replays all of it with one call (Graph.launch). A replay runs the captured kernels with the captured
arguments, so everything that changes from step to step must already live in device memory at fixed addresses:

    the batch              -> fixed (k, B, T) buffers, filled with .set() before the replay (k = grad_accum_steps)
    lr, bias corrections   -> kernels/adamw.step_scalars(), one (3,) array written before the replay
    the micro-batch losses -> one (k,) output of the graph, read after the replay (the step's one transfer)
    temporaries            -> a memory pool of the graph's own, kept alive with it, so their addresses stay valid

What cannot change between replays, and is therefore refused: the micro-batches' loss weights (n / total is a
Python float frozen at capture: every target must count, so no masked task data), dropout (its generator is
reseeded on the host: a replay would repeat the captured masks), several ranks (the gradient all-reduce
and host collectives), and the matmul attention (CuPy's matmul: CuPy refuses cuBLAS during a capture; the gemms
of kernels/precision.py call cuBLAS through kernels/cublas_ctypes.py, which can be captured). A capture that is
refused anyway is ended and dropped, with one line saying why, and the run goes on eagerly. The first step runs eagerly (kernels compile, caches fill; CuPy's capture forbids
host<->device copies), the second is captured and replayed, and from then on each step is one replay. The
arithmetic is the eager step's, op for op: the losses and weights are the same (tests/test_cuda_graph.py).
nanogpt_np/kernels/README.md ("CUDA graphs") has what CuPy allows during a capture, with source references.
"""
import numpy as np

from . import backend
from .run_setup import DataError
from .tensor import backward


def check_supported(cfg, world_size: int) -> None:
    """Refuse the runs a replay could not reproduce (see the module docstring)."""
    from .config import ConfigError
    if backend.device() != "cuda":
        raise ConfigError("--cuda_graph needs the GPU (--device=cuda)")
    if cfg.dropout > 0:
        raise ConfigError("--cuda_graph needs --dropout=0 (a replay would repeat the captured dropout masks)")
    if world_size > 1:
        raise ConfigError("--cuda_graph runs on one GPU (no ranks)")
    from .kernels import registry
    if registry.attention_kind() != "flash" or cfg.n_embd // cfg.n_head != 64:
        raise ConfigError("--cuda_graph needs flash attention (head size 64; --dtype=bfloat16 or "
                          "NANOGPT_ATTENTION=flash): the matmul attention multiplies with CuPy's matmul, whose "
                          "cuBLAS calls CuPy refuses during a capture")


class GraphedStep:
    """train_step for --cuda_graph: the same arithmetic as trainer.train_step, run as one graph replay."""

    def __init__(self, run, echo=print):
        import cupy as cp
        self.echo = echo                                      # says once why a capture was refused
        from .optim import _fused_adamw
        self.fused = _fused_adamw(run.model.flat_params)
        if self.fused is None:
            raise RuntimeError("--cuda_graph needs the fused AdamW kernel")
        cfg = run.cfg
        shape = (cfg.grad_accum_steps, cfg.batch_size, cfg.block_size)
        self.stream = cp.cuda.Stream(non_blocking=True)      # capture needs a stream other than the default one
        self.pool = cp.cuda.MemoryPool()                      # the graph's temporaries: alive with the graph
        with self.stream:
            self.x = cp.empty(shape, dtype=cp.int64)          # (k, B, T) the step's micro-batches, fixed addresses
            self.y = cp.empty(shape, dtype=cp.int64)
        self.graph = None
        self.losses = self.norm = None                        # the step's outputs, (k,) and [norm, scale]

    def __call__(self, run, lr: float):
        """One optimizer step. Returns (mean loss, gradient norm before clipping (device array))."""
        from .kernels.adamw import step_scalars
        cfg, opt = run.cfg, run.optimizer
        batches = [run.loader.next_batch() for _ in range(cfg.grad_accum_steps)]
        if any((y == -1).any() for _, y in batches):
            raise DataError("--cuda_graph needs batches whose every target counts (the loss weights are fixed "
                            "when the step is captured): train without it on masked task data")
        backend.synchronize()             # eager work on the default stream (evaluation, a weight restore) is done
        with self.stream:
            self.x.set(np.stack([x for x, _ in batches]).astype(np.int64))
            self.y.set(np.stack([y for _, y in batches]).astype(np.int64))
            opt.step_count += 1
            scalars = step_scalars(lr, opt.beta1, opt.beta2, opt.step_count)
            if self.losses is None:                           # the first step: eager (compiles, fills caches)
                self.losses, self.norm = self._body(run, scalars)
            else:
                if self.graph is None:                        # the second: captured (nothing runs), then replayed
                    self.graph = self._capture(run, scalars)
                if self.graph is False:                       # capture refused: every step eager, as without
                    self.losses, self.norm = self._body(run, scalars)
                else:
                    self.graph.launch(stream=self.stream)
            values = backend.to_numpy(self.losses).tolist()    # the step's one transfer (waits for the step)
        n = cfg.batch_size * cfg.block_size                   # every target counts: the weights are equal
        total = n * len(values)
        loss_sum = 0.0
        for value in values:
            loss_sum += value * n                             # as trainer.accumulate_gradients sums
        return loss_sum / total, self.norm[0]

    def _capture(self, run, scalars):
        """Capture _body into a graph (nothing runs). Returns the graph, or False when CUDA or CuPy refuses a call
        of the step during the capture (CuPy's cuBLAS wrapper raises NotImplementedError, the runtime raises
        CUDARuntimeError): the capture is ended and dropped, one line says why, and the run goes on eagerly."""
        import cupy as cp
        from .kernels import precision
        precision.bind_stream()                       # the gemms' handle on this stream: no cuBLAS setting
        cp.get_default_memory_pool().free_all_blocks()    # changes during the capture; step 1's temporaries:
        with cp.cuda.using_allocator(self.pool.malloc):   # to the graph's own pool
            self.stream.begin_capture()
            try:
                self.losses, self.norm = self._body(run, scalars)
            except (NotImplementedError, cp.cuda.runtime.CUDARuntimeError) as e:
                try:
                    self.stream.end_capture()         # leaves the stream out of capture mode; the graph is dropped
                except Exception:                     # (CUDA may report the capture as invalidated)
                    pass
                self.echo(f"--cuda_graph: the step could not be captured ({type(e).__name__}: {e}); "
                      "running every step eagerly instead")
                return False
            return self.stream.end_capture()

    def _body(self, run, scalars):
        """What the graph holds: zero the gradients, forward and backward over the k micro-batches, AdamW with
        the scalars read from the device. Returns ((k,) losses, [norm, scale]). zero_grad's host-side flags
        (tensor.fresh_grads) are set and cleared by the capture exactly as by an eager step, so the graph holds the
        same beta = 0 first writes of the matrices' gradients (tests/test_cuda_graph.py)."""
        cp = backend.xp_of(self.x)
        cfg, model, opt = run.cfg, run.model, run.optimizer
        k = cfg.grad_accum_steps
        n = cfg.batch_size * cfg.block_size
        model.zero_grad()
        losses = []
        for i in range(k):
            _, loss = model(self.x[i], self.y[i])             # (B, T) views of the fixed buffers
            backward(loss, grad=cp.full((), n / (n * k), loss.dtype))
            losses.append(loss.data)
        model.finish_gradients()         # (nothing fresh after a full backward: no GPU work, as in the eager step)
        norm = self.fused(model.flat_params, model.flat_grads, opt.m, opt.v, n_decay=model.n_decay,
                          beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay,
                          grad_clip=cfg.grad_clip, scratch=opt.scratch, scalars=scalars,
                          params_bf16=model.flat_params_bf16)          # bf16 matmuls: their weights' copy too
        model.params_written(bf16_copy_refreshed=model.flat_params_bf16 is not None)
        return cp.stack(losses), norm
