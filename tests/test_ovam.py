"""OVAM: attribution keys reproduce the UNet's cross-attention (paper Sec. 3.2), token optimisation (Sec. 3.3),
and the dense CRF. Mechanics on tiny random components; that optimised tokens help needs trained weights
(quality set)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.data import build_dataset
from bench.forward import ForwardSetting, run_traced
from bench.capture import request
from methods.base import ClassQuery
from methods.attribution import (AttributionSource, aggregate_daam, aggregate_sum, attn_layers,
    attribution_embedding, rekey, token_indices)
from methods.maps import minmax
from methods.tokens import load_tokens, save_tokens

torch.set_num_threads(1)
SIZE = 64  # image resolution (the backbone sees images at its own)


@pytest.fixture(scope="module")
def generated(tiny):
    """A 3-step guided generation of a shapes caption, recording cross-attention AND queries per head."""
    sample = build_dataset({"name": "shapes", "size": SIZE})[0]
    layers = attn_layers("all", backbone=tiny)
    req = request(cross=layers, queries=layers, per_head=True)
    setting = ForwardSetting(mode="generation", steps=3)
    trace = run_traced(tiny, req, setting, [sample.caption]).traces[0]
    names = [o["shape"] for o in sample.extra["objects"]]
    return trace, layers, names


def test_attribution_with_the_generation_prompt_is_the_unet_cross_attention(tiny, generated):
    """X' = X (padded like the generation prompt): A(Q, K') equals the recorded probabilities, per layer,
    step and head (OVAM Sec. 3.2)."""
    trace, layers, _ = generated
    emb, ids = attribution_embedding(tiny, trace.prompt, pad=True)
    assert ids == trace.token_ids
    for layer in layers:
        torch.testing.assert_close(rekey(trace, layer, emb), trace.cross[layer].float(), atol=1e-5, rtol=1e-4)


def test_ovam_maps_equal_daam_maps_under_matching_normalisation(tiny, generated):
    """Method level: OVAM with attribution "{prompt}" (padded) gives DAAM's maps for the prompt's words, with
    the same aggregation; and without padding the softmax renormalises over X' only (the paper's)."""
    from methods.daam import DAAM
    from methods.ovam import OVAM

    trace, layers, names = generated
    query = ClassQuery(list(range(1, len(names) + 1)), names)
    ovam = OVAM(tiny)
    cfg = OVAM.resolve({"attribution": "{prompt}", "pad": True, "mode": "generation"})
    recorded = AttributionSource(tiny, recorded=True).layer_maps(trace, layers, names)
    torch.testing.assert_close(ovam.heatmaps(trace, query, cfg), aggregate_sum(recorded, trace.latent_size),
                               atol=1e-4, rtol=1e-4)
    daam = DAAM(tiny)
    dcfg = DAAM.resolve({"mode": "generation"})
    # DAAM clamps each token's (each occurrence's) aggregated map before the word mean (castorini/daam
    # GlobalHeatMap.compute_word_heat_map), so the re-keyed maps are aggregated per token too
    src = AttributionSource(tiny, "{prompt}", pad=True, recorded=False)
    rekeyed = torch.stack([aggregate_daam([src.token_maps(trace, layer, n) for layer in layers],
                                          trace.latent_size).mean(0) for n in names])
    torch.testing.assert_close(minmax(daam.heatmaps(trace, query, dcfg)), minmax(rekeyed), atol=1e-4, rtol=1e-4)
    # paper normalisation: softmax over the unpadded X' = renormalised recorded probabilities
    emb, ids = attribution_embedding(tiny, trace.prompt, pad=False)
    layer = layers[0]
    rec = trace.cross[layer][..., :len(ids)].float()
    torch.testing.assert_close(rekey(trace, layer, emb), rec / rec.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_classes_absent_from_the_prompt_get_attribution_maps(tiny, generated):
    trace, layers, names = generated
    source = AttributionSource(tiny, "A photograph of a {name}", pad=True)
    absent = next(n for n in ("circle", "square", "triangle", "star", "cross") if n not in names)
    assert not token_indices(tiny.tokenizer, trace.token_ids, absent)
    maps = source.layer_maps(trace, layers, [absent])
    assert all(torch.isfinite(m).all() and m.shape[0] == 1 for m in maps)


def _training(backbone, name, images=1, epochs=60, loss="bce", resolution=0):
    from methods.tokens import optimize_tokens
    from methods.tokens import TokenSettings, initial_tokens, training_examples

    train = build_dataset({"name": "shapes", "split": "train", "size": SIZE})
    settings = TokenSettings(resolution=resolution, images_per_class=images)
    layers = attn_layers("all", backbone=backbone)
    examples = training_examples(backbone, train, train.classes.index(name), settings, layers)
    init = initial_tokens(backbone, name, settings.template)
    with torch.enable_grad():
        best, curve = optimize_tokens(examples, init, layers, loss, epochs, 100.0)
    return best, curve, examples


# On the v2 embedded weights the released CE loss closes only 13% of the gap to its floor in 40 epochs
# (0.375 -> 0.367, floor 0.318); BCE falls 0.317 -> 0.181. Strict: a model or fix that reaches it turns red.
CE_SLOW = pytest.mark.xfail(strict=True, reason="v2 embedded weights: CE token loss barely moves in 40 epochs")


@pytest.mark.parametrize("loss", ["bce", pytest.param("ce", marks=CE_SLOW)])
def test_token_optimisation_lowers_its_loss(backbone, tmp_path, loss):
    best, curve, examples = _training(backbone, "circle", epochs=40, loss=loss)
    floor = 0.0
    if loss == "ce":
        # the released loss takes min-max scaled maps in [0, 1] as logits, so the predicted probability of a
        # token stays within [sigmoid(-1), sigmoid(1)]: its lowest reachable value is the cross-entropy at
        # the target clipped to that range, and the optimisation must close the gap to it
        t = torch.stack([target for _, target in examples]).float()
        p = t.clamp(torch.sigmoid(torch.tensor(-1.0)), torch.sigmoid(torch.tensor(1.0)))
        floor = float(-(t * p.log() + (1 - t) * (1 - p).log()).mean())
    assert min(curve) - floor < 0.8 * (curve[0] - floor)
    assert best.shape == (2, backbone.text_encoder.config.hidden_size)
    path = tmp_path / "tokens.safetensors"
    save_tokens(path, {"circle": best}, {"loss": loss})
    torch.testing.assert_close(load_tokens(str(path))["circle"], best.float())


def _iou(method, backbone, cfg, sample, cid, name):
    query = ClassQuery([cid], [name])
    setting = ForwardSetting(size=SIZE)
    trace = run_traced(backbone, method.trace_request(cfg), setting, [method.prompt(query, sample.caption, cfg)],
                       images=[sample.image]).traces[0]
    pred = method.predict(trace, query, cfg, sample.label.shape).labels.numpy() == cid
    gt = sample.label == cid
    return (pred & gt).sum() / max((pred | gt).sum(), 1)


PAPER_TOKEN_THRESHOLDS = pytest.mark.xfail(strict=True, reason=(
    "v2 embedded weights: at the paper's optimised-token thresholds (tau 0.8, alpha 0.95, calibrated on SD) the "
    "learned token's maps keep only a small core that the dense CRF erases (held-out IoU 0.0; 0.26 without "
    "CRF); at tau 0.4 the same token beats the class name (see the matched-threshold case)"))


@pytest.mark.parametrize("thresholds", [
    pytest.param({}, id="paper-thresholds", marks=PAPER_TOKEN_THRESHOLDS),
    pytest.param({"tau": 0.4, "alpha": 0.85}, id="matched-thresholds"),
])
@pytest.mark.slow
@pytest.mark.quality
@pytest.mark.timeout(900)
def test_optimised_tokens_raise_heldout_iou(backbone, tmp_path, thresholds):
    """One annotated training image of a class; held-out validation images of that class: OVAM with the
    optimised token beats the class-name token (paper Tables 1-2), at the paper's thresholds for each (tau 0.8 /
    alpha 0.95 with tokens, 0.4 / 0.85 without) and with both at 0.4 / 0.85. Needs trained weights: with the
    random embedded backbone the attention carries no class information to learn (both IoUs are at chance).
    Measured on the v2 weights (12 images): tokens 0.821 against the name's 0.781 at 0.4 / 0.85; each at its
    best tau: 0.842 (tau 0.4) against 0.862 (tau 0.6)."""
    if backbone.name == "embedded-random":
        pytest.skip("random-weight backbone: attention maps carry no class signal (needs the trained embedded "
                    "weights or a real SD model)")
    from methods.ovam import OVAM

    name = "circle"
    best, _, _ = _training(backbone, name, epochs=200, resolution=SIZE)
    path = tmp_path / "tokens.safetensors"
    save_tokens(path, {name: best})
    val = build_dataset({"name": "shapes", "split": "val", "size": SIZE})
    cid = val.classes.index(name)
    samples = [val[i] for i in range(80) if cid in val[i].present_class_ids()][:12]
    method = OVAM(backbone)
    base = np.mean([_iou(method, backbone, OVAM.resolve(thresholds), s, cid, name) for s in samples])
    opt = np.mean([_iou(method, backbone, OVAM.resolve({**thresholds, "tokens": str(path)}), s, cid, name)
                   for s in samples])
    assert opt > base


def test_dense_crf_sharpens_a_blurred_mask_toward_the_true_edge():
    from methods.crf import crf_labels, dense_crf

    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :32] = (200, 30, 30)
    img[:, 32:] = (30, 30, 200)
    truth = torch.zeros(64, 64, dtype=torch.bool)
    truth[:, :32] = True
    kernel = torch.ones(1, 1, 1, 21) / 21  # horizontal box blur, then shifted 6 px off the edge
    blurred = F.conv2d(F.pad(truth.float()[None, None], (10, 10, 0, 0), mode="replicate"), kernel)[0, 0]
    blurred = torch.roll(blurred, 6, dims=1)
    before = ((blurred > 0.5) != truth).float().mean()
    refined = dense_crf(img, torch.stack([1 - blurred, blurred])).argmax(0) == 1
    after = (refined != truth).float().mean()
    assert after < 0.6 * before
    # hard unary (binarised mask, the released code's practice) with the shifted mask
    labels = crf_labels(img, (blurred > 0.5).long() * 3, [3]) == 3
    assert (labels != truth).float().mean() < before


def test_ovam_reads_the_branch_it_is_told(tiny):
    """branch=cond (paper) vs uncond (released code): different queries, both give finite maps."""
    from methods.ovam import OVAM

    sample = build_dataset({"name": "voc_sim", "size": SIZE})[0]
    method = OVAM(tiny)
    query = ClassQuery(sample.present_class_ids(), [build_dataset({"name": "voc_sim"}).classes[i]
                                                    for i in sample.present_class_ids()])
    traces = {}
    for branch in ("cond", "uncond"):
        cfg = OVAM.resolve({"mode": "generation", "steps": 2, "branch": branch, "crf": False})
        setting = method.forward_setting(cfg, 0)
        assert setting.branch == branch
        traces[branch] = run_traced(tiny, method.trace_request(cfg), setting, [sample.caption]).traces[0]
        assert torch.isfinite(method.predict(traces[branch], query, cfg, sample.label.shape).scores).all()
    layer = attn_layers("16", backbone=tiny)[0]
    assert not torch.allclose(traces["cond"].queries[layer], traces["uncond"].queries[layer])


def test_optimize_tokens_cli_is_the_fit_function_and_refuses_bad_input(tiny_model, tmp_path, capsys):
    from bench.optimize_tokens import main

    out = tmp_path / "tokens"
    common = ["--model", f"path={tiny_model}", "device=cpu", "--data", "name=shapes", "split=train", "size=32",
              "--epochs", "3", "--no-progress"]
    assert main(["--out", str(out), *common, "--classes", "circle"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "tokens.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["loss.csv", "loss.png", "summary.json", "tokens.safetensors"]
    assert load_tokens(str(out / "tokens.safetensors"))["circle"].shape == (2, 16)
    for args, message in ((["--out", str(tmp_path / "x"), *common, "--classes", "hexagon"], "not classes of"),
                          (["--out", str(out), *common], "exists and is not empty"),
                          (["--out", str(tmp_path / "x"), *common, "--blocks", "7"], "invalid choice")):
        assert main(args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x").exists()
