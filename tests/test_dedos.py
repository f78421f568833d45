"""DEDOS mechanics on tiny seeded random components (tests/tiny.py and a tiny random CLIP folder): the shape
of every stage, the loss decreasing on a fixed batch, save/reload, inference without diffusion, and the
equations' pieces against their definitions. Quality is measured by the committed reports (checked by `ledger/`)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.data import build_dataset
from bench.errors import BenchError
from bench.evaluate import trace_samples
from bench.fitting import LocalFitContext
from methods import METHODS
from methods.dedos import Dedos, tap_layers
from methods.dedos.frontend import block_channels, denoise, parse_timesteps, transformer_blocks
from methods.dedos.losses import seg_loss
from methods.dedos.model import (ProxyQueries, consistency_loss, geometric_ensemble, maskpool_probs,
                                 semantic_scores)

SMALL = {**Dedos.tester_params, "train_steps": 2, "train_classes": "circle+square+triangle"}
TRAIN = {"name": "shapes", "size": 32, "split": "train", "num_images": 8}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from bench.embedded.clip import build_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    model, tokenizer = build_clip(size=32, patch=8, width=32, layers=2, heads=2, projection=16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config(clip_folder, **kw):
    return Dedos.resolve({**SMALL, "clip": str(clip_folder), **kw})


def test_timesteps_and_taps():
    assert parse_timesteps("50+100+200", 3) == [200, 100, 50]  # denoising runs from the largest
    assert parse_timesteps("50+100+200", 5) == [200, 162, 125, 88, 50]  # Table 5: spread evenly
    assert parse_timesteps("100,50", 2) == [100, 50]
    with pytest.raises(ValueError, match="1..999"):
        parse_timesteps("0+2000", 2)
    assert tap_layers(24) == (7, 11, 15, 23)  # the release's ViT-L taps
    assert len(tap_layers(2)) == 4


def test_front_end_shapes(tiny):
    images = [build_dataset({**TRAIN, "num_images": 2})[i].image for i in range(2)]
    out = denoise(tiny, tiny.unet, images, [200, 100, 50], torch.Generator().manual_seed(0))
    blocks = transformer_blocks(tiny.unet)
    assert len(out.features) == 3 and all(len(f) == len(blocks) for f in out.features)
    assert [f.shape[-1] for f in out.features[0]] == block_channels(tiny.unet)
    assert all(f.shape[0] == 2 and f.ndim == 3 for f in out.features[0])
    assert out.after.shape == (2, 3, tiny.resolution, tiny.resolution) and out.after.dtype == torch.uint8


def test_proxy_queries_follow_eq_6_to_8():
    torch.manual_seed(0)
    proxy = ProxyQueries(n=8, c=16, feature_dims=[6, 10], steps=3, heads=2, kernel_n=2, kernel_c=4)
    q = proxy.initial()
    assert len(q) == 3 and q[0].shape == (8, 16)
    assert torch.equal(q[1], torch.kron(proxy.basic, proxy.kernels[1]))  # Eq. 6
    feats = [[torch.randn(2, 5, 6), torch.randn(2, 7, 10)] for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    out = proxy(feats, keep_prob=0.7, generator=gen)
    assert out.shape == (2, 8, 16) and torch.isfinite(out).all()
    # Eq. 7-8 on identical per-step queries: max = mean = each step
    same = [torch.ones(8, 16)] * 3
    want = proxy.fuse(torch.ones(8, 16 * 5))
    torch.testing.assert_close(proxy.combine(same), want)
    # the key mask: keep_prob 1 attends everywhere, deterministic
    assert torch.equal(proxy(feats, 1.0), proxy(feats, 1.0))
    once = ProxyQueries(n=8, c=16, feature_dims=[6], steps=1, heads=2, progressive=False)
    assert once.initial()[0].shape == (8, 16)


def test_consistency_loss_is_zero_when_projections_keep_similarities():
    torch.manual_seed(0)
    f = torch.randn(1, 6, 4)
    q = torch.eye(4)[None]  # n = c = 4: the queries span the feature space
    identity = torch.nn.Identity()
    assert consistency_loss(q, f, f, identity, identity).item() < 1e-10
    assert consistency_loss(q, f, torch.randn(1, 6, 4), identity, identity).item() < 1e-10  # same map
    assert consistency_loss(q[:, :1], f, f.flip(1), identity, identity).item() > 0


def test_every_stage_has_its_shape_and_the_loss_falls_on_a_fixed_batch(tiny, clip_folder):
    method = Dedos(tiny)
    cfg = config(clip_folder)
    model = method.build(cfg)
    names = ["background", "circle", "square", "triangle"]
    text = method.text(cfg, names)
    ds = build_dataset({**TRAIN, "num_images": 2})
    images = [ds[i].image for i in range(2)]
    clip = method.clip(cfg)
    pixels = clip.pixels(torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images]), model.size)
    den = denoise(tiny, tiny.unet, images, method.schedule(cfg), torch.Generator().manual_seed(0))
    size = tuple(4 * g for g in model.grid)
    targets = [method.target(ds[i].label, [0, 1, 2, 3], size, "cpu") for i in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        outputs, queries, consist = model(pixels, text, den.features, 1.0, None, *[torch.randn(2, 16, 32)] * 2)
        assert queries.shape == (2, cfg["n"], cfg["c"]) and consist.ndim == 0
        assert len(outputs) == cfg["decoder_layers"] + 1
        cls_logits, masks = outputs[-1]
        assert cls_logits.shape == (2, cfg["n"], len(names) + 1) and masks.shape == (2, cfg["n"], *size)
        assert semantic_scores(cls_logits, masks).shape == (2, len(names), *size)
        loss = sum(seg_loss(c, m, targets) for c, m in outputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_cost_aggregation_is_class_equivariant_and_takes_any_number_of_classes():
    """CAT-Seg's transfer to unseen classes rests on its aggregation treating classes alike: permuting the
    texts permutes the per-class logits, and a class never trained on goes through the same weights."""
    from methods.dedos.cost import CostAggregation

    torch.manual_seed(0)
    agg = CostAggregation(embed_dim=16, width=24, guide_dim=12, dim=16, grid=(4, 4)).eval()
    dense, patches = torch.randn(2, 4, 4, 16), torch.randn(2, 16, 24)
    guides = [torch.randn(2, 12, 8, 8), torch.randn(2, 12, 16, 16)]
    text = torch.randn(5, 16)
    with torch.no_grad():
        out = agg(dense, patches, text, guides)
        perm = torch.tensor([3, 0, 4, 1, 2])
        permuted = agg(dense, patches, text[perm], guides)
        fewer = agg(dense, patches, text[:2], guides)
    assert out.shape == (2, 5, 16, 16) and fewer.shape == (2, 2, 16, 16)
    torch.testing.assert_close(permuted, out[:, perm], rtol=1e-5, atol=1e-5)
    cost = CostAggregation.cost(dense, text)  # Sec. 3.2: cosine similarity, patch by patch
    torch.testing.assert_close(cost[1, 2, 3, 0], torch.nn.functional.cosine_similarity(dense[1, 3, 0], text[2], 0))


def test_no_cost_aggregation_option_builds_the_pre_version_3_model(tiny, clip_folder):
    with_cost = Dedos(tiny).build(config(clip_folder, components="baseline"))
    without = Dedos(tiny).build(config(clip_folder, components="baseline", cost_aggregation="none"))
    assert with_cost.cost is not None and without.cost is None and without.projection is None
    assert not any(k.startswith(("cost.", "projection.")) for k in without.state_dict())


def test_unseen_classes_are_not_supervised():
    label = np.zeros((8, 8), dtype=np.uint8)
    label[:4] = 4  # a star: unseen when the fit sees background, circle, square, triangle
    label[6:, :2] = 255
    tgt = Dedos.target(label, [0, 1, 2, 3], (8, 8), "cpu")
    assert tgt["classes"].tolist() == [0] and tgt["valid"][:4].sum() == 0 and tgt["valid"][6:, :2].sum() == 0
    assert tgt["masks"].shape == (1, 8, 8) and tgt["masks"][0, 4:6].all()
    with pytest.raises(BenchError, match="train_classes names hexagon"):
        Dedos.train_names(Dedos.resolve({"train_classes": "circle+hexagon"}), ["background", "circle"])


@pytest.mark.parametrize("components", ["full", "baseline"])
def test_fit_saves_reloads_and_inference_never_touches_the_diffusion_model(tiny, clip_folder, tmp_path,
                                                                         components):
    cfg = config(clip_folder, components=components)
    method = Dedos(tiny)
    setting = method.train_setting(cfg)
    ctx = LocalFitContext(setting, build_dataset(TRAIN), tiny)
    tensors = method.fit(ctx)
    assert len(ctx.curve) == cfg["train_steps"]
    assert ("proxy.basic" in tensors) == (components != "baseline")
    # clip_lr_scale > 0 (the default 0.01): the CLIP image tower and its projection are fine-tuned
    frozen = method.build(cfg).state_dict()
    for name in ("vision.encoder.layers.0.self_attn.q_proj.weight", "projection.weight"):
        assert not torch.equal(tensors[name], frozen[name]), name
    save_file(tensors, tmp_path / "weights.safetensors")
    reloaded = Dedos(tiny)
    reloaded.load_fit(setting.key, load_file(tmp_path / "weights.safetensors"))
    method.load_fit(setting.key, tensors)
    ds = build_dataset({"name": "shapes", "size": 32, "limit": 1})
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (tiny.unet, tiny.vae, tiny.text_encoder)]
    try:  # evaluation (the engine's trace_samples) and prediction: no UNet pass, no VAE, no SD text encoder
        batch = trace_samples(method, ds, [ds[0]], cfg, 0, method.trace_request(cfg))
        trace, query = batch.traces[0], batch.queries[0]
        assert batch.image_passes == 0 and np.array_equal(trace.image, ds[0].image)
        a = method.predict(trace, query, cfg, (32, 32))
        b = reloaded.predict(trace, query, cfg, (32, 32))
        kernels = method.predict(trace, query, cfg.replace(inference_queries="kernels"), (32, 32))
        prompted = [method.predict(trace, query, cfg.replace(ov_ensemble=e), (32, 32)) for e in ("fcclip",
                                                                                              "maskprompt")]
    finally:
        for h in hooks:
            h.remove()
    assert not calls, "inference ran the UNet, VAE or SD text encoder"
    assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert a.scores.shape == (5, 32, 32) and torch.all((a.scores >= 0) & (a.scores <= 1))
    assert kernels.scores.shape == a.scores.shape
    assert all(p.scores.shape == a.scores.shape and not torch.equal(p.scores, a.scores) for p in prompted)


def test_region_embeddings_see_only_the_mask(clip_folder):
    """Clip.region_embeddings (ov_ensemble=maskprompt): outside its mask the image is the normalisation mean,
    so what lies there does not matter, and a full mask is the plain image embedding."""
    from bench.models.clip import load_clip

    clip = load_clip(str(clip_folder))
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen)
    b = a.clone()
    b[..., 16:, :] = torch.randint(0, 256, (3, 16, 32), dtype=torch.uint8, generator=gen)  # differs outside
    top = torch.zeros(2, 32, 32, dtype=torch.bool)
    top[:, :16] = True
    top[1] = True  # the second mask: everything
    with torch.no_grad():
        ea, eb = clip.region_embeddings(a, top), clip.region_embeddings(b, top)
        torch.testing.assert_close(ea[0], eb[0])
        torch.testing.assert_close(ea[1], clip.image_embeddings(a)[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ea[1], eb[1])


def test_table_4_control_uses_a_random_unet(tiny, clip_folder):
    from methods.dedos.frontend import random_unet

    fresh = random_unet(tiny.unet, 0)
    assert fresh is not tiny.unet and fresh.config == tiny.unet.config
    assert not torch.equal(next(fresh.parameters()), next(tiny.unet.parameters()))
    cfg = config(clip_folder, unet_weights="random")
    assert Dedos(tiny).train_setting(cfg) != Dedos(tiny).train_setting(config(clip_folder))


def test_architecture_auto_is_the_papers_with_a_real_clip_and_scaled_with_the_tiny_one():
    from methods.dedos import EMBEDDED_SIZES, PAPER_SIZES, architecture

    assert {k: architecture(Dedos.resolve({}))[k] for k in EMBEDDED_SIZES} == EMBEDDED_SIZES
    real = architecture(Dedos.resolve({"clip": "openai/clip-vit-large-patch14-336"}))
    assert {k: real[k] for k in PAPER_SIZES} == PAPER_SIZES == {"n": 100, "c": 256, "heads": 8, "decoder_dim": 256,
                                                                "decoder_layers": 9, "cost_dim": 128}
    assert architecture(Dedos.resolve({"n": 40, "c": 32}))["n"] == 40  # explicit values win
    assert Dedos.traces_at_eval is False and METHODS.get("daam").traces_at_eval is True


def test_registered_with_train_and_post_knobs():
    cls = METHODS.get("dedos")
    assert cls.is_trained()
    assert {"components", "timesteps", "iterations", "n", "c", "train_steps"} <= set(cls.keys_of("train"))
    assert sorted(cls.keys_of("post")) == ["inference_queries", "ov_alpha", "ov_beta", "ov_ensemble", "tie_rule", "tie_tol"]
    assert cls.resolve({}).classes == "all"  # open vocabulary: every dataset class is scored


def test_geometric_ensemble_weights_the_decoder_and_clip_per_class():
    """ov_ensemble=fcclip (FC-CLIP's ensemble, an option beside the paper): weight 0 is the decoder's own
    classification, weight 1 CLIP's mask-pooled one; seen classes take alpha, unseen ones beta; the decoder's
    no-object probability is kept."""
    gen = torch.Generator().manual_seed(0)
    class_logits = torch.randn(1, 3, 4, generator=gen)  # 3 queries, K = 3 classes + no-object
    mask_logits = torch.randn(1, 3, 8, 8, generator=gen) * 4
    text = torch.nn.functional.normalize(torch.randn(3, 5, generator=gen), dim=-1)
    dense = text[torch.randint(0, 3, (1, 4, 4), generator=gen)]  # patches that are exactly class texts
    seen = torch.tensor([True, True, False])
    p_out = maskpool_probs(mask_logits, dense, text, 10.0)
    own = geometric_ensemble(class_logits, p_out, seen, 0.0, 0.0)
    assert torch.allclose(own.exp(), class_logits.softmax(-1), atol=1e-6)
    clip_only = geometric_ensemble(class_logits, p_out, seen, 1.0, 1.0).exp()
    masks = torch.nn.functional.interpolate(mask_logits, size=(4, 4), mode="bilinear",
                                            align_corners=False).sigmoid()
    pooled = torch.einsum("bnhw,bhwp->bnp", masks, dense)
    expected = (torch.nn.functional.normalize(pooled, dim=-1) @ text.T * 10).softmax(-1)
    void = class_logits.softmax(-1)[..., -1:]
    assert torch.allclose(clip_only[..., :-1], expected * (1 - void), atol=1e-5)
    assert torch.allclose(clip_only[..., -1:], void, atol=1e-6)
    # alpha for the seen classes only: moving beta changes nothing when every class is seen
    all_seen = torch.ones(3, dtype=torch.bool)
    a = geometric_ensemble(class_logits, p_out, all_seen, 0.4, 0.1)
    b = geometric_ensemble(class_logits, p_out, all_seen, 0.4, 0.9)
    assert torch.equal(a, b)
    c = geometric_ensemble(class_logits, p_out, seen, 0.4, 0.9)
    assert not torch.allclose(a, c)


def test_bad_train_settings_are_one_line_errors_before_fitting():
    method = Dedos()
    for bad, match in (({"n": 101}, "multiple of kernel_n"), ({"n": -1}, "positive"), ({"c": 250, "kernel_c": 4}, "multiple of kernel_c"),
                       ({"heads": 7}, "multiples of heads"), ({"timesteps": "0+5000"}, "1..999"),
                       ({"key_keep": 0.0}, "key_keep")):
        with pytest.raises(BenchError, match=match):
            method.train_setting(Dedos.resolve(bad))
