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

from bench.data.shapes import CLASSES, ShapesDataset
from bench.models.layers import LayerMap
from bench.data.shapes_gt import check_generated, generated_ground_truth, object_masks, parse_caption

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


# -- the v3 recipe's machinery: warm start across layouts, wall-clock budgets, resumable state ------------------------
V3_TINY = [*TINY, "--attention-levels", "0", "1", "2", "--max-length", "77", "--warmup", "30"]


def _weights(folder):
    from safetensors.torch import load_file

    return {part: load_file(folder / part) for part in ("unet/diffusion_pytorch_model.safetensors",
                                                        "text_encoder/model.safetensors",
                                                        "vae/diffusion_pytorch_model.safetensors")}


def test_v3_context_holds_every_prompt_uncut():
    """The v3 text context holds the longest prompt the methods build (iSeg's template over the 20 VOC
    classes), while v2's 16 positions cut even iSeg's prompt over the five shapes."""
    from bench.embedded.train import RECIPES, prompt_lengths

    lengths = prompt_lengths()
    assert max(lengths.values()) <= RECIPES["v3"]["max_length"], max(lengths.items(), key=lambda kv: kv[1])
    iseg_shapes = "A photograph of circle and square and triangle and star and cross and other objects and background"
    assert lengths[iseg_shapes] > 16


def test_warm_start_adds_attention_as_identity(tiny_model):
    """A v3 layout warm-started from a v2 folder computes the v2 UNet's function (new attention blocks start as
    identity), keeps its VAE, and its text positions begin with v2's."""
    from bench.embedded import build_tokenizer
    from bench.embedded.train import DEFAULTS, build_models, load_init, warm_start

    src_cfg = json.loads((tiny_model / "train_config.json").read_text())
    cfg = DEFAULTS | src_cfg | {"attention_levels": [0, 1, 2], "max_length": 77}
    models = build_models(cfg, build_tokenizer(77))
    counts = warm_start(models, tiny_model)
    assert counts["unet"]["new"] > 0 and counts["text_encoder"]["grown"] == 1, counts
    source = load_init(tiny_model)
    for m in (*models.values(), *source.values()):
        if isinstance(m, torch.nn.Module):
            m.eval()
    latent = src_cfg["size"] // src_cfg["vae_factor"]
    x, t = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = source["text_encoder"](torch.tensor([[0, 5, 9, 1] + [1] * 12] * 2))[0]
    with torch.no_grad():
        same = models["unet"](x, t, encoder_hidden_states=cond).sample
        ref = source["unet"](x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(same, ref, atol=1e-5), (same - ref).abs().max()
    pos = next(k for k in source["text_encoder"].state_dict() if k.endswith("position_embedding.weight"))
    assert torch.equal(models["text_encoder"].state_dict()[pos][:16], source["text_encoder"].state_dict()[pos])
    vae_a, vae_b = models["vae"].state_dict(), source["vae"].state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_b)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Stopped after 2 of 4 steps with its state saved, then resumed: the same weights as 4 steps at once."""
    from bench.embedded.train import main
    from bench.embedded.train_state import read_meta

    main([*V3_TINY, "--steps", "4", "--out", str(tmp_path / "straight")])
    main([*V3_TINY, "--steps", "4", "--stop-after", "2", "--out", str(tmp_path / "half"),
          "--state-dir", str(tmp_path / "state")])
    meta = read_meta(tmp_path / "state")
    assert (meta["step"], meta["total_steps"]) == (2, 4) and meta["config"]["max_length"] == 77
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "adam_m.safetensors", "adam_v.safetensors", "ema.safetensors", "model.safetensors"]
    main(["--resume", str(tmp_path / "state"), "--stop-after", "0", "--out", str(tmp_path / "resumed")])
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    main(["--export-state", str(tmp_path / "state"), "--out", str(tmp_path / "exported")])
    c, d = _weights(tmp_path / "exported"), _weights(tmp_path / "half")  # the EMA pipeline at step 2
    for part in c:
        assert all(torch.equal(c[part][k], d[part][k]) for k in c[part]), part


def test_resume_refuses_another_recipe(tmp_path, capsys):
    from bench.embedded.train import main

    main([*V3_TINY, "--steps", "2", "--stop-after", "1", "--out", str(tmp_path / "m"), "--state-dir",
          str(tmp_path / "state")])
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(tmp_path / "state"), "--lr", "0.1", "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 2
    assert "drop --lr" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "again").exists()
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path / "m"), "--out", str(tmp_path / "again")])  # not a state folder
    assert not (tmp_path / "again").exists()


def test_time_budget_sizes_the_schedule_and_writes_states(tmp_path, caplog, monkeypatch):
    """--steps 0: the schedule's length comes from the measured step time and ends with the budget (the probe
    shortened to steps 1-3, so that a loaded machine still reaches it within the test's budget)."""
    import logging

    from bench.embedded import train as train_module
    from bench.embedded.train import main
    from bench.embedded.train_state import read_meta

    monkeypatch.setattr(train_module, "PROBE", (1, 3))
    PROBE = train_module.PROBE
    with caplog.at_level(logging.INFO, logger="bench.embedded.train"):
        main([*V3_TINY, "--steps", "0", "--time-budget", "4", "--state-every", "1", "--out", str(tmp_path / "m"),
              "--state-dir", str(tmp_path / "state")])
    meta = read_meta(tmp_path / "state")
    assert meta["total_steps"] > PROBE[1] and meta["step"] <= meta["total_steps"]
    assert any("the schedule spans" in r.message for r in caplog.records)
    assert (tmp_path / "m" / "model_index.json").is_file()
    cfg = json.loads((tmp_path / "m" / "train_config.json").read_text())
    assert cfg["steps"] == 0 and cfg["time_budget"] == 4


def test_main_job_scores_a_sweep_on_a_model_folder(tiny_model):
    """`evaluate --main-job`: every configuration of the sweep scored with mIoU and its tied-label share."""
    from bench.embedded.evaluate import main_job

    report = main_job(tiny_model, "sweeps/iseg_lambda.yaml", ["data.limit=2"])
    assert report["images"] == 2 and [r["lambda"] for r in report["rows"]] == [0, 0.001, 0.005, 0.01, 0.05, 0.1]
    assert all(0 <= r["mIoU"] <= 100 and (np.isnan(r["tied"]) or 0 <= r["tied"] <= 100) for r in report["rows"])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two calls, each evaluating two models on the CPU: ~5 min each on a loaded 2-core machine
def test_gpu_lease_script_trains_resumes_and_evaluates_on_the_cpu(tmp_path):
    """bench/embedded/gpu_lease.sh end to end on the CPU with a tiny v3 (a 400-step schedule cut by a few seconds'
    budget, then resumed by a second call from the returned state): weights, state, report."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    from bench.embedded.train_state import read_meta

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LEASE_DEVICE": "cpu",
           "LEASE_LIMIT": "400", "LEASE_EVAL_RESERVE": "250", "LEASE_BUDGET": "6",
           "LEASE_TRAIN_ARGS": "--channels 8 16 16 16 --heads 2 --batch 2 --num-train-images 32 --render-workers 1 "
                               "--steps 400 --state-every 2",
           "LEASE_EVAL_ARGS": "--num-images 1 --t 100 --generate 1 --main-job-override data.limit=1"}
    states = []
    for call, resume in (("first", ""), ("second", str(tmp_path / "first" / "state"))):
        out = tmp_path / call
        done = subprocess.run(["bash", "bench/embedded/gpu_lease.sh"], cwd=root, capture_output=True, text=True,
                              env=env | {"OUT": str(out), "LEASE_RESUME": resume}, timeout=800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert len(list(out.rglob("*"))) <= 9  # at most 8 files (+ the state folder) come back from a lease
        report = json.loads((out / "report.json").read_text())
        assert report["v3"]["main_job"]["rows"] and report["baseline"]["main_job"]["rows"]
        assert "accepted" in report["v3"]["generation"] and report["v3"]["inversion"][0]["binding"]
        with tarfile.open(out / "weights.tar") as tar:
            assert "v3/model_index.json" in tar.getnames()
        states.append(read_meta(out / "state"))
    assert 0 < states[0]["step"] < states[1]["step"] <= states[1]["total_steps"] == 400
    assert "resumed from" in (tmp_path / "second" / "lease.log").read_text()
