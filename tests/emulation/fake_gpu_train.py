"""`python train.py` on the fake CuPy (fake_cupy.py), for data-parallel tests of the GPU path on the CPU:

    mpiexec -n 2 python tests/emulation/fake_gpu_train.py --device=cuda --out_dir=... [train.py settings]

Every rank sees FAKE_GPUS fake GPUs (default 2). After training, each rank prints one JSON line with what the
GPU path did: the fake GPU it selected and how many NCCL allreduces it ran."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # for `from emulation import fake_cupy`

import pytest                                                       # noqa: E402  (its MonkeyPatch)

from emulation import fake_cupy                                     # noqa: E402

if __name__ == "__main__":
    patch = pytest.MonkeyPatch()
    fake_cupy.install(patch)
    patch.setattr(fake_cupy.cuda.runtime, "getDeviceCount", lambda: int(os.environ.get("FAKE_GPUS", "2")))
    from nanogpt_np import distributed
    from nanogpt_np.trainer import main
    code = main(sys.argv[1:])
    print(json.dumps({"rank": distributed.connect().rank, "devices_used": fake_cupy.devices_used,
                      "nccl_allreduces": fake_cupy.nccl.NcclCommunicator.all_reduces}), flush=True)
    sys.exit(code)
