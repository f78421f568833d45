import sys
from pathlib import Path

from bench.env import quiet_environment

# The same environment as the command-line tools (bench.env), with a Ray temp dir of the tests' own.
quiet_environment(ray_tmp="ray-bench-tests")
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, tests/browser.py

import pytest
import torch

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


@pytest.fixture(scope="session")
def tiny():
    """Tiny seeded random components with the SD layout (tests/tiny.py): for mechanics, not quality."""
    from tiny import tiny_backbone

    return tiny_backbone()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny components as a diffusers folder, for runs of the engine (`model.path=`)."""
    from tiny import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that runs the engine in-process (starting Ray costs seconds)."""
    import ray

    from bench.env import init_ray

    init_ray()
    yield
    ray.shutdown()
