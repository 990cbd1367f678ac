"""The world of `mpiexec -n N`: mpi4py's COMM_WORLD, reductions in place on NumPy buffers.

MPI (the Message Passing Interface) is the standard way processes on one or many machines talk; mpiexec
starts the N processes and tells each its rank. mpi4py wraps the C library; `Allreduce(IN_PLACE, buf, SUM)`
replaces `buf` on every rank by the element-wise sum over all ranks, without a copy. On the GPU the big
gradient buffer is reduced by NCCL instead (nccl.py); MPI still carries the small values and the NCCL id.
"""
import sys
import time
import zlib

import numpy as np

from .errors import INSTALL_HINT, DistributedError


def _import_mpi():
    try:
        from mpi4py import MPI          # importing it initializes MPI (MPI_Init_thread)
    except ImportError:
        raise DistributedError(f"started by mpiexec, but mpi4py is not installed: {INSTALL_HINT}") from None
    except (RuntimeError, OSError) as e:              # mpi4py without a usable MPI library
        raise DistributedError(f"mpi4py cannot load an MPI library ({e}): {INSTALL_HINT}") from None
    return MPI


class MPIWorld:
    """N ranks of one MPI job. See the single-process world in __init__.py for what each method means."""

    def __init__(self, MPI, comm):
        self.MPI, self.comm = MPI, comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.is_main = self.rank == 0
        # rank among the processes on this machine: which GPU this rank takes (local_rank modulo GPUs)
        self.local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank).Get_rank()
        self.gpu = None                # the NCCL communicator once bound to a GPU
        self.name = f"rank {self.rank} of {self.world_size} (MPI)"

    @classmethod
    def from_launcher(cls):
        MPI = _import_mpi()
        world = cls(MPI, MPI.COMM_WORLD)
        world._end_all_ranks_on_uncaught_exceptions()
        return world

    def bind_device(self, device: str) -> None:
        if device == "cuda":
            from .nccl import NCCLCommunicator
            self.gpu = NCCLCommunicator.open(self.comm, self.local_rank)
            self.name += f", GPU {self.gpu.device_id} (NCCL)"

    def allreduce_sum_(self, flat_buffer) -> None:
        from .. import backend
        if self.gpu is not None and backend.is_gpu_array(flat_buffer):
            self.gpu.allreduce_sum_(flat_buffer)             # device memory: NCCL
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, flat_buffer, op=self.MPI.SUM)

    def sum_values(self, *values):
        buf = np.array(values, dtype=np.float64)            # (k,) float64: exact for counts below 2**53
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return tuple(buf.tolist())

    def any_rank(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    def from_main(self, value):
        return self.comm.bcast(value, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def assert_identical(self, flat_buffer, what: str) -> None:
        from .. import backend
        checksum = zlib.crc32(memoryview(np.ascontiguousarray(backend.to_numpy(flat_buffer))).cast("B"))
        checksums = self.comm.allgather(checksum)
        if len(set(checksums)) != 1:
            raise DistributedError(f"the ranks hold different {what} (CRC32 per rank: {checksums}); "
                                   f"data-parallel training has lost its synchronisation")

    def fail(self, exit_code: int, message: str) -> int:
        """Report, then MPI_Abort: the launcher ends every rank of the job with this exit code. Without it the
        other ranks would wait forever in their next reduction (and MPI_Finalize at exit would wait too)."""
        sys.stdout.flush()
        if not self.is_main:
            time.sleep(10)            # rank 0, failing the same way, ends the job first and reports it once
                                      # (10 s leaves room for a slow rank 0 on a loaded machine)
            message = f"{message} (rank {self.rank})"
        print(message, file=sys.stderr, flush=True)
        self._abort(exit_code)
        return exit_code              # not reached

    def _abort(self, exit_code: int) -> None:
        """MPI_Abort, after what this rank printed has had time to reach the launcher: the launcher forwards each
        rank's output through its own pipes, MPI_Abort tears those down at once, and a line still in flight is
        lost (seen with MPICH's mpiexec: about 1 run in 10 ended with an empty stderr)."""
        time.sleep(0.5)
        self.comm.Abort(exit_code)

    def _end_all_ranks_on_uncaught_exceptions(self):
        """An exception nobody catches (a bug) prints its traceback, then aborts the job (exit code 1)."""
        previous = sys.excepthook

        def hook(*exc_info):
            previous(*exc_info)
            sys.stderr.flush()
            self._abort(1)
        sys.excepthook = hook
