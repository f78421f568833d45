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
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from bench.data import build_dataset
from bench.fitting import LocalFitContext
from bench.run import main
from bench.synthesize import voc_palette
from bench.capture import Trace
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
