"""Move GPT-2 weights between nanogpt_np and Hugging Face's on-disk layout, with no torch and no network.

A Hugging Face GPT-2 directory (what `GPT2LMHeadModel.save_pretrained` + `GPT2Tokenizer.save_pretrained` write):

    config.json             GPT2Config: n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon, ...
    model.safetensors       "transformer.wte.weight" (V, C), "transformer.h.0.attn.c_attn.weight" (C, 3C), ...
                            (or model.safetensors.index.json + shards for big models)
    vocab.json, merges.txt  the byte-level BPE vocabulary (same formats as GPT-2's encoder.json / vocab.bpe)
    tokenizer_config.json   (written on export so AutoTokenizer picks GPT2Tokenizer)

GPT-2's Conv1D stores linear weights (in, out), exactly like nanogpt_np, so tensors move across unchanged: the
only renaming is the "transformer." prefix. `import_gpt2_dir` returns (GPTConfig, params, tokenizer);
`export_gpt2_dir` writes a model (or a run directory) in that layout so that `transformers` loads it as is.

What is handled:
  * keys with or without the "transformer." prefix (the original openai-community/gpt2 file has none);
    "lm_head.weight" is accepted when it equals wte (GPT-2 ties them) and rejected otherwise;
    the causal-mask buffers older files carry ("h.N.attn.bias", "h.N.attn.masked_bias") are ignored;
  * F32 weights as they are, F16/BF16/F64 converted to float32 (integer or bool tensors are rejected);
  * sharded checkpoints (model.safetensors.index.json);
  * on export, a model without biases (bias=False) is written with zero biases (GPT-2 always has them),
    which computes the same function.

What is rejected, each with a message naming the file and the problem: a missing config/weights file, a config
that is not GPT-2 or uses features nanogpt_np does not implement (another activation, untied lm_head,
cross-attention, layer-wise attention scaling, n_inner != 4*n_embd), missing or unexpected tensors, wrong shapes,
unsupported dtypes, a vocabulary with more tokens than the embedding has rows, and only-pickle checkpoints
(pytorch_model.bin: convert to safetensors with transformers first).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import CheckpointError, read_json_object
from .files import atomic_write_json
from .run_dir import holds_run, latest_checkpoint
from .safetensors import SafetensorsError, bf16_bits_to_float32, load_file, read_header, save_file

__all__ = ["CheckpointError", "import_gpt2_dir", "export_gpt2_dir", "hf_config_from_gpt", "gpt_config_from_hf",
           "is_gpt2_dir", "has_gpt2_config", "load_run_model"]

PREFIX = "transformer."
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")      # causal-mask buffers, not parameters
GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # all the tanh approximation nanogpt_np uses


# ----------------------------------------------------------------------------------------------- config

def gpt_config_from_hf(hf: dict, source: str = "config.json"):
    """A Hugging Face GPT2Config dict -> GPTConfig, refusing what nanogpt_np's GPT does not compute."""
    from ..model import GPTConfig

    def get(*names, default=None):
        for n in names:
            if n in hf and hf[n] is not None:
                return hf[n]
        return default

    model_type = hf.get("model_type")
    if model_type not in (None, "gpt2"):
        raise CheckpointError(f"{source}: model_type is {model_type!r}, only 'gpt2' can be imported")
    for key in ("n_embd", "n_layer", "n_head", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise CheckpointError(f"{source}: needs an integer {key!r}, got {hf.get(key)!r}")
    n_positions = get("n_positions", "n_ctx")
    if not isinstance(n_positions, int):
        raise CheckpointError(f"{source}: needs an integer 'n_positions' (or 'n_ctx')")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_NAMES:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported (nanogpt_np uses the tanh "
                              f"GELU, 'gelu_new')")
    checks = [("n_inner", hf.get("n_inner") in (None, 4 * hf["n_embd"]), "must be null or 4 * n_embd"),
              ("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "must be true"),
              ("add_cross_attention", not hf.get("add_cross_attention", False), "must be false"),
              ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "must be true"),
              ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False),
               "must be false")]
    for key, ok, why in checks:
        if not ok:
            raise CheckpointError(f"{source}: {key} = {hf.get(key)!r} is not supported ({why})")
    try:
        return GPTConfig(block_size=n_positions, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True,
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_config_from_gpt(config, eot_id: Optional[int] = None) -> dict:
    """GPTConfig -> the config.json transformers' GPT2LMHeadModel loads (dropout -> the three pdrop values)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------- weights

def _weight_files(path: str) -> Dict[str, str]:
    """tensor name -> safetensors file holding it, for a single file or a sharded index."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return {name: single for name in read_header(single)}
    if os.path.exists(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    pickles = [f for f in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if os.path.exists(os.path.join(path, f))]
    if pickles:
        raise CheckpointError(f"{path}: has {pickles[0]} but no model.safetensors; nanogpt_np reads safetensors "
                              f"only (load it in transformers and save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")


def _load_weights(path: str, config) -> Dict[str, np.ndarray]:
    """Read and check every tensor: GPT-2 name (no prefix) -> float32 array."""
    from ..model import parameter_shapes
    files = _weight_files(path)
    expected = parameter_shapes(config)
    chosen: Dict[str, Tuple[str, str]] = {}          # our name -> (name in the file, file)
    lm_head = None
    extra = []
    for key, file in files.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in expected:
            if name in chosen:
                raise CheckpointError(f"{file}: tensor {name!r} appears twice (with and without '{PREFIX}')")
            chosen[name] = (key, file)
        elif key == "lm_head.weight":
            lm_head = (key, file)
        elif name.startswith("h.") and name.endswith(IGNORED_BUFFERS):
            continue
        else:
            extra.append(key)
    missing = [n for n in expected if n not in chosen]
    where = os.path.join(path, "model.safetensors")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"{len(extra)} unexpected tensors: {', '.join(sorted(extra)[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise CheckpointError(f"{where}: does not match config.json ({config.n_layer} layers, n_embd "
                              f"{config.n_embd}): " + "; ".join(parts))

    headers: Dict[str, dict] = {}
    for _, file in list(chosen.values()) + ([lm_head] if lm_head else []):
        if file not in headers:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: weight shard listed in model.safetensors.index.json is missing")
            headers[file] = read_header(file)
    for name, shape in expected.items():                      # check everything before reading any data
        key, file = chosen[name]
        dtype, got = headers[file][key]
        _check_dtype(file, key, dtype)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(got)}, config.json implies {list(shape)}")
    by_file: Dict[str, list] = {}
    for name in expected:
        key, file = chosen[name]
        by_file.setdefault(file, []).append(key)
    loaded = {}
    for file, keys in by_file.items():
        for key, a in load_file(file, names=keys).items():
            loaded[key] = _as_float32(a, headers[file][key][0])
    params = {name: loaded[chosen[name][0]] for name in expected}
    if lm_head is not None:
        key, file = lm_head
        _check_dtype(file, key, headers[file][key][0])
        w = _as_float32(load_file(file, names=[key])[key], headers[file][key][0])
        if w.shape != params["wte.weight"].shape or not np.array_equal(w, params["wte.weight"]):
            raise CheckpointError(f"{file}: lm_head.weight differs from wte.weight; nanogpt_np ties them "
                                  f"(untied output embeddings are not supported)")
    return params


def _check_dtype(file: str, key: str, dtype: str) -> None:
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}; weights must be F32, F16, BF16 or F64")


def _as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits_to_float32(a).reshape(a.shape)
    return a.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------- tokenizer

def _load_tokenizer(path: str, config, required: bool):
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    have = [os.path.exists(vocab), os.path.exists(merges)]
    if not any(have):
        if required:
            raise CheckpointError(f"{path}: no vocab.json + merges.txt (the GPT-2 tokenizer files)")
        return None
    if not all(have):
        raise CheckpointError(f"{path}: has {'vocab.json' if have[0] else 'merges.txt'} but not "
                              f"{'merges.txt' if have[0] else 'vocab.json'}; both are needed")
    from ..tokenizers.bpe import BPETokenizer
    try:
        tok = BPETokenizer.from_gpt2_files(vocab, merges)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read vocab.json/merges.txt: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"{vocab}: the vocabulary has {tok.vocab_size} tokens but the weights have only "
                              f"{config.vocab_size} embedding rows (vocab_size in config.json); they do not match")
    return tok


# ----------------------------------------------------------------------------------------------- public API

def is_gpt2_dir(path) -> bool:
    """True when `path` is a complete Hugging Face GPT-2 directory: a config.json of a GPT-2 model,
    model.safetensors (or model.safetensors.index.json) and the tokenizer's vocab.json + merges.txt.
    Cheap (reads config.json only); import_gpt2_dir does the full checks."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not has_gpt2_config(path):
        return False
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return ((has("model.safetensors") or has("model.safetensors.index.json"))
            and has("vocab.json") and has("merges.txt"))


def has_gpt2_config(path) -> bool:
    """True when path/config.json describes a GPT-2 model (model_type gpt2 or GPT2LMHeadModel): enough to
    treat the folder as a Hugging Face one and let import_gpt2_dir name any missing file."""
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("model_type") == "gpt2" or "GPT2LMHeadModel" in data.get("architectures", []))


def import_gpt2_dir(path, require_tokenizer: bool = True):
    """Read a Hugging Face GPT-2 directory -> (GPTConfig, params {GPT-2 name: float32 array}, tokenizer).

    The tokenizer is a BPETokenizer built from vocab.json + merges.txt (None when both are absent and
    require_tokenizer is False). Use the result with `GPT(config).load_params(params)`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    hf = read_json_object(os.path.join(path, "config.json"))
    config = gpt_config_from_hf(hf, os.path.join(path, "config.json"))
    try:
        params = _load_weights(path, config)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = _load_tokenizer(path, config, require_tokenizer)
    return config, params, tokenizer


def load_run_model(run_dir):
    """(GPTConfig, params, tokenizer) from the newest checkpoint of a nanogpt_np run directory
    (model.safetensors, config.json, tokenizer.json), read directly so that exporting needs nothing but these
    files."""
    from ..model import GPTConfig
    run_dir = os.fspath(run_dir)
    folder = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if folder is None:
        raise CheckpointError(f"{run_dir}: not a training run directory (no checkpoints/step_* folder)")
    cfg = read_json_object(os.path.join(folder, "config.json"))
    cfg = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
    try:
        config = GPTConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: not a GPTConfig ({e})") from None
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(weights):
        raise CheckpointError(f"{folder}: no model.safetensors")
    params = load_file(weights)
    tokenizer = None
    for tok_path in (os.path.join(folder, "tokenizer.json"), os.path.join(run_dir, "tokenizer.json")):
        if os.path.exists(tok_path):
            from ..tokenizers.load import load_tokenizer
            tokenizer = load_tokenizer(tok_path)
            break
    return config, params, tokenizer


def _params_of(model) -> Dict[str, np.ndarray]:
    if hasattr(model, "state_dict"):
        return model.state_dict()
    from ..backend import to_numpy
    return {k: to_numpy(getattr(v, "data", v)) for k, v in model.params.items()}


# files an export writes (or an earlier export wrote); removed before exporting into the same folder, so a
# char-tokenizer export over a BPE one leaves no vocab.json behind for AutoTokenizer to pick up
EXPORT_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "nanogpt_tokenizer.json", "tokenizer.json",
                "model.safetensors.index.json")


def _remove_stale_export(out_dir: str) -> None:
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):  # the weight shards it lists are stale too
        try:
            shards = set(read_json_object(index).get("weight_map", {}).values())
        except (CheckpointError, AttributeError):
            shards = set()
        for name in shards:
            path = os.path.join(out_dir, os.path.basename(str(name)))
            if str(name).endswith(".safetensors") and os.path.isfile(path):
                os.remove(path)
    for name in EXPORT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def export_gpt2_dir(model_or_run, tokenizer=None, out_dir=None) -> str:
    """Write a GPT model (or a run directory path) as a Hugging Face GPT-2 directory at `out_dir`.

    Writes config.json, model.safetensors (float32, "transformer." names, lm_head tied so omitted) and, for a
    GPT-2-style BPE tokenizer, vocab.json + merges.txt + tokenizer_config.json. Any other tokenizer (e.g. the
    character one) is saved as nanogpt_tokenizer.json, which transformers ignores: the weights still load but
    AutoTokenizer will not. `tokenizer` defaults to the run's own when a run directory is given.
    Exporting over an earlier export first removes the tokenizer and index files that export may have
    written (EXPORT_FILES), so none is left stale; other files are kept. A training run directory is
    refused as out_dir. Returns out_dir.
    """
    from ..model import parameter_shapes
    if out_dir is None:
        raise TypeError("export_gpt2_dir needs out_dir")
    if isinstance(model_or_run, (str, os.PathLike)):
        config, params, run_tok = load_run_model(model_or_run)
        tokenizer = tokenizer if tokenizer is not None else run_tok
    else:
        config, params = model_or_run.config, _params_of(model_or_run)

    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size} embedding rows; they do not match")
    expected = parameter_shapes(config)
    full = parameter_shapes(type(config)(**{**config.to_dict(), "bias": True}))
    tensors = {}
    for name, shape in full.items():
        if name in expected:
            if name not in params:
                raise CheckpointError(f"model has no tensor {name!r}")
            a = np.asarray(params[name], dtype=np.float32)
            if a.shape != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {a.shape}, expected {tuple(shape)}")
        else:
            a = np.zeros(shape, dtype=np.float32)          # bias=False model: GPT-2 needs the biases, use 0
        tensors[PREFIX + name] = a

    out_dir = os.fspath(out_dir)
    if holds_run(out_dir):                     # its files would be mixed with (or replace) the run's
        raise CheckpointError(f"{out_dir} is a training run directory; export to another folder")
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_export(out_dir)
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    atomic_write_json(os.path.join(out_dir, "config.json"), hf_config_from_gpt(config, eot))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        if hasattr(tokenizer, "save_gpt2_files"):
            tokenizer.save_gpt2_files(out_dir, "vocab.json", "merges.txt")
            special = "<|endoftext|>"
            atomic_write_json(os.path.join(out_dir, "tokenizer_config.json"), {
                "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
                "add_prefix_space": False, "bos_token": special, "eos_token": special, "unk_token": special})
        else:
            tokenizer.save(os.path.join(out_dir, "nanogpt_tokenizer.json"))
    return out_dir


def main(argv=None) -> None:
    """python -m nanogpt_np.io.hf_gpt2 export RUN_DIR OUT_DIR  |  check HF_DIR"""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nanogpt_np.io.hf_gpt2", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a nanogpt_np run as a Hugging Face GPT-2 directory")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    c = sub.add_parser("check", help="validate a Hugging Face GPT-2 directory and print its size")
    c.add_argument("hf_dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            print(f"wrote {export_gpt2_dir(args.run_dir, None, args.out_dir)}")
        else:
            from ..model import check_finite
            config, params, tok = import_gpt2_dir(args.hf_dir, require_tokenizer=False)
            check_finite(params, source=args.hf_dir)
            n = sum(a.size for a in params.values())
            print(f"{args.hf_dir}: {config}, {n:,} parameters, tokenizer: "
                  f"{'none' if tok is None else f'{tok.vocab_size} tokens'}")
    except (ValueError, OSError) as err:  # CheckpointError, SafetensorsError; OSError: e.g. out_dir is a file
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
