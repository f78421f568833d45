"""Benchmark: per-image cost of K post-processing settings against K = 1 on the same images (target <= 1.3x).

Every round times K = 1, K = 6 (the lambda sweep) and K = 24 (lambda x N) back to back on the engine's
per-image path (`evaluate_batch`: trace once, predict, histogram and count the ties of every configuration of the
forward setting), so load from other processes hits all three alike; the ratios are of the per-setting minima over
the rounds (medians in extra_info). Run with `pytest tests/benchmarks --benchmark-enable`; without it the
sweeps run once and nothing is timed.

Measured on the embedded default (64 px UNet, 512 px labels), CPU, one thread, on a shared 2-core machine,
min-ratio over 7 interleaved rounds. Session 16 (tiled labels' undecided tiles kept as byte-sized local labels,
fewer temporaries in the certified labels, Ent-Self batched over lambdas, the allocator settings of bench.env,
ImageScorer without np.unique), under another job's load, whole runs of the previous and the new tree
interleaved: K = 24 1.44 / 1.33 / 1.36x before (K = 24 at 88-104 ms) and 1.27 / 1.29 / 1.29x after (K = 1
62-66 ms, K = 24 79-84 ms); eight further runs across its last two changes 1.26-1.31x; five runs near idle
1.27-1.30x (K = 1 60-64 ms, K = 24 78-81 ms). Met by a thin margin: a run may land just above it. K = 6:
1.08-1.12x. Earlier: K = 24 4.5-5.1x before labelling by tiles,
1.80-2.06x before tiles were also decided by their corners, 1.40-1.55x before certified labels of the undecided
tiles, 1.33-1.45x near idle in sessions 14-15 (then a strict xfail). Labels are exact: iSeg's release resize is
labelled by tiles (methods.tiled_labels: bounds and corner differences decide most tiles, certified scores most
of the rest, F.interpolate's own values the remainder: bit for bit the full upsample's labels). K = 24 adds
~18 ms per image to K = 1's ~65; profiled (bench.env's allocator settings), 11 ms of that is labelling by tiles
(certified labels 3.4, exact extremes 1.9, F.interpolate's labels 1.7, corner decisions 1.1), 2.7 iSeg's
Ent-Self and refinement chains (one per distinct lambda), 1.6 the resize and min-max of 24 configurations' maps,
1.7 histograms.
"""

import statistics
import time

import pytest

from bench.data import build_dataset
from bench.evaluate import Trial, evaluate_batch, group_request, group_trials
from methods import METHODS

LAMBDAS = [0, 0.001, 0.005, 0.01, 0.05, 0.1]
SETTINGS = {1: [{"lambda": 0.01}], 6: [{"lambda": lam} for lam in LAMBDAS],
            24: [{"lambda": lam, "iterations": n} for lam in LAMBDAS for n in (1, 3, 5, 10)]}
TARGET_RATIO = 1.3
ROUNDS = 7


@pytest.fixture(scope="module")
def timings(backbone):
    """{K: [seconds per image, one per round]} of interleaved rounds (None without --benchmark-enable)."""
    dataset = build_dataset({"name": "shapes", "limit": 3})
    samples = [dataset[i] for i in range(len(dataset))]
    cls = METHODS.get("iseg")
    method = cls(backbone)
    groups = {}
    for k, points in SETTINGS.items():
        (groups[k],) = group_trials(cls, [Trial(f"t{i}", cls.resolve(p), p) for i, p in enumerate(points)], [0])
    requests = {k: group_request(method, g) for k, g in groups.items()}

    def per_image(k):
        start = time.perf_counter()
        # as the engine calls it (bench.stages.trace): the group's trace request built once, tie counts included
        hists = [h for s in samples for h in evaluate_batch(method, dataset, [s], groups[k], requests[k], ties=[])[0]]
        assert len(hists) == k * len(samples)
        return (time.perf_counter() - start) / len(samples)

    return per_image


def _ratio(benchmark, per_image, k):
    if benchmark.disabled:
        per_image(k)
        pytest.skip("timed only with --benchmark-enable")
    times = {1: [], k: []}

    def round_():  # K = 1 and K = k back to back, alternating which goes first
        order = (1, k) if len(times[1]) % 2 == 0 else (k, 1)
        for key in order:
            times[key].append(per_image(key))

    per_image(1), per_image(k)  # warm-up
    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    ratio = min(times[k]) / min(times[1])
    benchmark.extra_info.update({f"ratio_{k}_vs_1": round(ratio, 3),
                                 f"median_ratio_{k}_vs_1": round(statistics.median(times[k]) /
                                                                 statistics.median(times[1]), 3),
                                 "ms_per_image_k1": round(1000 * min(times[1]), 1),
                                 f"ms_per_image_k{k}": round(1000 * min(times[k]), 1)})
    return ratio


def test_six_settings_cost_at_most_1_3x_one(benchmark, timings):
    ratio = _ratio(benchmark, timings, 6)
    assert ratio <= TARGET_RATIO, f"K = 6 costs {ratio:.2f}x K = 1 per image (target {TARGET_RATIO})"


def test_twenty_four_settings_cost_at_most_1_3x_one(benchmark, timings):
    ratio = _ratio(benchmark, timings, 24)
    assert ratio <= TARGET_RATIO, f"K = 24 costs {ratio:.2f}x K = 1 per image (target {TARGET_RATIO})"


def test_twenty_four_settings_cost_at_most_1_3x_one_end_to_end(benchmark):
    """Whole `bench.run` processes over 128 images, K = 24 and K = 1 alternating (bench.perf_overhead).
    Measured 1.19x wall, 1.20x CPU (medians of 2 rounds near idle; reports/perf/sharing-cpu.md); 1.31x / 1.34x
    before qualitative score maps were stored at figure size (full-size maps of 24 configurations: ~9 s)."""
    if benchmark.disabled:
        pytest.skip("timed only with --benchmark-enable")
    from bench.perf_overhead import measure_sharing

    result = benchmark.pedantic(lambda: measure_sharing(2), rounds=1, iterations=1)
    benchmark.extra_info.update({k: result[k] for k in ("ratio_total_median", "ratio_cpu_median")})
    ratio = max(result["ratio_total_median"], result["ratio_cpu_median"])  # wall moves with other work
    assert ratio <= TARGET_RATIO, f"K = 24 costs {ratio}x K = 1 end to end"
