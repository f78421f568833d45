"""The score stage: the stored per-image histograms of each (configuration, seed) summed and turned into
metrics in this process (bench.metrics.summarize), with the share of tied labels (`tied`); scoring is arithmetic,
so no Ray units are spent on it."""

from __future__ import annotations

import numpy as np

from bench.metrics import summarize, tied_percent
from bench.plan import ForwardGroup, Trial
from bench.sparse_histograms import CLASSES, COUNTS, totals, widen
from bench.stages.trace import load_shards


def group_index(groups: list[ForwardGroup]) -> dict[tuple[str, int], int]:
    """(trial id, seed) -> index of the forward group that traced it."""
    return {(trial.trial_id, group.seed): g for g, group in enumerate(groups) for trial in group.trials}


def load_scores(*shards) -> dict[str, np.ndarray]:
    """A sweep's shards (one folder, or one per backbone of a sweep over models) as one set of rows in one order
    (image, forward setting, configuration): shards arrive in completion order, which a retried batch, a resumed
    run or several actors change; one order makes everything derived from them (bootstrap) identical."""
    parts = [load_shards(folder) for folder in shards]
    if len(parts) > 1 and CLASSES in parts[0]:  # each folder's encoded columns are padded to its own widest row
        parts = widen(parts)
    scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((scores["trial"], scores["group"], scores["index"]))
    return {k: v[order] for k, v in scores.items()}


def summed(scores: dict[str, np.ndarray], rows: np.ndarray, num_classes: int) -> np.ndarray:
    """The (H, C) int64 histograms of the selected rows summed: the dataset totals of one (configuration, seed)."""
    if "hist" in scores:
        return scores["hist"][rows].sum(0)
    return totals({CLASSES: scores[CLASSES][rows], COUNTS: scores[COUNTS][rows]}, num_classes)


def score(trials: list[Trial], groups: list[ForwardGroup], seeds: list[int], scores: dict[str, np.ndarray],
          class_names: list[str], protocol: str) -> list[tuple[str, int, dict]]:
    """[(trial id, seed, metrics)] in trial order, seeds in the sweep's order."""
    group_of = group_index(groups)
    out = []
    for trial in trials:
        for seed in seeds:
            g = group_of[(trial.trial_id, seed)]
            rows = (scores["trial"] == trial.trial_id) & (scores["group"] == g)
            metrics = summarize(summed(scores, rows, len(class_names)), class_names, protocol)
            if "ties" in scores:
                metrics["tied"] = tied_percent(scores["ties"][rows])
            out.append((trial.trial_id, seed, metrics))
    return out

