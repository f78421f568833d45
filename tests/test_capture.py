"""Tracing on the embedded model: shapes and layer names in both modes; other layers untouched. Layers are
named by role (bench.models.layers), so the tests hold on the embedded layout and on SD's."""

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.forward import ForwardSetting, run_traced
from bench.models.layers import LayerMap
from bench.capture import AttentionTracer, attention_layers, request


@pytest.fixture(scope="module")
def layers(backbone):
    """CROSS, SELF, QUERY: a decoder cross-attention layer and an encoder one at the second-coarsest attention
    level (up_blocks.2 / down_blocks.1 on SD and on the embedded model), the last decoder self-attention."""
    m = LayerMap(backbone.unet)
    return (m.sd_resolution("cross", "32", ("up",))[1], m.decoder_self(-1),
            m.sd_resolution("cross", "32", ("down",))[0], m)


def processors(unet):
    return {name: type(m.processor).__name__ for name, m in unet.named_modules() if hasattr(m, "processor")}


def test_role_layers_exist_in_forward_order(backbone, layers):
    found = attention_layers(backbone.unet)
    cross, self_layer, query, m = layers
    assert found[self_layer] == "self" and found[cross] == found[query] == "cross"
    assert found[m.mid("cross")[0]] == "cross"
    assert {a.name for a in m.layers} == set(found)  # LayerMap places every attention layer


def test_inversion_trace_shapes(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    image = np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8)
    size = 64
    req = request(cross=[CROSS], self_attn=[SELF], queries=[QUERY])
    result = run_traced(backbone, req, ForwardSetting(timestep=100, size=size), ["a red circle"] * 2,
                        [image, image])
    assert result.unet_passes == 1
    latent = size // 8 if backbone.resolution == 512 else None
    trace = result.traces[0]
    h, w = trace.latent_size
    if latent:
        assert (h, w) == (latent, latent)
    assert set(trace.cross) == {CROSS} and set(trace.self_attn) == {SELF} and set(trace.queries) == {QUERY}
    assert trace.cross[CROSS].shape == (1, 1, h // 2, w // 2, backbone.max_length)
    s = trace.spatial_size(SELF)
    assert trace.self_attn[SELF].shape == (1, 1, s[0] * s[1], s[0] * s[1])
    heads = backbone.unet.get_submodule(QUERY).heads
    assert trace.queries[QUERY].shape[:3] == (1, heads, (h // 2) * (w // 2))
    assert trace.timesteps == [100]
    probs = trace.cross[CROSS]
    assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-4)
    assert torch.allclose(trace.self_attn[SELF].sum(-1), torch.ones(1, 1, s[0] * s[1]), atol=1e-4)
    # same noise for every image of the batch: identical images give identical traces
    assert torch.allclose(result.traces[1].cross[CROSS], probs)


def test_generation_trace_keeps_each_step_and_the_conditional_branch(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    req = request(cross=[CROSS], per_head=True)
    result = run_traced(backbone, req, ForwardSetting(mode="generation", steps=3, size=64),
                        ["a red circle", "a blue star"])
    assert result.unet_passes == 3
    trace = result.traces[1]
    heads = backbone.unet.get_submodule(CROSS).heads
    assert trace.cross[CROSS].shape[:2] == (3, heads)
    assert len(trace.timesteps) == 3 and trace.timesteps == sorted(trace.timesteps, reverse=True)
    assert trace.image.shape == (64, 64, 3) and trace.image.dtype == np.uint8


def test_summed_steps(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    req = request(cross=[CROSS], sum_steps=True)
    trace = run_traced(backbone, req, ForwardSetting(mode="generation", steps=2, size=64), ["a star"]).traces[0]
    assert trace.cross[CROSS].shape[0] == 1
    assert torch.allclose(trace.cross[CROSS].sum(-1), torch.full_like(trace.cross[CROSS].sum(-1), 2.0), atol=1e-4)


def test_unselected_layers_keep_their_processors(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    before = processors(backbone.unet)
    req = request(cross=[CROSS], self_attn=[SELF])
    with AttentionTracer(backbone.unet, req):
        during = processors(backbone.unet)
    changed = {n for n in before if before[n] != during[n]}
    assert changed == {CROSS, SELF}
    assert processors(backbone.unet) == before


def test_cat_cross_weights_reach_every_cross_layer_but_record_none_extra(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    req = request(cross=[CROSS])
    with AttentionTracer(backbone.unet, req, weight_keys=True):
        during = processors(backbone.unet)
    weighted = {n for n, p in during.items() if p == "WeightedKeyProcessor"}
    n_cross = sum(k == "cross" for k in attention_layers(backbone.unet).values())
    assert len(weighted) == n_cross - 1 and CROSS not in weighted


def test_unknown_layer_is_a_clear_error(backbone):
    with pytest.raises(BenchError, match="matches no cross-attention layer"):
        AttentionTracer(backbone.unet, request(cross=["up_blocks.9.*"]))


def test_union_keeps_self_attention_small_when_another_method_wants_heads(backbone, layers):
    CROSS, SELF, QUERY, _ = layers
    """A per-head, per-step cross-attention method must not force per-head, per-step HW x HW self-attention."""
    daam_like = request(cross=[CROSS], per_head=True)
    ovam_like = request(self_attn=[SELF], sum_self_steps=True)
    union = daam_like.union(ovam_like)
    assert union.per_head and union.sum_self_steps and not union.self_per_head and not union.sum_steps
    trace = run_traced(backbone, union, ForwardSetting(mode="generation", steps=3, size=64), ["a star"]).traces[0]
    heads = backbone.unet.get_submodule(CROSS).heads
    assert trace.cross[CROSS].shape[:2] == (3, heads)
    assert trace.self_attn[SELF].shape[:2] == (1, 1)
    mean = trace.step_mean("self_attn", SELF)
    assert torch.allclose(mean.sum(-1), torch.ones_like(mean.sum(-1)), atol=1e-4)
