"""Benchmark: the images per second one driver absorbs at cluster scale (bench.perf_driver: stub backbone,
K = 24 configurations, 21 / 459 / 847 classes; target 5,000 images/s, so that 64 GPUs at ~80 images/s are not
held back). Run with `pytest tests/benchmarks --benchmark-enable`; without it nothing runs.

Not reached: the per-image histograms the bootstrap intervals need are K x 8 x C int64 counts (33 KB, 705 KB
and 1.3 MB per image), which one driver cannot take in at 5,000 images/s (reports/perf/driver-cpu.md). What
would carry it there is reducing on the actors, not a faster driver loop; until then the check stays a strict
xfail."""

import pytest

from bench.perf_driver import TARGET_IMAGES_PER_SECOND, measure


@pytest.mark.xfail(strict=True, reason="the driver takes in every image's K x 8 x C histograms; see the docstring")
@pytest.mark.parametrize("classes", [21, 459, 847])
def test_one_driver_absorbs_5000_images_per_second(benchmark, classes):
    if benchmark.disabled:
        pytest.xfail("timed only with --benchmark-enable")
    result = benchmark.pedantic(lambda: measure(classes, 400), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["images_per_second"] >= TARGET_IMAGES_PER_SECOND, result
