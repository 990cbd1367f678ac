"""The training loop end to end on tiny settings: exact resume, logs, checkpoints, clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np.io.checkpoint import CheckpointError, load_model
from nanogpt_np.config import ConfigError, parse_args
from nanogpt_np.optim import lr_at
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model=tiny", "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--device=cpu", "--max_iters=12", "--lr_decay_iters=12", "--warmup_iters=3"]


def run(tmp_path, name, *extra):
    cfg = parse_args(TINY + [f"--out_dir={tmp_path / name}"] + list(extra))
    train(cfg, echo=lambda *a: None)
    return [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]


def checkpoint(run_dir):
    """The folder of a run's newest checkpoint."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    assert folders, f"no checkpoint in {run_dir}"
    return folders[-1]


def losses(log):
    return {e["step"]: e["loss"] for e in log if e["type"] == "train"}


@pytest.mark.parametrize("extra", [[], ["--dropout=0.2", "--grad_accum_steps=2"]])
def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path, extra):
    full = losses(run(tmp_path, "full", "--eval_interval=6", *extra))
    run(tmp_path, "cut", "--eval_interval=6", "--max_iters=6", *extra)          # "interrupted" at step 6
    resumed = losses(run(tmp_path, "cut", "--eval_interval=6", "--resume", *extra))
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]!r} != {full[step]!r}"   # bit for bit
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "cut").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loss_goes_down_and_logs_are_complete(tmp_path):
    log = run(tmp_path, "r", "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=30", "--learning_rate=3e-3")
    train_entries = [e for e in log if e["type"] == "train"]
    evals = [e for e in log if e["type"] == "eval"]
    assert {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s"} <= set(train_entries[0])
    assert [e["step"] for e in evals] == [30, 60]
    vocab = len(json.loads((tmp_path / "r" / "tokenizer.json").read_text())["chars"])
    assert evals[-1]["val_loss"] < np.log(vocab) - 1.0                              # far better than uniform
    assert np.mean([e["loss"] for e in train_entries[-10:]]) < train_entries[0]["loss"] - 0.5
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_000060"]   # older ones removed
    for f in ("model.safetensors", "optimizer.safetensors", "config.json", "train_config.json", "state.json",
              "tokenizer.json"):
        assert (tmp_path / "r" / "checkpoints" / "step_000060" / f).exists()
    assert (tmp_path / "r" / "tokenizer.json").exists()


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)          # half way through the cosine
    assert lr_at(110, **kw) == lr_at(500, **kw) == 0.1
    values = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="--bogus"):
        parse_args(["--bogus=1"])
    with pytest.raises(ConfigError, match="--batch_size expects int"):
        parse_args(["--batch_size=many"])
    with pytest.raises(ConfigError, match="--dropout"):
        parse_args(["--dropout=1.5"])


def test_config_file_and_override_order(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"max_iters": 7, "batch_size": 3}))
    cfg = parse_args(["--preset=quick", str(f), "--batch_size=5"])
    assert (cfg.max_iters, cfg.batch_size, cfg.eval_interval) == (7, 5, 100)
    f.write_text(json.dumps({"max_iters": "seven"}))
    with pytest.raises(ConfigError, match="max_iters"):
        parse_args([str(f)])


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args,message", [
    (["--nope=3"], "unknown setting --nope"),
    (["--max_iters=abc"], "--max_iters expects int"),
    (["--dataset=missing.txt"], "not found"),
    (["--dataset=empty.txt"], "empty"),
    (["--dataset=short.txt", "--block_size=64"], "fewer than block_size"),
    (["--resume", "--out_dir=nowhere"], "nowhere"),
    (["--n_head=3"], "divisible"),
    (["--seed=-1"], "--seed must be >= 0"),
    (["--min_lr=0.1"], "must not exceed"),
    (["--init_from=nowhere"], "nowhere"),
    (["latin1.json"], "latin1.json"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("just a few words of text, far too short for a block\n")
    (tmp_path / "latin1.json").write_bytes('{"dataset": "caf\xe9"}'.encode("latin-1"))
    r = cli(*args, "--device=cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_checkpoints(tmp_path):
    run(tmp_path, "r", "--max_iters=2", "--eval_interval=2")
    run_dir = tmp_path / "r"
    # another architecture: resuming with different sizes is refused with the difference named
    with pytest.raises(CheckpointError, match="n_embd"):
        train(parse_args(TINY + [f"--out_dir={run_dir}", "--resume", "--n_embd=16"]), echo=lambda *a: None)
    # truncated weights
    weights = checkpoint(run_dir) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(run_dir)
    weights.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_model(run_dir)


def test_train_py_with_no_arguments_starts(tmp_path):
    """The README's first command: defaults, embedded corpus, no download (shortened by a JSON file)."""
    (tmp_path / "short.json").write_text(json.dumps({"max_iters": 3, "eval_iters": 1, "log_interval": 1}))
    r = cli("short.json", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "step      3" in r.stdout
    s = subprocess.run([sys.executable, str(REPO / "sample.py"), "--out_dir=out", "--max_new_tokens=20",
                        "--prompt=The ", "--device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert s.returncode == 0 and len(s.stdout) > 10, s.stderr


def test_ctrl_c_saves_at_a_step_boundary_and_resumes_exactly(tmp_path):
    """SIGINT mid-run: the step in flight finishes, a checkpoint is written, exit code 130; resuming gives the
    losses of a run that was never interrupted, bit for bit, whichever step the signal landed in."""
    import signal
    import time
    args = TINY + ["--max_iters=400", "--lr_decay_iters=400", "--eval_interval=1000", "--dropout=0.1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"--out_dir={tmp_path / 'cut'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    log_path = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log_path.exists() or len(log_path.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped at step" in out
    stopped_at = json.loads((checkpoint(tmp_path / "cut") / "state.json").read_text())["step"]
    assert 5 <= stopped_at < 400
    resumed = losses(run(tmp_path, "cut", "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=1000",
                         "--dropout=0.1", "--resume"))
    full = losses(run(tmp_path, "full", "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=1000",
                      "--dropout=0.1"))
    assert all(resumed[s] == full[s] for s in range(1, 401)), "resumed losses differ from the uninterrupted run"


def test_early_stopping_keeps_the_best_weights(tmp_path, monkeypatch):
    """Scripted validation losses 3.0, 2.0, 2.5, 2.6 with patience 2: training stops at the 4th evaluation
    and the saved weights are those of the 2nd (step 4), equal to a run that simply stopped at step 4."""
    from nanogpt_np import trainer
    scripted = [3.0, 2.0, 2.5, 2.6]
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: scripted.pop(0) if scripted else 1.0)
    log = run(tmp_path, "es", "--max_iters=12", "--eval_interval=2", "--early_stopping_patience=2")
    assert [e["step"] for e in log if e["type"] == "eval"] == [2, 4, 6, 8]
    run(tmp_path, "ref", "--max_iters=4", "--eval_interval=2")
    a, b = load_model(tmp_path / "es").state_dict(), load_model(tmp_path / "ref").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_needs_only_the_run_directory(tmp_path):
    """--resume takes the run's saved settings; only flags given again change (here: train longer)."""
    full = losses(run(tmp_path, "full", "--eval_interval=6"))
    run(tmp_path, "cut", "--eval_interval=6", "--max_iters=6")
    cfg = parse_args([f"--out_dir={tmp_path / 'cut'}", "--resume", "--max_iters=12"])
    assert (cfg.model, cfg.block_size, cfg.batch_size, cfg.lr_decay_iters) == ("tiny", 16, 4, 12)
    train(cfg, echo=lambda *a: None)
    resumed = losses([json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")])
    assert all(resumed[s] == full[s] for s in range(1, 13))


def test_early_stopping_after_resume_uses_the_saved_best(tmp_path, monkeypatch):
    from nanogpt_np import trainer
    scripted = [3.0, 2.0, 2.5, 2.6]
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: scripted.pop(0))
    run(tmp_path, "es", "--max_iters=4", "--eval_interval=2", "--early_stopping_patience=2")    # best: step 4
    best = load_model(tmp_path / "es").state_dict()
    run(tmp_path, "es", "--max_iters=12", "--eval_interval=2", "--early_stopping_patience=2", "--resume")
    after = load_model(tmp_path / "es").state_dict()
    assert all(np.array_equal(best[k], after[k]) for k in best)          # the step-4 weights, not NaN
    state = json.loads((checkpoint(tmp_path / "es") / "state.json").read_text())
    assert state["step"] == 8 and "early stopping" in state["finished"]
    with pytest.raises(CheckpointError, match="finished"):
        run(tmp_path, "es", "--max_iters=12", "--resume")


def test_gradient_accumulation_weights_micro_batches_by_counted_targets(rng):
    """Two micro-batches with 1 and 8 counted targets give the gradient of the one batch holding both."""
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.trainer import accumulate_gradients
    model = GPT(GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=1, n_embd=8), seed=1, dtype="float64")
    x = rng.integers(0, 7, size=(2, 8))
    y = rng.integers(0, 7, size=(2, 8))
    y[0, :7] = -1                                            # row 0 counts 1 target, row 1 counts 8
    model.zero_grad()
    one = accumulate_gradients(model, [(x, y)])
    g_one = model.flat_grads.copy()
    model.zero_grad()
    two = accumulate_gradients(model, [(x[:1], y[:1]), (x[1:], y[1:])])
    np.testing.assert_allclose(model.flat_grads, g_one, rtol=1e-12, atol=1e-15)
    assert abs(one - two) < 1e-12


def test_accumulation_with_ranks_sums_losses_once_and_allows_a_rank_without_targets(rng):
    """With ranks, the targets and the loss sum go through world.sum_values once each per step. A rank whose
    micro-batches are all masked contributes nothing (no loss to bring back) and still gets the global mean.
    The other rank is played by a world that adds its numbers (its count and loss sum, known beforehand)."""
    from nanogpt_np.model import GPT, GPTConfig
    from nanogpt_np.trainer import accumulate_gradients
    model = GPT(GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=1, n_embd=8), seed=1, dtype="float64")
    x = rng.integers(0, 7, size=(2, 8))
    y = rng.integers(0, 7, size=(2, 8))
    y[0, :5] = -1                                            # 3 + 8 = 11 counted targets here
    model.zero_grad()
    mine = accumulate_gradients(model, [(x[:1], y[:1]), (x[1:], y[1:])])    # this rank alone: mean over 11

    class OtherRank:
        calls = []

        def __init__(self, count, loss_sum):
            self.other = [count, loss_sum]

        def sum_values(self, value):
            self.calls.append(value)
            return (value + self.other[len(self.calls) - 1],)

    world = OtherRank(count=5, loss_sum=5 * 1.25)
    model.zero_grad()
    both = accumulate_gradients(model, [(x[:1], y[:1]), (x[1:], y[1:])], world)
    assert len(world.calls) == 2 and world.calls[0] == 11
    assert abs(both - (mine * 11 + 5 * 1.25) / 16) < 1e-12
    masked = np.full_like(y, -1)
    world, OtherRank.calls = OtherRank(count=5, loss_sum=5 * 1.25), []
    model.zero_grad()
    assert abs(accumulate_gradients(model, [(x, masked)], world) - 1.25) < 1e-12      # no targets on this rank
    assert not model.flat_grads.any()


def test_task_data_respects_the_tokenizer_setting(tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"say {w}: ", "completion": w}) + "\n"
                            for w in ["yes", "no", "maybe", "never", "always", "often"] * 10))
    train(parse_args(TINY + [f"--dataset={task}", "--tokenizer=bpe", "--vocab_size=270", "--max_iters=2",
                             f"--out_dir={tmp_path / 'r'}"]), echo=lambda *a: None)
    assert json.loads((tmp_path / "r" / "tokenizer.json").read_text())["type"] == "bpe"


def test_saved_files_are_readable_like_normal_files(tmp_path):
    run(tmp_path, "r", "--max_iters=2", "--eval_interval=2")
    umask = os.umask(0)
    os.umask(umask)
    folder = checkpoint(tmp_path / "r")
    for name in ("model.safetensors", "config.json", "state.json", "tokenizer.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_init_from_a_hugging_face_gpt2_folder(tmp_path):
    """A downloaded GPT-2 folder holds Hugging Face's own tokenizer.json beside vocab.json + merges.txt:
    --init_from, sample.py and the tokenizer loader must read the GPT-2 pair, not that file."""
    from nanogpt_np.tokenizers.bpe import BPETokenizer
    from nanogpt_np.io.checkpoint import load_tokenizer_of_run
    from nanogpt_np.io.hf_gpt2 import export_gpt2_dir
    from nanogpt_np.model import GPT, GPTConfig
    text = "the quick brown fox jumps over the lazy dog. " * 200
    tok = BPETokenizer.train(text, 300)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16), seed=3)
    export_gpt2_dir(model, tok, tmp_path / "gpt2")
    (tmp_path / "gpt2" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert load_tokenizer_of_run(tmp_path / "gpt2").encode("the fox") == tok.encode("the fox")
    (tmp_path / "data.txt").write_text(text)
    not_model = [a for a in TINY if not a.startswith("--model")]        # the architecture comes with the weights
    train(parse_args(not_model + [f"--init_from={tmp_path / 'gpt2'}", f"--dataset={tmp_path / 'data.txt'}",
                                  "--max_iters=2", f"--out_dir={tmp_path / 'ft'}"]), echo=lambda *a: None)
    assert load_model(tmp_path / "ft").config.vocab_size == tok.vocab_size
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={tmp_path / 'gpt2'}",
                        "--max_new_tokens=5", "--device=cpu", "--prompt=the"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def test_default_corpus_does_not_depend_on_what_is_imported():
    """The embedded corpus must be the same text in any process (libraries may patch stdlib functions)."""
    import hashlib
    from nanogpt_np.data.corpus import default_corpus_text
    here = hashlib.sha256(default_corpus_text().encode()).hexdigest()
    fresh = subprocess.run([sys.executable, "-c", "import hashlib; from nanogpt_np.data.corpus import default_corpus_text;"
                            "print(hashlib.sha256(default_corpus_text().encode()).hexdigest())"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert fresh.stdout.strip() == here
    assert len(default_corpus_text()) > 500_000


@pytest.mark.parametrize("signum,name", [(2, "Ctrl-C"), (15, "SIGTERM")])
def test_stop_messages_name_the_signal_that_arrived(signum, name):
    """SIGTERM (from a job scheduler, say) is not a Ctrl-C: the messages say which signal came."""
    import signal
    from nanogpt_np.trainer import StopAtStepBoundary
    said = []
    stopper = StopAtStepBoundary(said.append)
    stopper._handle(signal.Signals(signum), None)
    assert stopper.requested and f"{name} again" in said[-1] and said[-1].strip().startswith(name)
    other = "SIGTERM" if name == "Ctrl-C" else "Ctrl-C"
    assert other not in said[-1]
    stopper.saving = True
    stopper._handle(signal.Signals(signum), None)                 # a second one while saving waits for the save
    assert said[-1].strip().startswith(name) and "checkpoint" in said[-1]
    stopper.saving = False
    with pytest.raises(KeyboardInterrupt):
        stopper._handle(signal.Signals(signum), None)
