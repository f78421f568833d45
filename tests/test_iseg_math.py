"""iSeg's equations on plain tensors (Eq. 4-7, Algorithm 1) and Cat-Cross (Eq. 8-9) in the UNet."""

import math

import pytest
import torch

from methods.iseg import ent_self, ent_self_code, ent_self_many, entropy, normalize, refine, refine_steps


def random_row_stochastic(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g) ** 3 + 0.05
    return a / a.sum(1, keepdim=True)


def test_ent_self_with_lambda_zero_is_identity():
    a = random_row_stochastic(32)
    assert torch.equal(ent_self(a, 0.0, "literal"), a)
    # row_max rescales and renormalises each row: A again, so lambda = 0 is naive iteration (Table 5b). The
    # release's column scaling is not: with lambda = 0 it still reweights keys by 1 / column max.
    torch.testing.assert_close(ent_self(a, 0.0), a)
    assert not torch.allclose(ent_self(a, 0.0, "col_max"), a)


@pytest.mark.parametrize("lam", [1e-5, 1e-4])
def test_literal_ent_self_lowers_entropy_for_tiny_steps(lam):
    a = random_row_stochastic(64, seed=1)
    reduced = ent_self(a, lam, "literal")
    assert (reduced > 0).all(), "step small enough to keep a distribution"
    assert entropy(reduced) < entropy(a)


@pytest.mark.parametrize("scale", ["row_max", "col_max"])
@pytest.mark.parametrize("lam", [0.01, 0.1])
def test_rescaled_ent_self_is_a_sharper_attention(scale, lam):
    """Eq. 7 on the max-normalised scale: a non-negative row-stochastic attention whose rows have lower
    entropy (sharper) than the input's, at the paper's lambdas."""
    a = random_row_stochastic(64, seed=1)
    out = ent_self(a, lam, scale)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(64))
    row_entropy = lambda m: -torch.special.xlogy(m, m).sum(1)
    assert (row_entropy(out) < row_entropy(a)).all()


def test_ent_self_follows_eq7():
    a = random_row_stochastic(8)
    assert torch.allclose(ent_self(a, 0.01, "literal"), a + 0.01 * (1 + torch.log(a)))
    b = a / a.max(1, keepdim=True).values  # row_max: Eq. 7 on each query's attention divided by its maximum
    c = (b + 0.01 * (1 + torch.log(b))).clamp_min(0)
    torch.testing.assert_close(ent_self(a, 0.01), c / c.sum(1, keepdim=True))


def test_ent_self_keeps_exact_zeros_and_touches_nothing_else():
    """Only exact zeros are special (no epsilon clamp of tiny entries): a zero stays zero, an entry of 1e-30
    takes the Eq. 7 step like any other."""
    a = random_row_stochastic(8)
    a[0, 1], a[0, 2] = 0.0, 1e-30
    out = ent_self(a, 0.01, "literal")
    assert out[0, 1] == 0
    assert torch.isclose(out[0, 2], torch.tensor(1e-30 + 0.01 * (1 + math.log(1e-30))))


def peaky_attention(n: int, seed: int = 0) -> torch.Tensor:
    """Softmax attention with SD-like magnitudes: entries ~1/n, a few strong keys per query."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=g) * 2).softmax(1)


def test_literal_eq7_collapses_the_class_maps_and_the_default_does_not():
    """Eq. 7 on raw attention (entries ~1/HW) pushes every entry negative and N = 10
    refinements make every class map the same; on the row-max scale the maps stay distinct."""
    from methods.maps import minmax

    a = peaky_attention(1024)
    assert (ent_self(a, 0.01, "literal") < 0).float().mean() > 0.99  # all but the few strongest keys
    g = torch.Generator().manual_seed(1)
    cross = torch.rand(1024, 2, generator=g)
    literal = minmax(refine(ent_self(a, 0.01, "literal"), cross, 10).T)
    default = minmax(refine(ent_self(a, 0.01), cross, 10).T)
    assert (literal[0] - literal[1]).abs().max() < 1e-3
    assert (default[0] - default[1]).abs().max() > 0.1


def test_code_ent_self_is_eq7_in_log10_units_on_the_column_scale():
    a = random_row_stochastic(16)
    col = a / a.max(0, keepdim=True).values
    want = (col + 0.015 * torch.log10(math.e * col)).clamp_min(0)
    torch.testing.assert_close(ent_self_code(a, 0.015), want / want.sum(1, keepdim=True))


def ground_truth_self_attention(mask: torch.Tensor) -> torch.Tensor:
    """Self-correlation of ground-truth segments (iSeg Fig. 2d): row i is uniform over i's segment."""
    flat = mask.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(1, keepdim=True)


def test_refinement_with_ground_truth_self_attention_recovers_the_mask():
    from methods.maps import labels_from_scores, minmax

    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[2:8, 3:9] = 1
    mask[9:15, 8:14] = 2
    g = torch.Generator().manual_seed(0)
    # noisy cross-attention: each class only slightly stronger inside its object
    cross = torch.rand(256, 2, generator=g)
    cross[:, 0] += 0.6 * (mask.flatten() == 1)
    cross[:, 1] += 0.6 * (mask.flatten() == 2)
    raw_labels = labels_from_scores(minmax(cross.T.reshape(2, 16, 16)), [1, 2], (16, 16))
    assert not torch.equal(raw_labels, mask), "the raw map must be imperfect for this test to mean anything"
    refined = refine(ground_truth_self_attention(mask), cross, iterations=1)
    labels = labels_from_scores(minmax(refined.T.reshape(2, 16, 16)), [1, 2], (16, 16))
    assert torch.equal(labels, mask)


def test_one_chain_of_products_serves_every_n():
    a = random_row_stochastic(128, seed=2)
    cross = torch.rand(128, 3, generator=torch.Generator().manual_seed(3))
    chain = refine_steps(a, cross, [0, 1, 4, 10])
    for n, got in chain.items():
        maps = cross
        for _ in range(n):
            maps = a @ normalize(maps)
        torch.testing.assert_close(got, normalize(maps))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_batched_chains_are_the_single_chains_bit_for_bit(k):
    """A lambda sweep refines its matrices in one batched chain (predict_many); each member must be the chain
    that matrix gets alone, bit for bit, so that a configuration scores the same alone and inside a sweep (the
    CPU's matrix kernels round differently for other shapes and layouts: K = 1 is a matrix-vector product)."""
    a = random_row_stochastic(256, seed=4)
    cross = torch.rand(k, 256, generator=torch.Generator().manual_seed(5)).T  # class-major, as class_maps gives
    lams = [0.0, 0.001, 0.01, 0.1]
    for scale in ("row_max", "col_max", "literal"):
        many = ent_self_many(a, lams, scale)
        singles = [ent_self(a, lam, scale) for lam in lams]
        assert all(torch.equal(many[b], single) for b, single in enumerate(singles))
        batched = refine_steps(many, cross, [1, 3, 10])
        for b, single in enumerate(singles):
            alone = refine_steps(single, cross, [1, 3, 10])
            assert all(torch.equal(batched[n][b], alone[n]) for n in alone), (scale, b)
            assert torch.equal(batched[10][b], refine(single, cross.contiguous(), 10))


def test_normalize_gives_unit_sum_nonnegative_columns():
    out = normalize(torch.randn(50, 4))
    assert torch.allclose(out.sum(0), torch.ones(4))
    assert (out >= 0).all()


def test_cat_cross_gamma_one_reproduces_plain_cross_attention(random_backbone):
    from bench.forward import ForwardSetting, run_traced
    from bench.capture import request
    from methods.iseg import ISeg

    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    prompt = "A photograph of circle and square and other objects and background"
    req = request(cross=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"])
    setting = ForwardSetting(size=64)
    method = ISeg(random_backbone)
    ids = random_backbone.tokenize([prompt])[0].tolist()
    from methods.base import ClassQuery

    query = ClassQuery([1, 2], ["circle", "square"])
    ones = method.key_weights(ids, query, {"gamma": 1.0})
    assert ones is None
    weights_one = torch.ones(1, len(ids))
    plain = run_traced(random_backbone, req, setting, [prompt], [image]).traces[0]
    unit = run_traced(random_backbone, req, setting, [prompt], [image], key_weights=weights_one).traces[0]
    boosted_w = method.key_weights(ids, query, {"gamma": 1.6})[None]
    boosted = run_traced(random_backbone, req, setting, [prompt], [image], key_weights=boosted_w).traces[0]
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert torch.allclose(plain.cross[layer], unit.cross[layer], atol=1e-6)
    class_tokens = (boosted_w[0] != 1).nonzero().flatten()
    assert len(class_tokens) == 2
    assert not torch.allclose(plain.cross[layer], boosted.cross[layer])


def test_cat_cross_on_embeddings_is_the_pass_on_scaled_embeddings(random_backbone, monkeypatch):
    """gamma_on=embeddings (the release's Cat-Cross) is the UNet pass on the class tokens' text embeddings scaled
    by gamma, bit for bit: their keys and their values. gamma_on=keys (Eq. 8-9) scales the keys alone: on SD's
    bias-free key projection the first cross-attention layer sees the same keys either way, so its maps agree,
    while the values it leaves untouched make the later layers' maps differ."""
    import numpy as np

    from bench.capture import request
    from bench.forward import ForwardSetting, run_traced
    from methods.base import ClassQuery
    from methods.iseg import ISeg

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    prompt = "A photograph of circle and square and other objects and background"
    first, later = "down_blocks.0.attentions.0.transformer_blocks.0.attn2", \
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    req, setting = request(cross=[first, later]), ForwardSetting(size=64)
    method = ISeg(random_backbone)
    query = ClassQuery([1, 2], ["circle", "square"])
    cfg = ISeg.resolve({"gamma": 1.6, "gamma_on": "embeddings"})
    assert method.token_weights_on(cfg) == "embeddings" and method.token_weights_on(ISeg.resolve({})) == "keys"
    weights = method.key_weights(random_backbone.tokenize([prompt])[0].tolist(), query, cfg)[None]
    assert torch.equal(weights.unique(), torch.tensor([1.0, 1.6]))

    on_embeddings = run_traced(random_backbone, req, setting, [prompt], [image], embedding_weights=weights).traces[0]
    condition = random_backbone.condition

    def scaled(prompts):
        states = condition(prompts)["encoder_hidden_states"]
        return {"encoder_hidden_states": states * weights.to(states.dtype)[:, :, None]}

    monkeypatch.setattr(random_backbone, "condition", scaled)
    by_hand = run_traced(random_backbone, req, setting, [prompt], [image]).traces[0]
    monkeypatch.undo()
    on_keys = run_traced(random_backbone, req, setting, [prompt], [image], key_weights=weights).traces[0]
    plain = run_traced(random_backbone, req, setting, [prompt], [image]).traces[0]
    for layer in (first, later):
        assert torch.equal(on_embeddings.cross[layer], by_hand.cross[layer]), layer
        assert not torch.allclose(on_embeddings.cross[layer], plain.cross[layer], atol=1e-4), layer
    # the first layer: the same keys up to the projection's rounding; later: values scaled by gamma moved the
    # hidden states (random weights: by ~7e-5 here, four orders of magnitude above that rounding)
    same = (on_keys.cross[first] - on_embeddings.cross[first]).abs().max()
    moved = (on_keys.cross[later] - on_embeddings.cross[later]).abs().max()
    assert same <= 1e-7 and moved >= 1e-5, (float(same), float(moved))
