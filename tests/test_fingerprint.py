"""Input fingerprints: a resume (and fit.from=) is refused in one line, naming what changed, when the model's weights
or the dataset's images or masks were replaced since the run started; unchanged inputs resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import write_voc

import bench.run
from bench.fingerprint import (
    FINGERPRINT_CACHE_ENV,
    HashCache,
    changed_inputs,
    file_hash,
    files_fingerprint,
    model_fingerprint,
    node_fingerprint,
)
from bench.run import main
from bench.rundir import STARTED, WORK

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "iseg_lambda.yaml"
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=20", "report.qualitative=0", "ray.num_actors=0",
         "sweep.lambda.grid=[0.01]"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(FINGERPRINT_CACHE_ENV, str(tmp_path / "fingerprints.db"))


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path):
    """The cache key holds the ctime and inode: a same-size rewrite that restores the mtime is still seen."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 10**10))  # old enough to be cached
    cache = HashCache()
    first = file_hash(path, cache=cache)
    assert file_hash(path, cache=cache) == first
    mtime = os.stat(path).st_mtime_ns
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(mtime, mtime))
    assert file_hash(path, cache=cache) != first
    cache.close()


def test_sampled_hashing_sees_a_replaced_head_and_a_changed_size(tmp_path, monkeypatch):
    import bench.fingerprint as fp

    monkeypatch.setattr(fp, "SAMPLE_ABOVE_BYTES", 100)
    path = tmp_path / "a.jpg"
    path.write_bytes(bytes(range(256)) * 2048)
    before = files_fingerprint({"a.jpg": path})
    assert before["mode"] == "sampled"
    path.write_bytes(b"\xff" + bytes(range(256)) * 2048)
    assert changed_inputs({"data": before}, {"data": files_fingerprint({"a.jpg": path})}) == [
        "the dataset: changed a.jpg"]


def test_hub_snapshots_are_named_by_their_commit(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--sd" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert model_fingerprint(snapshot) == {"kind": "hf", "repo": "org/sd", "commit": "a" * 40}


def test_node_probe_agrees_with_the_driver(tiny_model):
    assert node_fingerprint(str(tiny_model))["model"] == model_fingerprint(tiny_model)


def _interrupted(tmp_path, args, monkeypatch, capsys) -> Path:
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.run, "write_run", interrupted)
    assert main(args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    partial = tmp_path / "run.partial"
    assert json.loads((partial / WORK / STARTED).read_text())["inputs"]["model"]["kind"] == "files"
    return partial


def _refused(args, capsys, *names):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "changed since it started" in err[0], err
    for name in names:
        assert name in err[0], err[0]


def test_resume_with_replaced_weights_is_refused_and_unchanged_resumes(tmp_path, tiny_model, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    args = [str(SWEEP), *SMALL, f"model.path={model}", f"output_dir={tmp_path / 'run'}"]
    partial = _interrupted(tmp_path, args, monkeypatch, capsys)
    from tiny import save_tiny_folder

    other = save_tiny_folder(tmp_path / "other", seed=1)
    capsys.readouterr()  # its save's progress bar
    weights = "unet/diffusion_pytorch_model.safetensors"
    original = (model / weights).read_bytes()
    shutil.copy2(other / weights, model / weights)  # same size, another seed's weights
    assert (model / weights).stat().st_size == len(original)
    _refused(args, capsys, f"the model: changed {weights}")
    assert partial.is_dir()
    (model / weights).write_bytes(original)  # restored: the resume goes on
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["inputs"]["model"]["files"][weights][0] == len(original)


@pytest.mark.parametrize("what", ["image", "mask"])
def test_resume_with_replaced_images_or_masks_is_refused(what, tmp_path, tiny_model, monkeypatch, capsys):
    root = write_voc(tmp_path / "data")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"method: iseg\ndata: {{name: voc2012, root: {root}}}\nparams: {{background_words: ''}}\n")
    args = [str(sweep), f"model.path={tiny_model}", "ray.num_actors=0", "report.bootstrap=20",
            f"output_dir={tmp_path / 'run'}"]
    _interrupted(tmp_path, args, monkeypatch, capsys)
    voc = root / "VOC2012"
    if what == "image":
        name = "JPEGImages/2007_000002.jpg"
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(voc / name)
    else:
        name = "SegmentationClass/2007_000002.png"
        png = Image.open(voc / name)
        label = np.asarray(png).copy()
        label[:8] = 8
        out = Image.fromarray(label, mode="P")
        out.putpalette(png.getpalette())
        out.save(voc / name)
    _refused(args, capsys, "the dataset: changed", name)


def test_fit_from_a_run_fitted_on_other_weights_is_refused(tmp_path, tiny_model, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    source = tmp_path / "source"
    (source / "fit").mkdir(parents=True)
    args = ["method: linear_probe\n"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(args[0])
    from bench.config import compose, train_data_config
    from bench.fingerprint import input_fingerprints
    from bench.preflight import model_folder

    cfg = compose(sweep, [f"model.path={model}"])
    recorded = input_fingerprints(model_folder(cfg), cfg.data, [], train_data_config(cfg))
    (source / "run.json").write_text(json.dumps({"inputs": recorded}))
    from bench.errors import BenchError
    from bench.fingerprint import refuse_changed_fit_source

    refuse_changed_fit_source(source, recorded)  # the same inputs: accepted
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    now = input_fingerprints(model_folder(cfg), cfg.data, [], train_data_config(cfg))
    with pytest.raises(BenchError, match="fitted on other inputs .*vae/diffusion_pytorch_model.safetensors"):
        refuse_changed_fit_source(source, now)


def test_the_node_probe_compares_the_model_and_the_data_with_the_drivers(tmp_path, tiny_model, monkeypatch):
    """The per-node probe of a cluster run (bench.preflight._probe_node, run here in-process as a node whose
    working directory differs): the driver's folders pass; another copy at the same paths, with one weight file
    and one image replaced, is named input by input."""
    from bench.config import compose
    from bench.preflight import _probe_node, cluster_checks, preflight
    from bench.storage import Location

    shutil.copytree(tiny_model, tmp_path / "model")
    write_voc(tmp_path / "data")
    (tmp_path / "sweep.yaml").write_text("method: iseg\ndata: {name: voc2012, root: data}\n"
                                         "params: {background_words: ''}\n")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user gives them: the node resolves them as the driver does
    cfg = compose(tmp_path / "sweep.yaml", ["model.path=model", "ray.num_actors=0"])
    plan = preflight(cfg)
    checks = cluster_checks(cfg, plan, Location.of(tmp_path / "run"))
    assert sorted(c["fingerprint"]["key"] for c in checks if c.get("fingerprint")) == ["data", "model"]
    monkeypatch.chdir("/")
    assert all(r["ok"] for r in _probe_node(checks))
    weights = "unet/diffusion_pytorch_model.safetensors"
    data = bytearray((tmp_path / "model" / weights).read_bytes())
    data[-1] ^= 1  # same size, same names: only the content tells
    (tmp_path / "model" / weights).write_bytes(bytes(data))
    image = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000002.jpg"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(image)
    results = {c["fingerprint"]["key"]: r for c, r in zip(checks, _probe_node(checks)) if c.get("fingerprint")}
    assert results["model"] == {"ok": False, "other": True, "why": f"the model: changed {weights}"}
    assert not results["data"]["ok"] and results["data"]["other"]
    assert results["data"]["why"].startswith("the dataset: changed") and "2007_000002.jpg" in results["data"]["why"]
