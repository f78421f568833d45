import os
import tempfile

# Attention code runs several times slower with 2 torch threads on 2 cores; Ray stays local and quiet.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "ray-bench-tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def backbone():
    """The embedded default backbone (whatever `model=embedded` loads), on CPU."""
    from bench.models import load_backbone

    return load_backbone({"name": "embedded", "device": "cpu"})


@pytest.fixture(scope="session")
def random_backbone():
    """The seeded random-weight SD-architecture backbone (independent of shipped weights)."""
    from bench.models import load_backbone

    return load_backbone({"name": "embedded", "device": "cpu", "random": True})
