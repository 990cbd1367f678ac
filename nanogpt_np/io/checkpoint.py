"""Run directories: everything needed to sample from a model or to resume its training exactly.

    out_dir/
      config.json             the GPTConfig (architecture)
      train_config.json       the TrainConfig the run was started with
      model.safetensors       weights, GPT-2 names, linear weights (in, out)
      optimizer.safetensors   AdamW's m and v (flat, in the model's flat-buffer order)
      state.json              step, RNG states, the data loader's position, best validation loss
      tokenizer.json          the tokenizer that made the training tokens
      log.jsonl               one JSON object per logged step / evaluation (written by the trainer)

Every file is written atomically (temp file + fsync + rename). The tensors files carry the step in their
metadata and state.json is written last, so a crash in the middle of saving is caught on load (the steps
disagree) instead of silently mixing two checkpoints. No pickle anywhere: a checkpoint from a stranger can
hold data, not code.
"""
import os

from . import safetensors
from .errors import CheckpointError, read_json_object
from .hf_gpt2 import gpt_config_from_hf, has_gpt2_config, import_gpt2_dir
from .files import atomic_write_json
from ..model import GPT, GPTConfig


def save_checkpoint(out_dir, model: GPT, optimizer, train_config: dict, state: dict, tokenizer=None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    step = str(state["step"])
    atomic_write_json(os.path.join(out_dir, "config.json"), model.config.to_dict())
    atomic_write_json(os.path.join(out_dir, "train_config.json"), train_config)
    if tokenizer is not None:
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    safetensors.save_file(model.state_dict(), os.path.join(out_dir, "model.safetensors"),
                          metadata={"format": "nanogpt_np", "step": step})
    if optimizer is not None:
        safetensors.save_file(optimizer.state_arrays(), os.path.join(out_dir, "optimizer.safetensors"),
                              metadata={"step": step, "optimizer_steps": str(optimizer.step_count)})
    atomic_write_json(os.path.join(out_dir, "state.json"), state)       # last: it marks the checkpoint complete


def read_model_config(out_dir) -> GPTConfig:
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"no run directory at {out_dir}")
    if has_gpt2_config(out_dir):
        return gpt_config_from_hf(read_json_object(os.path.join(out_dir, "config.json")))
    d = read_json_object(os.path.join(out_dir, "config.json"))
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{out_dir}/config.json is not a valid model config: {e}") from None


def _load_tensors(path, what):
    if not os.path.exists(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return safetensors.load_file(path), safetensors.load_metadata(path)
    except ValueError as e:          # SafetensorsError: truncated, corrupt header, ...
        raise CheckpointError(str(e)) from None


def load_model(out_dir, dtype="float32", seed=0) -> GPT:
    """A GPT with the weights of the run in out_dir (for sampling, serving, evaluation, fine-tuning).
    A Hugging Face GPT-2 directory works too (imported by hf_gpt2, no torch)."""
    if has_gpt2_config(out_dir):
        config, params, _ = import_gpt2_dir(out_dir, require_tokenizer=False)
        model = GPT(config, seed=seed, dtype=dtype)
        model.load_params(params, source=out_dir)
        return model
    config = read_model_config(out_dir)
    tensors, _ = _load_tensors(os.path.join(out_dir, "model.safetensors"), "model weights")
    model = GPT(config, seed=seed, dtype=dtype)
    try:
        model.load_params(tensors, source=f"{out_dir}/model.safetensors")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model


def load_tokenizer_of_run(out_dir):
    from ..tokenizers.load import load_tokenizer
    if has_gpt2_config(out_dir):   # GPT-2's vocab.json + merges.txt; checked against config.json, not the weights
        try:
            tokenizer = load_tokenizer(out_dir)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        rows = read_model_config(out_dir).vocab_size
        if tokenizer.vocab_size > rows:
            raise CheckpointError(f"{out_dir}: the vocabulary has {tokenizer.vocab_size} tokens but the weights "
                                  f"have only {rows} embedding rows")
        return tokenizer
    path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise CheckpointError(f"the run in {out_dir} has no tokenizer.json")
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_training_state(out_dir) -> dict:
    """state.json of a run, checked for the keys a resume needs."""
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"no run directory at {out_dir}: nothing to resume")
    state = read_json_object(os.path.join(out_dir, "state.json"))
    if not isinstance(state.get("step"), int) or not isinstance(state.get("loader"), dict):
        raise CheckpointError(f"{out_dir}/state.json is corrupt: it needs an integer 'step' and a 'loader' state")
    return state


def load_training_state(out_dir, model: GPT, optimizer) -> dict:
    """Restore weights and optimizer state in place for --resume; returns state.json's contents.
    The model must have been built with the run's architecture (read_model_config)."""
    state = read_training_state(out_dir)
    tensors, meta = _load_tensors(os.path.join(out_dir, "model.safetensors"), "model weights")
    opt_arrays, opt_meta = _load_tensors(os.path.join(out_dir, "optimizer.safetensors"), "optimizer state")
    step = str(state.get("step"))
    if meta.get("step") != step or opt_meta.get("step") != step:
        raise CheckpointError(f"{out_dir}: model ({meta.get('step')}), optimizer ({opt_meta.get('step')}) and "
                              f"state.json ({step}) are from different steps; the last save was interrupted")
    try:
        model.load_params(tensors, source=f"{out_dir}/model.safetensors")
        optimizer.load_state_arrays(opt_arrays, int(opt_meta["optimizer_steps"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{out_dir}: {e}") from None
    return state
