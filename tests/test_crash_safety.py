"""A run never loses its work: kill -9 at any moment (inside a save too) leaves a run that resumes exactly,
and a new run never writes over an old one unless asked."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np.config import ConfigError, parse_args
from nanogpt_np.io import checkpoint, run_dir
from nanogpt_np.io.checkpoint import load_model
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("NANOGPT_NP_TEST_KILL_AT", None)
SAVE_POINTS = ["config.json", "train_config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors",
               "state.json", "renamed", "removed-older"]          # where crash_test_point can stop a save
BEFORE_RENAME = SAVE_POINTS[:6]


def write_text(path, rng):
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 6))) for _ in range(30)]
    path.write_text(" ".join(rng.choice(words, size=2500)) + "\n")


def tiny_args(data, out_dir, max_iters):
    return [f"--dataset={data}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=8",
            "--block_size=8", "--batch_size=2", "--dropout=0.1", f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}", "--warmup_iters=5", "--eval_interval=2", "--eval_iters=2",
            "--log_interval=1", "--device=cpu"]


def newest_step(out_dir):
    folders = run_dir.checkpoint_folders(out_dir)
    return folders[-1][0] if folders else None


def logged_steps(out_dir):
    try:
        lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[:-1]]     # the last line may still be being written
    return max(steps, default=0)


def records(out_dir):
    """log.jsonl without the timings (which differ from run to run): what must be equal bit for bit."""
    entries = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    for e in entries:
        e.pop("ms_per_step", None)
        e.pop("tokens_per_s", None)
    return entries


def start(args, kill_at=None):
    env = dict(ENV, **({"NANOGPT_NP_TEST_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, what, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def fast_dir(tmp_path):
    """A folder on tmpfs when there is one: fsync on a real disk costs ~0.1 s a save here, and what a kill -9
    leaves behind does not depend on fsync (only a power cut does)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            yield Path(d)
    else:
        yield tmp_path


def test_thirty_kill_9s_then_resume_give_the_uninterrupted_run_bit_for_bit(fast_dir):
    """30 SIGKILLs at random moments of a real `python train.py` (12 of them inside a save, placed between
    its files by the NANOGPT_NP_TEST_KILL_AT hook; the rest at random times, some during start-up), each
    followed by --resume: every resume works, and the losses and weights equal an uninterrupted run's."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"torture seed: {seed}")
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    data = fast_dir / "data.txt"
    write_text(data, rng)
    max_iters, run = 200, fast_dir / "run"
    first = tiny_args(data, run, max_iters) + [f"--seed={seed % 10000}"]
    resume = [f"--out_dir={run}", "--resume"]
    kinds = ["save"] * 12 + ["steps"] * 12 + ["startup"] * 6
    pick.shuffle(kinds)
    kinds[0] = "steps"                    # the first process must leave a checkpoint to resume from
    in_save = 0
    for i, kind in enumerate(kinds):
        args = first if i == 0 else resume
        before = newest_step(run) or 0
        # near the end, only kills that cannot overshoot it (a run that finishes is not a kill)
        if (kind == "startup" and before + 100 > max_iters) or (kind == "steps" and before + 40 > max_iters):
            kind = "save"
        if kind == "save":
            # the save of one of the next three checkpoints (every 2 steps), stopped after a random file
            target = before + 2 * (pick.randint(1, 3) if before + 40 <= max_iters else 1)
            point = pick.choice(SAVE_POINTS)
            proc = start(args, kill_at=f"{target}:{point}")
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
            expected = target - 2 if point in BEFORE_RENAME else target      # the previous save, or this one
            assert newest_step(run) == expected, (target, point)             # complete either way
            in_save += 1
        else:
            proc = start(args)
            if kind == "steps" or i == 0:
                goal = before + pick.randint(1, 6)
                wait_for(lambda: logged_steps(run) >= goal and newest_step(run) is not None, proc, f"step {goal}")
                time.sleep(pick.uniform(0, 0.01))
            else:
                time.sleep(pick.uniform(0, 0.25))             # imports, data, model, forgetting the log's tail
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read()
            assert proc.returncode != 0, "the run finished before the kill: make max_iters larger"
        proc.stderr.close()
    assert in_save >= 10
    final = subprocess.run([sys.executable, str(REPO / "train.py"), *resume], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert final.returncode == 0, final.stderr

    train(parse_args(tiny_args(data, fast_dir / "ref", max_iters) + [f"--seed={seed % 10000}"]),
          echo=lambda *a: None)
    assert records(run) == records(fast_dir / "ref")                  # every loss, lr, grad norm, val loss
    a, b = load_model(run).state_dict(), load_model(fast_dir / "ref").state_dict()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{max_iters:06d}"]   # no leftovers
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def tiny_run(tmp_path, name, *extra, max_iters=4):
    data = tmp_path / "data.txt"
    if not data.exists():
        write_text(data, np.random.default_rng())
    cfg = parse_args(tiny_args(data, tmp_path / name, max_iters) + list(extra))
    return train(cfg, echo=lambda *a: None)


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """An exception between any two files of a save: the previous checkpoint stays the newest, complete, and
    the half-written folder is gone (a kill -9 leaves it behind: the next start removes it, tested below)."""
    tiny_run(tmp_path, "r", max_iters=2)
    before = load_model(tmp_path / "r").state_dict()
    point = random.choice(SAVE_POINTS[:6])

    def fail(step, where):
        if where == point:
            raise OSError(f"disk full at {where}")
    monkeypatch.setattr(run_dir, "crash_test_point", fail)
    with pytest.raises(OSError, match="disk full"):
        tiny_run(tmp_path, "r", "--resume", max_iters=4)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_000002"]
    after = load_model(tmp_path / "r").state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    tiny_run(tmp_path, "r", max_iters=2)
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / ".step_000004.abc123.tmp").mkdir()                       # a save killed before its rename
    (ckpts / ".step_000004.abc123.tmp" / "model.safetensors").write_bytes(b"half")
    (ckpts / "step_000000").mkdir()                                   # an older one not yet removed
    (tmp_path / "r" / ".log.jsonl.xyz.tmp").write_text("{")
    (tmp_path / "r" / "notes.txt").write_text("mine")                 # not ours: stays
    assert run_dir.latest_checkpoint(tmp_path / "r").endswith("step_000002")
    tiny_run(tmp_path, "r", "--resume", max_iters=4)
    assert [p.name for p in ckpts.iterdir()] == ["step_000004"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["checkpoints", "log.jsonl", "notes.txt",
                                                                  "tokenizer.json"]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    tiny_run(tmp_path, "r", max_iters=2)
    with open(tmp_path / "r" / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "lo')                    # killed in the middle of a write
    tiny_run(tmp_path, "r", "--resume", max_iters=4)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps] == sorted(steps) and steps.count(3) == 1


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    tiny_run(tmp_path, "r", max_iters=2)
    log_before = (tmp_path / "r" / "log.jsonl").read_text()
    with pytest.raises(ConfigError) as e:
        tiny_run(tmp_path, "r", max_iters=2)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value) and "step 2" in str(e.value)
    assert (tmp_path / "r" / "log.jsonl").read_text() == log_before
    assert checkpoint.read_training_state(tmp_path / "r")["step"] == 2
    # --overwrite starts over: the old checkpoint and log are gone, not mixed in
    tiny_run(tmp_path, "r", "--overwrite", "--seed=7", max_iters=4)
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()
            if '"train"' in line] == [1, 2, 3, 4]
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_000004"]
    # a log without a checkpoint (a run killed before its first save, or --save_checkpoints=false) counts too
    tiny_run(tmp_path, "nosave", "--save_checkpoints=false", max_iters=2)
    with pytest.raises(ConfigError, match="holds the log of a run"):
        tiny_run(tmp_path, "nosave", max_iters=2)
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_args(["--resume", "--overwrite"])
    with pytest.raises(ConfigError, match="another --out_dir"):
        tiny_run(tmp_path, "r", f"--init_from={tmp_path / 'r'}", "--overwrite")
    assert checkpoint.read_training_state(tmp_path / "r")["step"] == 4          # still there


def test_the_refusal_is_one_line_on_the_command_line(tmp_path):
    tiny_run(tmp_path, "r", max_iters=2)
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *tiny_args(tmp_path / "data.txt", tmp_path / "r", 2)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
