"""Command line for sampling: `python sample.py --out_dir=RUN --prompt="..." [--key=value ...]`.

One line on stderr says what was loaded (run folder, step, best validation loss, tokenizer, device); stdout
gets each sample as the prompt followed by its continuation, streamed as it is generated."""
import math
import os
import sys
from dataclasses import dataclass, fields

from . import backend
from .io.checkpoint import CheckpointError, load_model, load_tokenizer_of_run, read_training_state
from .io.hf_gpt2 import has_gpt2_config
from .config import ConfigError, _parse_value
from .generate import check_sampling_args, stream_text


@dataclass
class SampleConfig:
    out_dir: str = "out"
    prompt: str = ""             # empty: start from <|endoftext|> or a newline
    prompt_file: str = ""        # read the prompt from a file instead
    num_samples: int = 1
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 200             # 0 = no top-k
    top_p: float = 1.0           # 1 = no nucleus cut
    seed: int = 1337
    device: str = "auto"


def parse_sample_args(argv) -> SampleConfig:
    cfg = SampleConfig()
    types = {f.name: f.type if not isinstance(f.type, str) else {"str": str, "int": int, "float": float}[f.type]
             for f in fields(SampleConfig)}
    for arg in argv:
        key, eq, text = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or key not in types or not eq:
            raise ConfigError(f"unknown or malformed argument {arg!r}; settings: "
                              + ", ".join(f"--{k}=" for k in types))
        setattr(cfg, key, _parse_value(key, text, types[key]))
    if not math.isfinite(cfg.temperature) or not math.isfinite(cfg.top_p):
        raise ConfigError("--temperature and --top_p must be finite numbers")
    try:
        check_sampling_args(cfg.temperature, cfg.top_k or None, cfg.top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0:
        raise ConfigError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    return cfg


def describe_run(out_dir, tokenizer) -> str:
    """One line about what sampling starts from, e.g.
    'sampling from out: step 2000, best val loss 1.4823, char tokenizer (97 tokens), cpu'."""
    if has_gpt2_config(out_dir):
        progress = "GPT-2 weights, no training state"             # a Hugging Face GPT-2 folder
    else:
        try:
            state = read_training_state(out_dir)
            best = state.get("best_val_loss")
            progress = f"step {state['step']}, " + (f"best val loss {best:.4f}" if isinstance(best, (int, float))
                                                    else "no validation loss yet")
        except CheckpointError as e:        # the weights loaded; say why there is no step rather than stop
            progress = f"no training state ({e})"
    kind = {"CharTokenizer": "char", "BPETokenizer": "BPE"}.get(type(tokenizer).__name__, type(tokenizer).__name__)
    return (f"sampling from {out_dir}: {progress}, {kind} tokenizer ({tokenizer.vocab_size} tokens), "
            f"{backend.device()}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nsettings: " + ", ".join(f"--{f.name}={f.default!r}" for f in fields(SampleConfig)))
        return 0
    try:
        cfg = parse_sample_args(argv)
        backend.use_device(cfg.device)
        model = load_model(cfg.out_dir)
        tokenizer = load_tokenizer_of_run(cfg.out_dir)
        prompt = cfg.prompt
        if cfg.prompt_file:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        print(describe_run(cfg.out_dir, tokenizer), file=sys.stderr, flush=True)
        for i in range(cfg.num_samples):
            sys.stdout.write(prompt)                      # the continuation reads on from the prompt
            for piece in stream_text(model, tokenizer, prompt, cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_k=cfg.top_k or None, top_p=cfg.top_p, seed=cfg.seed + i):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n---------------\n" if cfg.num_samples > 1 else "\n")
    except BrokenPipeError:              # e.g. `python sample.py ... | head`: the reader has gone, quietly stop
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (ConfigError, CheckpointError, backend.BackendError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
