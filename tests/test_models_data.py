"""Backbone loading (tiny pipelines saved from configs) and the datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import build_dataset
from bench.errors import BenchError
from bench.models import load_backbone, validate_model_config


@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory):
    """A diffusers SD folder saved from the embedded configs (the get_dummy_components pattern)."""
    from diffusers import StableDiffusionPipeline

    from bench.embedded import build_components

    folder = tmp_path_factory.mktemp("tiny-sd")
    parts = build_components(seed=3)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, parts


def test_load_local_diffusers_folder(tiny_pipeline_folder):
    folder, parts = tiny_pipeline_folder
    backbone = load_backbone({"path": str(folder), "device": "cpu"})
    assert backbone.dtype == torch.float32
    assert backbone.resolution == 512
    for name, p in backbone.unet.state_dict().items():
        assert torch.equal(p, parts["unet"].state_dict()[name])
    ids = backbone.tokenize(["a red circle"])[0].tolist()
    assert ids == parts["tokenizer"](["a red circle"], padding="max_length", max_length=77).input_ids[0]


def test_pickle_weights_are_refused(tiny_pipeline_folder, tmp_path):
    import shutil

    folder, _ = tiny_pipeline_folder
    copy = tmp_path / "pickled"
    shutil.copytree(folder, copy)
    for f in copy.rglob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(BenchError, match="safetensors"):
        load_backbone({"path": str(copy), "device": "cpu"})


def test_generation_uses_the_folders_own_scheduler(tiny_pipeline_folder, tmp_path):
    """A folder saved with PNDM (SD 1.x) generates with PNDM unless `scheduler=` names another;
    the provenance helper names the class without loading weights."""
    import shutil

    from diffusers import PNDMScheduler

    from bench.forward import ForwardSetting, run_traced
    from bench.models import scheduler_name
    from bench.capture import request

    folder, parts = tiny_pipeline_folder
    copy = tmp_path / "pndm"
    shutil.copytree(folder, copy)
    PNDMScheduler.from_config(parts["scheduler"].config, skip_prk_steps=True).save_pretrained(copy / "scheduler")
    backbone = load_backbone({"path": str(copy), "device": "cpu"})
    assert type(backbone.scheduler).__name__ == "PNDMScheduler"
    assert scheduler_name({"path": str(copy)}) == "PNDMScheduler"
    assert scheduler_name({"path": str(copy)}, "ddim") == "DDIMScheduler"
    req = request(cross=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"])
    runs = {}
    for name in ("auto", "pndm", "ddim"):
        setting = ForwardSetting(mode="generation", steps=3, size=64, scheduler=name)
        runs[name] = run_traced(backbone, req, setting, ["a red circle"]).traces[0].timesteps
    want = PNDMScheduler.from_config(parts["scheduler"].config, skip_prk_steps=True)  # as SD 1.5 saves it
    want.set_timesteps(3)
    assert runs["auto"] == runs["pndm"] == [int(t) for t in want.timesteps]
    assert runs["ddim"] != runs["auto"]
    with pytest.raises(BenchError, match="scheduler"):
        backbone.make_scheduler("nonsense")


def test_missing_weights_folder_names_where_weights_are_expected(tmp_path):
    with pytest.raises(BenchError, match="model_index.json"):
        validate_model_config({"path": str(tmp_path / "nope")})


def test_hub_id_outside_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BenchError, match="local Hugging Face cache"):
        validate_model_config({"id": "stabilityai/stable-diffusion-2-1-base"})


def test_shapes_is_deterministic_and_pixel_exact():
    a = build_dataset({"name": "shapes", "size": 96, "limit": 4})
    b = build_dataset({"name": "shapes", "size": 96, "num_images": 50})
    assert len(a) == 4
    for i in range(4):
        assert np.array_equal(a[i].image, b[i].image) and np.array_equal(a[i].label, b[i].label)
        sample = a[i]
        assert sample.image.shape == (96, 96, 3) and sample.label.shape == (96, 96)
        names = {a.classes[c] for c in sample.present_class_ids()}
        assert names <= set(sample.caption.split()), (names, sample.caption)
        assert 1 <= len(sample.extra["objects"]) <= 3
        # every labelled pixel has the object's colour: masks come from the same polygons
        from bench.data.shapes import COLOURS

        for obj in sample.extra["objects"]:
            cls = a.classes.index(obj["shape"])
            pixels = sample.image[sample.label == cls]
            colours = {tuple(COLOURS[o["colour"]]) for o in sample.extra["objects"] if o["shape"] == obj["shape"]}
            assert all(tuple(p) in colours for p in pixels[:50])
    other_split = build_dataset({"name": "shapes", "size": 96, "split": "train"})
    assert not np.array_equal(other_split[0].image, a[0].image)


def make_voc(root, ids, split="val"):
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [0] * 768
    for i, image_id in enumerate(ids):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        label = np.zeros((20, 30), np.uint8)
        label[5:10, 5:10] = 15  # person
        label[0, :] = 255
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_voc_layout(tmp_path):
    make_voc(tmp_path, ["2007_000001", "2007_000002"])
    ds = build_dataset({"name": "voc2012", "root": str(tmp_path / "VOCdevkit"), "limit": 1})
    assert len(ds) == 1 and len(ds.classes) == 21
    sample = ds[0]
    assert sample.present_class_ids() == [15]
    assert sample.label[0, 0] == 255 and sample.image.shape == (20, 30, 3)


def test_missing_dataset_root_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="VOC 2012"):
        build_dataset({"name": "voc2012", "root": str(tmp_path / "missing")})
