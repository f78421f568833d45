"""The ledger: the committed peer report (reports/peers: this project against the released iSeg and OVAM
pipelines, run by `python -m bench.peers`) carries what a reader needs to check it: the repositories and their
commits, every environment's versions, the commands, the numbers, and a cause for every difference it shows."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "peers"
RELEASES = {"iseg": "linsun449/iseg.code", "ovam": "vpulab/ovam"}
# a row agrees when its masks / labels agree everywhere and its maps within float32 rounding of [0, 1] values
MAP_TOL = 1e-4


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((REPORT / "peers.json").read_text())


@pytest.fixture(scope="module")
def readme() -> str:
    return (REPORT / "README.md").read_text()


def test_repositories_commits_and_versions(report, readme):
    for release, repo in RELEASES.items():
        entry = report["repositories"][release]
        assert entry["url"] == f"https://github.com/{repo}"
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), entry
        assert entry["commit"] in readme, f"README does not name {repo}'s commit"
        got = report["versions"][release]
        assert {"python", "torch"} <= set(got), got
    assert {"python", "torch", "diffusers", "transformers"} <= set(report["versions"]["project"])
    assert {"diffusers", "transformers"} <= set(report["versions"]["ovam"])
    assert "transformers" in report["versions"]["iseg"]  # its diffusers is the copy bundled in the repository


def test_commands_are_recorded(report, readme):
    commands = report["commands"]
    assert commands["driver"].startswith("python -m bench.peers")
    for release in RELEASES:
        assert f"peers_release.py {release}" in commands[release]
    assert "python -m bench.peers" in readme


def test_numbers_cover_both_releases_end_to_end(report):
    rows = pd.DataFrame(report["rows"])
    csv = pd.read_csv(REPORT / "peers.csv")
    assert len(csv) == len(rows)
    iseg, ovam = rows[rows["release"] == "iseg"], rows[rows["release"] == "ovam"]
    images = {i["name"] for i in report["inputs"]["images"]}
    settings = {s["name"] for s in report["inputs"]["iseg_settings"]}
    assert set(iseg["item"]) == images and set(iseg["setting"]) == settings
    assert len(iseg) == len(images) * len(settings)
    assert {"map_max_abs_diff", "label_agreement", "mean_class_iou"} <= set(iseg.columns)
    jobs = report["inputs"]["ovam"]
    classes = {f"{job['name']}/{name}" for job in jobs for name in job["names"]}
    assert set(ovam["item"]) == classes
    for tau in jobs[0]["taus"]:  # without and with the self-attention refinement, at every threshold
        assert f"refine=false tau={tau}" in set(ovam["setting"])
        assert f"refine=true tau={tau}, release formula with received attention" in set(ovam["setting"])
    assert f"refine=true tau={jobs[0]['taus'][0]}" in set(ovam["setting"])
    assert {"heat_max_abs_diff", "map_max_abs_diff", "mask_iou", "image_max_abs_diff"} <= set(ovam.columns)
    assert rows.drop(columns=["release", "setting", "item"]).notna().any(axis=1).all()


def differing(report) -> set[tuple[str, str]]:
    """(release, setting) pairs with any row whose maps or masks differ."""
    out = set()
    for row in report["rows"]:
        agree = row["label_agreement"] == 1.0 and row.get("mask_iou", 1.0) == 1.0
        maps = row["map_max_abs_diff"] <= MAP_TOL or row["map_max_abs_diff"] != row["map_max_abs_diff"]
        if not (agree and maps):
            out.add((row["release"], row["setting"]))
    return out


def test_every_difference_has_a_cause(report, readme):
    """README's causes table: one `| release | setting | cause |` row per (release, setting) that differs."""
    causes = {}
    for line in readme.splitlines():
        match = re.match(r"\| (iseg|ovam) \| `?([^|`]+?)`? \| (.+) \|$", line)
        if match:
            causes[(match.group(1), match.group(2))] = match.group(3).strip()
    missing = differing(report) - set(causes)
    assert not missing, f"differences without a cause in reports/peers/README.md: {sorted(missing)}"
    assert all(len(text) > 40 for text in causes.values()), "a cause is one sentence at least"


def test_the_traces_are_compared_before_the_differences_are_explained(report):
    """The causes table starts from the intermediate tensors: they are in the report, and the traces agree."""
    diagnosis = report["iseg_diagnosis"]
    for key in ("embedding", "cross_16", "cross_32", "self_64_heads_1_2", "fused_token_maps",
                "cluster_means_on_release_fused_maps"):
        entry = diagnosis[key]
        assert entry["max_abs_diff"] <= 1e-5 * entry["release_max"] or entry["max_abs_diff"] <= 2e-6, (key, entry)
    assert diagnosis["cluster_means_on_release_fused_maps"]["max_abs_diff"] == 0.0
