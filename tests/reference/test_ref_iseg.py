"""iSeg against its released code (linsun449/iseg.code) and, for the paper variant, against the paper's equations.

Real SD2.1-base shapes: 64x64 self-attention (4096 x 4096; 3 of up_blocks.3's 5 heads, the release reads heads
1 and 2), 77 tokens, 20 heads per 16x16 layer and 10 per 32x32 layer; label maps of 375 x 500 (a VOC size).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.capture import Trace
from methods.base import ClassQuery
from bench.models.layers import sd_layer_map
from methods.iseg import CODE_CROSS as RELEASE_LEVELS
from methods.iseg import RELEASE_VOC_HEADS, ISeg
from parity_tensors import agreement, cross_attention, relative_error, self_attention

LABEL = (375, 500)
PROMPT = "a photograph of dog and potted plant and other object and background, ground, land, grass"
NAMES = ["dog", "potted plant"]
HEADS = {"16": 20, "32": 10}
SD = sd_layer_map()  # SD 2.1's layer names: the release's layers, the paper's decoder layers, decoder self #-1/#-2
CODE_CROSS = [(res, *level) for res, level in zip(RELEASE_LEVELS, ISeg.code_cross(SD))]  # (res, weight, layers)
CODE_SELF, LAST_SELF = SD.decoder_self(-2), SD.decoder_self(-1)
PAPER_CROSS = ISeg(None).cross_layers(ISeg.resolve({}))


# -- the release, re-expressed (linsun449/iseg.code) -----------------------------------------------------------
# wsss/iSeg.py @ 87debb0b275f5987efe994fd8607af8b160e8ac8, iSeg.test_step: token positions from the VOC12_NAME
# table (data/voc/voc_name20.py: "dog" [1, [0]], "potted plant" [2, [1]]): the first class starts at 4 (after
# SOS and "a photograph of"), each next one 1 + the previous class's token count further on.
def release_token_positions() -> list[list[int]]:
    table = {"dog": (1, [0]), "potted plant": (2, [1])}
    starts, sel = [], []
    for i, name in enumerate(NAMES):
        starts.append(4 if i == 0 else starts[-1] + 1 + table[NAMES[i - 1]][0])
        sel.append([starts[-1] + j for j in table[name][1]])
    return sel


# wsss/featurecluster.py DFC_KL(32, 20, 64).forward and util/attn.py kl_dis @ 87debb0b / 4b0784cb: symmetric KL
# in fp16 (+1e-5), 6 x 6 grid initialisation, 20 rounds, emptied clusters dropped, ids compacted.
def release_dfc_kl(fused: torch.Tensor, clusters: int = 32, rounds: int = 20) -> tuple[torch.Tensor, int]:
    side = fused.shape[-1]
    x = fused.flatten(-2, -1).T
    x = torch.where(x == 0, 1e-6, x)
    g = torch.arange(0, side, side // clusters ** 0.5)[None].long()
    proto = x[(g.T * side + g).flatten()]
    for _ in range(rounds):
        a, b = proto.half()[:, None] + 1e-5, x.half()[None] + 1e-5
        quotient = a.log() - b.log()
        dist = (a * quotient).sum(-1) * 0.5 - (b * quotient).sum(-1) * 0.5
        assign = dist.argmin(0)
        ids = assign.unique()
        proto = torch.stack([x[assign == i].mean(0) for i in ids])
    ids = assign.unique()
    return torch.searchsorted(ids, assign), len(ids)


# wsss/iSeg.py iSeg.process_cross_att: per resolution the mean over every (layer, head) (or the VOC subset), each
# token map / its spatial sum, bilinear to 64, 0.7 / 0.3; optional DFC_KL member means; per class the mean of
# its selected token columns. cross[res]: (1, L*H, 77, res, res) as stable_difusion.get_attention_map returns.
def release_cross(cross: dict[int, torch.Tensor], voc_heads: bool, cluster: bool) -> torch.Tensor:
    weight, parts = {16: 0.7, 32: 0.3}, []
    for res, values in cross.items():
        values = values[:, list(RELEASE_VOC_HEADS[str(res)])].mean(1) if voc_heads else values.mean(1)
        normed = values / values.sum(dim=(-2, -1), keepdim=True)
        parts.append(weight[res] * F.interpolate(normed, size=(64, 64), mode="bilinear", align_corners=False))
    fused = torch.stack(parts).sum(0)[0]
    flat = fused.flatten(-2, -1).permute(1, 0)
    if cluster:
        assign, n = release_dfc_kl(fused)
        same = F.one_hot(assign, n)[:, assign].float()
        flat = same @ flat / same.sum(-1, keepdim=True)
    return torch.stack([flat[:, sel].mean(1) for sel in release_token_positions()], dim=1)[None]


# wsss/iSeg.py iSeg.get_att_map (Ent-Self in log10 units on the column-max scale, iterations with min-shift and
# unit-sum normalisation), then 64 -> 512 bilinear and min-max; test_step: bilinear to the label size;
# util/cam.py cam_to_label: min-max (+1e-6), background (1 - max)^2 in the argmax, or a threshold.
def release_maps_and_labels(cross_att, self64, ent: float, iters: int, bkg_thre: float = 0.0):
    cross = cross_att - cross_att.amin(dim=-2, keepdim=True)
    cross = cross / cross.sum(dim=-2, keepdim=True)
    trans = self64[:, [1, 2]].mean(1).flatten(-2, -1).permute(0, 2, 1)
    trans = trans / torch.amax(trans, dim=-2, keepdim=True)
    trans = trans + torch.where(trans == 0, 0, ent * torch.log10(math.e * trans))
    trans = trans.clamp(min=0)
    trans = trans / trans.sum(dim=-1, keepdim=True)
    for _ in range(iters):
        cross = torch.bmm(trans, cross)
        cross = cross - cross.amin(dim=-2, keepdim=True)
        cross = cross / cross.sum(dim=-2, keepdim=True)
    return release_final(cross, bkg_thre)


def release_final(cross: torch.Tensor, bkg_thre: float):
    att = cross.unflatten(dim=-2, sizes=(64, 64)).permute(0, 3, 1, 2)
    att = F.interpolate(att, size=512, mode="bilinear", align_corners=False)[0]
    att = att - att.amin(dim=(-2, -1), keepdim=True)
    att = att / att.amax(dim=(-2, -1), keepdim=True)
    att = F.interpolate(att[None], size=LABEL, mode="bilinear", align_corners=False)
    cam = att.reshape(1, len(NAMES), -1)
    cam = cam - cam.amin(dim=-1, keepdim=True)
    cam = cam / (cam.amax(dim=-1, keepdim=True) + 1e-6)  # the score maps compared, before the background rule
    if bkg_thre > 0:
        value, label = torch.where(cam < bkg_thre, 0, cam).max(dim=1)
        label = torch.where(value == 0, 0, label + 1)
    else:
        label = torch.cat([(1 - cam.amax(dim=1, keepdim=True)) ** 2, cam], dim=1).argmax(dim=1)
    return cam[0].reshape(len(NAMES), *LABEL), label[0].reshape(LABEL)


# -- shared synthetic trace -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(stand_in):
    ids = stand_in.tokenize([PROMPT])[0].tolist()
    dog, plant = release_token_positions()
    assert [stand_in.tokenizer.convert_ids_to_tokens(ids[dog[0]]), stand_in.tokenizer.convert_ids_to_tokens(
        ids[plant[0]])] == ["dog</w>", "plant</w>"], "the release's positions must land on the class words"
    strong = {dog[0]: 1, plant[0] - 1: 2, plant[0]: 2}  # dog on segment 1, "potted" and "plant" on 2
    cross, release = {}, {}
    for res, _, layers in CODE_CROSS:
        side = int(res)  # the papers' resolution names are SD's at 512 px: 16 -> 16x16 latent maps at 64
        maps = [cross_attention(side, HEADS[res], 77, strong, seed=i + 10 * int(res)) for i in range(len(layers))]
        cross.update(zip(layers, maps))
        # get_attention_map concatenates the layers' heads (forward order) and puts tokens before space
        release[int(res)] = torch.cat(maps, dim=1)[0].permute(0, 3, 1, 2)[None]
    for i, layer in enumerate(PAPER_CROSS):  # the paper's decoder layers the release does not read
        side = {"1": 16, "2": 32}[layer.split(".")[1]]  # up_blocks.1 at 16x16, up_blocks.2 at 32x32
        cross.setdefault(layer, cross_attention(side, HEADS[str(side)], 77, strong, seed=100 + i))
    self64 = self_attention(64, 3, seed=5)
    self_attn = {CODE_SELF: self64[None], LAST_SELF: self_attention(64, 1, seed=6)[None]}
    trace = Trace(prompt=PROMPT, token_ids=ids, timesteps=[100], latent_size=(64, 64), cross=cross,
                  self_attn=self_attn)
    # the release stores self-attention as (1, heads, key, h, w) of the query grid (permute(0, 1, 4, 2, 3))
    release_self = self64.transpose(1, 2).unflatten(-1, (64, 64))[None]
    return trace, release, release_self


QUERY = ClassQuery([1, 2], NAMES)


@pytest.mark.parametrize("kmeans, heads, bg", [(32, "all", 0.0), (0, "voc_release", 0.45)])
def test_code_variant_equals_the_release(world, stand_in, kmeans, heads, bg):
    """The release's defaults (KL clustering on, every head, (1 - max)^2 background: its VOC / COCO WSSS runs
    differ in lambda and heads), and its hand-picked VOC heads with COCO's background threshold."""
    trace, cross, self64 = world
    cfg = ISeg.resolve({"variant": "code", "tie_rule": "argmax", "lambda": 0.015, "iterations": 10, "kmeans": kmeans, "cross_heads": heads,
                        "background": "threshold" if bg else "power", "bg_threshold": bg})
    pred = ISeg(stand_in).predict(trace, QUERY, cfg, LABEL)
    want_cross = release_cross(cross, heads == "voc_release", kmeans > 0)
    got_cross = ISeg(stand_in).class_maps(trace, QUERY, cfg, (64, 64)).flatten(1).T
    assert relative_error(got_cross, want_cross[0]) < 1e-5
    maps, labels = release_maps_and_labels(want_cross, self64, 0.015, 10, bg)
    assert relative_error(pred.scores, maps) < 1e-5
    assert agreement(pred.labels, labels) >= 0.999


def paper_reference(trace: Trace, lam: float, iters: int) -> torch.Tensor:
    """The paper variant from the paper: Table 6a fuses the six decoder 16x16 / 32x32 layers (per class the
    class's tokens, heads averaged, bilinear to 64, mean); Table 6b the last decoder self-attention (heads
    averaged); Eq. 7 on each query's attention divided by its maximum, clamped at 0 and renormalised (methods/
    iseg.py docstring); Algorithm 1 with the release's normalisation; the release's final resize."""
    positions = {"dog": [4], "potted plant": [6, 7]}  # every sub-token of the name
    maps = []
    for layer in PAPER_CROSS:
        per = torch.stack([trace.cross[layer][0, ..., positions[n]].mean((0, -1)) for n in NAMES])
        maps.append(F.interpolate(per[None], size=(64, 64), mode="bilinear", align_corners=False)[0])
    cross = torch.stack(maps).mean(0).flatten(1).T[None]
    a = trace.self_attn[LAST_SELF][0].mean(0)
    a = a / a.amax(1, keepdim=True)
    a = torch.where(a > 0, a + lam * (1 + torch.log(a)), 0).clamp(min=0)
    a = (a / a.sum(1, keepdim=True))[None]
    cross = cross - cross.amin(dim=-2, keepdim=True)
    cross = cross / cross.sum(dim=-2, keepdim=True)
    for _ in range(iters):
        cross = torch.bmm(a, cross)
        cross = cross - cross.amin(dim=-2, keepdim=True)
        cross = cross / cross.sum(dim=-2, keepdim=True)
    return cross


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_paper_variant_equals_the_papers_equations(world, stand_in, lam):
    trace, _, _ = world
    cfg = ISeg.resolve({"lambda": lam, "tie_rule": "argmax"})
    pred = ISeg(stand_in).predict(trace, QUERY, cfg, LABEL)
    maps, labels = release_final(paper_reference(trace, lam, 10), 0.0)
    assert relative_error(pred.scores, maps) < 1e-5
    assert agreement(pred.labels, labels) >= 0.999
