"""The error of data-parallel setup, and the install line it names (imported by every file of distributed/)."""

INSTALL_HINT = "pip install 'nanogpt_np[dist]'  (mpi4py and the mpich MPI library)"


class DistributedError(RuntimeError):
    """Data-parallel training cannot start (missing MPI / NCCL, a batch that does not split); one line."""
