"""The Ray Tune trainable: one (configuration, seed) scored from its summed histograms.

Kept in a module with light imports (numpy only) because every Tune trial imports it in a worker process.
"""

from __future__ import annotations

from bench.metrics import summarize


def score_trial(config: dict, totals: dict, class_names: list[str], protocol: str) -> None:
    from ray import tune

    tune.report(summarize(totals[f"{config['trial']}/{config['seed']}"], class_names, protocol))
