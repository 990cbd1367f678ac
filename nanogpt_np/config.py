"""Training settings: defaults, named presets, a JSON config file, then `--key=value` overrides.

    python train.py                                  # the defaults: a small model on the embedded corpus
    python train.py --preset=shakespeare-char        # a named preset
    python train.py my_run.json --max_iters=500      # a JSON file of settings, then overrides

Later sources win: defaults < preset < JSON file < command line. Every key must be a field of TrainConfig
and every value must parse as that field's type; otherwise a ConfigError names the key (never a traceback).
"""
import dataclasses
import json
from dataclasses import dataclass


class ConfigError(ValueError):
    """A user mistake in the settings (unknown key, bad value); the launcher prints it as one line."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "pydocs"         # "pydocs" (embedded), a prepared name under data_root, or a text file path
    data_root: str = "data"
    tokenizer: str = "char"         # "char", "bpe" (trained on the training split) or "gpt2" (needs its files)
    vocab_size: int = 512           # target size when tokenizer == "bpe"
    val_fraction: float = 0.1       # for raw text: the last 10% (by position) is the validation split
    # model
    model: str = "small-cpu"        # a preset from model.MODEL_PRESETS; n_layer/n_head/n_embd override it
    n_layer: int = 0                # 0 = take the preset's value
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 12
    grad_accum_steps: int = 1       # micro-batches summed into one optimizer step
    max_iters: int = 1000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0         # 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0 = no clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20            # batches per validation loss, spread evenly over the whole split
    log_interval: int = 10
    out_dir: str = "out"
    save_checkpoints: bool = True
    resume: bool = False            # continue the run in out_dir exactly where its checkpoint left off
    overwrite: bool = False         # start a new run in an out_dir that holds one, deleting the old run
    init_from: str = ""             # start from weights: a nanogpt_np run directory or a GPT-2 directory
    early_stopping_patience: int = 0    # stop after this many evaluations without a better val loss (0 = off)
    # system
    device: str = "auto"            # "cpu", "cuda" or "auto"
    dtype: str = "float32"          # "float32", "float64" (checks) or "bfloat16" (GPU mixed precision)
    tf32: bool = True               # GPU float32 matmuls on TF32 tensor cores (as PyTorch/nanoGPT train)
    cuda_graph: bool = False        # GPU: capture the training step once as a CUDA graph and replay it
    seed: int = 1337

    # Not a setting: the names of the settings given explicitly (command line or JSON file; a preset does not
    # count), filled in by parse_args. --init_from refuses a given setting that its weights contradict.
    given = frozenset()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # nanoGPT's CPU recipe, on the embedded corpus: the default.
    "default": {},
    # The README's first command should finish in about a minute on a laptop.
    "quick": dict(max_iters=200, eval_interval=100, eval_iters=10),
    # nanoGPT's Shakespeare character recipe on a CPU (4 layers, 128 channels, block 64, batch 12).
    "shakespeare-char-cpu": dict(dataset="shakespeare_char", model="small-cpu", block_size=64, batch_size=12,
                                 max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                                 beta2=0.99, dropout=0.0, eval_interval=250, eval_iters=20),
    # nanoGPT's Shakespeare character recipe for a GPU (6 layers, 384 channels, block 256, batch 64).
    "shakespeare-char": dict(dataset="shakespeare_char", model="baby", block_size=256, batch_size=64,
                             max_iters=5000, lr_decay_iters=5000, learning_rate=1e-3, min_lr=1e-4,
                             warmup_iters=100, beta2=0.99, dropout=0.2, eval_interval=250, eval_iters=200),
    # GPT-2 small on BPE tokens.
    "gpt2": dict(model="gpt2", tokenizer="gpt2", block_size=1024, batch_size=8, grad_accum_steps=8,
                 learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, max_iters=20000, beta2=0.95,
                 weight_decay=0.1, eval_interval=500, eval_iters=50),
    # Fine-tuning from pre-trained weights: a low rate, a short warmup, stop when validation stops improving.
    "finetune": dict(learning_rate=3e-5, min_lr=3e-6, warmup_iters=20, max_iters=500, weight_decay=0.0,
                     eval_interval=50, eval_iters=20, early_stopping_patience=3, dropout=0.0),
}


def _parse_value(key: str, text: str, typ):
    """Turn the text of a command-line value into the field's type, or raise ConfigError naming the key."""
    if typ is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"--{key} expects {typ.__name__}, got {text!r}") from None


def _check_json_value(key, value, typ, source):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' expects {typ.__name__}, got {value!r}")
    return value


def _field_types() -> dict:
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: (types[f.type] if isinstance(f.type, str) else f.type) for f in dataclasses.fields(TrainConfig)}


def apply_settings(cfg: TrainConfig, settings: dict, source: str) -> TrainConfig:
    fields = _field_types()
    for key, value in settings.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown setting '{key}' (see nanogpt_np/config.py for the list)")
        setattr(cfg, key, _check_json_value(key, value, fields[key], source))
    return cfg


def parse_args(argv) -> TrainConfig:
    """Build a TrainConfig from command-line arguments (see the module docstring)."""
    fields = _field_types()
    cfg = TrainConfig()
    overrides = {}
    json_files = []
    preset = None
    for arg in argv:
        if arg in ("-h", "--help"):
            raise ConfigError(help_text())
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key == "preset":
                if not eq or text not in PRESETS:
                    raise ConfigError(f"--preset expects one of {', '.join(PRESETS)}, got {text!r}")
                preset = text
                continue
            if key not in fields:
                raise ConfigError(f"unknown setting --{key} (see `python train.py --help`)")
            if not eq:
                if fields[key] is bool:        # a bare --resume means --resume=true
                    text = "true"
                else:
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            overrides[key] = _parse_value(key, text, fields[key])
        elif arg.endswith(".json"):
            json_files.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value, --preset=NAME or a .json file")
    # Everything given on this command line, in order: preset, JSON files, then --key=value.
    layers = []
    if preset:
        layers.append((PRESETS[preset], f"preset {preset}"))
    for path in json_files:
        layers.append((_read_settings_file(path, "config file"), path))
    layers.append((overrides, "the command line"))
    for settings, source in layers:
        apply_settings(cfg, settings, source)
    if cfg.resume:
        cfg = _resumed_settings(cfg, layers)
    cfg.given = frozenset(key for settings, source in layers if not source.startswith("preset") for key in settings)
    validate(cfg)
    return cfg


def _read_settings_file(path, what) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object of settings")
    return settings


def _resumed_settings(cfg: TrainConfig, layers) -> TrainConfig:
    """--resume continues with the run's own saved settings (out_dir/train_config.json); only what this
    command line sets explicitly is changed. So `python train.py --out_dir=RUN --resume` is enough."""
    from .io.checkpoint import CheckpointError, read_train_config
    try:
        saved = read_train_config(cfg.out_dir)
    except CheckpointError as e:
        raise ConfigError(f"cannot read the saved settings: {e}") from None
    if not saved:
        return cfg                   # the trainer reports the missing checkpoint with the run directory named
    explicit = {k: v for settings, _ in layers for k, v in settings.items()}
    if explicit.get("init_from"):
        raise ConfigError("--resume and --init_from exclude each other: resume continues a run, "
                          "init_from starts a new one from existing weights")
    resumed = TrainConfig()
    apply_settings(resumed, {k: v for k, v in saved.items() if k in _field_types()},
                   f"the saved settings of {cfg.out_dir}")
    resumed.overwrite = False        # the run may have started with --overwrite; continuing it overwrites nothing
    for key, value in explicit.items():
        setattr(resumed, key, value)
    resumed.resume = True
    resumed.init_from = ""           # a resumed run continues its own weights, wherever they first came from
    return resumed


def validate(cfg: TrainConfig) -> None:
    """Range checks that a type check cannot do."""
    import math
    positive = ("block_size", "batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "log_interval")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    not_negative = ("max_iters", "warmup_iters", "lr_decay_iters", "early_stopping_patience", "seed",
                    "n_layer", "n_head", "n_embd", "weight_decay", "grad_clip", "min_lr")
    for key in not_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0, got {getattr(cfg, key)}")
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number, got {value}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run in --out_dir, "
                          "overwrite deletes it and starts a new one")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"--min_lr ({cfg.min_lr}) must not exceed --learning_rate ({cfg.learning_rate})")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"--{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if cfg.dtype not in ("float32", "float64", "bfloat16"):
        raise ConfigError(f"--dtype must be float32, float64 or bfloat16, got {cfg.dtype!r}")
    if cfg.tokenizer not in ("char", "bpe", "gpt2"):
        raise ConfigError(f"--tokenizer must be char, bpe or gpt2, got {cfg.tokenizer!r}")
    from .model import MODEL_PRESETS
    if cfg.model not in MODEL_PRESETS:
        raise ConfigError(f"--model must be one of {', '.join(MODEL_PRESETS)}, got {cfg.model!r}")
    sizes = model_sizes(cfg)
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(f"n_embd ({sizes['n_embd']}) must be divisible by n_head ({sizes['n_head']})")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        raise ConfigError(f"--vocab_size must be at least 257 for a BPE tokenizer, got {cfg.vocab_size}")


# What `python train.py --help` says about a setting, beside its default (settings not listed have none).
HELP = {
    "dataset": '"pydocs" (embedded), a prepared dataset under data_root, a text file or a .jsonl task file',
    "tokenizer": '"char", "bpe" (trained on the training split, vocab_size tokens) or "gpt2" (needs its files)',
    "val_fraction": "raw text: the last part, by position, held out for validation",
    "model": "a size preset; n_layer, n_head, n_embd override it (0 = the preset's)",
    "grad_accum_steps": "micro-batches summed into one optimizer step",
    "lr_decay_iters": "end of the cosine decay (0 = max_iters)",
    "grad_clip": "clip the global gradient norm to this (0 = no clipping)",
    "eval_interval": "steps between validation losses (and checkpoints)",
    "eval_iters": "batches per validation loss, of windows spread evenly over the whole validation split "
                  "(the same ones every time)",
    "resume": "continue the run in out_dir from its newest checkpoint, with its saved settings",
    "overwrite": "start a new run in an out_dir that holds one, deleting the old run",
    "init_from": "start from weights: a run directory or a Hugging Face GPT-2 folder (with their tokenizer)",
    "early_stopping_patience": "stop after this many evaluations without a better validation loss (0 = off)",
    "device": '"cpu", "cuda" or "auto"',
    "dtype": '"float32", "float64" (checks) or "bfloat16" (GPU mixed precision)',
    "tf32": "on the GPU, float32 matmuls use TF32 tensor cores (inputs rounded to 10 mantissa bits, float32 "
            "sums; several times faster); false: exact float32",
    "cuda_graph": "on the GPU, capture the training step once as a CUDA graph and replay it every step (less "
                  "host time; one GPU, --dropout=0, data without masked targets)",
}


def help_text() -> str:
    lines = ["usage: python train.py [CONFIG.json] [--preset=NAME] [--key=value ...]",
             f"presets: {', '.join(PRESETS)}", "settings (default):"]
    for f in dataclasses.fields(TrainConfig):
        setting = f"  --{f.name}={f.default!r}"
        lines.append(f"{setting:<34} {HELP[f.name]}" if f.name in HELP else setting)
    return "\n".join(lines)


def model_sizes(cfg: TrainConfig) -> dict:
    """n_layer / n_head / n_embd from the model preset, with any explicit overrides applied."""
    from .model import MODEL_PRESETS
    sizes = dict(MODEL_PRESETS[cfg.model])
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, key):
            sizes[key] = getattr(cfg, key)
    return sizes
