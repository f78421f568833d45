"""DAAM against castorini/daam and Attn2Mask against OVAM's re-implementation (vpulab/ovam), on SD 1.5-shaped
traces (see conftest.sd15): word maps at the latent size, masks at 512 x 512."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.attn2mask import Attn2Mask, step_index
from methods.base import ClassQuery
from methods.daam import DAAM
from methods.attribution import attn_layers
from parity_tensors import agreement, relative_error

IMAGE = (512, 512)
QUERY = ClassQuery([1, 2], ["dog", "potted plant"])


# -- castorini/daam, re-expressed -----------------------------------------------------------------------------------
# daam/trace.py @ 090f5afa4d4926d1edc6f8c4e110c5c86d49671b, DiffusionHeatMapHooker.compute_global_heat_map: every
# (factor, layer, head) map summed over the denoising calls (RawHeatMapCollection.update), the 8x8 factor dropped,
# bicubic to the 64x64 latent, clamped at 0, averaged -> (77, 64, 64).
def daam_global(trace, steps=slice(None)) -> torch.Tensor:
    merges = []
    for layer in attn_layers("64+32+16"):
        summed = trace.cross[layer][steps].sum(0)  # (heads, h, w, 77), conditional branch
        for head in summed:
            maps = head.permute(2, 0, 1).unsqueeze(1)  # (77, 1, h, w)
            merges.append(F.interpolate(maps, size=(64, 64), mode="bicubic").clamp_(min=0))
    return torch.stack(merges).mean(0)[:, 0]


# daam/utils.py @ 03bfdf4ccd75339f91df57908a5c46bbfcc2c619, compute_token_merge_indices: every occurrence of the
# word's tokens in the tokenized prompt, +1 for SOS; daam/heatmap.py @ 283f5e311c15757a493c5e2b862477153a309402,
# GlobalHeatMap.compute_word_heat_map: the mean of those (already clamped) token maps.
def daam_word(global_maps, tokenizer, prompt: str, word: str) -> torch.Tensor:
    tokens, search = tokenizer.tokenize(prompt.lower()), tokenizer.tokenize(word.lower())
    idx = [s + i + 1 for s in range(len(tokens)) if tokens[s:s + len(search)] == search for i in range(len(search))]
    return global_maps[idx].mean(0)


# daam/heatmap.py WordHeatMap.expand_as: bicubic to the image size, min-max (+1e-8), mask = map > threshold.
def daam_expand(word_map: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    im = F.interpolate(word_map[None, None].float(), size=IMAGE, mode="bicubic")
    im = (im - im.min()) / (im.max() - im.min() + 1e-8)
    return im[0, 0], im[0, 0] > threshold


def test_daam_word_maps_and_masks_equal_the_release(sd15, stand_in):
    cfg = DAAM.resolve({"mode": "generation", "tie_rule": "argmax"})
    method = DAAM(stand_in)
    got = method.heatmaps(sd15, QUERY, cfg)
    pred = method.predict(sd15, QUERY, cfg, IMAGE)
    glob = daam_global(sd15)
    for k, name in enumerate(QUERY.names):
        word = daam_word(glob, stand_in.tokenizer, sd15.prompt, name)
        assert relative_error(got[k], word) < 1e-5, name
        scores, mask = daam_expand(word, 0.4)
        assert relative_error(pred.scores[k], scores) < 1e-5, name
        assert agreement(pred.scores[k] > 0.4, mask) >= 0.999, name


# -- OVAM's Attn2Mask re-implementation, re-expressed (vpulab/ovam) ------------------------------------------------
# ovam/stable_diffusion/daam_block.py @ d5062894b5d76eff6a95dfb735a69ac4574f33f9, CrossAttentionDAAMBlock.forward with
# StableDiffusionHooker.get_ovam_callable's defaults (token softmax over X', heads summed) and the script's
# aggregation over epochs (experiments/attn2mask/generate_voc_sim_attn2mask.py
# @ 9cf1a8ff264e94307b1ac3eb7f160e83d3365de3: heatmap[timestep_heatmap] with 50 of 100 steps);
# ovam/stable_diffusion/daam_module.py StableDiffusionDAAM.forward: bilinear to the largest block size, summed.
def ovam_heatmap(trace, emb: torch.Tensor, epoch: int | None = None) -> torch.Tensor:
    per_block = []
    for layer in attn_layers("64+32+16"):
        module, q = trace.modules[layer], trace.queries[layer]  # q: (epochs, heads, hw, d)
        heads = q.shape[1]
        key = module.to_k(emb).view(emb.shape[0], heads, -1).permute(1, 0, 2)  # (heads, L', d)
        side = int(q.shape[2] ** 0.5)
        scores = torch.stack([torch.baddbmm(torch.empty(heads, q.shape[2], emb.shape[0]), q_e, key.transpose(-1, -2),
                                            beta=0, alpha=module.scale) for q_e in q])  # (epochs, heads, hw, L')
        scores = scores.permute(0, 1, 3, 2).reshape(q.shape[0], heads, emb.shape[0], side, side)
        att = scores.softmax(dim=-3)  # token softmax
        att = att.sum(0) if epoch is None else att[epoch]  # epochs: summed (the default) or the script's one
        per_block.append(att.sum(0)[None])  # heads summed
    size = max(b.shape[-1] for b in per_block)
    return sum(F.interpolate(b, size=(size, size), mode="bilinear") for b in per_block)[0]


# experiments/evaluation/attn2mask/evaluation_attn2mask.ipynb: the class channel (heatmap[-2], the token before
# EoT) min-max normalised, background 1 - h - beta, both bilinear to 512, argmax.
def attn2mask_labels(heat: torch.Tensor, beta: float = 0.2) -> torch.Tensor:
    h = (heat - heat.min()) / (heat.max() - heat.min())
    both = F.interpolate(torch.stack([1 - h - beta, h])[None], size=IMAGE, mode="bilinear")[0]
    return both.argmax(0)


def test_step_half_of_a_hundred_is_the_index_ovam_reads():
    assert step_index(0.5, 100) == 50
    assert step_index(0.5, 1) == 0


def test_attn2mask_unpadded_keys_equal_ovams_reimplementation(stand_in):
    """One class per image ("a photograph of a <class>", VOC-sim), the step at 0.5 of the schedule."""
    from methods.attribution import attribution_embedding
    from parity_tensors import sd15_world

    trace = sd15_world(stand_in, "a photograph of a dog", steps=2, seed=1)
    cfg = Attn2Mask.resolve({"mode": "generation", "keys": "unpadded", "steps": 2, "tie_rule": "argmax"})
    pred = Attn2Mask(stand_in).predict(trace, ClassQuery([1], ["dog"]), cfg, IMAGE)
    emb, _ = attribution_embedding(stand_in, trace.prompt, pad=False)
    heat = ovam_heatmap(trace, emb, epoch=50 * 2 // 100)[-2]
    want = (heat - heat.min()) / (heat.max() - heat.min())
    assert relative_error(pred.scores[0], want) < 1e-5
    assert agreement(pred.labels, attn2mask_labels(heat)) >= 0.999


def test_attn2mask_recorded_keys_are_daams_maps_at_one_step(sd15, stand_in):
    """The default keys: the UNet's own cross-attention at the chosen step, DAAM's aggregation, then the same
    background rule."""
    cfg = Attn2Mask.resolve({"mode": "generation", "steps": 2, "tie_rule": "argmax"})
    pred = Attn2Mask(stand_in).predict(sd15, ClassQuery([1], ["dog"]), cfg, IMAGE)
    heat = daam_word(daam_global(sd15, slice(1, 2)), stand_in.tokenizer, sd15.prompt, "dog")
    want = (heat - heat.min()) / (heat.max() - heat.min())
    assert relative_error(pred.scores[0], want) < 1e-5
    assert agreement(pred.labels, attn2mask_labels(heat)) >= 0.999


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_daam_threshold_is_strict(sd15, stand_in, threshold):
    cfg = DAAM.resolve({"mode": "generation", "tau": threshold})
    pred = DAAM(stand_in).predict(sd15, QUERY, cfg, IMAGE)
    assert torch.equal(pred.labels > 0, (pred.scores > threshold).any(0))
