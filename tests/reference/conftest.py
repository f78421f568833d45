"""Parity suite: this project's methods and metrics against the released code's math, re-expressed in each
test module (see parity_tensors.py for the shared synthetic tensors). Labels are compared under
`tie_rule=argmax`, the released code's behaviour (the default tie rule decides near-ties differently)."""

import pytest

from parity_tensors import StandInBackbone


@pytest.fixture(scope="session")
def stand_in():
    return StandInBackbone()


@pytest.fixture(scope="session")
def sd15(stand_in):
    """SD 1.5-shaped trace: latent 64, 16 attn2 layers x 8 heads, 77 tokens, 2 denoising steps (DAAM and OVAM
    sum 50; 2 keep memory and time small, and make a step index matter)."""
    from parity_tensors import sd15_world

    return sd15_world(stand_in, "a photograph of a dog and a potted plant", steps=2)
