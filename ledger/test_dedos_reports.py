"""The ledger: checks that the committed DEDOS reports (reports/embedded/dedos_*) are the runs
docs/studies/dedos.md says they are, and the open-vocabulary bar's verdict on them (strict xfails where it is not
met). These read committed files; they test no code (tests/test_dedos.py does)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# -- the bar (committed report of sweeps/dedos_openvocab.yaml on the embedded default) ------------------------------
# method version 4 (the CLIP tower trains at clip_lr_scale); dedos_openvocab/ is the same sweep at version 3
REPORT = ROOT / "reports" / "embedded" / "dedos_openvocab_v4"


# the sixteen-shape world (sweeps/dedos_openvocab_many.yaml: twelve seen names, four unseen), 3,000 steps per arm,
# evaluated on the first 1,500 val images (pre-registered)
MANY_3000_VAL1500 = REPORT.parent / "dedos_openvocab_many_3000_val1500"
# both arms re-fitted with fit_seed=1, the same 1,500 val images: the replication MANY_3000_VAL1500's PREREG.md asks for
MANY_3000_SEED1 = REPORT.parent / "dedos_openvocab_many_3000_seed1"


def fit_values(fit_dir):
    """The train-setting values a committed fit folder was fitted with (its train_config.json)."""
    import json

    return json.loads((fit_dir / "train_config.json").read_text())["setting"]["values"]


def committed_results(report=REPORT):
    """Each arm's row with the paper's classifier (ov_ensemble=none, the default)."""
    import pandas as pd

    frame = pd.read_csv(report / "summary.csv")
    return {row["components"]: row for _, row in frame.iterrows() if row["ov_ensemble"] == "none"}


def test_committed_report_has_seen_and_unseen_intervals():
    import json

    rows = committed_results()
    assert sorted(rows) == ["baseline", "full"]
    assert json.loads((REPORT / "run.json").read_text())["method_versions"]["dedos"] == "4"
    for fit in (REPORT / "fit").iterdir():  # the sweep's defaults: three seen names
        setting = json.loads((fit / "train_config.json").read_text())["setting"]
        assert setting["version"] == "4" and setting["values"]["train_classes"] == "circle+square+triangle"
    for arm in ("baseline", "full"):
        for part in ("seen", "unseen"):
            row = rows[arm]
            assert row[f"mIoU_{part}_ci_low"] <= row[f"mIoU_{part}"] <= row[f"mIoU_{part}_ci_high"]
    assert "mIoU unseen" in (REPORT / "report.md").read_text()


@pytest.mark.parametrize("report", [
    pytest.param(REPORT, marks=pytest.mark.xfail(
        strict=True, reason="the committed report (method version 4: CAT-Seg cost aggregation in both arms, "
        "the CLIP tower fine-tuned at x 0.01; the default 1,500 steps per arm, the 94.2% tiny CLIP) names no "
        "unseen pixel in either arm: unseen mIoU baseline 0.0 [0.0, 0.0], DEDOS 0.0 [0.0, 0.0] (version 3: "
        "0.0 / 0.1). Neither a CLIP whose patches know the shapes nor a fourth seen name changed that: the "
        "head trained on three or four names never scores an unseen one above them (docs/studies/dedos.md)")),
    pytest.param(MANY_3000_VAL1500),
    pytest.param(MANY_3000_SEED1, marks=pytest.mark.xfail(
        strict=True, reason="the pre-registered replication with fit_seed=1 (3,000 steps, 1,500 val images): "
        "unseen baseline 6.7 [5.4, 7.8], DEDOS 6.6 [5.3, 7.8]; seen 18.0 / 25.9 (docs/studies/dedos.md)"))],
    ids=["shapes", "shapes_many_3000_val1500", "shapes_many_3000_seed1"])
def test_dedos_beats_its_baseline_on_unseen_classes(report):
    """Per pair of fits: DEDOS's unseen interval (over images) lies above the baseline's. The bar is
    test_dedos_unseen_lead_holds_for_both_fit_seeds: one pair can pass by its training seed alone."""
    rows = committed_results(report)
    assert rows["full"]["mIoU_unseen_ci_low"] > rows["baseline"]["mIoU_unseen_ci_high"]


@pytest.mark.xfail(strict=True, reason="pre-registered: met only if both pairs of 3,000-step fits pass on 1,500 val "
                   "images; seed 0 does (5.7 [4.6, 6.8] vs 2.9 [2.4, 3.4]), seed 1 does not (6.6 [5.3, 7.8] vs 6.7 "
                   "[5.4, 7.8]): a training seed moves the baseline's unseen mIoU by 3.8 points "
                   "(docs/studies/dedos.md)")
def test_dedos_unseen_lead_holds_for_both_fit_seeds():
    for report in (MANY_3000_VAL1500, MANY_3000_SEED1):
        rows = committed_results(report)
        assert rows["full"]["mIoU_unseen_ci_low"] > rows["baseline"]["mIoU_unseen_ci_high"]


# the pre-registered five-seed protocol (its PREREG.md): fit seeds 0-4 per arm; seeds 0 and 1 are the committed
# pairs above, seeds 2-4 one folder per arm and seed
FIVE_SEEDS = REPORT.parent / "dedos_openvocab_many_3000_five_seeds"


def five_seed_values(part: str = "unseen", ensemble: str = "none") -> dict[str, list[float]]:
    """Per arm, mIoU over `part` classes for fit seeds 0-4 (ov_ensemble=`ensemble`), in seed order."""
    import pandas as pd

    out = {"baseline": [], "full": []}
    for seed in range(5):
        for name in out:
            if seed < 2:
                frame = pd.read_csv((MANY_3000_VAL1500, MANY_3000_SEED1)[seed] / "summary.csv")
                frame = frame[frame["components"] == name]
            else:
                frame = pd.read_csv(FIVE_SEEDS / f"seed{seed}_{name}" / "summary.csv")
            (value,) = frame.loc[frame["ov_ensemble"] == ensemble, f"mIoU_{part}"]
            out[name].append(float(value))
    return out


def test_five_seed_fits_are_the_pre_registered_ones():
    """Seeds 2-4 of each arm: the seed-0 fit's train setting but fit_seed, evaluated on the same 1,500 val images
    with the same three classifiers."""
    import json

    import pandas as pd

    for name in ("baseline", "full"):
        (first,) = (MANY_3000_VAL1500 / name / "fit").iterdir()
        for seed in (2, 3, 4):
            folder = FIVE_SEEDS / f"seed{seed}_{name}"
            (fit,) = (folder / "fit").iterdir()
            assert fit_values(fit) == {**fit_values(first), "fit_seed": seed}
            assert json.loads((folder / "run.json").read_text())["num_images"] == 1500
            assert sorted(pd.read_csv(folder / "summary.csv")["ov_ensemble"]) == ["fcclip", "maskprompt", "none"]


@pytest.mark.xfail(strict=True, reason="pre-registered five seeds per arm (3,000 steps, 1,500 val images, the paper's "
                   "classifier): DEDOS's unseen mIoU 5.7 / 6.6 / 5.1 / 7.3 / 9.3, mean 6.8 [4.8, 8.9], against the "
                   "baseline's 2.9 / 6.7 / 3.9 / 5.7 / 7.1, mean 5.3 [3.0, 7.5]: ahead by 1.5 (4 of 5 seeds, Welch "
                   "p = 0.20), intervals overlapping; seen 23.1 against 23.0 (docs/studies/dedos.md)")
def test_dedos_unseen_lead_holds_over_five_fit_seeds():
    """The bar as pre-registered (FIVE_SEEDS/PREREG.md): with the paper's classifier, the t-interval of
    DEDOS's unseen mIoU over its five fit seeds lies entirely above the baseline's."""
    from bench.stats import t_interval

    values = five_seed_values()
    _, _, full_low, _ = t_interval(values["full"])
    _, _, _, base_high = t_interval(values["baseline"])
    assert full_low > base_high, values


def test_many_shapes_seed1_report_is_the_replication():
    """The seed-1 pair: MANY_3000_VAL1500's train settings but fit_seed, the same 1,500 val images; DEDOS's
    seen lead replicates (disjoint intervals in both pairs)."""
    import json

    for arm in ("baseline", "full"):
        (first,) = (MANY_3000_VAL1500 / arm / "fit").iterdir()
        (again,) = (MANY_3000_SEED1 / arm / "fit").iterdir()
        a, b = fit_values(first), fit_values(again)
        assert (a["fit_seed"], b["fit_seed"]) == (0, 1) and {**a, "fit_seed": 1} == b
        assert json.loads((MANY_3000_SEED1 / arm / "run.json").read_text())["num_images"] == 1500
    for report in (MANY_3000_VAL1500, MANY_3000_SEED1):
        rows = committed_results(report)
        assert rows["full"]["mIoU_seen_ci_low"] > rows["baseline"]["mIoU_seen_ci_high"]


def test_many_shapes_val1500_report_is_the_pre_registered_run():
    """The 3,000-step fits on shapes_many, one per arm, at method version 4 on twelve seen names with the world's
    own CLIP (ring, heart, arrow and hourglass unseen), evaluated on the first 1,500 val images."""
    import json

    import pandas as pd

    for arm in ("baseline", "full"):
        (fit,) = (MANY_3000_VAL1500 / arm / "fit").iterdir()
        setting = json.loads((fit / "train_config.json").read_text())["setting"]
        values = setting["values"]
        assert setting["version"] == "4" and values["components"] == arm and values["train_steps"] == 3000
        assert values["clip"] == "embedded_many" and len(values["train_classes"].split("+")) == 12
        assert not {"ring", "heart", "arrow", "hourglass"} & set(values["train_classes"].split("+"))
        assert set(pd.read_csv(MANY_3000_VAL1500 / arm / "results.csv")["fit"]) == {fit.name}
        assert json.loads((MANY_3000_VAL1500 / arm / "run.json").read_text())["num_images"] == 1500
    assert "bootstrap over 1500 images" in (MANY_3000_VAL1500 / "summary.csv").read_text()
    assert "fit_seed=1" in (MANY_3000_VAL1500 / "PREREG.md").read_text()  # the replication it pre-registered
