"""Layers by role (bench.models.layers): SD resolves to the layers the papers name; other layouts resolve by
role or fail with a one-line error."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from bench.errors import BenchError
from bench.models.layers import LayerMap, sd_layer_map
from methods.iseg import ISeg
from methods.attribution import attn_layers


def names(blocks, kind):
    return [f"{b}.transformer_blocks.0.{kind}" for b in blocks]


def tiny_unet(down, up, transformer_layers=1):
    with torch.device("meta"):
        return UNet2DConditionModel(block_out_channels=(8,) * len(down), layers_per_block=2, norm_num_groups=4,
                                    cross_attention_dim=8, attention_head_dim=1, down_block_types=down,
                                    up_block_types=up, transformer_layers_per_block=transformer_layers)


def test_sd_roles_are_the_papers_layers():
    """Pins the SD 1.x/2.x resolution of every role a method uses to the layer names written out before roles."""
    sd = sd_layer_map()
    up = lambda b: [f"up_blocks.{b}.attentions.{i}" for i in range(3)]
    down = lambda b: [f"down_blocks.{b}.attentions.{i}" for i in range(2)]
    iseg = ISeg(None)
    assert iseg.cross_layers({"cross_levels": "16"}) == names(up(1), "attn2")
    assert iseg.cross_layers({"cross_levels": "32"}) == names(up(2), "attn2")
    assert iseg.cross_layers({"cross_levels": "both"}) == names(up(1) + up(2), "attn2")
    for k in (-1, -2, -3):
        assert iseg.self_layer({"self_layer": k}) == f"up_blocks.3.attentions.{3 + k}.transformer_blocks.0.attn1"
    code = {"variant": "code"}
    assert iseg.self_layer(code) == "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    assert [(w, ls) for w, ls in iseg.code_cross(sd)] == [
        (0.7, names(down(2) + up(1), "attn2")),
        (0.3, names(["down_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"],
                    "attn2"))]
    blocks = {"64": down(0) + up(3), "32": down(1) + up(2), "16": down(2) + up(1), "8": ["mid_block.attentions.0"]}
    for res, expected in blocks.items():
        assert attn_layers(res) == names(expected, "attn2")
    assert attn_layers("all") == attn_layers("64+32+16") == names(down(0) + down(1) + down(2) + up(1) + up(2) + up(3),
                                                                  "attn2")
    assert sd.finest("self") == names(down(0) + up(3), "attn1")


def test_layout_without_finest_attention():
    """The embedded v2 layout: attention at levels 1 and 2 only."""
    m = LayerMap(tiny_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")))
    assert m.levels("up") == [2, 1]
    assert m.sd_resolution("cross", "16", ("up",)) == names([f"up_blocks.1.attentions.{i}" for i in range(3)],
                                                             "attn2")
    assert m.decoder_self(-1) == "up_blocks.2.attentions.2.transformer_blocks.0.attn1"
    assert m.finest("self")[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert m.blocks("all", "cross") == m.blocks("16+32", "cross")
    with pytest.raises(BenchError, match="no cross-attention at rank 2"):
        m.blocks("64", "cross")
    with pytest.raises(BenchError, match="does not exist"):
        m.decoder_self(-7)


def test_sdxl_style_layout_resolves_every_transformer_block():
    m = LayerMap(tiny_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers=(1, 2, 2)))
    coarsest = m.sd_resolution("cross", "16", ("up",))
    assert len(coarsest) == 3 * 2 and all(n.startswith("up_blocks.0.") for n in coarsest)
    assert m.decoder_self(-1) == "up_blocks.1.attentions.2.transformer_blocks.1.attn1"
