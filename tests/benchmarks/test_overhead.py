"""Benchmark: the fixed overhead of a small local run (issue 12 target: <= 10 s beyond the work, and beyond Ray's
own start where the run starts Ray). Whole `python -m bench.run sweeps/iseg_lambda.yaml data.limit=16`
processes with the default `ray.execution=auto` (the driver on <= 2 cores), three rounds, the median
(bench.perf_overhead; `python -m bench.perf --parts overhead` writes the report). Run with
`pytest tests/benchmarks --benchmark-enable`; without it nothing runs.
"""

import pytest

from bench.perf_overhead import TARGET_SECONDS, measure_overhead


@pytest.mark.xfail(strict=True, reason="measured 14.1 s beyond the work with ray.execution=auto (the driver, no Ray; 17.0 s "
                   "in all, load 1.2, 2 shared cores; 26.8 s beyond Ray's own start with an actor): start-up 9.9 s (the "
                   "imports a model load needs: torch, diffusers (~4 s of it: diffusers' package import), "
                   "transformers; the preflight's rendering of every image), report 3.4 s (reports/perf/overhead-cpu.md)")
def test_fixed_overhead_of_a_small_local_run_is_at_most_10_s(benchmark):
    if benchmark.disabled:
        pytest.skip("timed only with --benchmark-enable")
    result = benchmark.pedantic(lambda: measure_overhead(3, variants=("auto",)), rounds=1, iterations=1)
    auto = result["variants"]["auto"]
    benchmark.extra_info.update({"fixed_overhead_s": auto["fixed_overhead"], "total_s": auto["total"],
                                 "work_s": result["work_seconds"], "load": auto["load"]})
    assert auto["fixed_overhead"] <= TARGET_SECONDS, f"fixed overhead {auto['fixed_overhead']:.1f} s"
