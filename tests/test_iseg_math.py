"""iSeg's equations on plain tensors (Eq. 4-7, Algorithm 1) and Cat-Cross (Eq. 8-9) in the UNet."""

import pytest
import torch

from methods.iseg import LOG_EPS, ent_self, entropy, normalize, refine, refine_sweep


def random_row_stochastic(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g) ** 3 + 0.05
    return a / a.sum(1, keepdim=True)


def test_ent_self_with_lambda_zero_is_identity():
    a = random_row_stochastic(32)
    assert torch.equal(ent_self(a, 0.0), a)


@pytest.mark.parametrize("lam", [1e-5, 1e-4])
def test_ent_self_lowers_entropy(lam):
    a = random_row_stochastic(64, seed=1)
    reduced = ent_self(a, lam)
    assert (reduced > 0).all(), "step small enough to keep a distribution"
    assert entropy(reduced) < entropy(a)
    renormalised = reduced / reduced.sum(1, keepdim=True)
    row_entropy = lambda m: -(m * m.log()).sum(1)  # noqa: E731
    assert (row_entropy(renormalised) < row_entropy(a)).float().mean() > 0.9


def test_ent_self_follows_eq7():
    a = random_row_stochastic(8)
    assert torch.allclose(ent_self(a, 0.01), a + 0.01 * (1 + torch.log(a)))


def ground_truth_self_attention(mask: torch.Tensor) -> torch.Tensor:
    """Self-correlation of ground-truth segments (iSeg Fig. 2d): row i is uniform over i's segment."""
    flat = mask.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(1, keepdim=True)


def test_refinement_with_ground_truth_self_attention_recovers_the_mask():
    from methods.postprocess import labels_from_scores, minmax

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


def test_refine_sweep_matches_per_config_refinement():
    a = random_row_stochastic(128, seed=2)
    cross = torch.rand(128, 3, generator=torch.Generator().manual_seed(3))
    lams, iters = [0.0, 0.001, 0.01, 0.1], [10, 4, 10, 1]
    batched = refine_sweep(a, torch.log(a.clamp_min(LOG_EPS)), cross, lams, iters)
    for lam, n, got in zip(lams, iters, batched):
        want = refine(ent_self(a.double(), lam), cross.double(), n)
        assert torch.allclose(got.double(), want, atol=1e-6), (lam, n)


def test_normalize_gives_unit_sum_nonnegative_columns():
    out = normalize(torch.randn(50, 4))
    assert torch.allclose(out.sum(0), torch.ones(4))
    assert (out >= 0).all()


def test_cat_cross_gamma_one_reproduces_plain_cross_attention(random_backbone):
    from bench.forward import ForwardSetting, run_traced
    from bench.trace import request
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
