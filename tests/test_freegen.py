"""FreeGen's Stage-1 equations on plain tensors (methods/freegen/rectify.py), and the method on a tiny trace (the
committed reports are checked by the ledger, `ledger/`)."""

import numpy as np
import pytest
import torch

from methods.freegen.rectify import (adaptive_self_attention, head_mean_weights, normalise, one_hot,
                                     pseudo_label, rectified_attention, rekeyed_cross, strongest_far_points,
                                     temporal_fluctuation, uniform_steps)


def test_eq1_head_mean_initialisation_is_the_mean_over_heads():
    probs = torch.rand(3, 4, 6, 6).softmax(-1)  # (S, H, N, N)
    w = head_mean_weights(4, 6)
    assert torch.allclose(adaptive_self_attention(probs, w), probs.mean(1), atol=1e-6)
    assert torch.allclose(adaptive_self_attention(probs), probs.mean(1))
    # W_h weights the rows of head h: one head only, rows scaled
    one = torch.zeros(4, 6)
    one[2] = torch.arange(6.0)
    assert torch.allclose(adaptive_self_attention(probs, one), probs[:, 2] * torch.arange(6.0)[:, None])


def test_eq3_identity_self_attention_keeps_the_cross_attention_and_propagates_otherwise():
    cross = torch.rand(5, 2)
    assert torch.allclose(rectified_attention(torch.eye(5), cross), cross)
    uniform = torch.full((5, 5), 0.2)
    assert torch.allclose(rectified_attention(uniform, cross), cross.mean(0).expand(5, 2), atol=1e-6)
    a = torch.rand(5, 5).softmax(-1)
    assert torch.allclose(rectified_attention(a, cross, power=4), torch.linalg.matrix_power(a, 4) @ cross, atol=1e-5)


def test_eq2_identity_key_map_is_the_unets_attention():
    q, k = torch.randn(2, 7, 4), torch.randn(2, 5, 4)
    plain = (q @ k.transpose(1, 2) * 0.5).softmax(-1)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(rekeyed_cross(q, k, 0.5, eye, [1, 2]), plain, atol=1e-6)
    assert torch.allclose(rekeyed_cross(q, k, 0.5), plain, atol=1e-6)
    doubled = rekeyed_cross(q, k, 0.5, 2 * eye, [1])
    assert not torch.allclose(doubled, plain)
    assert torch.allclose(doubled.sum(-1), torch.ones(2, 7))


def test_eq4_temporal_fluctuation():
    masks = torch.zeros(4, 2, 3, 3)
    masks[:, 0] = 1
    assert temporal_fluctuation(masks) == 0.0
    flip = masks.clone()
    flip[3, 0, 0, 0], flip[3, 1, 0, 0] = 0, 1  # one pixel changes class at one of 4 steps
    # that pixel, both channels: |1 - 0.75| x 3 steps + |0 - 0.75| x 1 = 1.5 per channel; over 4*2*9 entries
    assert temporal_fluctuation(flip) == pytest.approx(2 * 1.5 / (4 * 2 * 9))


def test_uniform_steps_include_the_last():
    assert uniform_steps(50, 4) == [0, 16, 33, 49]
    assert uniform_steps(50, 1) == [49]
    assert uniform_steps(3, 8) == [0, 1, 2]


def test_pseudo_label_bands_and_one_hot():
    scores = torch.tensor([[[0.9, 0.55, 0.1]], [[0.2, 0.3, 0.05]]])  # (K=2, 1, 3)
    label = pseudo_label(scores, [3, 5], 0.6, 0.5)
    assert label.tolist() == [[3, 255, 0]]
    hot = one_hot(torch.from_numpy(label.astype(np.int64)), 6)
    assert hot[:, 0, 1].sum() == 0 and hot[3, 0, 0] == 1 and hot[0, 0, 2] == 1
    assert torch.allclose(normalise(torch.tensor([[1.0, 3.0]])), torch.tensor([[0.0, 1.0]]))


def test_strongest_far_points():
    score = torch.zeros(10, 10)
    score[2, 3] = 1.0
    score[2, 4] = 0.95  # strong but adjacent
    score[8, 8] = 0.6  # weaker but far
    points = strongest_far_points(score, 3, min_score=0.5)
    assert points == [(3, 2), (8, 8), (4, 2)]  # strongest, then the farthest confident pixels
    assert strongest_far_points(score, 3, min_score=0.99) == [(3, 2)]  # nothing else is confident


def test_synthetic_mask_on_a_tiny_generation_trace(tiny):
    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from methods import METHODS

    method = METHODS.get("freegen")(tiny)
    cfg = method.resolve({"mode": "generation", "steps": 4, "asr": "init", "egd": False})
    data = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 2})
    batch = trace_samples(method, data, [data[0], data[1]], cfg, 0, method.trace_request(cfg))
    for _sample, query, trace in zip([data[0], data[1]], batch.queries, batch.traces):
        mask = method.synthetic_mask(trace, query, cfg, (32, 32))
        assert mask.label.shape == (32, 32) and mask.label.dtype == np.uint8
        assert set(np.unique(mask.label)) <= {0, 255, *query.ids}
        assert 0.0 <= mask.tff <= 1.0
        assert mask.scores.shape == (len(query.ids), 32, 32)
    # the last step against the mean over steps: both valid, and K=1 has nothing to fluctuate
    assert method.synthetic_mask(batch.traces[0], batch.queries[0], cfg.replace(tff_k=1), (32, 32)).tff == 0.0


def test_sam_pseudo_masks_on_a_tiny_trace(tiny):
    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from methods import METHODS

    method = METHODS.get("freegen")(tiny)
    cfg = method.resolve({"mode": "generation", "steps": 2, "pseudo_masks": "sam", "asr": "init",
                          "egd": False})
    data = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 1})
    batch = trace_samples(method, data, [data[0]], cfg, 0, method.trace_request(cfg))
    mask = method.synthetic_mask(batch.traces[0], batch.queries[0], cfg, (32, 32))
    assert set(np.unique(mask.label)) <= {0, *batch.queries[0].ids}  # SAM's masks: no ignore band
    pred = method.predict(batch.traces[0], batch.queries[0], cfg, (32, 32))
    assert torch.equal(pred.labels, torch.from_numpy(mask.label.astype(np.int64)))


# -- learned ASR (methods/freegen/asr.py) ---------------------------------------------------------------------------
def _toy_inputs(seed: int = 0, heads: int = 2, grid=(4, 4), tokens: int = 5, d: int = 3):
    from methods.freegen.asr import AsrInputs

    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    probs = torch.randn(heads, n, n, generator=g).softmax(-1)
    q = {"a": torch.randn(heads, n, d, generator=g), "b": torch.randn(heads, 4, d, generator=g)}
    ka, kb = torch.randn(heads, tokens, d, generator=g), torch.randn(heads, tokens, d, generator=g)
    k = {"a": [ka, ka], "b": [kb, kb]}  # both classes named by one prompt
    return AsrInputs(probs, grid, q, k, {"a": 0.5, "b": 0.5}, {"a": grid, "b": (2, 2)}, [[1], [2, 3]])


def test_asr_at_initialisation_is_the_head_mean_rule():
    from methods.freegen.asr import AsrModule
    from methods.maps import resize_maps

    x = _toy_inputs()
    a_star = AsrModule.like(x)(x)
    cross = []
    for layer in ("a", "b"):
        probs = rekeyed_cross(x.queries[layer], x.keys[layer][0], 0.5)  # the UNet's own attention
        maps = torch.stack([probs[..., t].mean(-1).mean(0) for t in x.class_tokens]).unflatten(1, x.grids[layer])
        cross.append(resize_maps(maps, x.grid))
    a_c = torch.stack(cross).mean(0).flatten(1).T  # (N, K)
    want = rectified_attention(x.self_probs.mean(0), a_c).T.unflatten(1, x.grid)
    assert torch.allclose(a_star, want, atol=1e-6)


def test_asr_fit_lowers_eq5_and_round_trips_through_its_artefact():
    from methods.freegen.asr import AsrModule, asr_loss

    x = _toy_inputs(1)
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[0, :4, :4] = True
    target[1, 4:, 4:] = True
    model = AsrModule.like(x)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        first = float(asr_loss(model(x), target))
    for _ in range(60):
        loss = asr_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(asr_loss(model(x), target)) < 0.8 * first
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # W and every Upsilon
    again = AsrModule.from_tensors(dict(reversed(model.state_tensors().items())))  # matched by name, not order
    assert torch.equal(again(x), model(x))


def test_learned_path_at_initialisation_matches_asr_off_on_a_tiny_trace(tiny):
    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from methods import METHODS
    from methods.freegen.asr import AsrModule

    method = METHODS.get("freegen")(tiny)
    cfg = method.resolve({"mode": "generation", "steps": 3, "egd": False})
    assert method.train_setting(cfg) is not None and method.train_setting(cfg.replace(asr="init")) is None
    assert method.train_setting(cfg.replace(asr="init", egd=True)) is not None  # the EGD is fitted
    data = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 1})
    batch = trace_samples(method, data, [data[0]], cfg, 0, method.trace_request(cfg))
    query, trace = batch.queries[0], batch.traces[0]
    x = method.asr_inputs(trace, query, cfg, 2)
    plain = method.rectified(trace, query, cfg.replace(asr="init"), [2])[0]
    assert torch.allclose(AsrModule.like(x)(x), plain, atol=1e-6)
    method.load_fit(method.train_setting(cfg).key, AsrModule.like(x).state_tensors())
    assert torch.allclose(method.rectified(trace, query, cfg, [2])[0], plain, atol=1e-6)


# -- Stage 2: the Entity-level Grounding Decoder and hardness-aware self-training (methods/freegen/egd.py) ----------
def _egd_sample(tiny, seed=0):
    from methods.freegen.egd import EgdSample, entity_embeddings, unet_features

    image = np.random.RandomState(seed).randint(0, 255, (8, 8, 3)).astype(np.uint8)
    (features,) = unet_features(tiny, [image], ["A photograph of a circle"])
    label = torch.zeros(8, 8, dtype=torch.long)
    label[2:6, 2:6] = 1
    label[0, 0] = 255
    return EgdSample(features, entity_embeddings(tiny, ["circle"]), label)


def _small_decoder(sample):
    from methods.freegen.egd import GroundingDecoder

    torch.manual_seed(0)
    return GroundingDecoder([f.shape[0] for f in sample.features], sample.entities.shape[1], dim=16, queries=2,
                            layers=1, decoder_layers=2, heads=2)


def test_egd_shapes_on_unet_features_at_t1(tiny):
    from methods.freegen.egd import feature_modules, predict_label

    sample = _egd_sample(tiny)
    # four resolutions (the tiny UNet's 8/4/2/1 latent grid), finest first; every ResNet / transformer output
    assert [tuple(f.shape[-2:]) for f in sample.features] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    channels = {}
    hooks = [m.register_forward_hook(lambda m, a, o: channels.setdefault(
        (o if torch.is_tensor(o) else o[0]).shape[-1], []).append(1)) for m in feature_modules(tiny.unet)]
    try:
        _egd_sample(tiny)
    finally:
        for h in hooks:
            h.remove()
    assert sum(len(v) for v in channels.values()) == len(feature_modules(tiny.unet))
    assert sample.entities.shape == (2, 16)  # background + circle, CLIP width
    model = _small_decoder(sample)
    masks, cls = model(sample)
    assert masks.shape == (2 + 2, 8, 8) and cls.shape == (2 + 2, 2)  # learnable + entity queries
    probs, label = predict_label(model, sample, (16, 16))
    assert probs.shape == (2, 16, 16) and torch.allclose(probs.sum(0), torch.ones(16, 16), atol=1e-5)
    assert label.shape == (16, 16) and set(label.unique().tolist()) <= {0, 1}


def test_egd_loss_decreases_on_a_fixed_batch_and_reloads_identically(tiny):
    from methods.freegen.egd import GroundingDecoder, egd_loss, predict_label, train_epochs

    samples = [_egd_sample(tiny, 0), _egd_sample(tiny, 1)]
    model = _small_decoder(samples[0])
    losses = []
    train_epochs(model, samples, 8, 1e-3, 1, 0, step_hook=lambda e, loss: losses.append(loss))
    assert losses[-1] < 0.6 * losses[0]
    with torch.no_grad():
        assert float(egd_loss(model, *model(samples[0]), samples[0].label)) < losses[0]
    again = GroundingDecoder.from_tensors(dict(reversed(model.state_tensors().items())))
    for s in samples:
        assert torch.equal(predict_label(again, s, (8, 8))[0], predict_label(model, s, (8, 8))[0])


def test_eq8_hardness_and_hst_keep_exactly_the_easiest_fraction():
    from methods.freegen.egd import easiest, hardness

    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 2]])
    loss = torch.zeros(4, 4)
    loss[:2, 2:] = 1.0  # class 1: mean 1
    loss[2:, :2] = 2.0  # class 2 (area 6): 4 pixels at 2 -> mean 8/6
    loss[3, 2:] = 0.0
    loss[2, 2:] = 50.0  # ignored pixels do not count
    loss[:2, :2] = 9.0  # background does not count when an object is present
    assert hardness(loss, label) == pytest.approx(1.0 + 8 / 6)
    only_background = torch.zeros(2, 2, dtype=torch.long)
    assert hardness(torch.full((2, 2), 3.0), only_background) == pytest.approx(3.0)
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]
    assert easiest(scores, 0.5) == [1, 3, 5, 7]  # the 4 lowest of 8, in index order
    assert easiest(scores, 0.25) == [1, 5]
    assert easiest(scores[:5], 0.5) == [1, 2, 3]  # ceil(2.5)
    assert easiest([0.2, 0.2, 0.1], 0.5) == [0, 2]  # ties: the lower index


def _small_egd_fit(tiny):
    """FreeGen with Stage 2 (HST on) fitted on 3 generated voc_sim images: method, cfg, setting, training data."""
    from bench.data import build_dataset
    from methods import METHODS

    method = METHODS.get("freegen")(tiny)
    cfg = method.resolve({"mode": "generation", "steps": 3, "asr": "init", "egd_images": 3, "egd_epochs": 2,
                          "egd_batch": 2, "egd_dim": 16, "egd_queries": 2, "egd_layers": 1, "egd_lr": 1e-3,
                          "tff": False})
    setting = method.train_setting(cfg)
    train = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 3})
    return method, cfg, setting, train


def test_egd_fit_with_hst_predicts_and_resumes_bit_for_bit(tiny, monkeypatch):
    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from bench.fitting import LocalFitContext
    from methods import METHODS

    method, cfg, setting, train = _small_egd_fit(tiny)
    ctx = LocalFitContext(setting, train, tiny)
    tensors = method.fit(ctx)
    assert {p.series for p in ctx.curve} == {"egd", "egd+hst"} and [p.step for p in ctx.curve] == [1, 2, 3, 4]
    assert [len(state["kept"]) for _, state, _ in ctx.checkpoints] == [3, 3, 2, 2]  # HST: the easiest ceil(1.5)
    assert "egd/arch" in tensors and "W" not in tensors  # asr=init: no ASR in the artefact
    resumed = LocalFitContext(setting, train, tiny, resume_from=ctx.checkpoints[2])
    again = METHODS.get("freegen")(tiny).fit(resumed)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    # with the first attempt's cache, the resumed fit traces no training image again (FitContext.cached)
    import bench.evaluate

    traced = []
    real_trace = bench.evaluate.trace_samples
    monkeypatch.setattr(bench.evaluate, "trace_samples", lambda *a, **k: traced.append(1) or real_trace(*a, **k))
    cached = LocalFitContext(setting, train, tiny, resume_from=ctx.checkpoints[2], caches=ctx.caches)
    again = METHODS.get("freegen")(tiny).fit(cached)
    assert not traced and all(torch.equal(again[k], tensors[k]) for k in tensors)
    monkeypatch.undo()
    method.load_fit(setting.key, tensors)
    data = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 1, "split": "val"})
    batch = trace_samples(method, data, [data[0]], cfg, 0, method.trace_request(cfg))
    query, trace = batch.queries[0], batch.traces[0]
    prediction = method.predict(trace, query, cfg, (32, 32))
    assert prediction.scores.shape == (len(query.ids), 32, 32)
    assert set(prediction.labels.unique().tolist()) <= {0, *query.ids}
    mask = method.synthetic_mask(trace, query, cfg, (32, 32))
    assert np.array_equal(mask.label, prediction.labels.numpy().astype(np.uint8))  # synthesis writes the EGD's


def test_egd_fit_streams_its_features_beyond_the_memory_budget_and_learns_the_same(tiny, monkeypatch):
    """Past its memory budget (EGD_FEATURES_MEMORY_SHARE of the machine) an EGD fit keeps each pair's image, not its UNet features, and recomputes
    them at every use: the same single-image pass, so the fit is bit for bit the one that held them."""
    import methods.freegen as freegen
    from bench.fitting import LocalFitContext, unpack_state
    from methods import METHODS

    method, cfg, setting, train = _small_egd_fit(tiny)
    held = LocalFitContext(setting, train, tiny)
    tensors = method.fit(held)
    monkeypatch.setattr(freegen, "EGD_FEATURES_MEMORY_SHARE", 0.0)
    streamed = LocalFitContext(setting, train, tiny)
    again = METHODS.get("freegen")(tiny).fit(streamed)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    kept = unpack_state(*streamed.caches["egd_samples"])["samples"]
    assert len(kept) == 3 and all("features" not in r and r["image"].dtype == torch.uint8 for r in kept)
    assert all("features" in r for r in unpack_state(*held.caches["egd_samples"])["samples"])


def test_learned_asr_fit_resumes_from_its_cache_without_tracing(tiny, monkeypatch):
    """The ASR fit's traced training images (inputs and SAM / attention targets) come back from the fit cache
    on the CPU and are moved to the method's device; the resumed fit ends bit for bit where the first did."""
    import bench.evaluate
    from bench.data import build_dataset
    from bench.fitting import LocalFitContext
    from methods import METHODS

    method = METHODS.get("freegen")(tiny)
    cfg = method.resolve({"mode": "generation", "steps": 3, "asr": "learned", "asr_targets": "attention",
                          "asr_images": 2, "asr_epochs": 3, "asr_batch": 1, "egd": False, "tff": False})
    setting = method.train_setting(cfg)
    train = build_dataset({"name": "voc_sim", "seeds_per_class": 1, "size": 32, "limit": 2})
    ctx = LocalFitContext(setting, train, tiny)
    tensors = method.fit(ctx)
    traced = []
    real_trace = bench.evaluate.trace_samples
    monkeypatch.setattr(bench.evaluate, "trace_samples", lambda *a, **k: traced.append(1) or real_trace(*a, **k))
    resumed = LocalFitContext(setting, train, tiny, resume_from=ctx.checkpoints[0], caches=ctx.caches)
    again = METHODS.get("freegen")(tiny).fit(resumed)
    assert not traced and set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_tff_sweep_reads_every_threshold_off_each_cards_samples(tmp_path):
    import json

    from methods.freegen.tff_sweep import main, sweep_rows

    def card(k, tffs, mious):
        return {"name": f"k{k}", "params": {"tff_k": k}, "filter": {"tff_k": k}, "counts": {"synthesised": len(tffs)},
                "samples": [{"tff": t, "mIoU": m} for t, m in zip(tffs, mious)]}

    rows = sweep_rows(card(4, [0.0, 0.03, 0.06, 0.2], [90.0, 80.0, 70.0, 60.0]))
    by = {r["threshold"]: r for r in rows}
    assert by["0.05"]["kept"] == 2 and by["0.05"]["mIoU kept"] == 85.0 and by["0.05"]["mIoU dropped"] == 65.0
    assert by["0.1"]["kept %"] == 75.0 and by["0.01"]["kept"] == 1
    assert rows[0]["spearman rho"] == -1.0  # the TFF ranks these masks perfectly
    for k in (2, 8):
        (tmp_path / f"k{k}").mkdir()
        (tmp_path / f"k{k}" / "dataset.json").write_text(json.dumps(card(k, [0.01 * k, 0.0], [50.0, 60.0])))
    assert main([str(tmp_path / "k8"), str(tmp_path / "k2"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.index("| 2 |") < text.index("| 8 |")  # ordered by K
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()  # nothing written on bad input
