"""The gradient reduction on GPUs: NCCL through CuPy's bindings, on the device buffers, one GPU per rank.

NCCL (NVIDIA's collective communication library) sums buffers across GPUs over NVLink, PCIe or the network
without a trip through host memory. Setting it up takes one value that every rank must share, the "unique
id" that rank 0 creates; it travels over MPI, which is already connecting the ranks. After that,
`allReduce(send, recv, count, dtype, SUM, stream)` on the same pointer sums in place, queued on the current
CUDA stream like any kernel.

Which GPU: a machine with G GPUs runs up to G ranks; a rank takes GPU (local rank modulo G), its local rank
being its place among the ranks on that machine. Two ranks on one GPU work but share it.
"""
import warnings

from .errors import DistributedError

NCCL_HINT = "pip install 'nvidia-nccl-cu13>=2.27.7,<3' (CuPy loads it from there)"


def _import_nccl():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # CuPy warns at length; one line below says the same
            from cupy.cuda import nccl
    except ImportError as e:
        raise DistributedError(f"several GPU ranks need CuPy's NCCL bindings ({e}): {NCCL_HINT}") from None
    if not getattr(nccl, "available", True):
        raise DistributedError(f"several GPU ranks need NCCL, which CuPy cannot load: {NCCL_HINT}")
    return nccl


class NCCLCommunicator:
    """Sums flat device buffers over the ranks, in place."""

    def __init__(self, cupy, nccl, comm, device_id):
        self.cupy, self.nccl, self.comm, self.device_id = cupy, nccl, comm, device_id
        self.dtypes = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    @classmethod
    def open(cls, mpi_comm, local_rank: int):
        """Select this rank's GPU (before anything is allocated on one), then create the communicator."""
        import cupy
        device_id = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(device_id).use()
        nccl = _import_nccl()
        unique_id = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        unique_id = mpi_comm.bcast(unique_id, root=0)                   # over MPI, to every rank
        comm = nccl.NcclCommunicator(mpi_comm.Get_size(), unique_id, mpi_comm.Get_rank())
        return cls(cupy, nccl, comm, device_id)

    def allreduce_sum_(self, flat_buffer) -> None:
        dtype = self.dtypes.get(str(flat_buffer.dtype))
        if dtype is None:
            raise DistributedError(f"NCCL reduction of {flat_buffer.dtype} buffers is not set up")
        ptr = flat_buffer.data.ptr
        self.comm.allReduce(ptr, ptr, flat_buffer.size, dtype, self.nccl.NCCL_SUM,
                            self.cupy.cuda.get_current_stream().ptr)
