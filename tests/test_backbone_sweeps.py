"""Sweeps on the tiny random-weight families, run as a user runs them (slow): `sweeps/methods_compare.yaml` with
`model.path=` exits 0 with a finite row per method on SDXL, SD3.5 and Flux, and records the family and the
random weights in run.json; `sweeps/methods_by_backbone.yaml` with `models=` runs on the embedded default plus a
tiny family in one run, a finite row per method x backbone, and its report's method x backbone table labels the
random-weight backbone."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tiny import save_tiny_family

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.limit=2", "params.steps=2", "ray.execution=driver"]


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_methods_compare_runs_on_each_tiny_family(tmp_path, family):
    folder = save_tiny_family(family, tmp_path / family)
    out = tmp_path / "run"
    done = _run("bench.run", ["sweeps/methods_compare.yaml", f"model.path={folder}", *FAST,
                              f"output_dir={out}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(out / "results.csv")
    assert {"daam", "attn2mask", "ovam", "iseg"} <= set(rows["method"])
    assert all(math.isfinite(v) for v in rows["mIoU"])
    prov = json.loads((out / "run.json").read_text())
    assert prov["backbone"] == {"family": family, "random_weights": True}
    assert "RANDOM WEIGHTS" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("execution", ["driver", "actors"])
def test_methods_by_backbone_on_the_embedded_default_and_a_tiny_family(tmp_path, execution):
    folder = save_tiny_family("sd3", tmp_path / "tiny-sd3")
    out = tmp_path / "by"
    done = _run("bench.run", ["sweeps/methods_by_backbone.yaml", f"models=embedded,{folder}", "data.limit=2",
                              "params.steps=2", f"ray.execution={execution}", f"output_dir={out}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(out / "results.csv")
    methods = {"daam", "attn2mask", "ovam", "iseg"}
    for model in ("embedded", "tiny-sd3"):
        part = rows[rows["model"] == model]
        assert methods <= set(part["method"]) and part["mIoU"].map(math.isfinite).all()
    table = pd.read_csv(out / "by_backbone.csv", index_col="method")
    assert list(table.columns) == ["embedded (sd)", "tiny-sd3 (sd3) [random weights]"]
    assert methods <= set(table.index) and table.notna().all().all()
    prov = json.loads((out / "run.json").read_text())
    assert prov["backbones"]["tiny-sd3"] == {"entry": str(folder), "family": "sd3", "random_weights": True}
    assert prov["backbones"]["embedded"]["family"] == "sd"
    report = (out / "report.md").read_text()
    assert "tiny-sd3 (" in report and "has random weights: its column tests the plumbing only" in report
    assert (out / "by_backbone.png").is_file()


def test_a_method_is_checked_against_every_backbone_family(tmp_path):
    """dedos runs on SD only: a sweep over models with an SD3 entry stops in preflight naming that entry, whether
    dedos is the sweep's method or one that `compare` runs."""
    from bench.config import compose
    from bench.errors import BenchError
    from bench.preflight import preflight

    folder = save_tiny_family("sd3", tmp_path / "tiny-sd3")
    for sweep, extra in (("dedos_iterations.yaml", []), ("methods_by_backbone.yaml", ["sweep.method=[daam,dedos]"])):
        cfg = compose(str(ROOT / "sweeps" / sweep), [f"models=embedded,{folder}", *extra,
                                                     f"output_dir={tmp_path / 'x'}"])
        with pytest.raises(BenchError, match=rf"^models entry {folder}: method=dedos runs on sd backbones only"):
            preflight(cfg)
    assert not (tmp_path / "x").exists()


def test_the_releases_cat_cross_is_refused_on_joint_attention_before_work(tmp_path):
    """iSeg gamma_on=embeddings scales the text embeddings a UNet's cross-attention reads as keys and values; on
    SD3 the text runs through joint attention, so preflight refuses it, naming the option that works there."""
    from bench.config import compose
    from bench.errors import BenchError
    from bench.preflight import preflight

    folder = save_tiny_family("sd3", tmp_path / "tiny-sd3")
    cfg = compose(str(ROOT / "sweeps" / "iseg_lambda.yaml"), [f"model.path={folder}", "+params.gamma_on=embeddings",
                                                              f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(BenchError, match=r"this model is sd3, .*use gamma_on=keys$"):
        preflight(cfg)
    assert not (tmp_path / "x").exists()
    preflight(compose(str(ROOT / "sweeps" / "iseg_lambda.yaml"), [f"model.path={folder}", "data.limit=1",
                                                                  f"output_dir={tmp_path / 'y'}"]))
