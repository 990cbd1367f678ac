"""Data-parallel training with `mpiexec -n 2`: the same steps as one process, exact resume, no hang on a death.

The mpiexec tests start real MPI jobs (mpi4py + an MPI library: pip install 'nanogpt_np[dist]') and skip
with that reason without them. Each rank runs one BLAS thread, so two ranks fit two cores.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import distributed
from nanogpt_np.config import parse_args
from nanogpt_np.data.loader import BatchLoader
from nanogpt_np.distributed import DistributedError
from nanogpt_np.io import safetensors
from nanogpt_np.io.run_dir import latest_checkpoint
from nanogpt_np.trainer import train

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs mpi4py and an MPI library with mpiexec: pip install 'nanogpt_np[dist]'")
pytestmark = pytest.mark.mpi

TINY = ["--model=tiny", "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--device=cpu", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------- helpers

def text_file(tmp_path) -> str:
    """~35 KB of word salad: a small, fast corpus (the embedded one takes a second to build)."""
    rng = np.random.default_rng(0)
    words = "the a model learns to predict next token from text data and its loss falls slowly".split()
    path = tmp_path / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=10)) for _ in range(700)))
    return str(path)


def task_file(tmp_path) -> str:
    """Prompt/completion pairs whose completions (the counted targets) differ in length from row to row, so
    the two ranks' halves of a batch count different numbers of targets."""
    rng = np.random.default_rng(1)
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for i in range(80):
            f.write(json.dumps({"prompt": f"q{i % 7}: ", "completion": "ab" * int(rng.integers(1, 6))}) + "\n")
    return str(path)


def mpirun(n, *args, script="train.py", timeout=120, **kwargs):
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(REPO / script), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def train_here(out_dir, *args):
    train(parse_args(TINY + [f"--out_dir={out_dir}", *args]), echo=lambda *a: None)


def train_log(out_dir):
    return {e["step"]: e for e in map(json.loads, open(Path(out_dir) / "log.jsonl")) if e["type"] == "train"}


def checkpoint_dir(out_dir) -> Path:
    """The folder of the run's newest checkpoint (checkpoints/step_NNNNNN/)."""
    return Path(latest_checkpoint(out_dir))


def weights(out_dir):
    return safetensors.load_file(str(checkpoint_dir(out_dir) / "model.safetensors"))


def assert_same_run(a, b, rtol, steps, elementwise=True):
    """Losses and gradient norms of every step, then the final weights, within rtol (0: bit for bit): every
    element relative to its tensor's largest, or (elementwise=False) the whole parameter vector in norm.
    float32 needs the second: AdamW divides by sqrt(v), so an element whose gradient is at rounding level
    (a sum whose terms cancel) moves by up to lr in either direction; summing the batch in two halves instead
    of one moves a few such elements of float32 weights by 1e-4 of their tensor's scale within a few steps."""
    la, lb = train_log(a), train_log(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for s in la:
        for key in ("loss", "grad_norm"):
            x, y = la[s][key], lb[s][key]
            assert abs(x - y) <= rtol * abs(y), f"step {s} {key}: {x!r} vs {y!r}"
    wa, wb = weights(a), weights(b)
    if not elementwise:
        x, y = (np.concatenate([w[k].ravel().astype(np.float64) for k in sorted(wb)]) for w in (wa, wb))
        err = np.linalg.norm(x - y) / np.linalg.norm(y)
        assert err <= rtol, f"weights: relative difference {err:.2e} in norm"
        return
    for name in wb:
        err = np.abs(wa[name] - wb[name]).max() / np.abs(wb[name]).max()
        assert err <= rtol, f"{name}: relative difference {err:.2e}"


def rank_pid(out_dir, rank, deadline):
    """The process id of rank `rank` of the job training into out_dir (found in /proc by its arguments and
    the rank variable its launcher set)."""
    want_arg, want_env = f"--out_dir={out_dir}".encode(), (f"PMI_RANK={rank}".encode(),
                                                             f"OMPI_COMM_WORLD_RANK={rank}".encode())
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if want_arg in cmdline and any(e in environ for e in want_env):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of the job in {out_dir} not found")


def wait_for_log_lines(out_dir, n, proc, deadline):
    path = Path(out_dir) / "log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {n} lines (exit code {proc.poll()})")


# ----------------------------------------------------------------------------------------------- no MPI needed

def test_rank_slices_are_the_global_batch_and_share_one_state():
    """Two ranks' rows put together are the batch one process draws; their saved states are the same."""
    tokens = np.arange(5000) % 97
    one = BatchLoader(tokens, 6, 8, seed=3)
    halves = [BatchLoader(tokens, 6, 8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [h.next_batch() for h in halves]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    assert halves[0].state_dict() == halves[1].state_dict() == one.state_dict()
    with pytest.raises(ValueError, match="split evenly"):
        BatchLoader(tokens, 5, 8, rank=0, world_size=2)


def test_missing_mpi_or_nccl_is_one_line_naming_the_extra(monkeypatch):
    from nanogpt_np.distributed import mpi, nccl
    monkeypatch.setitem(sys.modules, "mpi4py", None)                  # as if not installed
    with pytest.raises(DistributedError, match=r"nanogpt_np\[dist\]"):
        mpi._import_mpi()
    from emulation import fake_cupy
    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(fake_cupy.nccl, "available", False)
    with pytest.raises(DistributedError, match="nvidia-nccl-cu13") as e:
        nccl._import_nccl()
    assert "\n" not in str(e.value)


def test_plain_python_is_one_process_and_imports_no_mpi(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.connect() is distributed.SINGLE
    with pytest.raises(DistributedError, match="multiple of 4"):
        distributed.check_batch_split(6, type("World", (), {"world_size": 4})())


# ----------------------------------------------------------------------------------------------- mpiexec -n 2

@needs_mpi
@pytest.mark.parametrize("data,dtype,rtol,steps,extra", [
    ("text", "float64", 1e-12, 8, ["--grad_accum_steps=2"]),
    ("text", "float32", 1e-6, 4, []),
    ("task", "float64", 1e-12, 8, ["--grad_accum_steps=2"]),       # unequal target counts on the two ranks
])
def test_two_ranks_take_the_steps_of_one_rank(tmp_path, data, dtype, rtol, steps, extra):
    dataset = text_file(tmp_path) if data == "text" else task_file(tmp_path)
    args = [f"--dataset={dataset}", f"--dtype={dtype}", f"--max_iters={steps}", "--eval_interval=4", *extra]
    train_here(tmp_path / "one", *args)
    r = mpirun(2, *TINY, *args, f"--out_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done:") == 1 and "data parallel: 2 rank(s)" in r.stdout      # rank 0 speaks alone
    assert_same_run(tmp_path / "two", tmp_path / "one", rtol, steps, elementwise=dtype == "float64")
    state = json.loads((checkpoint_dir(tmp_path / "two") / "state.json").read_text())
    assert state["ranks"] == 2


@needs_mpi
def test_resume_with_another_rank_count(tmp_path):
    """The loader state is the global batch stream's: a 2-rank checkpoint continues on 1 process exactly
    (to rounding) without dropout, and is refused, in one line, with it."""
    args = [f"--dataset={text_file(tmp_path)}", "--dtype=float64", "--eval_interval=4", "--lr_decay_iters=8"]
    train_here(tmp_path / "one", *args, "--max_iters=8")
    r = mpirun(2, *TINY, *args, "--max_iters=4", f"--out_dir={tmp_path / 'cut'}")
    assert r.returncode == 0, r.stderr
    with pytest.raises(DistributedError, match=r"2 rank\(s\) and dropout 0.1.*mpiexec -n 2"):
        train_here(tmp_path / "cut", *args, "--max_iters=8", "--resume", "--dropout=0.1")
    train_here(tmp_path / "cut", *args, "--max_iters=8", "--resume")
    assert_same_run(tmp_path / "cut", tmp_path / "one", 1e-12, steps=8)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-rank run with dropout (each rank its own masks) and checkpoints every 50 steps, never stopped."""
    tmp = tmp_path_factory.mktemp("dist")
    args = [f"--dataset={text_file(tmp)}", "--max_iters=150", "--eval_interval=50", "--dropout=0.1"]
    r = mpirun(2, *TINY, *args, f"--out_dir={tmp / 'full'}")
    assert r.returncode == 0, r.stderr
    return tmp / "full", args


@needs_mpi
@pytest.mark.parametrize("rank,sig", [(1, signal.SIGTERM), (0, signal.SIGINT)])
def test_a_signal_to_one_rank_stops_all_at_one_step_and_resumes_bit_for_bit(tmp_path, uninterrupted, rank, sig):
    full, args = uninterrupted
    cut = tmp_path / "cut"
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(REPO / "train.py"), *TINY, *args, f"--out_dir={cut}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        wait_for_log_lines(cut, 5, proc, deadline)
        os.kill(rank_pid(cut, rank, deadline), sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out.count("stopped at step") == 1
    stopped_at = json.loads((checkpoint_dir(cut) / "state.json").read_text())["step"]
    assert 5 <= stopped_at < 150
    r = mpirun(2, *TINY, *args, f"--out_dir={cut}", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(cut, full, 0.0, steps=150)


@needs_mpi
def test_a_killed_rank_ends_the_others_within_30_s(tmp_path):
    out = tmp_path / "r"
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(REPO / "train.py"), *TINY, f"--dataset={text_file(tmp_path)}",
           "--max_iters=100000", "--eval_interval=100000", f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        wait_for_log_lines(out, 3, proc, deadline)
        survivor = rank_pid(out, 0, deadline)
        os.kill(rank_pid(out, 1, deadline), signal.SIGKILL)
        killed_at = time.time()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - killed_at < 30
    time.sleep(0.5)
    assert not Path(f"/proc/{survivor}").exists() or "Z" in Path(f"/proc/{survivor}/stat").read_text().split()[2]


@needs_mpi
def test_a_batch_that_does_not_split_is_one_line(tmp_path):
    r = mpirun(2, *TINY, f"--dataset={text_file(tmp_path)}", "--batch_size=3", f"--out_dir={tmp_path / 'r'}",
               timeout=60)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not split evenly over 2 ranks" in errors[0], r.stderr    # rank 0 reports
    assert "Traceback" not in r.stderr


@needs_mpi
def test_gpu_path_on_the_fake_cupy_uses_nccl_one_gpu_per_rank(tmp_path):
    """The GPU code path (device selection, NCCL allreduce on device buffers, unique id over MPI) on the fake
    CuPy: 2 ranks equal 1 process, each rank took its own (fake) GPU, one NCCL allreduce per step."""
    # --tf32=false: the fake rounds TF32 matmul inputs as the GPU does (1e-3 per element), which would swamp
    # the 1e-6 comparison of two ways of summing the batch; the NCCL path is what is tested here
    args = [*TINY, "--device=cuda", "--tf32=false", f"--dataset={text_file(tmp_path)}", "--max_iters=4",
            "--eval_interval=4"]
    script = REPO / "tests" / "emulation" / "fake_gpu_train.py"
    one = subprocess.run([sys.executable, str(script), *args, f"--out_dir={tmp_path / 'one'}"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = mpirun(2, *args, f"--out_dir={tmp_path / 'two'}", script=script)
    assert two.returncode == 0, two.stderr
    # each rank prints one JSON report; mpiexec may join it to another rank's unfinished line
    reports = sorted(map(json.loads, re.findall(r'\{"rank": .*?\}', two.stdout)), key=lambda d: d["rank"])
    assert [(d["devices_used"], d["nccl_allreduces"]) for d in reports] == [([0], 4), ([1], 4)]
    assert_same_run(tmp_path / "two", tmp_path / "one", 1e-6, steps=4, elementwise=False)


ZERO_CHECK = """
import numpy as np
from nanogpt_np import distributed
from nanogpt_np.distributed.zero import ZeroAdamW
from nanogpt_np.model import GPT, GPTConfig
from nanogpt_np.optim import AdamW
from nanogpt_np.trainer import accumulate_gradients
world = distributed.connect()
config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
plain, zero = GPT(config, seed=0, dtype="float64"), GPT(config, seed=0, dtype="float64")
opt_plain = AdamW(plain, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
opt_zero = ZeroAdamW(zero, world, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
assert opt_zero.m.size < plain.flat_params.size                     # each rank holds part of the state
rng = np.random.default_rng(0)
for step in range(4):
    x, y = rng.integers(0, 11, size=(2, 4, 8))                       # (4, 8) global batch; 2 rows per rank
    rows = slice(2 * world.rank, 2 * world.rank + 2)
    for model in (plain, zero):
        model.zero_grad()
        accumulate_gradients(model, [(x[rows], y[rows])], world)
    world.allreduce_sum_(plain.flat_grads)
    norms = opt_plain.step(grad_clip=0.5), opt_zero.step(grad_clip=0.5)
    assert abs(norms[0] - norms[1]) <= 1e-12 * norms[0], norms
err = np.abs(zero.flat_params - plain.flat_params).max() / np.abs(plain.flat_params).max()
assert err < 1e-12, err
world.assert_identical(zero.flat_params, "ZeRO-1 weights")
print("ok", err, flush=True)
"""


@needs_mpi
def test_zero1_equals_the_plain_step():
    """ZeRO-1 (each rank updates its slice of the buffer) takes the plain data-parallel steps (float64)."""
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", ZERO_CHECK], env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stdout + r.stderr
