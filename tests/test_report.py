"""Reports from fixed results tables (no model run): tables, uncertainty, escaping, figures, the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.errors import BenchError
from bench.metrics import summarize
from bench.reporting import load_run, save_qualitative, summarize_run, write_report
from bench.reporting.cli import main as report_main
from bench.reporting.model import RunData
from bench.reporting.tables import main_table
from bench.stats import bootstrap_intervals, metrics_from_totals, t_interval

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "circle", "square"]
PAPER = {0: 69.1, 0.01: 75.2, 0.1: 74.1}


def make_cfg(sweep=None, seeds=(0,), paper=True, model="embedded", classes=CLASSES, description="demo sweep"):
    sweep = sweep or {"lambda": {"grid": [0, 0.01, 0.1]}}
    cfg = {"name": "iseg_lambda", "description": description, "method": "iseg",
           "model": {"name": model, "path": None, "id": None, "device": "auto", "dtype": "auto", "random": False,
                     "resolution": 128},
           "data": {"name": "shapes", "limit": 4}, "params": {}, "sweep": sweep, "num_samples": 1,
           "search_seed": 0, "seeds": list(seeds), "metric": {"protocol": "iseg", "main": "mIoU"},
           "paper": ({"table": "iSeg Table 5(b)", "note": "VOC train", "param": "lambda", "metric": "mIoU",
                      "backbone": "sd2.1", "dataset": "voc2012", "protocol": "iseg", "tolerance": 1.0,
                      "values": dict(PAPER)} if paper else {}),
           "ray": {}, "report": {"bootstrap": 100}, "output_dir": None, "overrides": ["data.limit=4"],
           "sweep_file": "sweeps/iseg_lambda.yaml"}
    return cfg


def make_prov(cfg, classes=CLASSES):
    from bench.results import SCHEMA_VERSION, config_hash

    return {"schema_version": SCHEMA_VERSION, "config_hash": config_hash(cfg), "overrides": cfg["overrides"],
            "git_sha": "abc123",
            "versions": {"python": "3.11", "torch": "2.x"}, "devices": ["cpu (x86_64)"], "metric_protocol": "iseg",
            "seeds": cfg["seeds"], "num_images": 4, "num_trials": 3, "num_forward_settings": 1,
            "unet_passes": 4, "trace_seconds": 2.0, "images_per_second": 2.0, "wall_seconds": 5.0,
            "finished": "2026-01-01T00:00:00+00:00",
            "dataset": {"name": "shapes", "num_images": 4, "classes": list(classes), "split": "val"}}


def make_frame(values: dict, seeds=(0,), classes=CLASSES, ci=True, prompt="A photo of {classes}"):
    """values: {lambda: [mIoU per seed]} -> a results frame as bench.results writes it."""
    rows = []
    for k, (lam, per_seed) in enumerate(values.items()):
        for seed, m in zip(seeds, per_seed):
            row = {"trial": f"t{k:04d}", "seed": seed, "lambda": lam, "mIoU": m, "aAcc": m + 10, "mAcc": m + 5}
            for j, c in enumerate(classes):
                row[f"IoU/{c}"] = m + j
                row[f"Acc/{c}"] = m + j + 1
            row.update(unet_passes=4, forward_setting=f"seed={seed},template={prompt}")
            if ci:
                row.update(mIoU_ci_low=m - 2, mIoU_ci_high=m + 3)
            row["paper_mIoU"] = PAPER.get(lam, math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def make_run_dir(path: Path, cfg, frame, prov) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / "run.json").write_text(json.dumps(prov))
    frame.to_parquet(path / "results.parquet", index=False)
    return path


# -- tables ------------------------------------------------------------------------------------------------------
def paper_setup(cfg, prov):
    """The run made with the paper's setup (SD 2.1 on VOC 2012, iSeg's protocol): its paper column is shown."""
    cfg["paper"].update(backbone="sd2.1", dataset="voc2012", protocol="iseg", tolerance=1.0)
    cfg["model"]["id"] = "stabilityai/stable-diffusion-2-1-base"
    prov["dataset"]["name"] = "voc2012"
    return cfg, prov


def test_single_seed_table_has_paper_values_deltas_bootstrap_ci_and_best(tmp_path):
    cfg = make_cfg()
    prov = make_prov(cfg)
    cfg, prov = paper_setup(cfg, prov)
    frame = make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]})
    run = RunData(cfg, frame, prov)
    t = main_table(run)
    assert t.header == ["lambda", "mIoU (ours)", "95% CI", "mIoU (paper)", "Δ (ours − paper)", "verdict"]
    assert [[c.text for c in r] for r in t.rows] == [
        ["0", "70.0", "[68.0, 73.0]", "69.1", "+0.9", "reproduced"],
        ["0.01", "72.5", "[70.5, 75.5]", "75.2", "-2.7", "not reproduced"],
        ["0.1", "71.0", "[69.0, 74.0]", "74.1", "-3.1", "not reproduced"]]
    assert [r[1].best for r in t.rows] == [False, True, False]  # our best
    assert [r[3].best for r in t.rows] == [False, True, False]  # the paper's best
    assert any("bootstrap over 4 images, 100 draws" in n for n in t.notes)

    write_report(tmp_path, cfg, frame, prov)
    md = (tmp_path / "report.md").read_text()
    assert "| 0.01 | **72.5** | [70.5, 75.5] | **75.2** | -2.7 | not reproduced |" in md
    assert "iSeg Table 5(b)" in md
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["paper"]) == [69.1, 75.2, 74.1]
    assert np.allclose(summary["delta"], [0.9, -2.7, -3.1])
    for name in ("report.html", "plot_mIoU_lambda.png", "classes_IoU.png"):
        assert (tmp_path / name).is_file(), name


def test_several_seeds_give_mean_std_and_t_interval():
    cfg = make_cfg(seeds=(0, 1, 2))
    frame = make_frame({0: [10.0, 12.0, 14.0], 0.01: [20.0, 20.0, 23.0], 0.1: [5.0, 6.0, 7.0]}, seeds=(0, 1, 2))
    s = summarize_run(RunData(cfg, frame, make_prov(cfg)))
    first = s.iloc[0]
    half = 4.302652729911275 * 2.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
    assert first["mean"] == pytest.approx(12.0) and first["std"] == pytest.approx(2.0)
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((12 - half, 12 + half))
    assert first["ci_kind"] == "t-interval over 3 seeds"
    t = main_table(RunData(cfg, frame, make_prov(cfg)))
    assert t.header[:4] == ["lambda", "mIoU (ours)", "± std", "95% CI"]
    assert [c.text for c in t.rows[0]][:4] == ["0", "12.0", "2.0", f"[{12 - half:.1f}, {12 + half:.1f}]"]
    assert t.rows[1][1].best


def test_per_class_table_has_classes_as_columns(tmp_path):
    cfg = make_cfg()
    write_report(tmp_path, cfg, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}), make_prov(cfg))
    md = (tmp_path / "report.md").read_text()
    assert "| configuration | background | circle | square | mIoU |" in md
    assert "| lambda=0.01 | **72.5** | **73.5** | **74.5** | **72.5** |" in md


def test_t_interval_and_bootstrap_helpers():
    assert t_interval([5.0])[0] == 5.0 and math.isnan(t_interval([5.0])[2])
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, size=(7, 4, 5))
    hist[:, 1] = hist[:, 0] + rng.integers(0, 50, size=(7, 5))  # union >= intersection
    hist[:, 3] = hist[:, 0] + rng.integers(0, 5, size=(7, 5))
    totals = hist.sum(0)
    for protocol in ("mmseg", "iseg"):
        got = metrics_from_totals(totals[None], protocol)
        want = summarize(totals, [f"c{i}" for i in range(5)], protocol)
        for k in ("mIoU", "aAcc", "mAcc"):
            assert got[k][0] == pytest.approx(want[k])
        ci = bootstrap_intervals(hist, protocol, 300)
        assert ci["mIoU"][0] <= want["mIoU"] <= ci["mIoU"][1]
    assert all(math.isnan(v) for v in bootstrap_intervals(hist[:1], "mmseg", 10)["mIoU"])


# -- figures -----------------------------------------------------------------------------------------------------
def _grid_frame(params: dict) -> pd.DataFrame:
    import itertools

    rows = []
    for k, point in enumerate(itertools.product(*params.values())):
        m = 50 + sum(float(v) if not isinstance(v, str) else len(v) for v in point)
        row = {"trial": f"t{k:04d}", "seed": 0, **dict(zip(params, point)), "mIoU": m, "aAcc": m, "mAcc": m}
        row.update({f"IoU/{c}": m for c in CLASSES})
        rows.append(row)
    return pd.DataFrame(rows)


def test_two_swept_parameters_give_a_heatmap_three_parallel_coordinates(tmp_path):
    params2 = {"lambda": [0, 0.01], "gamma": [1.2, 1.6, 2.0]}
    cfg = make_cfg(sweep={k: {"grid": v} for k, v in params2.items()})
    (tmp_path / "a").mkdir()
    write_report(tmp_path / "a", cfg, _grid_frame(params2), make_prov(cfg))
    assert (tmp_path / "a" / "heatmap_mIoU.png").is_file()
    assert (tmp_path / "a" / "plot_mIoU_gamma.png").is_file()
    params3 = {**params2, "level": ["16", "both"]}
    cfg = make_cfg(sweep={k: {"grid": v} for k, v in params3.items()})
    (tmp_path / "b").mkdir()
    write_report(tmp_path / "b", cfg, _grid_frame(params3), make_prov(cfg))
    assert (tmp_path / "b" / "parallel_mIoU.png").is_file()
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| lambda | gamma | level | mIoU (ours) | mIoU (paper) |\n" in md  # paper: lambda (hidden: embedded)
    assert "| 0.01 | 2 | both | **56.0** | hidden: embedded model, not SD 2.1 |" in md


def test_figure_panels_are_reduced_to_what_a_panel_shows():
    """Images and label maps go into a panel at most PANEL_SIDE a side: labels keep their ids (no averaging
    invents a class between two), images are block means; small arrays are drawn as they are."""
    from bench.reporting.qualitative import PANEL_SIDE, for_panel

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (512, 512)).astype(np.uint8)
    label[0, 0] = 255
    small = for_panel(label, nearest=True)
    assert small.shape == (256, 256) and max(small.shape) <= PANEL_SIDE
    assert set(np.unique(small)) <= set(np.unique(label)) and small[0, 0] == 255
    image = rng.integers(0, 256, (512, 384, 3)).astype(np.uint8)
    reduced = for_panel(image, nearest=False)
    assert reduced.shape == (256, 192, 3) and reduced.dtype == np.uint8
    assert abs(int(reduced[0, 0, 0]) - image[:2, :2, 0].mean()) <= 1
    assert for_panel(label[:64, :64], nearest=True).shape == (64, 64)


def test_qualitative_figure_from_saved_predictions(tmp_path):
    class Sample:
        image_id = "img/0 <b>"
        image = np.zeros((32, 32, 3), np.uint8)
        label = np.zeros((32, 32), np.uint8)
        label[4:20, 4:20] = 2
        label[0, :] = 255

    class Pred:
        def __init__(self, v):
            self.scores = np.full((2, 8, 8), v, np.float32)
            self.labels = np.where(Sample.label == 2, 2, 0).astype(np.int64)

    cfg = make_cfg()
    frame = make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]})
    path = save_qualitative(tmp_path / "qualitative", Sample(), CLASSES, ["t0000", "t0001", "t0002"],
                            [Pred(0.2), Pred(0.5), Pred(0.9)], query_ids=[1, 2], seed=0, group=0, prompt="a square")
    assert path.name == "img%2F0%20%3Cb%3E.g000.npz" and not list((tmp_path / "qualitative").glob(".*"))
    with np.load(path, allow_pickle=False) as z:
        assert z["scores"].shape == (3, 2, 8, 8) and z["preds"].shape == (3, 32, 32)
    write_report(tmp_path, cfg, frame, make_prov(cfg))
    assert (tmp_path / "qualitative.png").is_file()
    md = (tmp_path / "report.md").read_text()
    assert "score maps of class 'square'" in md and "prompt 'a square'" in md


# -- escaping ----------------------------------------------------------------------------------------------------
HOSTILE_CLASSES = ["background", "<script>window.__pwned=1</script>", "a \"quoted\" & 'single' </td>"]
HOSTILE_PROMPT = "<img src=x onerror=\"window.__pwned=2\"> & {classes}"


def hostile_report(out: Path) -> Path:
    cfg = make_cfg(classes=HOSTILE_CLASSES, description="<b>bold?</b> & <iframe src='https://example.com'>")
    cfg["params"] = {"template": HOSTILE_PROMPT}
    cfg["overrides"] = ["params.template=<script>alert(1)</script>"]
    frame = make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}, classes=HOSTILE_CLASSES, prompt=HOSTILE_PROMPT)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, cfg, frame, make_prov(cfg, HOSTILE_CLASSES))
    return out / "report.html"


def test_hostile_class_names_and_prompts_are_text(tmp_path):
    text = hostile_report(tmp_path).read_text()
    assert text.count("<script>") == 1  # ours, at the end
    assert "<script>window.__pwned" not in text and "<img src=x" not in text and "<iframe" not in text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt; &amp; {classes}" in text
    assert "a &quot;quoted&quot; &amp; &#x27;single&#x27; &lt;/td&gt;" in text
    assert "https://example.com" not in text.replace("&#x27;https://example.com&#x27;", "")
    md = (tmp_path / "report.md").read_text()
    assert ("| configuration | background | \\<script\\>window.\\_\\_pwned=1\\</script\\> | "
            "a \"quoted\" \\& 'single' \\</td\\> | mIoU |") in md
    # outside code spans and fences (which Markdown shows literally) no markup survives
    prose = re.sub(r"(`+).*?\1", "", re.sub(r"```yaml.*?```", "", md, flags=re.S))
    assert not re.search(r"(?<!\\)<(script|img|iframe|b>|/td)", prose)


# -- CLI ---------------------------------------------------------------------------------------------------------
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    cfg_a = make_cfg(model="embedded")
    cfg_b = make_cfg(model="sd15")
    a = make_run_dir(tmp_path / "run-a", cfg_a, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}), make_prov(cfg_a))
    b = make_run_dir(tmp_path / "run-b", cfg_b, make_frame({0: [60.0], 0.01: [61.0], 0.1: [65.0]}), make_prov(cfg_b))
    return a, b


def test_cli_combines_two_runs_into_one_table(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    out = tmp_path / "combined"
    assert report_main([str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combined", "run-a", "run-b"]  # no temp left
    md = (out / "report.md").read_text()
    # neither run has the paper's setup (SD 2.1 on VOC): no paper columns (bench.reporting.paper)
    assert "| method (setting) | embedded (128 px) | sd15 (128 px) |\n" in md
    assert "| iseg (lambda=0.01) | **72.5** | 61.0 |" in md
    assert "| iseg (lambda=0.1) | 71.0 | **65.0** |" in md
    assert "combined_lambda.png" in md and (out / "combined_lambda.png").is_file()
    assert "## run-a: iseg on shapes val, embedded (128 px)" in md
    assert "Warning" not in md
    combined = pd.read_csv(out / "summary.csv")
    assert len(combined) == 6 and set(combined["run"]) == {"run-a", "run-b"}


def test_cli_regenerates_one_report_in_place_and_flags_edited_config(tmp_path):
    cfg = make_cfg()
    prov = make_prov(cfg)
    run = make_run_dir(tmp_path / "run", cfg, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}), prov)
    assert report_main([str(run)]) == 0
    assert "Warning" not in (run / "report.md").read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    cfg["params"] = {"iterations": 3}  # edited after the run
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert report_main([str(run)]) == 0
    assert "the file was edited after the run" in (run / "report.md").read_text()
    assert load_run(run).label == "run"


@pytest.mark.parametrize("case", ["missing", "not a run", "partial", "out exists", "same twice", "no args"])
def test_cli_bad_input_is_one_line_nonzero_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    a, b = two_runs(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    args = {"missing": [str(tmp_path / "nope")], "not a run": [str(tmp_path / "empty")],
            "partial": [str(tmp_path / "x.partial")], "out exists": [str(a), str(b), "--out", str(tmp_path / "full")],
            "same twice": [str(a), str(a)], "no args": []}[case]
    message = {"missing": "does not exist", "not a run": "has no config.yaml, run.json, results.parquet",
               "partial": "interrupted run", "out exists": "choose another --out", "same twice": "twice",
               "no args": "python -m bench.report"}[case]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert report_main(args) == 2  # in-process through the CLI's main
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if case != "no args":
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    else:
        assert message in out
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_run_of_a_newer_schema_is_refused(tmp_path):
    cfg = make_cfg()
    prov = {**make_prov(cfg), "schema_version": 99}
    run = make_run_dir(tmp_path / "run", cfg, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}), prov)
    with pytest.raises(BenchError, match="run schema 99"):
        load_run(run)
    old = make_run_dir(tmp_path / "old", cfg, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}),
                       {k: v for k, v in make_prov(cfg).items() if k != "schema_version"})
    assert load_run(old).prov.get("schema_version") is None  # runs from before schema versions still load


def test_qualitative_keeps_class_ids_past_255(tmp_path):
    """459/847-class layouts label with uint16 and ignore 65535: the saved maps keep ids > 255 (a uint8 cast
    would wrap id 300 to 44) and the figure treats 65535 as ignored."""
    from bench.reporting.qualitative import colorize, load_qualitative
    names = [f"class{i}" for i in range(460)]

    class Sample:
        image_id, image, ignore_index = "wide", np.zeros((16, 16, 3), np.uint8), 65535
        label = np.full((16, 16), 300, np.uint16)
        label[0, :] = 65535

    class Pred:
        scores = np.zeros((1, 4, 4), np.float32)
        labels = np.full((16, 16), 458, np.int64)

    save_qualitative(tmp_path / "qualitative", Sample(), names, ["t0000"], [Pred()], query_ids=[300], seed=0)
    (q,) = load_qualitative(tmp_path)
    assert q.ignore_index == 65535 and int(q.label[5, 5]) == 300 and int(q.entries[("t0000", 0)][2][0, 0]) == 458
    rgb = colorize(q.label, len(names), q.ignore_index)
    assert (rgb[0] == 255).all() and not (rgb[5, 5] == 255).all()


def test_qualitative_score_maps_are_stored_at_figure_size(tmp_path):
    """Score maps are area-averaged to SCORE_SIDE a side (aspect kept); label maps stay at full size."""
    import torch

    from bench.reporting.qualitative import SCORE_SIDE, load_qualitative

    class Sample:
        image_id, image = "big", np.zeros((512, 256, 3), np.uint8)
        label = np.zeros((512, 256), np.uint8)

    class Pred:
        scores = torch.zeros(2, 512, 256)
        scores[1, :256] = 1.0  # the top half of class 2's map
        labels = torch.zeros(512, 256, dtype=torch.long)

    save_qualitative(tmp_path / "qualitative", Sample(), CLASSES, ["t0000"], [Pred()], query_ids=[1, 2], seed=0)
    (q,) = load_qualitative(tmp_path)
    scores, _, pred = q.entries[("t0000", 0)]
    assert scores.shape == (2, SCORE_SIDE, SCORE_SIDE // 2) and pred.shape == (512, 256)
    assert scores[1, :SCORE_SIDE // 2].min() == 1.0 and scores[1, SCORE_SIDE // 2:].max() == 0.0


def test_fits_table_final_loss_is_the_last_stage_with_its_series():
    """A staged fit (FreeGen: the ASR logs the unnamed series, then the EGD "egd" and "egd+hst") reports the
    loss it ended with, named by its series; a fit with one unnamed series shows the bare number."""
    from bench.reporting.fits import fits_table

    staged = pd.DataFrame({"series": ["", "", "egd", "egd+hst"], "step": [1, 2, 3, 4], "loss": [0.9, 0.8, 0.5, 0.25]})
    plain = pd.DataFrame({"series": ["", ""], "step": [1, 2], "loss": [0.7, 0.4]})
    run = RunData(cfg={"name": "r"}, frame=pd.DataFrame(), prov={})
    table = fits_table(run, [{"hash": "a", "curve": staged}, {"hash": "b", "curve": plain}])
    column = table.header.index("final loss")
    assert [row[column].text for row in table.rows] == ["0.2500 (egd+hst)", "0.4000"]
    assert [row[column].sort for row in table.rows] == [0.25, 0.4]


def test_configurations_whose_labels_tie_breaking_decided_are_flagged(tmp_path):
    cfg = make_cfg()
    frame = make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}).assign(tied=[0.1, 72.0, 4.9])
    write_report(tmp_path, cfg, frame, make_prov(cfg))
    md = (tmp_path / "report.md").read_text()
    assert "Labels without margin: in 1 of 3 configurations (lambda=0.01)" in md and "72.0% at lambda=0.01" in md
    assert pd.read_csv(tmp_path / "summary.csv")["tied"].tolist() == [0.1, 72.0, 4.9]
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    write_report(quiet, cfg, frame.assign(tied=[0.1, 5.0, math.nan]), make_prov(cfg))
    assert "Labels without margin" not in (quiet / "report.md").read_text()


@pytest.mark.parametrize("ids", [("a b", "a_b"), ("x/y", "x_y"), (".h", "%2Eh"), ("a" * 90, "a" * 91), ("~", "%7E")])
def test_qualitative_file_names_are_injective_in_image_ids(ids):
    from bench.reporting.qualitative import _key

    names = [_key(i) for i in ids]
    assert len(set(names)) == 2 and all("/" not in n and not n.startswith(".") and len(n) <= 100 for n in names)
