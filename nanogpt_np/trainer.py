"""The training loop: data -> model -> AdamW, with evaluation, logs and checkpoints that resume exactly.

One optimizer step:
    lr = warmup-then-cosine(step)
    zero the flat gradient buffer
    repeat grad_accum_steps times:   x, y = next batch;  loss = model(x, y);  backward(loss * its share of targets)
    clip the global gradient norm;  AdamW step

Everything random comes from generators seeded by `seed`: the initial weights, the batch order (the loader's
state is saved with each checkpoint) and dropout (reseeded from (seed, step) every step). So an interrupted run
resumed with --resume produces the same losses, bit for bit, as one that never stopped.
"""
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from . import backend
from .io import safetensors
from .io.checkpoint import (CheckpointError, load_model, load_tokenizer_of_run, load_training_state,
                         read_model_config, read_training_state, save_checkpoint)
from .config import ConfigError, TrainConfig, model_sizes
from .io.files import atomic_write_text
from .data.loader import BatchLoader
from .model import GPT, GPTConfig
from .optim import AdamW, lr_at
from .tensor import backward


class DataError(ValueError):
    """Training data that is missing, empty or too short; the message says what to do."""


# ----------------------------------------------------------------------------------------------- data

def build_tokenizer(kind: str, train_text: str, vocab_size: int, full_text: str = None, log=print):
    """A tokenizer for raw text: characters of the whole text, or BPE trained on the training split."""
    if kind == "char":
        from .tokenizers.char import CharTokenizer
        return CharTokenizer.from_text(full_text if full_text is not None else train_text)
    if kind == "bpe":
        from .tokenizers.bpe import BPETokenizer
        log(f"training a BPE tokenizer to {vocab_size} tokens on {len(train_text):,} characters ...")
        return BPETokenizer.train(train_text, vocab_size, verbose=False)
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise ConfigError(f"unknown tokenizer {kind!r}")


def gpt2_tokenizer():
    """GPT-2's own tokenizer, from encoder.json + vocab.bpe where the data pipeline looks for them (they are
    not downloaded here): $NANOGPT_GPT2_DIR or data/gpt2/."""
    from .tokenizers.bpe import BPETokenizer
    from .data.prepare import find_gpt2_dir
    try:
        directory = find_gpt2_dir()
    except FileNotFoundError as e:
        raise DataError(f"--tokenizer=gpt2: {e}") from None
    return BPETokenizer.from_gpt2_files(os.path.join(directory, "encoder.json"), os.path.join(directory, "vocab.bpe"))


def load_text_data(cfg: TrainConfig, tokenizer=None, log=print):
    """(train_tokens, val_tokens, tokenizer) for the embedded corpus or a text file, split by position."""
    if cfg.dataset == "pydocs":
        from .data.corpus import default_corpus_text
        text, source = default_corpus_text(), "the embedded corpus (Python's documentation)"
    else:
        path = cfg.dataset
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError(_missing_dataset_message(cfg)) from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte offset {e.start}); clean it with "
                            f"`python -m nanogpt_np.data.prepare` first") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
        source = path
    if not text.strip():
        raise DataError(f"{source} is empty: there is nothing to train on")
    n_val = int(len(text) * cfg.val_fraction)
    train_text, val_text = text[:len(text) - n_val], text[len(text) - n_val:]
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, train_text, cfg.vocab_size, full_text=text, log=log)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    try:
        train = np.array(tokenizer.encode(train_text, allowed_special="none"), dtype=dtype)
        val = np.array(tokenizer.encode(val_text, allowed_special="none"), dtype=dtype)
    except ValueError as e:       # a resumed / fine-tuned run's tokenizer cannot encode this text
        raise DataError(f"{source}: {e} (the tokenizer comes from the run or --init_from weights)") from None
    log(f"data: {source}: {len(train):,} train and {len(val):,} val tokens, vocabulary {tokenizer.vocab_size}")
    return train, val, tokenizer


def _missing_dataset_message(cfg):
    from .data.datasets import prepare_command
    return (f"dataset {cfg.dataset!r} not found: it is neither a prepared dataset under {cfg.data_root}/ nor a "
            f"text file. Prepare it with `{prepare_command(cfg.dataset, cfg.data_root)}`, "
            f"or pass --dataset=path/to/text.txt")


def load_data(cfg: TrainConfig, tokenizer=None, log=print):
    """Train/val token arrays and the tokenizer for cfg.dataset (prepared dir, embedded corpus or text file)."""
    prepared = os.path.join(cfg.data_root, cfg.dataset)
    if os.path.isdir(prepared) or os.path.isdir(cfg.dataset):
        from .data.datasets import load_prepared
        try:
            ds = load_prepared(cfg.dataset, data_root=cfg.data_root)
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from None
        log(f"data: prepared dataset {cfg.dataset}, vocabulary {ds.tokenizer.vocab_size}")
        if tokenizer is not None and _tokenizer_identity(tokenizer) != _tokenizer_identity(ds.tokenizer):
            raise DataError(f"dataset {cfg.dataset} was tokenized with a different tokenizer than the weights "
                            f"being continued (--resume / --init_from); prepare it again with their tokenizer.json "
                            f"(python data/prepare.py ... --tokenizer RUN/tokenizer.json)")
        return ds.train, ds.val, (tokenizer or ds.tokenizer)
    if cfg.dataset != "pydocs" and not os.path.isfile(cfg.dataset):
        raise DataError(_missing_dataset_message(cfg))
    return load_text_data(cfg, tokenizer, log)


def _tokenizer_identity(tokenizer):
    """What makes two tokenizers give the same ids: their saved form (or, lacking one, the vocabulary size)."""
    to_dict = getattr(tokenizer, "to_dict", None)
    return json.dumps(to_dict(), sort_keys=True) if to_dict else tokenizer.vocab_size


def _count(tokens):
    return sum(len(t) for t in tokens) if isinstance(tokens, (list, tuple)) else len(tokens)


def _check_long_enough(tokens, block_size, split):
    n = _count(tokens)
    if n < block_size + 1:
        raise DataError(f"the {split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                        f"use more data or a smaller --block_size")


# ----------------------------------------------------------------------------------------------- logging

class RunLog:
    """Human-readable lines on stdout and the same records as JSON lines in out_dir/log.jsonl."""

    def __init__(self, out_dir, write_file=True, echo=print):
        self.path = os.path.join(out_dir, "log.jsonl") if write_file else None
        self.echo = echo

    def forget_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (a crash may have logged steps that the
        resumed run will now repeat), so log.jsonl holds each step once."""
        if not self.path or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(kept))

    def record(self, entry: dict, line: str):
        self.echo(line)
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


def evaluate(model: GPT, tokens, batch_size, block_size, max_batches) -> float:
    """Mean loss over the first `max_batches` sequential (B, T) windows of `tokens` (deterministic)."""
    loader = BatchLoader(tokens, batch_size, block_size, seed=0)
    was_training = model.training
    model.eval()
    losses = [model.loss_on(backend.to_device(x), backend.to_device(y))
              for x, y in loader.iter_sequential(max_batches=max_batches)]
    model.train(was_training)
    return float(np.mean(losses))


# ----------------------------------------------------------------------------------------------- training

class StopAtStepBoundary:
    """Ctrl-C (SIGINT) or SIGTERM during training asks the loop to finish the current step, save a
    checkpoint and stop; a second Ctrl-C stops at once without saving (the last checkpoint stays intact).
    Stopping between steps, never inside one, is what keeps an interrupted run exactly resumable: the
    optimizer never saves a half-applied update, and the data loader never skips a batch."""

    def __init__(self, echo):
        self.echo = echo
        self.requested = False
        self.saving = False        # while a checkpoint is being written, even a second Ctrl-C waits for it
        self._previous = {}

    def _handle(self, signum, frame):
        if self.saving:
            self.requested = True
            self.echo("\nfinishing the checkpoint first, then stopping")
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo("\nstopping after this step (Ctrl-C again to stop now, without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def train(cfg: TrainConfig, echo=print) -> dict:
    """Run training as configured. Returns a summary: final step, last train loss, best val loss."""
    device = backend.use_device(cfg.device)
    if cfg.dtype == "bfloat16" and device != "cuda":
        raise ConfigError("--dtype=bfloat16 (mixed precision) needs the GPU (--device=cuda); use float32 on the CPU")
    if device == "cuda":
        # Fused kernels: bf16 matmuls when asked (float32 master weights and optimizer state stay float32);
        # the loss gradient is exactly 1 without accumulation, so cross-entropy can skip a scaling pass.
        from .kernels import registry
        registry.configure(dtype="bfloat16" if cfg.dtype == "bfloat16" else "float32",
                           loss_is_root=cfg.grad_accum_steps == 1, logits_reusable=False)
        echo(registry.describe())
    param_dtype = "float32" if cfg.dtype == "bfloat16" else cfg.dtype
    if cfg.resume and cfg.init_from:
        raise ConfigError("--resume and --init_from exclude each other: resume continues a run, "
                          "init_from starts a new one from existing weights")

    # Tokenizer and data. A resumed or fine-tuned run reuses the tokenizer its weights were trained with.
    tokenizer, saved_state = None, None
    if cfg.resume:
        saved_state = read_training_state(cfg.out_dir)
        if saved_state.get("finished"):
            raise CheckpointError(f"the run in {cfg.out_dir} has finished ({saved_state['finished']}); "
                                  f"start a new run from its weights with --init_from={cfg.out_dir}")
        tokenizer = load_tokenizer_of_run(cfg.out_dir)
    elif cfg.init_from:
        tokenizer = _tokenizer_of_init(cfg.init_from)
    from .data import task_data
    is_task = task_data.is_task_file(cfg.dataset)     # JSONL prompt/completion pairs: loss on completions only
    if is_task:
        if tokenizer is None:
            text = task_data.task_text(task_data.read_task_file(cfg.dataset))
            tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.vocab_size, log=echo)
        loader, val_loader = task_data.task_loaders(cfg.dataset, tokenizer, cfg.block_size, cfg.batch_size,
                                                    cfg.val_fraction, cfg.seed)
        echo(f"data: task {cfg.dataset}: {len(loader.data.x):,} train and {len(val_loader.data.x):,} val rows, "
             f"{loader.data.n_truncated + val_loader.data.n_truncated} truncated")
    else:
        train_tokens, val_tokens, tokenizer = load_data(cfg, tokenizer, log=echo)
        _check_long_enough(train_tokens, cfg.block_size, "train")
        _check_long_enough(val_tokens, cfg.block_size, "validation")
        loader = BatchLoader(train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed)

    # The architecture: from the settings for a new run, from the weights for --init_from and --resume
    # (only dropout and a context no longer than the model's may change then).
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout,
                             bias=cfg.bias, **model_sizes(cfg))
    init_model = None
    if cfg.init_from:
        init_model = load_model(cfg.init_from)        # a nanogpt_np run or a Hugging Face GPT-2 folder
        model_config = init_model.config
    elif cfg.resume:
        saved_config = read_model_config(cfg.out_dir)
        _check_resumed_architecture(cfg, model_config, saved_config)
        model_config = saved_config
    if cfg.init_from or cfg.resume:
        if cfg.block_size > model_config.block_size:
            raise ConfigError(f"--block_size={cfg.block_size} is longer than the model's context "
                              f"({model_config.block_size})")
        model_config = GPTConfig(**{**model_config.to_dict(), "dropout": cfg.dropout})
    if model_config.vocab_size < tokenizer.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_config.vocab_size} embedding rows")

    model = GPT(model_config, seed=cfg.seed, dtype=param_dtype)
    if init_model is not None:
        model.load_params(init_model.state_dict(), source=cfg.init_from)
    optimizer = AdamW(model, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    log = RunLog(cfg.out_dir, write_file=True, echo=echo)
    step, best_val, bad_evals = 0, math.inf, 0
    if cfg.resume:
        state = load_training_state(cfg.out_dir, model, optimizer)
        step, bad_evals = state["step"], state.get("bad_evals", 0)
        best_val = math.inf if state.get("best_val_loss") is None else state["best_val_loss"]   # None: no eval yet
        loader.load_state_dict(state["loader"])
        log.forget_after(step)
        echo(f"resuming from step {step} in {cfg.out_dir}")
    else:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tokenizer.save(os.path.join(cfg.out_dir, "tokenizer.json"))

    n_params = model.num_params()
    echo(f"model: {model_config.n_layer} layers, {model_config.n_head} heads, {model_config.n_embd} channels, "
         f"block {model_config.block_size}, vocab {model_config.vocab_size}: {n_params:,} parameters "
         f"({n_params / 1e6:.2f}M) on {device}, {cfg.dtype}")
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
    stopper = StopAtStepBoundary(echo)
    best_params, best_step = None, None        # the best evaluation's weights, for early stopping (host copy)
    best_path = os.path.join(cfg.out_dir, "best.safetensors")

    def save(step_now, finished=None):
        if not cfg.save_checkpoints:
            return
        state = {"step": step_now, "loader": loader.state_dict(),
                 "best_val_loss": best_val if math.isfinite(best_val) else None, "bad_evals": bad_evals}
        if finished:
            state["finished"] = finished
        stopper.saving = True
        try:
            save_checkpoint(cfg.out_dir, model, optimizer, cfg.to_dict(), state, tokenizer)
        finally:
            stopper.saving = False

    last_loss = None
    interrupted = False
    t_last, steps_timed = time.perf_counter(), 0
    with stopper:
        while step < cfg.max_iters:
            lr = lr_at(step, lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                       decay_iters=decay_iters)
            # Dropout masks come from a generator seeded by (seed, step): nothing to save for an exact resume.
            model.reseed_dropout(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
            model.zero_grad()
            last_loss = accumulate_gradients(model, [loader.next_batch() for _ in range(cfg.grad_accum_steps)])
            grad_norm = optimizer.step(lr, cfg.grad_clip)                  # clips, then updates
            step += 1
            steps_timed += 1
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; try a lower --learning_rate")

            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                backend.synchronize()
                now = time.perf_counter()
                ms = (now - t_last) * 1000 / steps_timed
                t_last, steps_timed = now, 0
                entry = {"type": "train", "step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                         "ms_per_step": ms, "tokens_per_s": tokens_per_step / (ms / 1000)}
                log.record(entry, f"step {step:6d} | loss {last_loss:.4f} | lr {lr:.2e} | grad norm "
                                  f"{float(grad_norm):7.3f} | {ms:7.1f} ms/step | {entry['tokens_per_s']:,.0f} tok/s")

            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                val_loss = (task_data.task_val_loss(model, val_loader, cfg.eval_iters) if is_task else
                            evaluate(model, val_tokens, cfg.batch_size, cfg.block_size, cfg.eval_iters))
                if not math.isfinite(val_loss):
                    raise FloatingPointError(f"validation loss became {val_loss} at step {step}; "
                                             f"try a lower --learning_rate")
                improved = val_loss < best_val
                best_val, bad_evals = (val_loss, 0) if improved else (best_val, bad_evals + 1)
                ppl = math.exp(val_loss) if val_loss < 700 else math.inf
                log.record({"type": "eval", "step": step, "val_loss": val_loss,
                            "val_ppl": ppl if math.isfinite(ppl) else None, "best_val_loss": best_val},
                           f"eval {step:6d} | val loss {val_loss:.4f} | val ppl {ppl:9.2f}"
                           + (" | best" if improved else ""))
                if improved and cfg.early_stopping_patience:
                    best_params, best_step = backend.to_numpy(model.flat_params).copy(), step
                    if cfg.save_checkpoints:
                        safetensors.save_file(model.state_dict(), best_path, metadata={"step": str(step)})
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    # The run ends with the weights of its best evaluation, not the last (worse) ones. After a
                    # resume the best weights are in best.safetensors rather than in memory.
                    if best_params is not None:
                        model.flat_params[...] = backend.to_device(best_params)
                    elif os.path.exists(best_path):
                        model.load_params(safetensors.load_file(best_path), source=best_path)
                        best_step = safetensors.load_metadata(best_path).get("step")
                    save(step, finished=f"early stopping at step {step}, weights of step {best_step}")
                    echo(f"early stopping: no better validation loss for {bad_evals} evaluations; "
                         f"kept the weights of step {best_step} (val loss {best_val:.4f})")
                    break
                save(step)
                t_last, steps_timed = time.perf_counter(), 0       # do not count evaluation as step time
            if stopper.requested:
                if step < cfg.max_iters:
                    save(step)
                    echo(f"stopped at step {step}; " + (f"checkpoint saved in {cfg.out_dir} (continue with --resume)"
                                                        if cfg.save_checkpoints else "checkpoints are off: nothing saved"))
                    interrupted = True
                break
    return {"step": step, "train_loss": last_loss, "best_val_loss": best_val, "out_dir": cfg.out_dir,
            "interrupted": interrupted}


def _check_resumed_architecture(cfg, requested: GPTConfig, saved: GPTConfig) -> None:
    """A resumed run keeps its architecture: settings that would change it are an error, not ignored.
    (A run that started from --init_from weights has the architecture of those weights: nothing to compare.)"""
    try:
        with open(os.path.join(cfg.out_dir, "train_config.json"), encoding="utf-8") as f:
            if json.load(f).get("init_from"):
                return
    except (OSError, ValueError, AttributeError):
        pass
    keys = ("n_layer", "n_head", "n_embd", "bias")
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r} vs requested {getattr(requested, k)!r}"
             for k in keys if getattr(saved, k) != getattr(requested, k)]
    if diffs:
        raise CheckpointError(f"the checkpoint in {cfg.out_dir} is a different architecture ({'; '.join(diffs)})")


def accumulate_gradients(model, batches) -> float:
    """Forward and backward over micro-batches, summing gradients into model.flat_grads as if they were one
    batch. Each micro-batch's mean loss is weighted by its share of the targets that count (task data masks
    prompt positions, so micro-batches differ), which makes k micro-batches equal one k-times larger batch.
    Returns the mean loss per counted target."""
    counts = [int((y != -1).sum()) for _, y in batches]
    total = sum(counts)
    if total == 0:
        raise DataError("a training batch has no target to learn from (every position is masked)")
    loss_sum = 0.0
    for (x, y), n in zip(batches, counts):
        if n == 0:
            continue
        _, loss = model(backend.to_device(x), backend.to_device(y))        # x, y: (B, T) integer ids
        backward(loss, grad=backend.xp_of(loss.data).full((), n / total, loss.dtype))
        loss_sum += loss.item() * n
    return loss_sum / total


def _tokenizer_of_init(path):
    """The tokenizer that goes with --init_from weights: a run's tokenizer.json or a GPT-2 folder's files."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--init_from={path}: not a directory (give a run directory or a GPT-2 folder)")
    return load_tokenizer_of_run(path)


def main(argv=None) -> int:
    """Command-line entry point: one clear line and a non-zero exit for user mistakes."""
    from .config import help_text, parse_args
    from .backend import BackendError
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except (ValueError, OSError, BackendError, FloatingPointError) as e:
        # ConfigError, DataError, CheckpointError, TokenizerError, TaskDataError are all ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: try a smaller --batch_size, --block_size or model", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped without saving: the last checkpoint in the run directory is intact", file=sys.stderr)
        return 130
    if summary["interrupted"]:
        return 130
    print(f"done: step {summary['step']}, best val loss {summary['best_val_loss']:.4f}, run in {summary['out_dir']}")
    return 0
