"""The paper column only for the paper's setup (bench.reporting.paper): a run on another backbone, dataset or
protocol shows why the paper's number is hidden, never a delta; the paper's setup gets a verdict."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report import PAPER, make_cfg, make_frame, make_prov

from bench.reporting import RunData, summarize_run, write_report
from bench.reporting.paper import backbone_family, hidden_reason, verdict
from bench.reporting.tables import main_table


@pytest.mark.parametrize("model, family", [
    ({"name": "embedded"}, "embedded"),
    ({"name": "embedded", "random": True}, "random weights"),
    ({"name": "sd21-base-arch"}, "random weights"),
    ({"id": "stabilityai/stable-diffusion-2-1-base"}, "sd2.1"),
    ({"path": "/models/sd-2-1-base"}, "sd2.1"),
    ({"id": "runwayml/stable-diffusion-v1-5"}, "sd1.5"),
    ({"id": "CompVis/stable-diffusion-v1-4"}, "sd1.4"),
    ({"id": "stabilityai/stable-diffusion-xl-base-1.0"}, "sdxl"),
    ({"path": "/models/my-checkpoint"}, "unknown"),
])
def test_backbone_family(model, family):
    assert backbone_family(model) == family


def _matching():
    cfg = make_cfg()
    cfg["paper"].update(backbone="sd2.1", dataset="voc2012", protocol="iseg", tolerance=1.0)
    cfg["model"]["id"] = "stabilityai/stable-diffusion-2-1-base"
    prov = make_prov(cfg)
    prov["dataset"]["name"] = "voc2012"
    return cfg, prov


def test_each_mismatch_names_itself():
    cfg, prov = _matching()
    assert hidden_reason(cfg, prov) is None
    cfg["model"]["id"] = None
    assert hidden_reason(cfg, prov) == "hidden: embedded model, not SD 2.1"
    cfg, prov = _matching()
    prov["dataset"]["name"] = "shapes"
    assert hidden_reason(cfg, prov) == "hidden: dataset shapes, not voc2012"
    cfg, prov = _matching()
    prov["dataset"]["synthetic"] = True
    assert "synthetic" in hidden_reason(cfg, prov)
    cfg, prov = _matching()
    prov["metric_protocol"] = "mmseg"
    assert hidden_reason(cfg, prov) == "hidden: metric protocol mmseg, not iseg"
    cfg, prov = _matching()
    del cfg["paper"]["backbone"]
    assert "does not state the paper's backbone" in hidden_reason(cfg, prov)


def test_verdict():
    assert verdict(0.4, 1.0) == "reproduced"
    assert verdict(-1.2, 1.0) == "not reproduced"
    assert verdict(math.nan, 1.0) == ""
    assert verdict(0.0, None) == "no tolerance stated"


def test_embedded_run_hides_the_paper_number_and_delta(tmp_path):
    cfg = make_cfg()
    cfg["paper"].update(backbone="sd2.1", dataset="voc2012", protocol="iseg", tolerance=1.0)
    prov = make_prov(cfg)
    frame = make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]})
    s = summarize_run(RunData(cfg, frame, prov))
    assert s["paper"].isna().all() and s["delta"].isna().all()
    t = main_table(RunData(cfg, frame, prov))
    assert t.header == ["lambda", "mIoU (ours)", "95% CI", "mIoU (paper)"]
    assert {r[-1].text for r in t.rows} == {"hidden: embedded model, not SD 2.1"}
    write_report(tmp_path, cfg, frame, prov)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["delta"].isna().all() and summary["paper"].isna().all()
    assert set(summary["paper_hidden"]) == {"hidden: embedded model, not SD 2.1"}
    md = (tmp_path / "report.md").read_text()
    assert "Δ" not in md and str(PAPER[0.01]) not in md.split("| lambda")[1].split("\n\n")[0]


def test_every_sweep_states_its_papers_setup():
    """Every sweep with paper values names the paper's backbone, dataset, protocol and tolerance."""
    from pathlib import Path

    import yaml

    from bench.config import compose

    for path in sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")):
        paper = (yaml.safe_load(path.read_text()) or {}).get("paper") or {}
        if paper.get("values"):
            assert {"backbone", "dataset", "protocol", "tolerance"} <= set(paper), path.name
            compose(str(path), [])  # the keys validate
