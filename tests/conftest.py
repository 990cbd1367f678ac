import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))        # for `import gradcheck`

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def rng():
    """A fresh, unseeded generator: every run checks new random inputs (the seed is printed on failure)."""
    import numpy as np
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def shakespeare_path():
    p = SHARED / "data" / "tinyshakespeare.txt"
    if not p.exists():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return p
