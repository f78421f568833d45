"""The downstream segmenter (methods/segformer.py): it learns, its fit is deterministic and survives the
safetensors round trip, it predicts from the image alone, and the fit stage trains it on another dataset than
the evaluated one (`train.data`: a VOC-layout folder, as `bench.synthesize` writes)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from bench.data import build_dataset
from bench.fitting import LocalFitContext
from bench.run import main
from bench.synthesize import voc_palette
from bench.trace import Trace
from methods import METHODS
from methods.base import ClassQuery

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"name": "shapes", "size": 32}
FAST = {"size": 32, "steps": 40, "batch_size": 4, "lr": 3e-3}


def write_voc_folder(folder: Path, dataset, ids: range, card: bool = True) -> Path:
    """A VOC-layout folder (JPEGImages, palette PNGs, ImageSets, dataset.json) of `dataset`'s samples."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for i in ids:
        sample = dataset[i]
        name = f"img{i:04d}"
        Image.fromarray(sample.image).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
        label = Image.fromarray(sample.label.astype(np.uint8), mode="P")
        label.putpalette(voc_palette())
        label.save(folder / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (folder / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{n}\n" for n in names))
    if card:
        (folder / "dataset.json").write_text(json.dumps({"classes": list(dataset.classes)}))
    return folder


def fit(values: dict, dataset, **kw):
    cls = METHODS.get("segformer")
    method = cls()
    params = cls.resolve(values)
    setting = method.train_setting(params)
    ctx = LocalFitContext(setting, dataset, None, **kw)
    return method, params, setting, method.fit(ctx), ctx


def predict(method, params, sample, ids=None):
    ids = ids if ids is not None else list(range(1, 6))
    trace = Trace(prompt="", token_ids=[], timesteps=[], latent_size=(4, 4), image=sample.image)
    return method.predict(trace, ClassQuery(ids, [str(i) for i in ids]), params, tuple(sample.label.shape))


def test_fit_is_deterministic_and_reloads_identically():
    train = build_dataset({**SHAPES, "split": "train", "num_images": 8})
    method, params, setting, tensors, ctx = fit(FAST, train)
    _, _, _, again, _ = fit(FAST, train)
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert ctx.curve[-1].loss < ctx.curve[0].loss  # it learns
    method.load_fit(setting.key, tensors)
    reloaded = METHODS.get("segformer")()
    reloaded.load_fit(setting.key, load_bytes(save_bytes({k: v.contiguous() for k, v in tensors.items()})))
    sample = build_dataset({**SHAPES, "split": "val", "limit": 1})[0]
    a, b = predict(method, params, sample), predict(reloaded, params, sample)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert a.scores.shape[0] == 5 and a.labels.shape == sample.label.shape
    # classes=gt: the argmax runs over background and the queried classes only
    only = predict(method, params, sample, ids=[2])
    assert set(only.labels.unique().tolist()) <= {0, 2}


def test_mmseg_augmentation_keeps_shapes_and_ids_and_pads_with_ignore():
    """augment=mmseg (MMSegmentation's SegFormer pipeline): every output is (3, S, S) / (S, S), labels are the
    input's ids or 255, a shrunk image sits top-left with normalised 0 and ignored labels around it, and the
    same generator seed gives the same pair."""
    from methods.segformer import MEAN, STD, mmseg_augment, pixel_values

    sample = build_dataset({**SHAPES, "size": 32, "split": "train", "num_images": 1})[0]
    x, y = pixel_values([sample.image], 32)[0], torch.from_numpy(sample.label.astype(np.int64))
    shrunk = 0
    for seed in range(40):
        a = mmseg_augment(x, y, torch.Generator().manual_seed(seed), flip=seed % 2 == 1)
        b = mmseg_augment(x, y, torch.Generator().manual_seed(seed), flip=seed % 2 == 1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        image, label = a
        assert image.shape == (3, 32, 32) and label.shape == (32, 32)
        assert set(label.unique().tolist()) <= set(y.unique().tolist()) | {255}
        rgb = (image * STD[0] + MEAN[0]) * 255
        real = label != 255
        assert rgb[:, real].min() > -1e-3 and rgb[:, real].max() < 255 + 1e-3
        if label[-1, -1] == 255:
            shrunk += 1
            assert (image[:, -1, -1] == 0).all()
    assert 5 < shrunk < 35  # the resize ratio is drawn from [0.5, 2]: about a third of the draws shrink


def test_hsv_conversion_round_trips():
    from methods.segformer import hsv_to_rgb, rgb_to_hsv

    rgb = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    hsv = rgb_to_hsv(rgb)
    assert hsv[0].min() >= 0 and hsv[0].max() < 180 and hsv[1:].min() >= 0 and hsv[1:].max() <= 255
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-3)
    grey = torch.full((3, 2, 2), 77.0)
    assert torch.equal(rgb_to_hsv(grey)[:2], torch.zeros(2, 2, 2))


def test_mmseg_augmentation_is_another_deterministic_fit():
    train = build_dataset({**SHAPES, "split": "train", "num_images": 8})
    values = {**FAST, "steps": 6, "augment": "mmseg"}
    _, _, setting, tensors, _ = fit(values, train)
    _, _, _, again, _ = fit(values, train)
    _, _, plain, flips_only, _ = fit({**FAST, "steps": 6}, train)
    assert setting.key != plain.key
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert not all(torch.equal(tensors[k], flips_only[k]) for k in tensors)


def test_a_different_seed_or_data_size_is_another_fit():
    cls = METHODS.get("segformer")
    keys = {cls().train_setting(cls.resolve(v)).key for v in ({}, {"train_seed": 1}, {"train_images": 10})}
    assert len(keys) == 3


@pytest.mark.slow
def test_the_fit_learns_more_than_background():
    """On rendered shapes at 64 px, 400 steps on 40 images separate the shapes from the background and beat
    labelling every pixel background by 5 mIoU on 20 val images: the fit trains a segmenter, not a constant."""
    from bench.metrics import ImageScorer, summarize

    train = build_dataset({**SHAPES, "size": 64, "split": "train", "num_images": 40})
    val = build_dataset({**SHAPES, "size": 64, "split": "val", "limit": 20})
    method, params, setting, tensors, _ = fit({"steps": 400}, train)
    method.load_fit(setting.key, tensors)
    fitted_hist, background_hist = 0, 0
    for sample in val:
        scorer = ImageScorer(sample.label, 6, 255)
        pred = predict(method, params, sample)
        fitted_hist = fitted_hist + scorer.histograms([pred.labels.numpy()])[0]
        background_hist = background_hist + scorer.histograms([np.zeros_like(sample.label, dtype=np.int64)])[0]
    fitted, background = summarize(fitted_hist, list(val.classes)), summarize(background_hist, list(val.classes))
    assert fitted["IoU/background"] > 85 and fitted["mIoU"] > background["mIoU"] + 5, (fitted, background)


def test_predicting_without_the_image_or_with_unfitted_classes_says_why():
    train = build_dataset({**SHAPES, "split": "train", "num_images": 2})
    method, params, setting, tensors, _ = fit({**FAST, "steps": 1}, train)
    method.load_fit(setting.key, tensors)
    trace = Trace(prompt="", token_ids=[], timesteps=[], latent_size=(4, 4))
    with pytest.raises(ValueError, match="has none"):
        method.predict(trace, ClassQuery([1], ["circle"]), params, (32, 32))
    trace.image = train[0].image
    with pytest.raises(ValueError, match="fitted on 6 classes"):
        method.predict(trace, ClassQuery([9], ["x"]), params, (32, 32))


# -- through the fit stage: train on a VOC-layout folder, evaluate on real shapes ------------------------------------
@pytest.mark.slow
def test_train_source_folder_fits_on_ray_train_and_scores_real_images(tmp_path, tiny_model, ray_session):
    folder = write_voc_folder(tmp_path / "synthetic", build_dataset({**SHAPES, "split": "train"}), range(6))
    sweep = tmp_path / "down.yaml"
    relative = os.path.relpath(folder)  # Ray Train workers run elsewhere: the driver resolves it
    sweep.write_text("method: segformer\ndata: {name: shapes, size: 32, limit: 2}\nparams: {classes: all}\n"
                     f"train: {{data: {{name: voc2012, root: {relative}}}}}\n")
    out = tmp_path / "run"
    args = [str(sweep), f"model.path={tiny_model}", "report.bootstrap=20", "ray.num_actors=0",
            *(f"params.{k}={v}" for k, v in {**FAST, "steps": 5}.items()), f"output_dir={out}"]
    assert main(args) == 0
    frame = pd.read_parquet(out / "results.parquet")
    (fit_dir,) = (out / "fit").iterdir()
    assert frame["fit"].iloc[0] == fit_dir.name
    config = json.loads((fit_dir / "train_config.json").read_text())
    assert config["data"] == {"limit": None, "name": "voc2012", "root": relative, "split": "train"}
    assert "voc2012" in (out / "config.yaml").read_text()
    # the same sweep fitted on the real shapes' train split is another fit (the source is in the hash)
    real = tmp_path / "real"
    assert main([*args[:-1], "train.data.name=shapes", "train.data.root=null",
                 "train.data.size=32", "train.data.num_images=6", f"output_dir={real}"]) == 0
    (real_fit,) = (real / "fit").iterdir()
    assert real_fit.name != fit_dir.name


def test_train_source_is_checked_before_anything_runs(tmp_path, capsys):
    shapes = build_dataset({**SHAPES, "split": "train"})
    voc_classes = write_voc_folder(tmp_path / "voc", shapes, range(2), card=False)  # VOC's 21 classes
    sweep = tmp_path / "down.yaml"
    sweep.write_text("method: segformer\ndata: {name: shapes, size: 32, limit: 2}\n")
    cases = {
        "train.data={name: shapse}": "Did you mean",
        "train.data={root: x}": "train.data.name is missing",
        "train.data={name: shapes, sise: 3}": "sise",
        f"train.data={{name: voc2012, root: {tmp_path / 'none'}}}": "not found",
        f"train.data={{name: voc2012, root: {voc_classes}}}": "has other classes",
        "train.data={name: shapes, size: 32, split: val}": "fitted on the evaluated split",
    }
    for override, message in cases.items():
        out = tmp_path / "out"
        assert main([str(sweep), override, f"output_dir={out}"]) == 2, override
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (override, err)
        assert not out.exists() and not out.with_name("out.partial").exists()


# -- the report's synthetic-dataset section ---------------------------------------------------------------------------
def test_report_shows_the_card_of_a_synthetic_training_set(tmp_path):
    from bench.reporting.dataset_card import dataset_card_blocks
    from bench.reporting.model import RunData
    from bench.reporting.render import to_html, to_markdown

    folder = write_voc_folder(tmp_path / "syn", build_dataset({**SHAPES, "split": "train"}), range(2), card=False)
    card = {"name": "<b>syn</b>", "method": "freegen", "method_version": "1", "seed": 0,
            "classes": ["background", "circle"], "model": {"name": "embedded"}, "data": {"name": "voc_sim"}, "params": {"tff_threshold": 0.05},
            "dataset": {"template": "A photograph of a {name}"},
            "counts": {"synthesised": 4, "kept": 3, "filtered": 1}, "filter": {"rule": "TFF > 0.05", "tff_k": 4},
            "tff": {"mean": 0.04, "quantiles": {"50": 0.03}},
            "pseudo_mask_quality": {"all": {"mIoU": 90.0, "images": 4}, "kept": {"mIoU": 93.0, "images": 3}},
            "samples": [{"id": str(i), "tff": t, "mIoU": m} for i, (t, m) in
                        enumerate([(0.01, 95.0), (0.02, 92.0), (0.04, 91.0), (0.09, 70.0)])]}
    (folder / "dataset.json").write_text(json.dumps(card))
    Image.new("RGB", (8, 8)).save(folder / "samples.png")
    run = RunData(cfg={"name": "r", "data": {"name": "shapes"}, "train": {"data": {"name": "voc2012",
                                                                               "root": str(folder)}}},
                  frame=pd.DataFrame(), prov={}, path=tmp_path / "run", label="r")
    out = tmp_path / "out"
    out.mkdir()
    blocks = dataset_card_blocks(run, out)
    markdown, html = to_markdown(blocks), to_html(blocks, "t")
    assert "Synthetic dataset (training data)" in markdown and "4 synthesised, 3 kept, 1 filtered" in markdown
    assert (out / "synthetic0_samples.png").is_file() and "synthetic0_samples.png" in markdown
    assert "<b>syn</b>" not in html and "&lt;b&gt;syn&lt;/b&gt;" in html  # card strings are escaped
    # the threshold table: at the card's threshold 3 of 4 samples are kept, their mean per-image mIoU 92.67
    assert "0.0500 (this set)" in markdown and "92.67" in markdown
    assert dataset_card_blocks(RunData(cfg={"name": "r", "data": {"name": "shapes"}}, frame=pd.DataFrame(),
                                       prov={}), out) == []


# -- the committed downstream protocol (README, FreeGen downstream) ---------------------------------------------------
# freegen_downstream: 40-image synthetic sets made on the CPU with Stage 1 only (ASR at its initialisation);
# freegen_downstream_200: 200-image sets made on a GPU with the defaults (learned ASR on SAM's masks, TFF, EGD,
# HST), the bar's evidence.
DOWNSTREAM = ROOT / "reports" / "embedded" / "freegen_downstream"
DOWNSTREAM_200 = ROOT / "reports" / "embedded" / "freegen_downstream_200"
# the same two 200-image sets with the larger segmenter (scale=b0, MiT-b0), pre-registered at five seeds per
# synthetic arm and three for the real one
DOWNSTREAM_B0 = ROOT / "reports" / "embedded" / "freegen_downstream_200_b0"
# the tiny segmenter with MMSegmentation's training pipeline (params.augment=mmseg), pre-registered at five seeds
# per synthetic arm and three for the real one, on the two 200-image sets synthesised again on the CPU (session 13)
DOWNSTREAM_MMSEG = ROOT / "reports" / "embedded" / "freegen_downstream_200_mmseg"
# exploratory, no bar verdict: the same with 4,000 steps, three seeds per synthetic arm and two real runs
DOWNSTREAM_MMSEG_4000 = ROOT / "reports" / "embedded" / "freegen_downstream_200_mmseg_4000"
# the fourth test of the bar, pre-registered after that look: augment=mmseg, 4,000 steps, fresh seeds (ten per
# synthetic arm, five real), the same CPU-synthesised sets
DOWNSTREAM_TEN = ROOT / "reports" / "embedded" / "freegen_downstream_200_mmseg_4000_ten"
# the fifth test, pre-registered: sets synthesised from the shapes captions (coco_cap replay of 1-3-shape train
# scenes, the real arm's own images) instead of one-shape voc_sim prompts; default recipe, ten seeds per
# synthetic arm, five real
DOWNSTREAM_CAPTIONS = ROOT / "reports" / "embedded" / "freegen_downstream_captions"
SETS = {DOWNSTREAM: ("synthetic/freegen_full", "synthetic/freegen_all_off"),
        DOWNSTREAM_200: ("/work/data/freegen_full200", "/work/data/freegen_all_off200"),
        DOWNSTREAM_B0: ("/work/data/freegen_full200", "/work/data/freegen_all_off200"),
        DOWNSTREAM_MMSEG: ("/work/data/freegen_full200_cpu", "/work/data/freegen_all_off200_cpu"),
        DOWNSTREAM_TEN: ("/work/data/freegen_full200_cpu", "/work/data/freegen_all_off200_cpu"),
        DOWNSTREAM_CAPTIONS: ("/work/data/freegen_full_cap200", "/work/data/freegen_all_off_cap200")}
# the 200-image protocol was pre-registered at three seeds and raised to ten, all reported, when three overlapped
SEEDS = {DOWNSTREAM: {"full": [0, 1, 2], "real": [0, 1, 2], "all_off": [0, 1, 2]},
         DOWNSTREAM_200: {"full": list(range(10)), "real": list(range(10)), "all_off": list(range(10))},
         DOWNSTREAM_B0: {"full": list(range(5)), "real": [0, 1, 2], "all_off": list(range(5))},
         DOWNSTREAM_MMSEG: {"full": list(range(5)), "real": [0, 1, 2], "all_off": list(range(5))},
         DOWNSTREAM_TEN: {"full": list(range(10, 20)), "real": list(range(10, 15)), "all_off": list(range(10, 20))},
         DOWNSTREAM_CAPTIONS: {"full": list(range(10)), "real": list(range(5)), "all_off": list(range(10))}}


FULL_VS_OFF = ("not reached on the embedded default: over ten training seeds, full FreeGen's 159 kept samples (the "
               "defaults, Stage 2 on) score 23.0 mIoU (t-interval [22.2, 23.8]) against the all-off set's 200 samples "
               "22.3 ([21.5, 23.2]): the paper's order, 0.6 apart (Welch p = 0.23), intervals overlapping; the tiny "
               "segmenter sits a few points above labelling every pixel background (14.5). With MiT-b0 (scale=b0, "
               "five seeds, pre-registered): 25.3 [23.7, 26.8] against 23.6 [20.0, 27.3], 1.7 apart (Welch p = 0.29), "
               "intervals overlapping. With MMSegmentation's training pipeline (augment=mmseg, five seeds, "
               "pre-registered, sets synthesised again on the CPU): 20.6 [19.9, 21.3] against 20.2 [19.6, 20.7]; the "
               "augmentation lowered every arm at 1,000 steps (real shapes 30.1 -> 20.5). At 4,000 steps with it "
               "(ten fresh seeds, pre-registered after a three-seed look that showed 27.0 against 20.9): 22.1 "
               "[20.2, 23.9] against 21.0 [19.6, 22.4], 1.1 apart (Welch p = 0.30). With sets synthesised from the "
               "shapes captions (multi-object scenes, the real arm's images; ten seeds, pre-registered): 24.4 "
               "[22.8, 26.0] against 24.4 [21.6, 27.1] (Welch p = 0.98), although full FreeGen's pseudo-masks "
               "score 61.1 mIoU (kept) against all off's 81.1: its Stage 2 gives every object of a scene one class. "
               "FreeGen's Stage 1 alone on those scenes (ASR + TFF, pseudo-masks 85.2 kept; pre-registered): 23.9 "
               "[21.8, 26.0] against the same all-off arm (Welch p = 0.75)")


def arm(name: str, report: Path = DOWNSTREAM_200) -> dict:
    """One arm of the protocol: per-training-seed mIoU (bootstrap intervals over the val images in the run) and
    the t-interval over the training seeds (ten; three until the first three overlapped: README)."""
    from bench.stats import t_interval

    rows = pd.read_csv(report / name / "results.csv")
    mean, _, low, high = t_interval(rows["mIoU"])
    return {"rows": rows, "mean": mean, "low": low, "high": high}


@pytest.mark.parametrize("report", [DOWNSTREAM, DOWNSTREAM_200, DOWNSTREAM_B0, DOWNSTREAM_MMSEG, DOWNSTREAM_TEN,
                                    DOWNSTREAM_CAPTIONS],
                         ids=["40", "200", "200-b0", "200-mmseg", "200-mmseg-4000-ten", "captions"])
def test_downstream_runs_are_the_protocol(report):
    """The committed arms evaluate the same 100 real val shapes with the same segmenter and differ only in the
    training data: FreeGen's kept samples, as many real rendered shapes, the all-off synthetic set."""
    configs = {a: yaml.safe_load((report / a / "config.yaml").read_text()) for a in ("full", "real", "all_off")}
    card = json.loads((report / "cards" / "full" / "dataset.json").read_text())
    full_root, off_root = SETS[report]
    assert configs["full"]["train"]["data"]["root"] == full_root
    assert configs["all_off"]["train"]["data"]["root"] == off_root
    assert configs["real"]["train"]["data"]["name"] == "shapes"
    assert configs["real"]["train"]["data"]["num_images"] == card["counts"]["kept"]
    for config in configs.values():
        assert config["data"] == configs["full"]["data"] and config["params"] == configs["full"]["params"]
    off = json.loads((report / "cards" / "all_off" / "dataset.json").read_text())
    assert off["params"]["rectify"] is False and off["params"]["tff"] is False and card["params"]["tff"] is True
    for name in ("full", "real", "all_off"):
        assert sorted(arm(name, report)["rows"]["train_seed"]) == SEEDS[report][name]


@pytest.mark.parametrize("report", [DOWNSTREAM_200, DOWNSTREAM_B0, DOWNSTREAM_MMSEG, pytest.param(
    DOWNSTREAM_TEN, marks=pytest.mark.xfail(strict=True, reason=(
        "not reached at 4,000 steps with the augmentation: real shapes 44.6 [26.9, 62.3] over five seeds (27.2-61.9) "
        "against full FreeGen's 22.1; the longer schedule lifts the real arm and not the synthetic ones"))),
    DOWNSTREAM_CAPTIONS], ids=["tiny", "b0", "mmseg", "mmseg-4000", "captions"])
def test_synthetic_trained_segmenter_is_within_10_miou_of_real(report):
    """The issue's bar: the segmenter trained on FreeGen's kept synthetic shapes scores within 10 mIoU of the
    same segmenter trained on as many real rendered shapes (means over the training seeds)."""
    full, real = arm("full", report), arm("real", report)
    assert full["mean"] >= real["mean"] - 10, (full["mean"], real["mean"])


@pytest.mark.xfail(strict=True, reason=FULL_VS_OFF)
@pytest.mark.parametrize("report", [DOWNSTREAM_200, DOWNSTREAM_B0, DOWNSTREAM_MMSEG, DOWNSTREAM_TEN, DOWNSTREAM_CAPTIONS],
                         ids=["tiny", "b0", "mmseg", "mmseg-4000", "captions"])
def test_full_freegen_beats_all_off_downstream(report):
    """The issue's bar (the paper's 69.6 vs 60.5 ordering): the segmenter trained on full FreeGen's set beats
    the one trained on the all-off set (raw cross-attention masks, no TFF) beyond the spread over training
    seeds: the t-intervals over the (ten) seeds do not overlap."""
    full, off = arm("full", report), arm("all_off", report)
    assert full["low"] > off["high"], (full, off)


def test_b0_report_is_the_larger_segmenter_on_the_same_sets():
    """The b0 arms differ from the tiny ones only in the encoder: same synthetic sets, same real count, same
    val images; every fit is a MiT-b0."""
    for name in ("full", "real", "all_off"):
        tiny = yaml.safe_load((DOWNSTREAM_200 / name / "config.yaml").read_text())
        b0 = yaml.safe_load((DOWNSTREAM_B0 / name / "config.yaml").read_text())
        assert b0["params"] == {**tiny["params"], "scale": "b0"}
        assert b0["train"]["data"] == tiny["train"]["data"] and b0["data"] == tiny["data"]
        for fit in (DOWNSTREAM_B0 / name / "fit").iterdir():
            assert json.loads((fit / "train_config.json").read_text())["setting"]["values"]["scale"] == "b0"


def test_mmseg_report_differs_from_the_tiny_one_by_the_augmentation_and_the_sets():
    """The augment=mmseg arms: the tiny arms' settings plus params.augment=mmseg, trained on the 200-image sets
    synthesised again on the CPU with the same commands (their cards: same prompts, seeds and parameters as the
    H100 sets', pseudo-mask quality within 0.1 mIoU); the real arm takes as many shapes as the new full set keeps."""
    for name in ("full", "real", "all_off"):
        tiny = yaml.safe_load((DOWNSTREAM_200 / name / "config.yaml").read_text())
        mmseg = yaml.safe_load((DOWNSTREAM_MMSEG / name / "config.yaml").read_text())
        assert mmseg["params"] == {**tiny["params"], "augment": "mmseg"} and mmseg["data"] == tiny["data"]
        for fit in (DOWNSTREAM_MMSEG / name / "fit").iterdir():
            assert json.loads((fit / "train_config.json").read_text())["setting"]["values"]["augment"] == "mmseg"
    for card in ("full", "all_off"):
        old = json.loads((DOWNSTREAM_200 / "cards" / card / "dataset.json").read_text())
        new = json.loads((DOWNSTREAM_MMSEG / "cards" / card / "dataset.json").read_text())
        assert new["params"] == old["params"] and new["seed"] == old["seed"]
        assert abs(new["pseudo_mask_quality"]["all"]["mIoU"] - old["pseudo_mask_quality"]["all"]["mIoU"]) < 0.1
    # the secondary arms (not the bar): flips only on the same new sets, separating the augmentation's effect
    full_root, off_root = SETS[DOWNSTREAM_MMSEG]
    for name, root in (("full_flip", full_root), ("all_off_flip", off_root)):
        config = yaml.safe_load((DOWNSTREAM_MMSEG / name / "config.yaml").read_text())
        assert config["params"].get("augment") == "none" and config["train"]["data"]["root"] == root
        assert sorted(arm(name, DOWNSTREAM_MMSEG)["rows"]["train_seed"]) == list(range(5))


def test_mmseg_4000_report_is_the_exploratory_run_it_says():
    """The longer-schedule look (README: no bar verdict drawn): the augment=mmseg arms' settings with steps=4000,
    on the same sets, seeds as written down before it ran."""
    full_root, off_root = SETS[DOWNSTREAM_MMSEG]
    seeds = {"full": [0, 1, 2], "all_off": [0, 1, 2], "real_s0": [0], "real_s1": [1]}
    for name, expected in seeds.items():
        config = yaml.safe_load((DOWNSTREAM_MMSEG_4000 / name / "config.yaml").read_text())
        assert config["params"] == {"classes": "all", "augment": "mmseg", "steps": 4000}
        root = config["train"]["data"].get("root")
        assert root == {"full": full_root, "all_off": off_root}.get(name, root)
        if name.startswith("real"):
            assert config["train"]["data"]["name"] == "shapes" and config["train"]["data"]["num_images"] == 161
        assert sorted(pd.read_csv(DOWNSTREAM_MMSEG_4000 / name / "results.csv")["train_seed"]) == expected
    assert "no bar verdict" in (DOWNSTREAM_MMSEG_4000 / "PREREG.md").read_text()


def test_ten_seed_report_is_the_pre_registered_schedule():
    """The fourth test of the bar: the exploratory 4,000-step settings (augment=mmseg, steps=4000) on the same
    CPU-synthesised sets, with seeds that run had not used."""
    for name in ("full", "real", "all_off"):
        config = yaml.safe_load((DOWNSTREAM_TEN / name / "config.yaml").read_text())
        assert config["params"] == {"classes": "all", "augment": "mmseg", "steps": 4000}
        for fit in (DOWNSTREAM_TEN / name / "fit").iterdir():
            values = json.loads((fit / "train_config.json").read_text())["setting"]["values"]
            assert values["augment"] == "mmseg" and values["steps"] == 4000 and values["train_seed"] >= 10


def test_caption_report_trains_on_the_real_arms_scenes():
    """The fifth test: both sets replay coco_cap's train scenes (the shapes captions, 1-3 shapes each) with the
    same commands but the all-off switches; FreeGen's ASR fit learned from the test split's scenes; the
    downstream arms use the default recipe."""
    cards = {n: json.loads((DOWNSTREAM_CAPTIONS / "cards" / n / "dataset.json").read_text())
             for n in ("full", "all_off")}
    for card in cards.values():
        assert card["data"] == {"name": "coco_cap", "limit": None, "split": "train", "num_images": 200, "size": 64}
        assert card["counts"]["synthesised"] == 200
    assert cards["full"]["params"]["egd"] is True and cards["all_off"]["params"]["egd"] is False
    assert all("train.split=test" in card["overrides"] for card in cards.values())
    for name in ("full", "real", "all_off"):
        config = yaml.safe_load((DOWNSTREAM_CAPTIONS / name / "config.yaml").read_text())
        assert config["params"] == {"classes": "all"}


# the sixth test, pre-registered: FreeGen's Stage 1 (learned ASR, TFF; params.egd=false) on the caption scenes,
# ten seeds in two runs (0-4, 5-9), against the fifth test's all-off and real arms
DOWNSTREAM_CAPTIONS_STAGE1 = ROOT / "reports" / "embedded" / "freegen_downstream_captions_stage1"


def stage1_arm() -> dict:
    from bench.stats import t_interval

    rows = pd.concat([pd.read_csv(DOWNSTREAM_CAPTIONS_STAGE1 / part / "results.csv")
                      for part in ("stage1_a", "stage1_b")])
    mean, _, low, high = t_interval(rows["mIoU"])
    return {"rows": rows, "mean": mean, "low": low, "high": high}


def test_stage1_caption_report_is_the_fifth_tests_full_set_without_stage_2():
    card = json.loads((DOWNSTREAM_CAPTIONS_STAGE1 / "cards" / "stage1" / "dataset.json").read_text())
    full = json.loads((DOWNSTREAM_CAPTIONS / "cards" / "full" / "dataset.json").read_text())
    assert card["params"] == {**full["params"], "egd": False} and card["data"] == full["data"]
    assert card["kept_ids"] == full["kept_ids"]  # the TFF scores Stage 1's masks in both pipelines
    assert sorted(stage1_arm()["rows"]["train_seed"]) == list(range(10))
    for part in ("stage1_a", "stage1_b"):
        config = yaml.safe_load((DOWNSTREAM_CAPTIONS_STAGE1 / part / "config.yaml").read_text())
        assert config["params"] == {"classes": "all"}
        assert config["train"]["data"]["root"] == "/work/data/freegen_stage1_cap200"


def test_stage1_on_caption_scenes_is_within_10_miou_of_real():
    assert stage1_arm()["mean"] >= arm("real", DOWNSTREAM_CAPTIONS)["mean"] - 10


@pytest.mark.xfail(strict=True, reason=FULL_VS_OFF)
def test_freegen_stage1_beats_all_off_on_caption_scenes():
    stage1, off = stage1_arm(), arm("all_off", DOWNSTREAM_CAPTIONS)
    assert stage1["low"] > off["high"], (stage1, off)
