"""Everything a training run needs before its first step, so that trainer.py can be just the loop.

    setup_run(cfg) -> Run
      device       numpy or cupy (and the fused kernels' settings on the GPU)
      tokenizer    a new run builds one; --resume and --init_from reuse the one their weights were trained with
      data         a prepared dataset, the embedded corpus, a text file, or prompt/completion task data
      model        a new GPT from the settings, the saved one for --resume, or --init_from weights
      optimizer    AdamW over the model's flat parameter buffer
      state        step, best validation loss, loader position: zero for a new run, the checkpoint's on --resume

Each piece is a small function below; they are called in that order.
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from . import backend, distributed
from .config import ConfigError, TrainConfig, model_sizes
from .data.datasets import count_tokens
from .data.loader import BatchLoader
from .io import run_dir
from .io.checkpoint import (CheckpointError, load_model, load_tokenizer_of_run, load_training_state,
                            read_model_config, read_train_config, read_training_state)
from .model import GPT, GPTConfig
from .optim import AdamW




# ----------------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the training loop works on. `val_tokens` is None for task data, which has `val_loader` instead."""
    cfg: TrainConfig
    device: str
    tokenizer: object
    model: GPT
    optimizer: AdamW
    loader: object                 # BatchLoader, or task_data's loader of masked (x, y) rows
    val_tokens: object = None
    val_loader: object = None
    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0             # evaluations in a row without a better validation loss (early stopping)
    saved_step: int = -1           # the step of the newest checkpoint (a step is saved once)
    world: object = distributed.SINGLE     # the data-parallel ranks (distributed/); one process by default
    graphed_step: object = None    # --cuda_graph: cuda_graph.GraphedStep, which replaces train_step's body


def setup_run(cfg: TrainConfig, echo=print, world=distributed.SINGLE) -> Run:
    """Device, tokenizer, data, model, optimizer and (on --resume) the saved state, ready for the first step.
    With data-parallel ranks (`world`), every rank sets up the same run; only rank 0 writes files."""
    if cfg.resume and cfg.init_from:
        raise ConfigError("--resume and --init_from exclude each other: resume continues a run, "
                          "init_from starts a new one from existing weights")
    distributed.check_batch_split(cfg.batch_size, world)
    check_out_dir(cfg, world)
    device = setup_device(cfg, echo, world)
    tokenizer = inherited_tokenizer(cfg)
    if cfg.init_from:                           # before the data is read: a mistake should cost nothing
        _check_init_from_settings(cfg, read_model_config(cfg.init_from), tokenizer)
    loader, val_tokens, val_loader, tokenizer = load_training_data(cfg, tokenizer, echo, world)
    model = build_model(cfg, tokenizer)
    optimizer = AdamW(model, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    run = Run(cfg, device, tokenizer, model, optimizer, loader, val_tokens, val_loader, world=world)
    if cfg.resume:
        restore_training_state(run)
        echo(f"resuming from step {run.step} in {cfg.out_dir}")
    world.barrier()                 # every rank has read and checked the run directory before rank 0 writes
    if not cfg.resume and world.is_main:
        if cfg.overwrite:
            run_dir.remove_run(cfg.out_dir)       # only now: a setting or data error above leaves the old run be
        os.makedirs(cfg.out_dir, exist_ok=True)
        tokenizer.save(os.path.join(cfg.out_dir, "tokenizer.json"))
    world.assert_identical(model.flat_params, "initial weights")
    c, n_params = model.config, model.num_params()
    echo(f"model: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, block {c.block_size}, "
         f"vocab {c.vocab_size}: {n_params:,} parameters ({n_params / 1e6:.2f}M) on {device}, {cfg.dtype}")
    if world is not distributed.SINGLE:
        echo(f"data parallel: {world.world_size} rank(s), each trains on {cfg.batch_size // world.world_size} of "
             f"the {cfg.batch_size} rows of every batch; logging from {world.name}")
    return run


def check_out_dir(cfg: TrainConfig, world=distributed.SINGLE) -> None:
    """A new run never writes over the work of another: a folder holding a checkpoint or a log is refused
    unless --resume continues it or --overwrite replaces it. Leftovers of a killed save are removed here
    (by rank 0 alone when there are data-parallel ranks)."""
    out_dir = cfg.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out_dir={out_dir} is a file, not a folder")
    if cfg.init_from and os.path.isdir(cfg.init_from) and os.path.isdir(out_dir) \
            and os.path.samefile(cfg.init_from, out_dir):
        raise ConfigError(f"--init_from={cfg.init_from} is the --out_dir itself: give the new run another --out_dir")
    if not cfg.resume and not cfg.overwrite and run_dir.holds_run(out_dir):
        try:
            what = f"a run (checkpoint of step {read_training_state(out_dir)['step']})"
        except CheckpointError:
            what = "the log of a run"
        raise ConfigError(f"{out_dir} already holds {what}: continue it with --resume, start over with "
                          f"--overwrite (deletes it), or choose another --out_dir")
    if world.is_main:
        run_dir.remove_leftovers(out_dir)


def setup_device(cfg: TrainConfig, echo=print, world=distributed.SINGLE) -> str:
    """Select numpy or cupy; on the GPU, this rank's GPU and the fused kernels' settings for this run (and say
    which kernels)."""
    device = backend.use_device(cfg.device)
    world.bind_device(device)          # with ranks on GPUs: one GPU per rank, and NCCL between them
    if cfg.dtype == "bfloat16" and device != "cuda":
        raise ConfigError("--dtype=bfloat16 (mixed precision) needs the GPU (--device=cuda); use float32 on the CPU")
    if device == "cuda":
        # Fused kernels: bf16 matmuls when asked (float32 master weights and optimizer state stay float32);
        # the loss gradient is exactly 1 with one micro-batch on one rank, so cross-entropy can skip a scaling
        # pass (with accumulation or ranks it is that micro-batch's share of the step's targets).
        from .kernels import registry
        registry.configure(dtype="bfloat16" if cfg.dtype == "bfloat16" else "float32", tf32=cfg.tf32,
                           loss_is_root=cfg.grad_accum_steps == 1 and world.world_size == 1, logits_reusable=False)
        echo(registry.describe())
    return device


def inherited_tokenizer(cfg: TrainConfig):
    """The tokenizer the weights were trained with (--resume, --init_from), or None for a new run."""
    if cfg.resume:
        saved_state = read_training_state(cfg.out_dir)
        if saved_state.get("finished"):
            raise CheckpointError(f"the run in {cfg.out_dir} has finished ({saved_state['finished']}); "
                                  f"start a new run from its weights with --init_from={cfg.out_dir}")
        return load_tokenizer_of_run(cfg.out_dir)
    if cfg.init_from:
        return _tokenizer_of_init(cfg.init_from)
    return None


def load_training_data(cfg: TrainConfig, tokenizer, echo=print, world=distributed.SINGLE):
    """(train loader, val tokens, val loader, tokenizer). Task data (JSONL prompt/completion pairs, loss on the
    completions only) has a val loader; everything else a flat array of validation tokens."""
    from .data import task_data
    if task_data.is_task_file(cfg.dataset):
        if tokenizer is None:
            text = task_data.task_text(task_data.read_task_file(cfg.dataset))
            tokenizer = build_tokenizer(cfg.tokenizer, text, cfg.vocab_size, log=echo)
        loader, val_loader = task_data.task_loaders(cfg.dataset, tokenizer, cfg.block_size, cfg.batch_size,
                                                    cfg.val_fraction, cfg.seed, rank=world.rank,
                                                    world_size=world.world_size)
        echo(f"data: task {cfg.dataset}: {len(loader.data.x):,} train and {len(val_loader.data.x):,} val rows, "
             f"{loader.data.n_truncated + val_loader.data.n_truncated} truncated")
        return loader, None, val_loader, tokenizer
    train_tokens, val_tokens, tokenizer = load_data(cfg, tokenizer, log=echo)
    _check_long_enough(train_tokens, cfg.block_size, "train")
    _check_long_enough(val_tokens, cfg.block_size, "validation")
    loader = BatchLoader(train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed,
                         rank=world.rank, world_size=world.world_size)          # this rank's rows of each batch
    return loader, val_tokens, None, tokenizer


def build_model(cfg: TrainConfig, tokenizer) -> GPT:
    """The architecture comes from the settings for a new run, from the weights for --init_from and --resume
    (only dropout, and a context no longer than the model's, may change then). --init_from loads its weights
    here; --resume loads them with the optimizer state (restore_training_state)."""
    param_dtype = "float32" if cfg.dtype == "bfloat16" else cfg.dtype     # bf16 runs keep float32 master weights
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
    return model


def restore_training_state(run: Run) -> None:
    """--resume: weights, AdamW moments, step, early-stopping counters and the loader's position."""
    state = load_training_state(run.cfg.out_dir, run.model, run.optimizer)
    distributed.check_resumed_rank_count(state.get("ranks", 1), run.world, run.cfg.dropout)
    run.step, run.bad_evals = state["step"], state.get("bad_evals", 0)
    run.saved_step = run.step
    run.best_val = math.inf if state.get("best_val_loss") is None else state["best_val_loss"]   # None: no eval yet
    run.loader.load_state_dict(state["loader"])


# ----------------------------------------------------------------------------------------------- data

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


def _check_long_enough(tokens, block_size, split):
    n = count_tokens(tokens)
    if n < block_size + 1:
        raise DataError(f"the {split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                        f"use more data or a smaller --block_size")



def _check_resumed_architecture(cfg, requested: GPTConfig, saved: GPTConfig) -> None:
    """A resumed run keeps its architecture: settings that would change it are an error, not ignored.
    (A run that started from --init_from weights has the architecture of those weights: nothing to compare.)"""
    try:
        if read_train_config(cfg.out_dir).get("init_from"):
            return
    except CheckpointError:
        pass
    keys = ("n_layer", "n_head", "n_embd", "bias")
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r} vs requested {getattr(requested, k)!r}"
             for k in keys if getattr(saved, k) != getattr(requested, k)]
    if diffs:
        raise CheckpointError(f"the checkpoint in {cfg.out_dir} is a different architecture ({'; '.join(diffs)})")



def _check_init_from_settings(cfg, weights: GPTConfig, tokenizer) -> None:
    """--init_from takes the architecture and the tokenizer of its weights. A setting given explicitly that
    says otherwise (--model, --n_layer, --n_head, --n_embd, --bias, --tokenizer, --vocab_size) is refused with
    the difference named, not silently ignored."""
    given, sizes, diffs = cfg.given, model_sizes(cfg), []
    for k in ("n_layer", "n_head", "n_embd"):
        if (k in given or "model" in given) and sizes[k] != getattr(weights, k):
            asked = f"--{k}" if k in given else f"--model={cfg.model}"
            diffs.append(f"{k}: weights {getattr(weights, k)}, {asked} asks {sizes[k]}")
    if "bias" in given and cfg.bias != weights.bias:
        diffs.append(f"bias: weights {weights.bias}, --bias asks {cfg.bias}")
    kind = _tokenizer_kind(tokenizer)
    if "tokenizer" in given and cfg.tokenizer != kind:
        diffs.append(f"tokenizer: weights {kind}, --tokenizer asks {cfg.tokenizer}")
    if "vocab_size" in given and cfg.vocab_size != tokenizer.vocab_size:
        diffs.append(f"vocabulary: weights {tokenizer.vocab_size} tokens, --vocab_size asks {cfg.vocab_size}")
    if diffs:
        raise ConfigError(f"--init_from={cfg.init_from} brings its own architecture and tokenizer, and they differ "
                          f"from the settings given ({'; '.join(diffs)}): drop those settings, or train from "
                          f"scratch without --init_from")


def _tokenizer_kind(tokenizer) -> str:
    """"char", "gpt2" (a BPE with GPT-2's 50257 tokens) or "bpe": what --tokenizer would have made it."""
    from .tokenizers.char import CharTokenizer
    if isinstance(tokenizer, CharTokenizer):
        return "char"
    return "gpt2" if tokenizer.vocab_size == 50257 else "bpe"


def _tokenizer_of_init(path):
    """The tokenizer that goes with --init_from weights: a run's tokenizer.json or a GPT-2 folder's files."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--init_from={path}: not a directory (give a run directory or a GPT-2 folder)")
    return load_tokenizer_of_run(path)
