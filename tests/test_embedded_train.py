"""The embedded-model trainer runs end to end and writes a folder the bench loads like a real SD checkpoint;
generated-image ground truth recovers rendered masks and rejects captions the image does not show."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from bench.data.shapes import CLASSES, ShapesDataset  # noqa: E402
from bench.models.layers import LayerMap  # noqa: E402
from bench.data.shapes_gt import check_generated, generated_ground_truth, object_masks, parse_caption  # noqa: E402

TINY = ["--seed", "0", "--size", "16", "--num-train-images", "16", "--vae-steps", "2", "--vae-batch", "4",
        "--steps", "2", "--batch", "4", "--channels", "8", "16", "16", "16"]


@pytest.fixture(scope="module", params=[1, 2], ids=["vae-factor-1", "vae-factor-2"])
def tiny_model(tmp_path_factory, request):
    from bench.embedded.train import main

    out = tmp_path_factory.mktemp("embedded") / "model"
    main([*TINY, "--out", str(out), "--vae-factor", str(request.param)])
    return out


def test_trained_folder_loads_through_load_pipeline_folder(tiny_model):
    from bench.embedded import build_tokenizer
    from bench.models import load_pipeline_folder

    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / part).exists(), part
    assert not tiny_model.with_name(tiny_model.name + ".partial").exists()
    assert not list(tiny_model.rglob("*.bin")) and list(tiny_model.rglob("*.safetensors"))
    bb = load_pipeline_folder(tiny_model, torch.device("cpu"), torch.float32, name="embedded")
    cfg = json.loads((tiny_model / "train_config.json").read_text())
    assert bb.resolution == 16 and bb.unet.config.sample_size == 16 // cfg["vae_factor"]
    assert bb.scheduler.config.prediction_type == "v_prediction"
    # Layout: attention only at levels 1 and 2 (--attention-levels default); the methods' roles resolve on it.
    layers = LayerMap(bb.unet)
    assert layers.levels("up") == layers.levels("down") == [2, 1] and layers.mid("cross")
    assert layers.decoder_self(-1) == "up_blocks.2.attentions.2.transformer_blocks.0.attn1"
    assert layers.sd_resolution("cross", "16", ("up",))[0].startswith("up_blocks.1.")
    captions = ["a red circle and a blue square", "an orange star", "a photograph of a dog", ""]
    ref = build_tokenizer(cfg["max_length"])
    assert bb.max_length == cfg["max_length"] == bb.text_encoder.config.max_position_embeddings
    for c in captions:
        assert bb.tokenize([c]).tolist() == ref([c], padding="max_length", max_length=cfg["max_length"],
                                                 truncation=True, return_tensors="pt").input_ids.tolist()
    latents = bb.encode_images([ShapesDataset(1, 16, 0)[0].image], bb.resolution)
    out = bb.unet(latents, torch.tensor([10]), encoder_hidden_states=bb.encode_text(["a red circle"])).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert cfg["seed"] == 0


def test_bad_arguments_exit_with_one_line_and_write_nothing(tmp_path, capsys):
    from bench.embedded.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--out", str(tmp_path / "model"), "--vae-factor", "3"])
    assert exit_info.value.code == 2
    assert "--vae-factor must be 1 or 2" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_training_is_deterministic(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from bench.embedded.train import main

    again = tmp_path / "again"
    factor = json.loads((tiny_model / "train_config.json").read_text())["vae_factor"]
    main([*TINY, "--out", str(again), "--vae-factor", str(factor)])
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tiny_model / part), load_file(again / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_shipped_weights_load_as_default_backbone():
    from bench.embedded import shipped_folder
    from bench.models import load_backbone

    if shipped_folder() is None:
        pytest.skip("no trained weights shipped")
    bb = load_backbone({"name": "embedded", "device": "cpu"})
    assert bb.name == "embedded" and bb.info.get("prediction_type") == "v_prediction"
    cfg = json.loads((shipped_folder() / "train_config.json").read_text())
    assert bb.resolution == cfg["size"] == cfg["vae_factor"] * bb.unet.config.sample_size


def test_parse_caption():
    assert parse_caption("a red circle and an orange star") == [("red", "circle"), ("orange", "star")]
    with pytest.raises(ValueError):
        parse_caption("a photograph of a dog")


@pytest.mark.parametrize("size", [64, 128])
def test_generated_ground_truth_recovers_rendered_masks(size):
    ds = ShapesDataset(num_images=30, size=size, seed=0, split="val")
    for i in range(len(ds)):
        s = ds[i]
        label, reason = generated_ground_truth(s.image, s.caption)
        assert reason is None, (s.caption, reason)
        fg = s.label > 0
        assert ((label == s.label) & fg).sum() / (fg | (label > 0)).sum() > 0.97
        masks = object_masks(s.extra["objects"], size)
        assert np.array_equal(np.any(masks, axis=0), fg)


def test_generated_ground_truth_rejects_mismatched_captions():
    ds = ShapesDataset(num_images=30, size=64, seed=0, split="val")
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        objects = s.extra["objects"]
        present = {o["colour"] for o in objects}
        missing = next(c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c not in present)
        caption = s.caption + f" and a {missing} circle"
        assert check_generated(s.image, caption) is not None
        # the right colour with the wrong shape
        o = objects[0]
        wrong = next(x for x in ("circle", "square", "triangle", "star", "cross")
                     if x != o["shape"])
        bad = s.caption.replace(f"{o['colour']} {o['shape']}", f"{o['colour']} {wrong}", 1)
        if len([p for p in objects if p["colour"] == o["colour"]]) == 1:
            assert check_generated(s.image, bad) is not None, bad
            checked += 1
        # an object the image shows but the caption omits
        if len(objects) > 1:
            assert check_generated(s.image, s.caption.split(" and ")[0]) is not None
    assert checked > 10
    assert CLASSES[0] == "background"


def test_checkpoints_survive_the_final_save(tmp_path):
    from bench.embedded.train import main

    out = tmp_path / "model"
    main([*TINY, "--out", str(out), "--checkpoint-every", "1"])
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (tmp_path / "model.partial").exists()
