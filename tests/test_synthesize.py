"""`python -m bench.synthesize` end to end on tiny random components (in-process): the VOC-layout dataset the
`voc2012` loader reads, its card, resumption without regenerating finished images, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench.stages.synthesis
from bench.data import build_dataset
from bench.synthesize import main

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "freegen_synthesis.yaml"
SMALL = ["data.seeds_per_class=1", "data.size=32", "params.steps=3", "ray.batch_size=2", "params.asr_epochs=2",
         "params.egd_epochs=2", "params.egd_dim=16", "params.egd_queries=2", "params.egd_layers=1"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_voc_dataset(out: Path):
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"synthesised": 5, "kept": 5, "filtered": 0}
    voc = build_dataset({"name": "voc2012", "root": str(out), "split": "train"})
    assert len(voc) == 5 and voc[0].label.shape == (32, 32)


@pytest.mark.slow
def test_synthesis_on_the_ray_actor_pool(tmp_path, tiny_model, capsys, ray_session):
    out = tmp_path / "synthetic"
    code, stdout, stderr = cli(capsys, SWEEP, *SMALL, f"model.path={tiny_model}", "ray.num_actors=1",
                               "params.tff_threshold=1.0", f"output_dir={out}")
    assert code == 0, stderr[-3000:]
    check_voc_dataset(out)


@pytest.mark.slow  # a Ray Train fit inside (20-40 s on 2 cores): beyond the fast suite's per-test share
def test_synthesis_writes_a_voc_dataset_the_loader_reads(tmp_path, tiny_model, capsys, monkeypatch, ray_session):
    """The paper's defaults: learned ASR, then the EGD with HST, fitted first by the fit stage (Ray Train, as in
    bench.run) and kept in the folder. Where a local pool would hold one actor (one GPU, two CPU cores),
    `ray.execution=auto` generates in this process."""
    import bench.env

    monkeypatch.setattr(bench.env, "local_slots", lambda use_gpu: 1)
    out = tmp_path / "synthetic"
    code, stdout, stderr = cli(capsys, SWEEP, *SMALL, f"model.path={tiny_model}", "params.tff_threshold=1.0",
                               f"output_dir={out}")
    assert code == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    assert not (tmp_path / "synthetic.partial").exists() and not (out / "work").exists()
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"synthesised": 5, "kept": 5, "filtered": 0}
    assert [s["prompt"] for s in card["samples"]][:2] == ["A photograph of a circle", "A photograph of a square"]
    assert card["pseudo_mask_quality"]["all"]["images"] == 5 and 0 <= card["pseudo_mask_quality"]["all"]["mIoU"] <= 100
    assert card["throughput"]["images_per_second"] > 0
    assert (card["throughput"]["execution"], card["throughput"]["actors"]) == ("driver", 0)
    # asr=learned: fitted on the training split before generating, in the folder as in a run directory
    fit_dir = out / card["fit"]
    assert (fit_dir / "weights.safetensors").is_file() and (fit_dir / "done").is_file()
    fit = json.loads((fit_dir / "train_config.json").read_text())
    assert fit["setting"]["values"]["asr"] == "learned" and fit["setting"]["values"]["egd"] is True
    series = [line.split(",")[0] for line in (fit_dir / "loss.csv").read_text().splitlines()[1:]]
    assert series[-2:] == ["egd+hst", "egd+hst"]  # ASR, EGD, then HST
    voc = build_dataset({"name": "voc2012", "root": str(out), "split": "train"})
    assert len(voc) == 5 and voc.classes[:2] == ["background", "circle"]  # the card's classes, not VOC's
    sample = voc[0]
    assert sample.image.shape == (32, 32, 3) and sample.label.shape == (32, 32)
    assert set(np.unique(sample.label)) <= {0, 1, 2, 3, 4, 5, 255}
    png = Image.open(out / "SegmentationClass" / f"{voc.ids[0]}.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC's colour map
    assert len(build_dataset({"name": "voc2012", "root": str(out), "split": "all"})) == 5


@pytest.mark.slow  # a Ray Train fit inside (20-40 s on 2 cores): beyond the fast suite's per-test share
def test_tff_filter_and_resume_without_regenerating(tmp_path, tiny_model, capsys, monkeypatch):
    out = tmp_path / "synthetic"
    args = [SWEEP, *SMALL, f"model.path={tiny_model}", "ray.num_actors=0", "params.tff_threshold=0.0",
            "params.egd=false", f"output_dir={out}"]  # the EGD would have no TFF-kept sample to learn from
    generated = []
    real_call = bench.stages.synthesis.SynthesisWorker.__call__

    def counting(self, batch):
        generated.extend(int(i) for i in batch["index"])
        return real_call(self, batch)

    monkeypatch.setattr(bench.stages.synthesis.SynthesisWorker, "__call__", counting)
    real_write = bench.stages.synthesis.write_images
    calls = []

    def interrupted_before_the_second(folder, cfg, batch):  # the first batch is written and sharded
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(folder, cfg, batch)

    monkeypatch.setattr(bench.stages.synthesis, "write_images", interrupted_before_the_second)
    code, _, _ = cli(capsys, *args)
    assert code == 130 and (tmp_path / "synthetic.partial").is_dir() and not out.exists()
    assert generated == [0, 1, 2, 3]
    monkeypatch.setattr(bench.stages.synthesis, "write_images", real_write)
    code, stdout, stderr = cli(capsys, *[a for a in args if a != "params.tff_threshold=0.0"], "params.tff_threshold=0.5")
    assert code == 2 and "another configuration" in stderr  # a changed configuration is refused
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr[-3000:]
    assert generated == [0, 1, 2, 3, 2, 3, 4]  # the first batch was not generated again
    card = json.loads((out / "dataset.json").read_text())
    # threshold 0: every sample whose masks move at all over the K steps is filtered
    moved = [s["id"] for s in card["samples"] if s["tff"] > 0]
    assert card["filtered_ids"] == moved and card["counts"]["kept"] == 5 - len(moved)
    kept = (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert kept == [s["id"] for s in card["samples"] if s["tff"] == 0]


BAD = {
    "a sweep": ("sweep:\n  fg_threshold: [0.5, 0.6]\n", [], "one configuration"),
    "not a synthesiser": (None, [], "does not synthesise"),
    "inversion": ("", ["params.mode=inversion"], "params.mode=generation"),
    "unknown parameter": ("", ["params.tff_kk=3"], "did you mean"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    extra, overrides, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "synth.yaml"
    other_method = "name: x\nmethod: daam\ndata: {name: voc_sim, size: 32}\nparams: {mode: generation}\n"
    sweep.write_text(SWEEP.read_text() + extra if extra is not None else other_method)
    code, _, stderr = cli(capsys, sweep, *overrides, f"output_dir={tmp_path / 'out'}")
    assert code == 2
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth.yaml"]


def test_usage(capsys):
    code, stdout, _ = cli(capsys)
    assert code == 2 and "usage: python -m bench.synthesize" in stdout


def test_no_fit_where_the_configuration_ignores_it(tmp_path, tiny_model, capsys):
    """Table 6's all-off row (rectify=false) reads no ASR, so synthesis does not fit one; asr=init needs none
    (without the EGD, which is fitted)."""
    for name, extra in (("off", "params.rectify=false"), ("init", "params.asr=init")):
        out = tmp_path / name
        code, _, stderr = cli(capsys, SWEEP, *SMALL, f"model.path={tiny_model}", "ray.num_actors=0", extra,
                              "params.egd=false", "data.limit=2", f"output_dir={out}")
        assert code == 0, stderr[-3000:]
        assert (out / "dataset.json").is_file() and not (out / "fit").exists()
