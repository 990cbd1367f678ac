"""`python -m nanogpt_np.serve ...` starts the HTTP server (see server.py)."""
import os
import sys

# One BLAS thread unless told otherwise (OPENBLAS_NUM_THREADS=N ...). A decode step multiplies small matrices
# (a few rows per active sequence); BLAS threads that spin-wait for such work fight the request threads for
# the cores, and on a busy machine they make a batch of 32 ten times slower, not faster. This must happen
# before numpy is first imported, so before server.py is.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from .server import main  # noqa: E402  (after the BLAS settings above)

sys.exit(main())
