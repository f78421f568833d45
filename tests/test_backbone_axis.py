"""The backbone as a sweep axis (`models:`, bench.backbones): the plan groups backbone outermost and hashes each
backbone's fits with its model; a run loads each backbone once and resumes an interrupted backbone, finished
backbones untouched; a bad entry is one line naming it, before anything is written; the report's method x
backbone table labels a random-weight backbone and escapes user strings."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.config import compose
from bench.errors import BenchError
from bench.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "sweeps" / "methods_by_backbone.yaml")


@pytest.fixture(scope="module")
def two_tiny(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """Two tiny SD folders of different weights and names (labels tiny-a, tiny-b)."""
    from tiny import save_tiny_folder

    base = tmp_path_factory.mktemp("axis")
    first = base / "tiny-a"
    shutil.copytree(tiny_model, first)
    return first, save_tiny_folder(base / "tiny-b", seed=1)


def test_plan_puts_the_backbone_outermost_and_hashes_fits_per_backbone(two_tiny):
    a, b = two_tiny
    cfg = compose(SWEEP, [f"models={a},{b}", "data.limit=1"])
    plan = make_plan(cfg)
    per = len(plan.trials) // 2
    assert [label for label, _ in plan.backbones] == ["tiny-a", "tiny-b"]
    assert [t.swept["model"] for t in plan.trials] == ["tiny-a"] * per + ["tiny-b"] * per
    assert [t.params for t in plan.trials[:per]] == [t.params for t in plan.trials[per:]]  # one protocol
    labels = [g.model for g in plan.groups]
    assert labels == sorted(labels) and plan.first_group("tiny-b") == labels.index("tiny-b")  # contiguous
    assert all(g.key.startswith(f"model={g.model},") for g in plan.groups)
    assert [sub.model.path for _, sub in plan.backbones] == [str(a), str(b)]
    probe = compose(str(ROOT / "sweeps" / "linear_probe.yaml"), [f"models={a},{b}"])
    fits = make_plan(probe).fits
    assert [u.model for u in fits] == ["tiny-a", "tiny-b"] and fits[0].hash != fits[1].hash
    assert fits[0].setting == fits[1].setting


def test_entries_resolve_to_a_registered_name_a_folder_a_stored_folder_or_a_hub_id(two_tiny):
    from bench.backbones import resolve_entry

    a, _ = two_tiny
    assert resolve_entry("embedded").options == {"name": "embedded", "path": None, "id": None}
    assert resolve_entry(str(a)).options == {"path": str(a), "id": None}
    stored = resolve_entry("s3://lab-models/sd/sdxl-base/")  # each node copies it (bench.node_cache)
    assert stored.options == {"path": "s3://lab-models/sd/sdxl-base/", "id": None} and stored.label == "sdxl-base"
    assert resolve_entry("org/some-model").options == {"path": None, "id": "org/some-model"}


def test_bad_entries_are_refused_naming_them(two_tiny, tmp_path):
    a, b = two_tiny
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match=r"^models entry .*empty: model.path=.*empty is not a diffusers pipeline"):
        compose(SWEEP, [f"models=embedded,{tmp_path / 'empty'}"])
    with pytest.raises(BenchError, match=r"^models entry no-such/model: "):
        compose(SWEEP, ["models=embedded,no-such/model"])
    twin = tmp_path / "other" / "tiny-a"
    shutil.copytree(a, twin)
    with pytest.raises(BenchError, match="share the label tiny-a"):
        compose(SWEEP, [f"models={a},{twin}"])
    with pytest.raises(BenchError, match="drop model.path"):
        compose(SWEEP, [f"models={a}", f"model.path={b}"])
    with pytest.raises(BenchError, match="search.algo searches one backbone"):
        compose(str(ROOT / "sweeps" / "daam_threshold_search.yaml"), [f"models={a},{b}"])
    from bench.stages.synthesis import synthesis_params

    with pytest.raises(BenchError, match="a synthesis runs on one backbone"):
        synthesis_params(compose(str(ROOT / "sweeps" / "freegen_synthesis.yaml"), [f"models={a},{b}"]))


def test_a_bad_entry_is_one_line_and_exit_2_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "bench.run", SWEEP, f"models=embedded,{tmp_path / 'empty'}",
                           f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"error: models entry {tmp_path / 'empty'}: ")
    assert not out.exists() and not out.with_name("run.partial").exists()


class _Interrupt(RuntimeError):
    pass


def test_each_backbone_loads_once_and_an_interrupted_backbone_resumes(two_tiny, tmp_path, monkeypatch):
    """ray.execution=driver, one image per batch: the first invocation fails on tiny-b's second image; the
    resumed one loads tiny-b only (tiny-a's images are all sharded) and traces its missing images; the
    results equal an undisturbed run's."""
    import bench.stages.trace as trace
    from bench.run import run

    a, b = two_tiny
    loads, batches = [], []
    real_load, real_batch = trace.load_backbone, trace.evaluate_batch

    def counting_load(cfg):
        loads.append(Path(cfg["path"]).name)
        return real_load(cfg)

    def failing_batch(method, *args, **kwargs):
        batches.append(loads[-1])
        if fail_at is not None and len(batches) == fail_at:
            raise _Interrupt("the machine went away")
        return real_batch(method, *args, **kwargs)

    monkeypatch.setattr(trace, "load_backbone", counting_load)
    monkeypatch.setattr(trace, "evaluate_batch", failing_batch)
    args = [f"models={a},{b}", "data=shapes", "data.limit=3", "params.mode=inversion",
            "sweep.method=[daam,whole_image]", "ray.execution=driver", "ray.batch_size=1", "report.bootstrap=0",
            "report.qualitative=0"]
    out = tmp_path / "run"
    fail_at = 5  # tiny-a: batches 1-3; tiny-b: batch 4 done, 5 fails
    with pytest.raises(BenchError, match="the machine went away.*resume with"):
        run(SWEEP, [*args, f"output_dir={out}"])
    assert loads == ["tiny-a", "tiny-b"]
    loads.clear()
    fail_at = None
    run(SWEEP, [*args, f"output_dir={out}"])
    assert loads == ["tiny-b"] and batches[5:] == ["tiny-b", "tiny-b"]  # only tiny-b's two missing images
    resumed = pd.read_csv(out / "results.csv")
    loads.clear()
    run(SWEEP, [*args, f"output_dir={tmp_path / 'whole'}"])
    assert loads == ["tiny-a", "tiny-b"]
    whole = pd.read_csv(tmp_path / "whole" / "results.csv")
    assert sorted(resumed["model"].unique()) == ["tiny-a", "tiny-b"] and len(resumed) == 4
    assert resumed["mIoU"].map(math.isfinite).all()
    pd.testing.assert_frame_equal(resumed, whole)
    prov = json.loads((out / "run.json").read_text())
    assert prov["backbones"] == {"tiny-a": {"entry": str(a), "family": "sd", "random_weights": False},
                                 "tiny-b": {"entry": str(b), "family": "sd", "random_weights": False}}


def test_report_labels_random_weight_backbones_and_escapes_paths(tmp_path):
    """The report of a sweep over models (results as the engine writes them): the method x backbone table, a
    random-weight column labelled in the table, the plot's caption and a warning; a path's markup escaped."""
    from bench.reporting import write_report

    from bench.frozen import thaw

    composed = compose(SWEEP, ["models=embedded"])
    cfg = {**composed.as_dict(), "sweep": thaw(composed.swept)}  # as the run ran it: compare's default sweep
    cfg["models"] = ["embedded", "/m/<b>x"]
    rows = [{"trial": f"t{k:04d}", "seed": 0, "model": model, "method": method, "mIoU": value, "aAcc": value,
             "mAcc": value}
            for k, (model, method, value) in enumerate([("embedded", "daam", 50.0), ("embedded", "iseg", 60.0),
                                                        ("b-x", "daam", 10.0), ("b-x", "iseg", 12.0)])]
    prov = {"backbones": {"embedded": {"entry": "embedded", "family": "sd", "random_weights": False},
                          "b-x": {"entry": "/m/<b>x", "family": "sd3", "random_weights": True}},
            "dataset": {"name": "voc_sim", "classes": ["background", "circle"]}}
    write_report(tmp_path, cfg, pd.DataFrame(rows), prov)
    table = pd.read_csv(tmp_path / "by_backbone.csv", index_col="method")
    assert list(table.columns) == ["embedded (sd)", "b-x (sd3) [random weights]"]
    assert table.loc["iseg"].tolist() == [60.0, 12.0] and table.loc["daam"].tolist() == [50.0, 10.0]
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "## By backbone" in md and (tmp_path / "by_backbone.png").is_file()
    assert "has random weights: its column tests the plumbing only; no conclusion is drawn from it" in md
    assert "b-x: sd3 — RANDOM WEIGHTS" in md and "models=embedded, /m/<b>x" in md  # the provenance names them
    assert "/m/&lt;b&gt;x" in page and "/m/<b>x" not in page
