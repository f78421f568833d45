"""OVAM against vpulab/ovam: the open-vocabulary heat map (Eq. 3-5) on an SD 1.5-shaped trace, the self-attention
binarisation (paper Eq. 8-9 and the released evaluation) and the released token-optimisation loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.capture import Trace
from methods.base import ClassQuery
from methods.ovam import OVAM
from methods.tokens import token_loss
from methods.attribution import attn_layers, attribution_embedding
from parity_tensors import agreement, relative_error, segments, self_attention
from test_ref_daam import ovam_heatmap


def test_heat_map_equals_the_release(sd15, stand_in):
    """OVAM(X' = "A photograph of a dog", unpadded) over every stored step: the release's token softmax, epochs
    and heads summed, blocks bilinear to 64 and summed (test_ref_daam.ovam_heatmap with all epochs)."""
    cfg = OVAM.resolve({"mode": "generation", "tie_rule": "argmax"})
    got = OVAM(stand_in).heatmaps(sd15, ClassQuery([1], ["dog"]), cfg)[0]
    emb, ids = attribution_embedding(stand_in, "A photograph of a dog", pad=False)
    want = ovam_heatmap(sd15, emb)  # (L', 64, 64)
    assert relative_error(got, want[ids.index(stand_in.tokenizer.convert_tokens_to_ids("dog</w>"))]) < 1e-5


LATENT = 32  # reduced from SD's 64: five 64x64 self-attention maps would be 5 x 4096^2 floats
IMAGE = (256, 256)


@pytest.fixture(scope="module")
def refinement():
    """Five top-resolution self-attention layers (summed over steps and heads) and one class heat map."""
    layers = attn_layers("64", "attn1")
    self_attn = {layer: self_attention(LATENT, 1, seed=20 + i)[None] for i, layer in enumerate(layers)}
    g = torch.Generator().manual_seed(3)
    heat = (segments(LATENT, seed=4) == 1).float() * 3 + torch.rand(LATENT, LATENT, generator=g) * 2
    trace = Trace(prompt="", token_ids=[], timesteps=[0], latent_size=(LATENT, LATENT), self_attn=self_attn)
    received = sum(a[0, 0].sum(0) for a in self_attn.values()).view(LATENT, LATENT)
    return trace, heat, received


def predict(trace, heat, **params):
    method = OVAM(None)
    method.heatmaps = lambda *_: heat[None]  # the refinement only: the heat map is given
    return method.predict(trace, ClassQuery([1], ["dog"]), OVAM.resolve({"crf": False, "tie_rule": "argmax", **params}), IMAGE)


# experiments/evaluation/ovam_sa/evaluation_ovam_sa.ipynb @ 9cf1a8ff264e94307b1ac3eb7f160e83d3365de3: heat map and
# self-attention map bilinear to 512 (here 256), the latter min-max scaled to [min_sa, 1] there, then
# heatmap / heatmap.max() * sa > threshold. The self-attention map is the attention each pixel receives (the
# released extractor computes a constant, see methods/ovam.py), given to both sides.
def release_binarise(heat, received, tau: float, alpha: float):
    up = lambda m: F.interpolate(m[None, None], size=IMAGE, mode="bilinear")[0, 0]
    sa = up(received)
    sa = (sa - sa.min()) / (sa.max() - sa.min()) * (1 - alpha) + alpha
    h = up(heat)
    scores = h / h.max() * sa
    return scores, scores > tau


def test_released_binarisation_equals_the_notebook(refinement):
    trace, heat, received = refinement
    pred = predict(trace, heat, binarise="code")
    scores, mask = release_binarise(heat, received, 0.4, 0.85)
    assert relative_error(pred.scores[0], scores) < 1e-5
    assert agreement(pred.labels == 1, mask) >= 0.999


def test_paper_binarisation_is_eq_8_and_9(refinement):
    """Eq. 8: A_alpha = the received attention min-max scaled to [alpha, 1]; Eq. 9: A_alpha D / max(A_alpha D),
    compared with tau (>=), at the latent size."""
    trace, heat, received = refinement
    pred = predict(trace, heat)
    a_alpha = 0.85 + 0.15 * (received - received.min()) / (received.max() - received.min())
    fused = a_alpha * heat
    assert relative_error(pred.scores[0], fused / fused.max()) < 1e-5


# ovam/optimize/optimize.py @ d5062894b5d76eff6a95dfb735a69ac4574f33f9, optimize_embedding as
# experiments/voc_simple/2_token_optimization.py calls it (apply_min_max=3720, an int: min-max over the whole
# (1, tokens, H, W) map) with nn.CrossEntropyLoss over the token axis against [1 - gt, gt].
def release_token_loss(maps: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    mask = maps[None]
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    return torch.nn.CrossEntropyLoss(reduction="mean")(mask, torch.stack([1 - gt, gt])[None])


def test_released_token_loss_and_its_gradient(stand_in):
    g = torch.Generator().manual_seed(7)
    maps = (torch.rand(2, 64, 64, generator=g) * 30).requires_grad_(True)
    gt = (segments(64, seed=8) > 0).float()
    ours = token_loss(maps / 30, maps, gt, "ce")
    (grad_ours,) = torch.autograd.grad(ours, maps)
    want = release_token_loss(maps, gt)
    (grad_want,) = torch.autograd.grad(want, maps)
    assert abs(ours.item() - want.item()) < 1e-6
    assert relative_error(grad_ours, grad_want) < 1e-5
