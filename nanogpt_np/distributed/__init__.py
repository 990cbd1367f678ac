"""Data-parallel training: N processes ("ranks") train one model together, each on its share of every batch.

    mpiexec -n 4 python train.py ...          # 4 ranks; the global batch is still --batch_size

Every rank holds the whole model and the whole optimizer. One optimizer step on every rank:

    x, y = rows [rank * B/N, (rank + 1) * B/N) of each micro-batch        (the loader's rank slice)
    forward + backward on them -> local gradients in model.flat_grads    (weighted by the GLOBAL target count)
    allreduce_sum_(model.flat_grads)            the ONE big reduction of the step: every rank gets the sum
    clip + AdamW                                identical inputs on every rank -> identical weights

Why a sum and not a mean: accumulate_gradients weights each micro-batch's mean loss by (its targets) /
(the targets of the whole global batch, all ranks together). The sum over ranks of those weighted gradients
is then exactly the gradient of the mean loss over the global batch, the same quantity one process computes
on the whole batch, so N ranks and 1 rank take the same steps (up to the order of floating-point additions).

This module is the rank/world API the trainer uses. `connect()` returns one of two worlds:

    SingleProcess   plain `python train.py`: every call here does nothing, nothing is imported
    MPIWorld        launched by mpiexec (mpi.py): mpi4py on host (NumPy) buffers; on the GPU the big reduction
                    goes through NCCL on the device buffers (nccl.py), everything small through MPI

Failure rules, because a collective call waits for every rank: a rank that fails calls `fail(code, message)`,
which reports once and aborts the whole MPI job (MPI_Abort) instead of leaving the others waiting in their next
reduction; a rank that dies is noticed by the launcher (mpiexec), which ends the others.
"""
import os
import sys

from .errors import INSTALL_HINT, DistributedError  # noqa: F401  (part of this package's API)

# Environment variables that MPI launchers set in the processes they start: MPICH / Intel MPI (hydra),
# Open MPI, and PMIx-based launchers. Their presence, not their value, means "started by mpiexec".
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


class SingleProcess:
    """The world of one process: rank 0 of 1. Every collective is the identity."""
    rank, world_size, local_rank, is_main = 0, 1, 0, True
    name = "one process"

    def bind_device(self, device: str) -> None:
        """Choose this rank's GPU and open the GPU communicator (nothing to do with one process)."""

    def allreduce_sum_(self, flat_buffer) -> None:
        """Sum a flat gradient buffer (numpy or cupy) over the ranks, in place."""

    def sum_values(self, *values):
        """Sum a few Python numbers over the ranks (target counts, loss sums); returns a tuple."""
        return tuple(values)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (a stop request)."""
        return bool(flag)

    def from_main(self, value):
        """Rank 0's `value` on every rank (a small picklable object, e.g. a validation loss)."""
        return value

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def assert_identical(self, flat_buffer, what: str) -> None:
        """Raise when the ranks hold different contents in `flat_buffer` (they must never drift apart)."""

    def fail(self, exit_code: int, message: str) -> int:
        """A rank has failed: print `message` and end every rank (with ranks; never returns), or return the
        exit code. Alone: print it (before connect() under mpiexec: on rank 0 only, see fail() below)."""
        if not launched_by_mpi() or _launcher_rank() == 0:
            print(message, file=sys.stderr)
        return exit_code


SINGLE = SingleProcess()
_world = SINGLE              # this process's world, once connect() has run (MPI connects a process once)


def connect():
    """The world this process belongs to: an MPIWorld when an MPI launcher started it (even `mpiexec -n 1`,
    which exercises the MPI and NCCL code with one rank), otherwise the single-process world."""
    global _world
    if _world is SINGLE and launched_by_mpi():
        from .mpi import MPIWorld
        _world = MPIWorld.from_launcher()
    return _world


def fail(exit_code: int, message: str) -> int:
    """The command line's error paths: report `message` once and end every rank (never returns), or, alone,
    return the exit code. Every rank usually meets the same user mistake at the same moment, so rank 0
    reports it; another rank reports its own failure if rank 0 has not ended the job within a few seconds.
    (Before connect(), only settings can fail, and they are the same everywhere: rank 0 alone prints.)"""
    return _world.fail(exit_code, message)


def _launcher_rank() -> int:
    return int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", 0))))


def check_batch_split(batch_size: int, world) -> int:
    """Rows of each micro-batch per rank. The global batch must split evenly over the ranks, so that every
    rank computes the same amount and the N-rank run takes exactly the steps of the 1-rank run."""
    if batch_size % world.world_size:
        lower = batch_size - batch_size % world.world_size
        raise DistributedError(f"--batch_size={batch_size} does not split evenly over {world.world_size} ranks: "
                               f"use a multiple of {world.world_size} (e.g. {lower or world.world_size})")
    return batch_size // world.world_size


def check_resumed_rank_count(saved_ranks: int, world, dropout: float) -> None:
    """A resume with another number of ranks is exact (the loader's state is that of the global batch
    stream, the same on every rank) except for dropout: each rank draws the masks of its own rows from a
    generator seeded by (seed, step, rank), so other ranks would draw other masks. That case is refused."""
    if saved_ranks != world.world_size and dropout > 0:
        raise DistributedError(
            f"this run was trained with {saved_ranks} rank(s) and dropout {dropout}; dropout masks depend on "
            f"the ranks, so resume it with {saved_ranks} rank(s) (mpiexec -n {saved_ranks}) to continue exactly")
