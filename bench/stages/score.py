"""The score stage: the stored per-image histograms of each (configuration, seed) summed and turned into
metrics in this process (bench.metrics.summarize), with the share of tied labels (`tied`); scoring is arithmetic,
so no Ray units are spent on it."""

from __future__ import annotations

import numpy as np

from bench.metrics import summarize, tied_percent
from bench.plan import ForwardGroup, Trial


def group_index(groups: list[ForwardGroup]) -> dict[tuple[str, int], int]:
    """(trial id, seed) -> index of the forward group that traced it."""
    return {(trial.trial_id, group.seed): g for g, group in enumerate(groups) for trial in group.trials}


def score(trials: list[Trial], groups: list[ForwardGroup], seeds: list[int], scores: dict[str, np.ndarray],
          class_names: list[str], protocol: str) -> list[tuple[str, int, dict]]:
    """[(trial id, seed, metrics)] in trial order, seeds in the sweep's order."""
    group_of = group_index(groups)
    out = []
    for trial in trials:
        for seed in seeds:
            g = group_of[(trial.trial_id, seed)]
            rows = (scores["trial"] == trial.trial_id) & (scores["group"] == g)
            metrics = summarize(scores["hist"][rows].sum(0), class_names, protocol)
            if "ties" in scores:
                metrics["tied"] = tied_percent(scores["ties"][rows])
            out.append((trial.trial_id, seed, metrics))
    return out

