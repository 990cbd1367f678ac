"""The training loop: data -> model -> AdamW, with evaluation, logs and checkpoints that resume exactly.

One optimizer step:
    lr = warmup-then-cosine(step)
    zero the flat gradient buffer
    repeat grad_accum_steps times:   x, y = next batch;  loss = model(x, y);  backward(loss * its share of targets)
    clip the global gradient norm;  AdamW step

Everything random comes from generators seeded by `seed`: the initial weights, the batch order (the loader's
state is saved with each checkpoint) and dropout (reseeded from (seed, step) every step). So an interrupted run
resumed with --resume produces the same losses, bit for bit, as one that never stopped.

What happens before the first step (device, tokenizer, data, model, --resume / --init_from) is in run_setup.py;
this file is the loop itself, then its helpers: logging and evaluation, checkpoints, Ctrl-C handling.

With `mpiexec -n N` every rank runs this same loop on its rows of each batch (distributed/__init__.py): the
gradients are summed over the ranks once per step, rank 0 logs and writes checkpoints, and a stop request
on any rank stops them all at the same step boundary.
"""
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from . import backend, distributed
from .config import TrainConfig
from .data.loader import BatchLoader
from .io.checkpoint import read_best_weights, save_checkpoint
from .io.files import atomic_write_text
from .model import GPT
from .optim import lr_at
from .run_setup import DataError, Run, setup_run
from .tensor import backward


# ----------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, echo=print) -> dict:
    """Run training as configured. Returns a summary: final step, last train loss, best val loss."""
    world = distributed.connect()               # one process, or this rank of `mpiexec -n N`
    echo = echo if world.is_main else _quiet    # rank 0 speaks (and writes) for every rank
    run = setup_run(cfg, echo, world)           # device, tokenizer, data, model, optimizer, resumed state
    if cfg.cuda_graph:                          # the step as one CUDA-graph replay (cuda_graph.py)
        from .cuda_graph import GraphedStep, check_supported
        check_supported(cfg, world.world_size)
        run.graphed_step = GraphedStep(run, echo)
    log = RunLog(cfg.out_dir, write_file=world.is_main, echo=echo)
    if cfg.resume:
        log.forget_after(run.step)
    stopper = StopAtStepBoundary(echo)
    best = BestWeights(run)
    timer = StepTimer(tokens_per_step=cfg.batch_size * cfg.block_size * cfg.grad_accum_steps)
    last_loss, interrupted = None, False
    with stopper:
        while run.step < cfg.max_iters:
            lr = lr_at(run.step, lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                       decay_iters=cfg.lr_decay_iters or cfg.max_iters)
            last_loss, grad_norm = train_step(run, lr)
            run.step += 1
            timer.count_step()
            last = run.step == cfg.max_iters
            if run.step % cfg.log_interval == 0 or last:
                log_train_step(log, run.step, last_loss, lr, grad_norm, timer)
            if run.step % cfg.eval_interval == 0 or last:
                improved = evaluate_and_log(run, log)
                best.remember_if(improved)
                if cfg.early_stopping_patience and run.bad_evals >= cfg.early_stopping_patience:
                    kept = best.restore()
                    save(run, stopper, best, finished=f"early stopping at step {run.step}, weights of step {kept}")
                    echo(f"early stopping: no better validation loss for {run.bad_evals} evaluations; "
                         f"kept the weights of step {kept} (val loss {run.best_val:.4f})")
                    break
                save(run, stopper, best)
                timer.restart()                   # evaluation and saving do not count as step time
            if world.any_rank(stopper.requested):      # a signal to any rank stops every rank here
                if run.step < cfg.max_iters:
                    save(run, stopper, best)
                    echo(f"stopped at step {run.step}; " + (f"checkpoint saved in {cfg.out_dir} (continue with "
                         f"--resume)" if cfg.save_checkpoints else "checkpoints are off: nothing saved"))
                    interrupted = True
                break
    return {"step": run.step, "train_loss": last_loss, "best_val_loss": run.best_val, "out_dir": cfg.out_dir,
            "interrupted": interrupted}


def train_step(run: Run, lr: float):
    """One optimizer step: zero the flat gradient buffer (model.zero_grad), forward and backward over
    grad_accum_steps micro-batches, finish the gradients, clip the global gradient norm, AdamW.
    Returns (mean loss, gradient norm before clipping)."""
    cfg, model = run.cfg, run.model
    if run.graphed_step is not None:            # --cuda_graph: the same arithmetic, as one graph replay
        loss, grad_norm = run.graphed_step(run, lr)
    else:
        # Dropout masks come from a generator seeded by (seed, step): nothing to save for an exact resume.
        # With several ranks, by (seed, step, rank): each rank's rows get their own masks.
        words = [cfg.seed, run.step] + ([run.world.rank] if run.world.world_size > 1 else [])
        model.reseed_dropout(int(np.random.SeedSequence(words).generate_state(1)[0]))
        model.zero_grad()
        batches = [run.loader.next_batch() for _ in range(cfg.grad_accum_steps)]
        loss = accumulate_gradients(model, batches, run.world)
        model.finish_gradients()                       # flat_grads complete (a GPU matrix nobody wrote: zeroed)
        run.world.allreduce_sum_(model.flat_grads)     # the step's one gradient reduction: every rank gets the sum
        grad_norm = run.optimizer.step(lr, cfg.grad_clip)                 # clips, then updates
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {run.step + 1}; try a lower --learning_rate")
    return loss, grad_norm


def accumulate_gradients(model, batches, world=distributed.SINGLE) -> float:
    """Forward and backward over micro-batches, summing gradients into model.flat_grads as if they were one
    batch. Each micro-batch's mean loss is weighted by its share of the targets that count (task data masks
    prompt positions, so micro-batches differ), which makes k micro-batches equal one k-times larger batch.
    With ranks, the share is of the targets of all ranks together, so that summing the ranks' gradients gives
    the gradient of the whole global batch. Returns the mean loss per counted target (over all ranks).

    The micro-batches' losses stay on the device until the end: one transfer per step, not one sync per
    micro-batch (on the GPU a sync would stall the host until the GPU caught up, every micro-batch)."""
    counts = [int((y != -1).sum()) for _, y in batches]
    (total,) = world.sum_values(sum(counts))                          # every rank's targets of this step
    total = int(total)
    if total == 0:
        raise DataError("a training batch has no target to learn from (every position is masked)")
    losses, weights = [], []                      # each counted micro-batch's mean loss (a 0-d device array)
    for (x, y), n in zip(batches, counts):
        if n == 0:
            continue
        _, loss = model(backend.to_device(x), backend.to_device(y))        # x, y: (B, T) integer ids
        xp = backend.xp_of(loss.data)
        backward(loss, grad=xp.full((), n / total, loss.dtype))
        losses.append(loss.data)
        weights.append(n)
    values = backend.to_numpy(xp.stack(losses)).tolist() if losses else []    # the step's one transfer
    loss_sum = 0.0
    for value, n in zip(values, weights):
        loss_sum += value * n                     # in float64 on the host, in order: the sum it always was
    (loss_sum,) = world.sum_values(loss_sum)
    return loss_sum / total


# ----------------------------------------------------------------------------------------------- logging

class RunLog:
    """Human-readable lines on stdout and the same records as JSON lines in out_dir/log.jsonl."""

    def __init__(self, out_dir, write_file=True, echo=print):
        self.path = os.path.join(out_dir, "log.jsonl") if write_file else None
        self.echo = echo

    def forget_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (a crash may have logged steps that the
        resumed run will now repeat), so log.jsonl holds each step once. A kill -9 in the middle of a write
        can leave a torn last line: it is dropped too."""
        if not self.path or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue                      # a torn line (or a blank one)
                if entry.get("step", 0) <= step:
                    kept.append(json.dumps(entry) + "\n")
        atomic_write_text(self.path, "".join(kept))

    def record(self, entry: dict, line: str):
        self.echo(line)
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


def evaluate(model: GPT, tokens, batch_size, block_size, max_batches) -> float:
    """Mean loss over `max_batches` batches of (B, T) windows spread evenly over all of `tokens`: a sample of
    the whole validation split, the same windows at every evaluation (deterministic)."""
    loader = BatchLoader(tokens, batch_size, block_size, seed=0)
    was_training = model.training
    model.eval()
    losses = [model.loss_on(backend.to_device(x), backend.to_device(y))
              for x, y in loader.iter_spread(max_batches)]
    model.train(was_training)
    return float(np.mean(losses))


def evaluate_and_log(run: Run, log: RunLog) -> bool:
    """Measure the validation loss, update the best loss and the early-stopping count, log it.
    Returns whether it improved on the best so far."""
    cfg = run.cfg
    if run.val_loader is not None:
        from .data.task_data import task_val_loss
        val_loss = task_val_loss(run.model, run.val_loader, cfg.eval_iters)
    else:
        val_loss = evaluate(run.model, run.val_tokens, cfg.batch_size, cfg.block_size, cfg.eval_iters)
    val_loss = run.world.from_main(val_loss)     # ranks measure the same weights; rank 0's value decides for all
    if not math.isfinite(val_loss):
        raise FloatingPointError(f"validation loss became {val_loss} at step {run.step}; try a lower --learning_rate")
    improved = val_loss < run.best_val
    run.best_val, run.bad_evals = (val_loss, 0) if improved else (run.best_val, run.bad_evals + 1)
    ppl = math.exp(val_loss) if val_loss < 700 else math.inf
    log.record({"type": "eval", "step": run.step, "val_loss": val_loss,
                "val_ppl": ppl if math.isfinite(ppl) else None, "best_val_loss": run.best_val},
               f"eval {run.step:6d} | val loss {val_loss:.4f} | val ppl {ppl:9.2f}" + (" | best" if improved else ""))
    return improved


class StepTimer:
    """Milliseconds per step and tokens per second since the last report (evaluation excluded)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart()

    def restart(self):
        self.t0, self.steps = time.perf_counter(), 0

    def count_step(self):
        self.steps += 1

    def report(self):
        """(ms per step, tokens per s) since the last report; restarts the count."""
        backend.synchronize()                 # the GPU runs ahead of Python: wait for it before reading the clock
        ms = (time.perf_counter() - self.t0) * 1000 / max(self.steps, 1)
        self.restart()
        return ms, self.tokens_per_step / (ms / 1000)


def log_train_step(log: RunLog, step, loss, lr, grad_norm, timer: StepTimer):
    ms, tokens_per_s = timer.report()
    entry = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
             "ms_per_step": ms, "tokens_per_s": tokens_per_s}
    log.record(entry, f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {float(grad_norm):7.3f} | "
                      f"{ms:7.1f} ms/step | {tokens_per_s:,.0f} tok/s")


# ----------------------------------------------------------------------------------------------- checkpoints

def save(run: Run, stopper, best=None, finished=None):
    """A checkpoint of the run as it is now (weights, optimizer, step, loader position, early-stopping state
    and best weights). A step is saved once (Ctrl-C right after an evaluation's save has nothing to add)."""
    cfg = run.cfg
    if not cfg.save_checkpoints or run.step == run.saved_step:
        return
    run.world.assert_identical(run.model.flat_params, "weights")     # cheap proof that the ranks stay in step
    if not run.world.is_main:                     # rank 0 writes; the others wait below until it is written
        run.world.barrier()
        run.saved_step = run.step                 # on every rank, so all skip (or all join) the next save alike
        return
    state = {"step": run.step, "loader": run.loader.state_dict(), "ranks": run.world.world_size,
             "best_val_loss": run.best_val if math.isfinite(run.best_val) else None, "bad_evals": run.bad_evals}
    if finished:
        state["finished"] = finished
    stopper.saving = True
    try:
        save_checkpoint(cfg.out_dir, run.model, run.optimizer, cfg.to_dict(), state, run.tokenizer,
                        best_weights=best.saved() if best else None)
        run.saved_step = run.step
    finally:
        stopper.saving = False
    run.world.barrier()


class BestWeights:
    """Early stopping ends a run with the weights of its best evaluation, not the last (worse) ones. They are
    kept in memory (a host copy) and saved with every checkpoint, which is where a resumed run finds them."""

    def __init__(self, run: Run):
        self.run = run
        self.params, self.step = None, None
        if run.cfg.resume and run.cfg.early_stopping_patience:
            self.params, self.step = read_best_weights(run.cfg.out_dir) or (None, None)

    def remember_if(self, improved: bool):
        run = self.run
        if improved and run.cfg.early_stopping_patience:
            self.params, self.step = run.model.state_dict(), run.step       # host copies

    def saved(self):
        """(weights, step) to save with a checkpoint, or None."""
        return None if self.params is None else (self.params, self.step)

    def restore(self):
        """Put the best weights back into the model; returns the step they are from."""
        if self.params is not None:
            self.run.model.load_params(self.params, source=f"the best weights (step {self.step})")
        return self.step


def _quiet(*args, **kwargs):
    """The echo of ranks other than 0."""


class StopAtStepBoundary:
    """Ctrl-C (SIGINT) or SIGTERM during training asks the loop to finish the current step, save a
    checkpoint and stop; a second signal stops at once without saving (the last checkpoint stays intact).
    Stopping between steps, never inside one, is what keeps an interrupted run exactly resumable: the
    optimizer never saves a half-applied update, and the data loader never skips a batch."""

    def __init__(self, echo):
        self.echo = echo
        self.requested = False
        self.saving = False        # while a checkpoint is being written, even a second signal waits for it
        self._previous = {}

    def _handle(self, signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name      # e.g. "SIGTERM"
        if self.saving:
            self.requested = True
            self.echo(f"\n{name}: finishing the checkpoint first, then stopping")
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo(f"\n{name}: stopping after this step ({name} again to stop now, without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """Command-line entry point: one clear line and a non-zero exit for user mistakes."""
    from .config import help_text, parse_args
    from .backend import BackendError
    from .distributed import DistributedError
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except (ValueError, OSError, BackendError, DistributedError, FloatingPointError) as e:
        # ConfigError, DataError, CheckpointError, TokenizerError, TaskDataError are all ValueErrors
        return distributed.fail(2, f"error: {e}")   # prints; with ranks, ends them all instead of leaving them waiting
    except MemoryError:
        return distributed.fail(2, "error: out of memory: try a smaller --batch_size, --block_size or model")
    except KeyboardInterrupt:
        return distributed.fail(130, "stopped without saving: the last checkpoint in the run directory is intact")
    if summary["interrupted"]:
        return 130
    if distributed.connect().is_main:
        print(f"done: step {summary['step']}, best val loss {summary['best_val_loss']:.4f}, run in {summary['out_dir']}")
    return 0
