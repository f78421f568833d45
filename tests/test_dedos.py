"""DEDOS mechanics on tiny seeded random components (tests/tiny.py and a tiny random CLIP folder): the shape
of every stage, the loss decreasing on a fixed batch, save/reload, inference without diffusion, and the
equations' pieces against their definitions. Quality is measured by the committed report (bench/embedded)."""

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
    for step in range(8):
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
    assert sorted(cls.keys_of("post")) == ["inference_queries", "ov_alpha", "ov_beta", "ov_ensemble"]
    assert cls.resolve({}).classes == "all"  # open vocabulary: every dataset class is scored


# -- the bar (committed report of sweeps/dedos_openvocab.yaml on the embedded default) ------------------------------
# method version 4 (the CLIP tower trains at clip_lr_scale); dedos_openvocab/ is the same sweep at version 3
REPORT = Path(__file__).resolve().parents[1] / "reports/embedded/dedos_openvocab_v4"


# the same bar on the sixteen-shape world (sweeps/dedos_openvocab_many.yaml: twelve seen names, four unseen)
MANY_REPORT = REPORT.parent / "dedos_openvocab_many"
# its two arms again at twice the steps (3,000; pre-registered after MANY_REPORT's fits underfit), one folder per arm
MANY_3000 = REPORT.parent / "dedos_openvocab_many_3000"
# those two 3,000-step fits, unchanged, evaluated on the first 1,500 val images (pre-registered after MANY_3000)
MANY_3000_VAL1500 = REPORT.parent / "dedos_openvocab_many_3000_val1500"
# both arms re-fitted with fit_seed=1, the same 1,500 val images: the replication MANY_3000_VAL1500's PREREG.md asks for
MANY_3000_SEED1 = REPORT.parent / "dedos_openvocab_many_3000_seed1"


def fit_values(fit_dir):
    """The train-setting values a committed fit folder was fitted with (its train_config.json)."""
    import json

    return json.loads((fit_dir / "train_config.json").read_text())["setting"]["values"]


def committed_results(report=REPORT):
    """Each arm's row with the paper's classifier (ov_ensemble=none, the default)."""
    import pandas as pd

    frame = pd.read_csv(report / "summary.csv")
    return {row["components"]: row for _, row in frame.iterrows() if row["ov_ensemble"] == "none"}


def test_committed_report_has_seen_and_unseen_intervals():
    import json

    rows = committed_results()
    assert sorted(rows) == ["baseline", "full"]
    assert json.loads((REPORT / "run.json").read_text())["method_versions"]["dedos"] == "4"
    for fit in (REPORT / "fit").iterdir():  # the sweep's defaults: three seen names
        setting = json.loads((fit / "train_config.json").read_text())["setting"]
        assert setting["version"] == "4" and setting["values"]["train_classes"] == "circle+square+triangle"
    for arm in ("baseline", "full"):
        for part in ("seen", "unseen"):
            row = rows[arm]
            assert row[f"mIoU_{part}_ci_low"] <= row[f"mIoU_{part}"] <= row[f"mIoU_{part}_ci_high"]
    assert "mIoU unseen" in (REPORT / "report.md").read_text()


@pytest.mark.parametrize("report", [
    pytest.param(REPORT, marks=pytest.mark.xfail(
        strict=True, reason="the committed report (method version 4: CAT-Seg cost aggregation in both arms, "
        "the CLIP tower fine-tuned at x 0.01; the default 1,500 steps per arm, the 94.2% tiny CLIP) names no "
        "unseen pixel in either arm: unseen mIoU baseline 0.0 [0.0, 0.0], DEDOS 0.0 [0.0, 0.0] (version 3: "
        "0.0 / 0.1). Neither a CLIP whose patches know the shapes nor a fourth seen name changed that: the "
        "head trained on three or four names never scores an unseen one above them (README, DEDOS)")),
    pytest.param(MANY_REPORT, marks=pytest.mark.xfail(
        strict=True, reason="on shapes_many (1,500 steps, pre-registered) both arms name unseen pixels for the "
        "first time, but the intervals overlap: unseen baseline 3.3 [1.8, 5.2], DEDOS 4.6 [2.7, 6.3]; the fits "
        "underfit sixteen classes (seen 15.6 / 19.0; README, DEDOS)")),
    pytest.param(MANY_3000, marks=pytest.mark.xfail(
        strict=True, reason="at 3,000 steps (pre-registered) DEDOS's lead grows but the intervals still overlap: "
        "unseen baseline 2.9 [1.6, 4.7], DEDOS 6.0 [3.7, 8.6] (seen 17.5 / 25.6; README, DEDOS)")),
    pytest.param(MANY_3000_VAL1500),
    pytest.param(MANY_3000_SEED1, marks=pytest.mark.xfail(
        strict=True, reason="the pre-registered replication with fit_seed=1 (3,000 steps, 1,500 val images): "
        "unseen baseline 6.7 [5.4, 7.8], DEDOS 6.6 [5.3, 7.8]; seen 18.0 / 25.9 (README, DEDOS)"))],
    ids=["shapes", "shapes_many", "shapes_many_3000", "shapes_many_3000_val1500", "shapes_many_3000_seed1"])
def test_dedos_beats_its_baseline_on_unseen_classes(report):
    """Per pair of fits: DEDOS's unseen interval (over images) lies above the baseline's. The issue's bar is
    test_dedos_unseen_lead_holds_for_both_fit_seeds: one pair can pass by its training seed alone."""
    rows = committed_results(report)
    assert rows["full"]["mIoU_unseen_ci_low"] > rows["baseline"]["mIoU_unseen_ci_high"]


@pytest.mark.xfail(strict=True, reason="pre-registered: met only if both pairs of 3,000-step fits pass on 1,500 val "
                   "images; seed 0 does (5.7 [4.6, 6.8] vs 2.9 [2.4, 3.4]), seed 1 does not (6.6 [5.3, 7.8] vs 6.7 "
                   "[5.4, 7.8]): a training seed moves the baseline's unseen mIoU by 3.8 points (README, DEDOS)")
def test_dedos_unseen_lead_holds_for_both_fit_seeds():
    for report in (MANY_3000_VAL1500, MANY_3000_SEED1):
        rows = committed_results(report)
        assert rows["full"]["mIoU_unseen_ci_low"] > rows["baseline"]["mIoU_unseen_ci_high"]


# the pre-registered five-seed protocol (its PREREG.md): fit seeds 0-4 per arm; seeds 0 and 1 are the committed
# pairs above, seeds 2-4 one folder per arm and seed
FIVE_SEEDS = REPORT.parent / "dedos_openvocab_many_3000_five_seeds"


def five_seed_values(part: str = "unseen", ensemble: str = "none") -> dict[str, list[float]]:
    """Per arm, mIoU over `part` classes for fit seeds 0-4 (ov_ensemble=`ensemble`), in seed order."""
    import pandas as pd

    out = {"baseline": [], "full": []}
    for seed in range(5):
        for name in out:
            if seed < 2:
                frame = pd.read_csv((MANY_3000_VAL1500, MANY_3000_SEED1)[seed] / "summary.csv")
                frame = frame[frame["components"] == name]
            else:
                frame = pd.read_csv(FIVE_SEEDS / f"seed{seed}_{name}" / "summary.csv")
            (value,) = frame.loc[frame["ov_ensemble"] == ensemble, f"mIoU_{part}"]
            out[name].append(float(value))
    return out


def test_five_seed_fits_are_the_pre_registered_ones():
    """Seeds 2-4 of each arm: the seed-0 fit's train setting but fit_seed, evaluated on the same 1,500 val images
    with the same three classifiers."""
    import json

    import pandas as pd

    for name in ("baseline", "full"):
        (first,) = (MANY_3000_VAL1500 / name / "fit").iterdir()
        for seed in (2, 3, 4):
            folder = FIVE_SEEDS / f"seed{seed}_{name}"
            (fit,) = (folder / "fit").iterdir()
            assert fit_values(fit) == {**fit_values(first), "fit_seed": seed}
            assert json.loads((folder / "run.json").read_text())["num_images"] == 1500
            assert sorted(pd.read_csv(folder / "summary.csv")["ov_ensemble"]) == ["fcclip", "maskprompt", "none"]


@pytest.mark.xfail(strict=True, reason="pre-registered five seeds per arm (3,000 steps, 1,500 val images, the paper's "
                   "classifier): DEDOS's unseen mIoU 5.7 / 6.6 / 5.1 / 7.3 / 9.3, mean 6.8 [4.8, 8.9], against the "
                   "baseline's 2.9 / 6.7 / 3.9 / 5.7 / 7.1, mean 5.3 [3.0, 7.5]: ahead by 1.5 (4 of 5 seeds, Welch "
                   "p = 0.20), intervals overlapping; seen 23.1 against 23.0 (README, DEDOS)")
def test_dedos_unseen_lead_holds_over_five_fit_seeds():
    """The issue's bar as pre-registered (FIVE_SEEDS/PREREG.md): with the paper's classifier, the t-interval of
    DEDOS's unseen mIoU over its five fit seeds lies entirely above the baseline's."""
    from bench.stats import t_interval

    values = five_seed_values()
    _, _, full_low, _ = t_interval(values["full"])
    _, _, _, base_high = t_interval(values["baseline"])
    assert full_low > base_high, values


def test_many_shapes_seed1_report_is_the_replication():
    """The seed-1 pair: MANY_3000_VAL1500's train settings but fit_seed, the same 1,500 val images; DEDOS's
    seen lead replicates (disjoint intervals in both pairs)."""
    import json

    for arm in ("baseline", "full"):
        (first,) = (MANY_3000_VAL1500 / arm / "fit").iterdir()
        (again,) = (MANY_3000_SEED1 / arm / "fit").iterdir()
        a, b = fit_values(first), fit_values(again)
        assert (a["fit_seed"], b["fit_seed"]) == (0, 1) and {**a, "fit_seed": 1} == b
        assert json.loads((MANY_3000_SEED1 / arm / "run.json").read_text())["num_images"] == 1500
    for report in (MANY_3000_VAL1500, MANY_3000_SEED1):
        rows = committed_results(report)
        assert rows["full"]["mIoU_seen_ci_low"] > rows["baseline"]["mIoU_seen_ci_high"]


def test_many_shapes_3000_steps_report_is_the_pre_registered_run():
    """The 3,000-step arms on shapes_many (README, DEDOS): the same train settings as MANY_REPORT's but the
    step count, one run per arm joined by bench.report; DEDOS's seen interval now lies above the baseline's."""
    import pandas as pd

    first = {fit_values(f)["components"]: fit_values(f) for f in (MANY_REPORT / "fit").iterdir()}
    for arm in ("baseline", "full"):
        (fit,) = (MANY_3000 / arm / "fit").iterdir()
        values = fit_values(fit)
        assert values["components"] == arm and values["train_steps"] == 3000
        assert {k: v for k, v in values.items() if k != "train_steps"} == \
            {k: v for k, v in first[arm].items() if k != "train_steps"}
        assert set(pd.read_csv(MANY_3000 / arm / "results.csv")["fit"]) == {fit.name}
    rows = committed_results(MANY_3000)
    assert rows["full"]["mIoU_seen_ci_low"] > rows["baseline"]["mIoU_seen_ci_high"]
    assert rows["full"]["mIoU_unseen"] > rows["baseline"]["mIoU_unseen"] > 0.0


def test_many_shapes_val1500_report_evaluates_the_3000_step_fits():
    """The 3,000-step fits of MANY_3000 (same fit hashes, same loss curves: nothing re-trained) on the first 1,500
    val images instead of 300 (pre-registered in its PREREG.md); the first 300 are MANY_3000's images."""
    import json

    import pandas as pd

    for arm in ("baseline", "full"):
        (fit,) = (MANY_3000 / arm / "fit").iterdir()
        (again,) = (MANY_3000_VAL1500 / arm / "fit").iterdir()
        assert again.name == fit.name
        assert (again / "loss.csv").read_bytes() == (fit / "loss.csv").read_bytes()
        assert set(pd.read_csv(MANY_3000_VAL1500 / arm / "results.csv")["fit"]) == {fit.name}
        assert json.loads((MANY_3000_VAL1500 / arm / "run.json").read_text())["num_images"] == 1500
    assert "bootstrap over 1500 images" in (MANY_3000_VAL1500 / "summary.csv").read_text()
    assert "fit_seed=1" in (MANY_3000_VAL1500 / "PREREG.md").read_text()  # the replication it pre-registered


def test_many_shapes_report_is_the_pre_registered_run():
    """The sixteen-shape run (README, DEDOS): both arms at method version 4 on twelve seen names with the
    world's own CLIP, ring, heart, arrow and hourglass unseen, 300 val images; the paper's classifier names
    unseen shapes in both arms (the five-shape world's never did), DEDOS ahead on seen and unseen alike."""
    import json

    import pandas as pd

    fits = sorted((MANY_REPORT / "fit").iterdir())
    settings = [json.loads((f / "train_config.json").read_text())["setting"] for f in fits]
    assert sorted(s["values"]["components"] for s in settings) == ["baseline", "full"]
    for s in settings:
        values = s["values"]
        assert s["version"] == "4" and values["clip"] == "embedded_many" and values["train_steps"] == 1500
        assert len(values["train_classes"].split("+")) == 12
        assert not {"ring", "heart", "arrow", "hourglass"} & set(values["train_classes"].split("+"))
    assert set(pd.read_csv(MANY_REPORT / "results.csv")["fit"]) == {f.name for f in fits}
    assert "unseen: ring+heart+arrow+hourglass" in (MANY_REPORT / "config.yaml").read_text()
    assert "bootstrap over 300 images" in (MANY_REPORT / "summary.csv").read_text()
    rows = committed_results(MANY_REPORT)
    for arm in ("baseline", "full"):
        assert rows[arm]["mIoU_unseen_ci_low"] > 0.0
    assert rows["full"]["mIoU_seen"] > rows["baseline"]["mIoU_seen"]
    assert rows["full"]["mIoU_unseen"] > rows["baseline"]["mIoU_unseen"]


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


OV_REPORT = Path(__file__).resolve().parents[1] / "reports" / "embedded" / "dedos_openvocab_ov"
# the same two fits with a CLIP trained with the dense alignment loss (bench.embedded.clip --dense-weight 1.0)
DENSE_CLIP_REPORT = OV_REPORT.parent / "dedos_openvocab_denseclip"
# the same two dense-CLIP fits evaluated on 500 val images (the first 100 are DENSE_CLIP_REPORT's)
DENSE_CLIP_500 = OV_REPORT.parent / "dedos_openvocab_denseclip_500"


@pytest.mark.parametrize("report", [OV_REPORT, DENSE_CLIP_REPORT, DENSE_CLIP_500],
                         ids=["shipped-clip", "dense-clip", "dense-clip-500"])
def test_committed_ov_report_reads_unseen_classes_through_clip(report):
    """The committed evaluation of the bar's two fits with every ov_ensemble: the paper's classifier names
    (almost) no unseen pixel, both ensembles with a frozen CLIP's per-query classification do, in both arms.
    With the dense CLIP too, whose patches alone segment the unseen shapes: the trained head is what never
    names them (README, DEDOS)."""
    import pandas as pd

    rows = {(r["components"], r["ov_ensemble"]): r for _, r in pd.read_csv(report / "summary.csv").iterrows()}
    for arm in ("baseline", "full"):
        assert rows[(arm, "none")]["mIoU_unseen_ci_high"] < 1.0
        for ensemble in ("fcclip", "maskprompt"):
            assert rows[(arm, ensemble)]["mIoU_unseen_ci_low"] > 0.0


def test_dense_clip_report_names_the_clip_it_used():
    import json

    card = json.loads((DENSE_CLIP_REPORT / "clip_train_config.json").read_text())
    assert card["args"]["dense_weight"] == 1.0 and card["args"]["seed"] == 0
    for arm in ("baseline", "full"):
        config = (DENSE_CLIP_REPORT / arm / "config.yaml").read_text()
        assert "params.clip=" in config  # fitted with that CLIP, not the shipped one


def test_dense_clip_500_evaluates_the_same_fits_on_more_images():
    """The 500-image evaluation re-reads the dense-CLIP report's two fits (same fit hashes) with the code they
    were fitted with (method version 3), so only the number of val images differs."""
    import json

    import pandas as pd

    for arm in ("baseline", "full"):
        fits = {report: set(pd.read_csv(report / arm / "results.csv")["fit"]) for report in
                (DENSE_CLIP_REPORT, DENSE_CLIP_500)}
        fitted = {p.name for p in (DENSE_CLIP_REPORT / arm / "fit").iterdir()}
        assert fits[DENSE_CLIP_500] == fits[DENSE_CLIP_REPORT] == fitted
        run = json.loads((DENSE_CLIP_500 / arm / "run.json").read_text())
        assert run["num_images"] == 500 and run["fits_reused"] == 1 and run["fits_trained"] == 0
        assert run["method_versions"]["dedos"] == "3"


FOUR_SEEN = OV_REPORT.parent / "dedos_openvocab_4seen"


def test_four_seen_names_report_is_the_pre_registered_run():
    """The four-seen-names run (README, DEDOS): both arms fitted at method version 4 on circle, square, triangle
    and star, cross the only unseen class; the paper's classifier names no cross pixel in either arm, so the
    extra name did not reach the bar (test_dedos_beats_its_baseline_on_unseen_classes stays a strict xfail)."""
    import json

    import pandas as pd

    fits = sorted((FOUR_SEEN / "fit").iterdir())
    settings = [json.loads((f / "train_config.json").read_text())["setting"] for f in fits]
    assert sorted(s["values"]["components"] for s in settings) == ["baseline", "full"]
    for s in settings:
        assert s["version"] == "4" and s["values"]["train_classes"] == "circle+square+triangle+star"
    results = pd.read_csv(FOUR_SEEN / "results.csv")
    assert set(results["fit"]) == {f.name for f in fits}
    assert "unseen: cross" in (FOUR_SEEN / "config.yaml").read_text()
    rows = {(r["components"], r["ov_ensemble"]): r for _, r in pd.read_csv(FOUR_SEEN / "summary.csv").iterrows()}
    for arm in ("baseline", "full"):
        assert rows[(arm, "none")]["mIoU_unseen_ci_high"] < 1.0
        assert rows[(arm, "none")]["mIoU_seen"] > 50.0  # the fits did learn the seen classes, star included


def test_bad_train_settings_are_one_line_errors_before_fitting():
    method = Dedos()
    for bad, match in (({"n": 101}, "multiple of kernel_n"), ({"n": -1}, "positive"), ({"c": 250, "kernel_c": 4}, "multiple of kernel_c"),
                       ({"heads": 7}, "multiples of heads"), ({"timesteps": "0+5000"}, "1..999"),
                       ({"key_keep": 0.0}, "key_keep")):
        with pytest.raises(BenchError, match=match):
            method.train_setting(Dedos.resolve(bad))
