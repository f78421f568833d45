"""Benchmark: the 6-point lambda sweep against a 1-point sweep on the same images (target ratio <= 1.3).

Both run the engine's per-image path (`evaluate_batch`: trace once, score every configuration of the forward
setting) at the backbone's native resolution. Run with `pytest tests/benchmarks --benchmark-enable`; the
ratio is stored in the benchmark's extra_info and checked only when benchmarking is enabled.
"""

import time

import pytest

from bench.data import build_dataset
from bench.evaluate import Trial, evaluate_batch, group_trials
from methods import METHODS

LAMBDAS = [0, 0.001, 0.005, 0.01, 0.05, 0.1]
TARGET_RATIO = 1.3


def sweep(backbone, lambdas, samples, dataset):
    cls = METHODS.get("iseg")
    trials = [Trial(f"t{i}", cls.resolve({"lambda": lam}), {"lambda": lam}) for i, lam in enumerate(lambdas)]
    (group,) = group_trials(cls, trials, [0])
    method = cls(backbone)
    hists = []
    for sample in samples:
        hists += evaluate_batch(method, dataset, [sample], group)[0]
    return hists


@pytest.fixture(scope="module")
def images():
    dataset = build_dataset({"name": "shapes", "limit": 3})
    return dataset, [dataset[i] for i in range(len(dataset))]


def best_of(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_six_point_sweep_costs_about_one_forward(benchmark, backbone, images):
    dataset, samples = images
    six = lambda: sweep(backbone, LAMBDAS, samples, dataset)  # noqa: E731
    one = lambda: sweep(backbone, [0.01], samples, dataset)  # noqa: E731
    result = benchmark.pedantic(six, rounds=3, iterations=1, warmup_rounds=1)
    assert len(result) == len(LAMBDAS) * len(samples)
    if benchmark.disabled:
        return
    ratio = benchmark.stats.stats.min / best_of(one, 3)
    benchmark.extra_info["ratio_6_vs_1"] = round(ratio, 3)
    assert ratio <= TARGET_RATIO, f"6-point sweep costs {ratio:.2f}x a 1-point sweep (target {TARGET_RATIO})"
