"""The score stage: one Ray Tune trial per (configuration, seed), turning the stored histograms into metrics
(bench.scoring.score_trial). Tune's experiment lives in `<work>/tune/` and is restored on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import tune

from bench.config import SweepConfig
from bench.plan import ForwardGroup, Trial
from bench.scoring import score_trial


def group_index(groups: list[ForwardGroup]) -> dict[tuple[str, int], int]:
    """(trial id, seed) -> index of the forward group that traced it."""
    return {(trial.trial_id, group.seed): g for g, group in enumerate(groups) for trial in group.trials}


def tune_results(cfg: SweepConfig, trials: list[Trial], groups: list[ForwardGroup], scores: dict[str, np.ndarray],
                 class_names: list[str], storage: Path) -> list[tuple[str, int, dict]]:
    totals = {}
    for (trial_id, seed), g in group_index(groups).items():
        rows = (scores["trial"] == trial_id) & (scores["group"] == g)
        totals[f"{trial_id}/{seed}"] = scores["hist"][rows].sum(0)
    trainable = tune.with_resources(score_trial, {"cpu": 0.1})
    trainable = tune.with_parameters(trainable, totals=totals, class_names=class_names,
                                     protocol=cfg.metric.protocol)
    path = (storage / "tune").resolve()  # Tune's storage needs an absolute path
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.trial_id for t in trials]),
                         "seed": tune.grid_search(list(cfg.seeds))},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=8, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=str(storage.resolve()), verbose=0,
                                      log_to_file=False))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} Tune trials failed: {errors[0]}")
    return [(r.config["trial"], r.config["seed"], r.metrics) for r in grid]
