"""Where a training run keeps its files, and how a checkpoint is switched in as a whole.

    out_dir/
      log.jsonl                 one JSON object per logged step / evaluation (appended by the trainer)
      tokenizer.json            the tokenizer that made the training tokens (written when the run starts)
      checkpoints/
        step_000400/            the newest complete checkpoint: what --resume, sample.py, the server read
          model.safetensors  optimizer.safetensors  state.json  config.json  train_config.json  tokenizer.json
          best.safetensors      (with early stopping: the weights of the best evaluation so far)

A save writes the whole step folder under a hidden temporary name (checkpoints/.step_000400.XXXX.tmp), every
file fsynced, and then renames it to step_000400: one atomic rename. So a folder named step_NNNNNN is always
complete, and the newest one is the checkpoint. Only after the rename are the older step folders removed
(each renamed to a hidden name before its files go). A kill -9 at any moment therefore leaves the previous
checkpoint or the new one, never a mix; the leftovers (hidden .tmp names) are removed when the next run starts.

Runs saved before step folders existed kept their files directly in out_dir; they are still read (and resumed:
the next save goes into checkpoints/).
"""
import os
import re

from .files import remove_folder

CHECKPOINTS = "checkpoints"
_STEP_FOLDER = re.compile(r"step_(\d+)")
# what the trainer writes beside checkpoints/ (best.safetensors: where runs before step folders kept it)
_TOP_LEVEL_FILES = ("log.jsonl", "tokenizer.json", "best.safetensors")


def step_folder(out_dir, step: int) -> str:
    return os.path.join(os.fspath(out_dir), CHECKPOINTS, f"step_{step:06d}")


def checkpoint_folders(out_dir) -> list:
    """[(step, path)] of the complete checkpoints in out_dir, oldest first."""
    parent = os.path.join(os.fspath(out_dir), CHECKPOINTS)
    if not os.path.isdir(parent):
        return []
    found = []
    for name in os.listdir(parent):
        m = _STEP_FOLDER.fullmatch(name)
        if m and os.path.isdir(os.path.join(parent, name)):
            found.append((int(m.group(1)), os.path.join(parent, name)))
    return sorted(found)


def latest_checkpoint(out_dir):
    """The folder holding out_dir's newest complete checkpoint, or None when it has none."""
    folders = checkpoint_folders(out_dir)
    if folders:
        return folders[-1][1]
    if os.path.isfile(os.path.join(os.fspath(out_dir), "state.json")):    # a run saved before step folders
        return os.fspath(out_dir)
    return None


def holds_run(out_dir) -> bool:
    """True when out_dir holds the work of a training run: a checkpoint or a log."""
    return latest_checkpoint(out_dir) is not None or os.path.isfile(os.path.join(os.fspath(out_dir), "log.jsonl"))


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def remove_leftovers(out_dir) -> None:
    """Remove what a killed process left behind: temporary files and folders of interrupted saves, and step
    folders older than the newest (a save that was killed after its rename, before it removed them)."""
    out_dir = os.fspath(out_dir)
    parent = os.path.join(out_dir, CHECKPOINTS)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if _is_leftover(name):
                _remove(os.path.join(parent, name))
        for _, folder in checkpoint_folders(out_dir)[:-1]:
            remove_folder(folder)
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if _is_leftover(name) and any(name.startswith(f".{kept}.") for kept in _TOP_LEVEL_FILES):
                _remove(os.path.join(out_dir, name))


def remove_older_checkpoints(out_dir, keep) -> None:
    """After a save: every complete checkpoint but `keep` (the folder just written) goes."""
    for _, folder in checkpoint_folders(out_dir):
        if os.path.abspath(folder) != os.path.abspath(keep):
            remove_folder(folder)


def remove_run(out_dir) -> None:
    """--overwrite: delete what a training run wrote into out_dir (checkpoints, log, tokenizer; the files of a
    run saved before step folders existed). Anything else in the folder stays."""
    import shutil
    out_dir = os.fspath(out_dir)
    shutil.rmtree(os.path.join(out_dir, CHECKPOINTS), ignore_errors=True)
    legacy = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json", "train_config.json")
    names = _TOP_LEVEL_FILES + (legacy if os.path.isfile(os.path.join(out_dir, "state.json")) else ())
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def _remove(path) -> None:
    import shutil
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def crash_test_point(step: int, point: str) -> None:
    """A hook for the crash tests, inert unless NANOGPT_NP_TEST_KILL_AT="STEP:POINT" is set: then the process
    kills itself with SIGKILL (exactly what `kill -9` does) when the save of STEP reaches POINT (a file name
    just written, "renamed" or "removed-older"), so a test can place a kill -9 between the files of a save."""
    wanted = os.environ.get("NANOGPT_NP_TEST_KILL_AT")
    if wanted and wanted == f"{step}:{point}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
