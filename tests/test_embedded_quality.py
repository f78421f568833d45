"""The shipped embedded model meets the quality bar of the issue that asked for it, measured by the bench itself:
inversion mode, held-out `shapes` val images at the model's native resolution, every method at its default
parameters, the `iseg` metric protocol. The thresholds are the issue's, not fitted to the model."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from bench.data import build_dataset
from bench.evaluate import Trial, evaluate_batch, group_trials
from bench.metrics import summarize, tied_percent
from methods import METHODS
import methods.maps

torch.set_num_threads(1)
# The quality bar of the shipped model: slow, and CI runs it as its own step (.ci/run).
pytestmark = [pytest.mark.slow, pytest.mark.quality, pytest.mark.timeout(1800)]
N_IMAGES = 40
ISEG_CONFIGS = {  # name -> overrides of iSeg's defaults (N = 10, lambda = 0.01, ...)
    "default": {},
    "raw": {"iterations": 0},  # the fused cross-attention map, not refined
    "ent_self_n1": {"iterations": 1},
    "naive_n1": {"iterations": 1, "lambda": 0.0},
    "naive_n10": {"lambda": 0.0},
}


@pytest.fixture(scope="module")
def shipped(backbone):
    from bench.embedded import shipped_folder

    if shipped_folder() is None or backbone.info.get("random"):
        pytest.skip("no trained embedded weights shipped")
    return backbone


def miou(backbone, name: str, configs: dict[str, dict]) -> dict[str, float]:
    """mIoU of each configuration of one method on the first N_IMAGES val images (one UNet pass per image and
    forward setting)."""
    cls = METHODS.get(name)
    method = cls(backbone)
    dataset = build_dataset({"name": "shapes", "size": backbone.resolution, "limit": N_IMAGES})
    trials = [Trial(key, cls.resolve(cfg), cfg) for key, cfg in configs.items()]
    out = {}
    for group in group_trials(cls, trials, [0]):
        totals = [0] * len(group.trials)
        for start in range(0, len(dataset), 10):
            samples = [dataset[i] for i in range(start, min(len(dataset), start + 10))]
            hists, _ = evaluate_batch(method, dataset, samples, group)
            for k, hist in enumerate(hists):  # sample-major
                totals[k % len(group.trials)] += hist
        out |= {t.trial_id: summarize(total, dataset.classes, "iseg")["mIoU"] for t, total in zip(group.trials, totals)}
    return out


@pytest.fixture(scope="module")
def scores(shipped) -> dict[str, float]:
    out = {f"iseg/{k}": v for k, v in miou(shipped, "iseg", ISEG_CONFIGS).items()}
    for name in ("daam", "whole_image", "centre_blob"):
        out[name] = miou(shipped, name, {"default": {}})["default"]
    return out


# Parts of the bar the shipped weights do not reach yet (docs/studies/embedded-model.md has the measurements). Strict:
# a model that reaches one turns its test red until the marker is removed.
NOT_REACHED = pytest.mark.xfail(strict=True, reason="quality bar not reached by the shipped embedded weights")


@NOT_REACHED
def test_iseg_with_default_parameters_reaches_60_miou(scores):
    assert scores["iseg/default"] >= 60, scores


def test_raw_cross_attention_is_well_above_trivial_baselines(scores):
    assert scores["daam"] >= max(scores["whole_image"], scores["centre_blob"]) + 10, scores


# v2 weights, 40 images: the refined default (N = 10) 47.7 against the raw fused map 60.8; one Ent-Self iteration
# (70.0) does beat it. The last decoder self-attention (16x16) spreads the maps with every further product.
@NOT_REACHED
def test_refinement_beats_the_raw_map_it_starts_from(scores):
    assert scores["iseg/default"] > scores["iseg/raw"], scores


@NOT_REACHED
def test_refined_maps_beat_raw_cross_attention_of_daam(scores):
    assert scores["iseg/default"] > scores["daam"], scores


@NOT_REACHED  # v2 weights: N = 10 47.7 < N = 1 70.0 (40 images)
def test_ent_self_improves_with_iterations(scores):
    """iSeg Fig. 1(f), Ent-Self curve."""
    assert scores["iseg/default"] > scores["iseg/ent_self_n1"], scores


# This passed on the v1 weights while Ent-Self collapsed every class map into one (the class maps
# differed by ~1e-5, so it compared foreground/background masks). With Ent-Self on the row-max scale: v1 weights
# 15.0 (lambda = 0.01) against 15.3 (naive, N = 10); v2 weights 47.7 against 49.9 on these 40 images (48.2 against 49.5 with
# the float32 chain: at N = 10 both are tie-breaking, see `tied` below).
@NOT_REACHED
def test_ent_self_beats_naive_iteration(scores):
    """iSeg Fig. 1(f): Ent-Self above naive iteration at N = 10."""
    assert scores["iseg/default"] > scores["iseg/naive_n10"], scores


# Ties (measured on the v2 weights, 40 images): the refinement chain is a power iteration, so after many steps
# every class map of an image converges to the same map (the self-attention's leading non-constant eigenvector)
# and min-max makes them equal: at N = 10 the two best classes' final scores lie within 1e-5 on 72% of the
# pixels of multi-class images (N = 1: 0.1%). Labels there are decided by tie-breaking and rounding: computing
# the chain in another float32 summation order moved the main job's settings by up to 4 mIoU, which is why it
# runs in float64 (methods.iseg.CHAIN_DTYPE). Comparisons between N = 10 settings on this model are not
# evidence about the settings.
@pytest.fixture(scope="module")
def tied(shipped) -> dict[str, float]:
    """Share of the class-score cells of multi-class images whose two best final class scores lie within 1e-5,
    for iSeg's default (N = 10) and one Ent-Self step."""
    cls = METHODS.get("iseg")
    method = cls(shipped)
    dataset = build_dataset({"name": "shapes", "size": shipped.resolution, "limit": N_IMAGES})
    configs = {"default": {}, "ent_self_n1": {"iterations": 1}}
    (group,) = group_trials(cls, [Trial(k, cls.resolve(c), c) for k, c in configs.items()], [0])
    ties: list = []
    # at the float32 rounding scale (1e-5), not the tie rule's tolerance (methods.labels.TIE_TOL, 0.01), which
    # the reports' column counts: at 0.01 one Ent-Self step leaves 49% of the counted cells tied (40 images)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods.maps, "TIE", 1e-5)
        for start in range(0, len(dataset), 10):
            evaluate_batch(method, dataset, [dataset[i] for i in range(start, min(len(dataset), start + 10))],
                           group, ties=ties)
    per_config = np.asarray(ties).reshape(-1, len(group.trials), 2)  # image-major, then the group's trials
    return {t.trial_id: tied_percent(per_config[:, j]) / 100 for j, t in enumerate(group.trials)}


def test_one_ent_self_step_keeps_the_class_maps_apart(tied):
    assert tied["ent_self_n1"] <= 0.01, tied


@NOT_REACHED  # v2 weights: 72% of the pixels tied at N = 10
def test_default_keeps_the_class_maps_apart(tied):
    """At iSeg's default N = 10 the two best classes differ by more than 1e-5 on >= 95% of the pixels of
    multi-class images (so that labels are not decided by tie-breaking)."""
    assert tied["default"] <= 0.05, tied


def test_naive_iteration_degrades(scores):
    """iSeg Fig. 1(f), naive curve."""
    assert scores["iseg/naive_n10"] < scores["iseg/naive_n1"], scores


def test_generations_pass_the_caption_check(shipped):
    """>= 70% of images sampled from test-split captions (DDIM 25 steps, guidance 4) pass
    `generated_ground_truth`, so generation-mode protocols can score freely generated images."""
    from bench.embedded import shipped_folder
    from bench.embedded.evaluate import generation_check

    report = generation_check(shipped_folder(), num_images=32)
    assert report["accepted"] >= 0.7, report["reasons"]


# v2 weights: 0.74 by total mass; by mean attention per object pixel (which a uniform map leaves at chance) 0.98.
@NOT_REACHED
def test_class_words_bind_to_their_own_objects(shipped):
    """In two-object images, each shape word's cross-attention has more mass on its own object than on the
    other in >= 90% of cases (at the bench's default timestep, t = 100)."""
    from bench.embedded import shipped_folder
    from bench.embedded.evaluate import evaluate

    report = evaluate(shipped_folder(), num_images=100, t=100)
    assert report["binding"]["raw"]["objects"] >= 40
    assert report["binding"]["raw"]["rate"] >= 0.9, report["binding"]
