"""The ledger: checks that the committed FreeGen downstream report (reports/embedded/freegen_downstream_200) is
the protocol docs/studies/freegen.md describes, and the bars' verdicts on it (strict xfail where not met). These
read committed files; they test no code (tests/test_segformer.py does)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# -- the committed downstream protocol (docs/studies/freegen.md) ---------------------------------------------------
# freegen_downstream_200: 200-image sets made on a GPU with the defaults (learned ASR on SAM's masks, TFF, EGD,
# HST), the bar's evidence. The other tests of the bar (MiT-b0, MMSegmentation's augmentation, caption scenes)
# are described in docs/studies/freegen.md; their reports are in the git history.
DOWNSTREAM_200 = ROOT / "reports" / "embedded" / "freegen_downstream_200"
SETS = {DOWNSTREAM_200: ("/work/data/freegen_full200", "/work/data/freegen_all_off200")}
# the 200-image protocol was pre-registered at three seeds and raised to ten, all reported, when three overlapped
SEEDS = {DOWNSTREAM_200: {"full": list(range(10)), "real": list(range(10)), "all_off": list(range(10))}}


FULL_VS_OFF = ("not reached on the embedded default: over ten training seeds, full FreeGen's 159 kept samples (the "
               "defaults, Stage 2 on) score 23.0 mIoU (t-interval [22.2, 23.8]) against the all-off set's 200 samples "
               "22.3 ([21.5, 23.2]): the paper's order, 0.6 apart (Welch p = 0.23), intervals overlapping; the tiny "
               "segmenter sits a few points above labelling every pixel background (14.5). With MiT-b0 (scale=b0, "
               "five seeds, pre-registered): 25.3 [23.7, 26.8] against 23.6 [20.0, 27.3], 1.7 apart (Welch p = 0.29), "
               "intervals overlapping. With MMSegmentation's training pipeline (augment=mmseg, five seeds, "
               "pre-registered, sets synthesised again on the CPU): 20.6 [19.9, 21.3] against 20.2 [19.6, 20.7]; the "
               "augmentation lowered every arm at 1,000 steps (real shapes 30.1 -> 20.5). At 4,000 steps with it "
               "(ten fresh seeds, pre-registered after a three-seed look that showed 27.0 against 20.9): 22.1 "
               "[20.2, 23.9] against 21.0 [19.6, 22.4], 1.1 apart (Welch p = 0.30). With sets synthesised from the "
               "shapes captions (multi-object scenes, the real arm's images; ten seeds, pre-registered): 24.4 "
               "[22.8, 26.0] against 24.4 [21.6, 27.1] (Welch p = 0.98), although full FreeGen's pseudo-masks "
               "score 61.1 mIoU (kept) against all off's 81.1: its Stage 2 gives every object of a scene one class. "
               "FreeGen's Stage 1 alone on those scenes (ASR + TFF, pseudo-masks 85.2 kept; pre-registered): 23.9 "
               "[21.8, 26.0] against the same all-off arm (Welch p = 0.75)")


def arm(name: str, report: Path = DOWNSTREAM_200) -> dict:
    """One arm of the protocol: per-training-seed mIoU (bootstrap intervals over the val images in the run) and
    the t-interval over the training seeds (ten; three until the first three overlapped: docs/studies/freegen.md)."""
    from bench.stats import t_interval

    rows = pd.read_csv(report / name / "results.csv")
    mean, _, low, high = t_interval(rows["mIoU"])
    return {"rows": rows, "mean": mean, "low": low, "high": high}


@pytest.mark.parametrize("report", [DOWNSTREAM_200], ids=["200"])
def test_downstream_runs_are_the_protocol(report):
    """The committed arms evaluate the same 100 real val shapes with the same segmenter and differ only in the
    training data: FreeGen's kept samples, as many real rendered shapes, the all-off synthetic set."""
    configs = {a: yaml.safe_load((report / a / "config.yaml").read_text()) for a in ("full", "real", "all_off")}
    card = json.loads((report / "cards" / "full" / "dataset.json").read_text())
    full_root, off_root = SETS[report]
    assert configs["full"]["train"]["data"]["root"] == full_root
    assert configs["all_off"]["train"]["data"]["root"] == off_root
    assert configs["real"]["train"]["data"]["name"] == "shapes"
    assert configs["real"]["train"]["data"]["num_images"] == card["counts"]["kept"]
    for config in configs.values():
        assert config["data"] == configs["full"]["data"] and config["params"] == configs["full"]["params"]
    off = json.loads((report / "cards" / "all_off" / "dataset.json").read_text())
    assert off["params"]["rectify"] is False and off["params"]["tff"] is False and card["params"]["tff"] is True
    for name in ("full", "real", "all_off"):
        assert sorted(arm(name, report)["rows"]["train_seed"]) == SEEDS[report][name]


@pytest.mark.parametrize("report", [DOWNSTREAM_200], ids=["tiny"])
def test_synthetic_trained_segmenter_is_within_10_miou_of_real(report):
    """The bar: the segmenter trained on FreeGen's kept synthetic shapes scores within 10 mIoU of the
    same segmenter trained on as many real rendered shapes (means over the training seeds)."""
    full, real = arm("full", report), arm("real", report)
    assert full["mean"] >= real["mean"] - 10, (full["mean"], real["mean"])


@pytest.mark.xfail(strict=True, reason=FULL_VS_OFF)
@pytest.mark.parametrize("report", [DOWNSTREAM_200], ids=["tiny"])
def test_full_freegen_beats_all_off_downstream(report):
    """The bar (the paper's 69.6 vs 60.5 ordering): the segmenter trained on full FreeGen's set beats
    the one trained on the all-off set (raw cross-attention masks, no TFF) beyond the spread over training
    seeds: the t-intervals over the (ten) seeds do not overlap."""
    full, off = arm("full", report), arm("all_off", report)
    assert full["low"] > off["high"], (full, off)
