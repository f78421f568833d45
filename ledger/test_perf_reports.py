"""The committed cost measurements of reports/perf/ that the manual points to: what they measured is what the
pages say they measured, and the .md is the rendering of its .json (a hand-edited table fails here)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "reports" / "perf"


def test_sd3_medium_joint_capture_report_is_the_documented_measurement():
    """docs/backbones.md: one 512 px pass of SD3 Medium's architecture (1024 image tokens, 77 + 256 text tokens,
    24 joint blocks), each role traced on every block, within plain + 2 x kept."""
    from bench.perf_joint import render_joint

    report = json.loads((PERF / "sd3-medium-arch-cpu.json").read_text())
    joint = report["joint"]
    assert (joint["size"], joint["image_tokens"], joint["text_tokens"], joint["joint_layers"]) == (512, 1024, 333, 24)
    assert set(joint["roles"]) == {"cross", "self", "both"}
    assert all(row["within_bound"] for row in joint["roles"].values())
    assert (PERF / "sd3-medium-arch-cpu.md").read_text() == render_joint(report)
    assert "reports/perf/sd3-medium-arch-cpu.md" in (ROOT / "docs" / "backbones.md").read_text()


def test_driver_cost_report_is_the_documented_measurement():
    """docs/cost.md: one driver's cost per image at K = 24 configurations and 21, 459 and 847 classes, the
    histograms sent by their nonzero class columns (fewer bytes than the dense ones), the driver's work and Ray
    Data's delivery at ray.batch_size=1."""
    from bench.perf_driver import CLASS_COUNTS, CONFIGS, render_report

    report = json.loads((PERF / "driver-cpu.json").read_text())
    rows = report["results"]
    assert {(r["classes"], r["batch_size"]) for r in rows} >= {(c, 1) for c in CLASS_COUNTS}
    assert all(r["configs"] == CONFIGS and r["bytes_per_image"] < r["dense_bytes_per_image"] for r in rows)
    assert {(r["classes"], r["batch_size"]) for r in report["ray"]} >= {(c, 1) for c in CLASS_COUNTS}
    assert (PERF / "driver-cpu.md").read_text() == render_report(report)
    assert "reports/perf/driver-cpu.md" in (ROOT / "docs" / "cost.md").read_text()
