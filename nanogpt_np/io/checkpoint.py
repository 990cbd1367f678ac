"""Run directories: everything needed to sample from a model or to resume its training exactly.

The layout (run_dir.py has the details of how a save is switched in):

    out_dir/
      log.jsonl                   one JSON object per logged step / evaluation (written by the trainer)
      tokenizer.json              the tokenizer that made the training tokens
      checkpoints/step_000400/    the newest complete checkpoint:
        config.json               the GPTConfig (architecture)
        train_config.json         the TrainConfig of the run (what --resume continues with)
        model.safetensors         weights, GPT-2 names, linear weights (in, out)
        optimizer.safetensors     AdamW's m and v (flat, in the model's flat-buffer order)
        state.json                step, the data loader's position, best validation loss
        tokenizer.json            the tokenizer again, so the folder stands on its own
        best.safetensors          with early stopping: the weights of the best evaluation so far

A checkpoint is written as a whole into a temporary folder and renamed into place, so a crash in the middle
of a save leaves the previous checkpoint untouched. Everything that reads a run (sample.py, the server,
evaluation, --init_from, --resume, GPT-2 export) goes through the functions below, which read the newest
complete checkpoint. No pickle anywhere: a checkpoint from a stranger can hold data, not code.
"""
import os

from . import run_dir, safetensors
from .errors import CheckpointError, read_json_object
from .hf_gpt2 import gpt_config_from_hf, has_gpt2_config, import_gpt2_dir
from .files import atomic_folder, atomic_write_json
from ..model import GPT, GPTConfig, check_finite


def save_checkpoint(out_dir, model: GPT, optimizer, train_config: dict, state: dict, tokenizer=None,
                    best_weights=None) -> str:
    """Write out_dir/checkpoints/step_NNNNNN (see the module docstring) and then remove the older checkpoints.
    `best_weights`: (state dict, step) of the best evaluation, kept for early stopping. Returns the folder."""
    step = state["step"]
    folder = run_dir.step_folder(out_dir, step)
    if os.path.exists(folder):
        raise CheckpointError(f"{folder} exists already: a step is saved once")
    with atomic_folder(folder) as tmp:
        def written(name):                       # the crash tests can stop the process between the files
            run_dir.crash_test_point(step, name)
        atomic_write_json(os.path.join(tmp, "config.json"), model.config.to_dict())
        written("config.json")
        atomic_write_json(os.path.join(tmp, "train_config.json"), train_config)
        written("train_config.json")
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            written("tokenizer.json")
        safetensors.save_file(model.state_dict(), os.path.join(tmp, "model.safetensors"),
                              metadata={"format": "nanogpt_np", "step": str(step)})
        written("model.safetensors")
        if optimizer is not None:
            safetensors.save_file(optimizer.state_arrays(), os.path.join(tmp, "optimizer.safetensors"),
                                  metadata={"step": str(step), "optimizer_steps": str(optimizer.step_count)})
            written("optimizer.safetensors")
        if best_weights is not None:
            tensors, best_step = best_weights
            safetensors.save_file(tensors, os.path.join(tmp, "best.safetensors"), metadata={"step": str(best_step)})
            written("best.safetensors")
        atomic_write_json(os.path.join(tmp, "state.json"), state)
        written("state.json")
    run_dir.crash_test_point(step, "renamed")
    run_dir.remove_older_checkpoints(out_dir, keep=folder)
    run_dir.crash_test_point(step, "removed-older")
    return folder


def _checkpoint(out_dir, what="nothing to load") -> str:
    """The folder of out_dir's newest complete checkpoint; CheckpointError when there is none."""
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"no run directory at {out_dir}: {what}")
    folder = run_dir.latest_checkpoint(out_dir)
    if folder is None:
        raise CheckpointError(f"{out_dir} holds no checkpoint (no {run_dir.CHECKPOINTS}/step_* folder): {what}")
    return folder


def read_model_config(out_dir) -> GPTConfig:
    if has_gpt2_config(out_dir):
        return gpt_config_from_hf(read_json_object(os.path.join(out_dir, "config.json")))
    folder = _checkpoint(out_dir)
    d = read_json_object(os.path.join(folder, "config.json"))
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json is not a valid model config: {e}") from None


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
        config, tensors, _ = import_gpt2_dir(out_dir, require_tokenizer=False)
        source = out_dir
    else:
        config = read_model_config(out_dir)
        source = os.path.join(_checkpoint(out_dir), "model.safetensors")
        tensors, _ = _load_tensors(source, "model weights")
    model = GPT(config, seed=seed, dtype=dtype)
    try:
        model.load_params(tensors, source=source)      # names, shapes, dtypes and finite values checked
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
    folder = run_dir.latest_checkpoint(out_dir)           # the checkpoint's own copy, else the run's
    path = os.path.join(folder, "tokenizer.json") if folder else None
    if not path or not os.path.exists(path):
        path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise CheckpointError(f"the run in {out_dir} has no tokenizer.json")
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_state(out_dir, what="nothing to load") -> dict:
    """state.json of the run's newest checkpoint (step, best validation loss, ...), as saved."""
    return read_json_object(os.path.join(_checkpoint(out_dir, what), "state.json"))


def read_training_state(out_dir) -> dict:
    """state.json of the run's newest checkpoint, checked for the keys a resume needs."""
    folder = _checkpoint(out_dir, "nothing to resume")
    state = read_state(out_dir, "nothing to resume")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("loader"), dict):
        raise CheckpointError(f"{folder}/state.json is corrupt: it needs an integer 'step' and a 'loader' state")
    return state


def read_train_config(out_dir) -> dict:
    """The training settings saved with the newest checkpoint (what --resume continues with); {} for a
    directory without a checkpoint."""
    folder = run_dir.latest_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if folder is None or not os.path.exists(os.path.join(folder, "train_config.json")):
        return {}
    return read_json_object(os.path.join(folder, "train_config.json"))


def read_best_weights(out_dir):
    """(state dict, step) of the best evaluation saved with the newest checkpoint (early stopping), or None."""
    folder = _checkpoint(out_dir)
    path = os.path.join(folder, "best.safetensors")
    if not os.path.exists(path):
        return None
    tensors, meta = _load_tensors(path, "best weights")
    return tensors, int(meta.get("step", -1))


def load_training_state(out_dir, model: GPT, optimizer) -> dict:
    """Restore weights and optimizer state in place for --resume; returns state.json's contents.
    The model must have been built with the run's architecture (read_model_config)."""
    state = read_training_state(out_dir)
    folder = _checkpoint(out_dir, "nothing to resume")
    tensors, meta = _load_tensors(os.path.join(folder, "model.safetensors"), "model weights")
    opt_arrays, opt_meta = _load_tensors(os.path.join(folder, "optimizer.safetensors"), "optimizer state")
    step = str(state.get("step"))
    if meta.get("step") != step or opt_meta.get("step") != step:      # only possible in a pre-step-folder run
        raise CheckpointError(f"{folder}: model ({meta.get('step')}), optimizer ({opt_meta.get('step')}) and "
                              f"state.json ({step}) are from different steps; the last save was interrupted")
    try:
        model.load_params(tensors, source=f"{folder}/model.safetensors")
        check_finite(opt_arrays, source=f"{folder}/optimizer.safetensors")
        optimizer.load_state_arrays(opt_arrays, int(opt_meta["optimizer_steps"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return state
