"""Sweeps on the tiny random-weight families, run as a user runs them (slow): `sweeps/methods_compare.yaml` with
`model.path=` exits 0 with a finite row per method on SDXL, SD3.5 and Flux, and records the family and the
random weights in run.json; `bench.backbones` runs `sweeps/methods_by_backbone.yaml` on the embedded default
plus a tiny family and writes the method x backbone table with the random-weight backbone labelled."""

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
def test_methods_by_backbone_on_the_embedded_default_and_a_tiny_family(tmp_path):
    folder = save_tiny_family("sd3", tmp_path / "tiny-sd3")
    out = tmp_path / "by"
    done = _run("bench.backbones", ["sweeps/methods_by_backbone.yaml", f"backbones=embedded,{folder}", *FAST,
                                    f"output_dir={out}"])
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "by_backbone.csv", index_col="method")
    assert list(table.columns) == ["embedded (sd)", "tiny-sd3 (sd3) [random weights]"]
    assert {"daam", "attn2mask", "ovam", "iseg"} <= set(table.index) and table.notna().all().all()
    assert "tiny-sd3 has random weights" in (out / "by_backbone.md").read_text()
    assert (out / "by_backbone.png").is_file()
    again = _run("bench.backbones", ["sweeps/methods_by_backbone.yaml", f"backbones=embedded,{folder}", *FAST,
                                     f"output_dir={out}"])
    assert again.returncode == 0 and "finished run" in again.stderr  # finished backbones are kept


def test_backbones_command_needs_backbones(tmp_path):
    done = _run("bench.backbones", ["sweeps/methods_by_backbone.yaml", f"output_dir={tmp_path / 'x'}"])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: name the backbones")
    assert not (tmp_path / "x").exists()
