"""Benchmark: the images per second one driver absorbs at cluster scale (bench.perf_driver: stub backbone,
K = 24 configurations, 21 / 459 / 847 classes; target 5,000 images/s, so that 64 GPUs at ~80 images/s are not
held back). Run with `pytest tests/benchmarks --benchmark-enable` on an idle machine; without the flag nothing
runs.

The driver's own work (gathering the batches into shards, the bar, the merge at the end) takes in the nonzero
class columns of each image's histograms (bench.sparse_histograms) faster than the target, judged by the
driver's CPU time (a core of its own). Ray Data's delivery of the result batches does not at
`ray.batch_size=1`: it costs the driver a few milliseconds per batch whatever the batch holds, about 200 images/s
of driver CPU on a shared 2-core machine, 25 times short (reports/perf/driver-cpu.md). Larger batches divide
that cost (about 2,500 images/s at 64); what would reach the target at 1 is fewer, larger blocks than result
batches, or reducing on the actors; until then that check stays a strict xfail."""

import pytest

from bench.perf_driver import TARGET_IMAGES_PER_SECOND, measure, measure_ray


@pytest.mark.parametrize("classes", [21, 459, 847])
def test_one_driver_absorbs_5000_images_per_second(benchmark, classes):
    if benchmark.disabled:
        assert measure(classes, 40, batch_size=8)["images"] == 40  # the replay runs; its speed is not judged here
        pytest.skip("timed only with --benchmark-enable")
    result = benchmark.pedantic(lambda: measure(classes, 2000), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["cpu_images_per_second"] >= TARGET_IMAGES_PER_SECOND, result


@pytest.mark.xfail(strict=True, reason="Ray Data's fixed cost per result batch at ray.batch_size=1; see the docstring")
@pytest.mark.parametrize("classes", [21, 847])
def test_ray_data_delivers_5000_images_per_second_to_one_driver(benchmark, classes):
    if benchmark.disabled:
        pytest.xfail("timed only with --benchmark-enable")
    result = benchmark.pedantic(lambda: measure_ray(classes, 300, batch_size=1), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["driver_cpu_images_per_second"] >= TARGET_IMAGES_PER_SECOND, result
