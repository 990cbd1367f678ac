"""ZeRO stage 1 on the CPU: each rank keeps and updates AdamW's state for 1/N of the flat buffer.

The plain data-parallel step (trainer.train_step) sums the whole gradient on every rank, then every rank
runs the same AdamW over the whole buffer: N copies of the same work and of m and v. ZeRO-1 splits it:

    reduce-scatter   rank r receives only its slice [lo_r, hi_r) of the summed gradient   (half an allreduce)
    norm             the global gradient norm from the slices' squared norms, one tiny reduction, then clip
    AdamW            on params[lo_r:hi_r] with this rank's m and v, which are 1/N of the full ones
    allgather        every rank receives every slice of the updated parameters             (the other half)

The traffic equals one allreduce; what is saved is (N-1)/N of AdamW's time and of m and v's memory. The
result equals the plain step up to rounding: the norm is summed in another order. Measured against the plain
form by `benchmarks/train_cpu.py --zero`; the trainer does not use it yet (its checkpoints would need m and v
gathered to rank 0).
"""
import math

import numpy as np

from ..optim import adamw_update


class ZeroAdamW:
    """AdamW over this rank's slice of model.flat_params; step() takes the unreduced local gradients."""

    def __init__(self, model, world, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.model, self.world, self.MPI = model, world, world.MPI
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        n, N = model.flat_params.size, world.world_size
        bounds = [n * r // N for r in range(N + 1)]                      # rank r owns [bounds[r], bounds[r+1])
        self.counts = [bounds[r + 1] - bounds[r] for r in range(N)]
        self.displacements = bounds[:-1]
        self.lo, self.hi = bounds[world.rank], bounds[world.rank + 1]
        size = self.hi - self.lo
        self.n_decay = min(max(model.n_decay - self.lo, 0), size)       # decayed matrices come first in the buffer
        self.m = np.zeros(size, model.flat_params.dtype)
        self.v = np.zeros_like(self.m)
        self.grads = np.empty_like(self.m)                               # (size,) this rank's summed gradients
        self.scratch = np.empty_like(self.m)
        self.step_count = 0

    def step(self, lr=None, grad_clip=0.0) -> float:
        """Reduce-scatter the gradients, clip by the global norm, update this slice, allgather the parameters.
        Returns the gradient norm before clipping (the same on every rank)."""
        MPI, comm = self.MPI, self.world.comm
        mpi_type = MPI.DOUBLE if self.m.dtype == np.float64 else MPI.FLOAT
        self.model.finish_gradients()
        comm.Reduce_scatter(self.model.flat_grads, self.grads, recvcounts=self.counts, op=MPI.SUM)
        (sum_sq,) = self.world.sum_values(float(self.grads @ self.grads))
        norm = math.sqrt(sum_sq)
        if grad_clip and grad_clip > 0 and norm > grad_clip:
            self.grads *= grad_clip / (norm + 1e-6)
        self.step_count += 1
        params = self.model.flat_params
        adamw_update(params[self.lo:self.hi], self.grads, self.m, self.v, lr=self.lr if lr is None else lr,
                     beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                     step=self.step_count, n_decay=self.n_decay, scratch=self.scratch)
        comm.Allgatherv(MPI.IN_PLACE, [params, self.counts, self.displacements, mpi_type])
        self.model.params_written()
        return norm
