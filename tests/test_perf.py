"""bench.perf: its command-line errors and one small end-to-end measurement on the embedded model."""

import json

import pytest

from bench.perf import interleaved, main


@pytest.mark.parametrize("argv, needle", [
    (["--batches", "1,x"], "--batches"),
    (["--batches", "0"], "positive"),
    (["--repeats", "0"], "positive"),
    (["--parts", "inversion,speed"], "--parts"),
    (["--model", "sd22"], "model"),
    (["--parts", "overhead,inversion"], "alone"),
    (["--parts", "fits,sharing"], "alone"),
])
def test_bad_arguments_are_one_line(argv, needle, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "perf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "perf").exists()


def test_interleaved_alternates_and_counts():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          device=__import__("torch").device("cpu"), repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert timings["a"]["repeats"] == 3 and timings["b"]["min_s"] <= timings["b"]["median_s"]


@pytest.mark.slow
def test_perf_report_on_the_embedded_model(tmp_path):
    assert main(["--model", "embedded", "--device", "cpu", "--batches", "1,2", "--repeats", "1", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "embedded-cpu.json").read_text())
    assert [row["batch"] for row in result["inversion"]] == [1, 2]
    assert all(row["iseg_images_per_second"] > 0 for row in result["inversion"])
    assert result["generation"]["traced_over_pipeline"] > 0 and "memory" in result
    assert "Device: CPU" in (tmp_path / "embedded-cpu.md").read_text()


def test_overhead_table_states_load_and_verdict():
    """The overhead part's Markdown from measured phases: one row per variant, fixed overhead = total - the work -
    Ray's own start where the run started Ray, the verdict against 10 s, and a warning when the machine was loaded."""
    from bench.perf_overhead import render_overhead

    phases = {"startup": 2.0, "engine": 3.0, "trace": 20.0, "report": 1.0, "shutdown": 2.0, "cpu": 12.0}
    o = {"sweep": "sweeps/iseg_lambda.yaml data.limit=16", "repeats": 3, "ray_own_seconds": 8.0, "work_seconds": 4.0,
         "cpu_count": 2, "target_seconds": 10.0,
         "variants": {"auto": {**phases, "total": 12.0, "load": 1.0, "num_actors": 0, "execution": "driver",
                               "fixed_overhead": 8.0},
                      "actors": {**phases, "total": 30.0, "load": 9.0, "num_actors": 1, "execution": "actors",
                                 "fixed_overhead": 18.0}}}
    text = "\n".join(render_overhead(o))
    assert "| auto | driver | 1.0 | 12.0 | 12.0 |" in text and "| actors | 1 actor(s) | 9.0 | 30.0 |" in text
    assert "reached (best 8.0 s)" in text and "load average reached 9" in text
    o["variants"]["auto"]["fixed_overhead"] = 12.0
    assert "not reached (best 12.0 s)" in "\n".join(render_overhead(o))


def test_fixed_overhead_subtracts_rays_start_only_from_runs_that_start_ray(monkeypatch, tmp_path):
    import bench.perf_overhead as po

    runs = iter([{"variant": v, "execution": e, "num_actors": n, "load": 1.0, "total": t, "cpu": 1.0,
                  "startup": 1.0, "engine": 1.0, "trace": 1.0, "report": 1.0, "shutdown": 1.0}
                 for v, e, n, t in (("auto", "driver", 0, 14.0), ("actors", "actors", 1, 30.0))])
    monkeypatch.setattr(po, "one_run", lambda variant, out: next(runs))
    monkeypatch.setattr(po, "ray_own", lambda: 7.0)
    monkeypatch.setattr(po, "work_seconds", lambda: 3.0)
    o = po.measure_overhead(1)
    assert o["variants"]["auto"]["fixed_overhead"] == 11.0  # 14 - 3: no Ray started, no allowance
    assert o["variants"]["actors"]["fixed_overhead"] == 20.0  # 30 - 3 - 7


def test_sharing_table_states_the_ratios_and_verdict():
    from bench.perf_overhead import render_sharing

    o = {"sweep": "sweeps/iseg_lambda.yaml data.limit=128", "images": 128, "repeats": 2, "target": 1.3,
         "median": {1: {"total": 40.0, "trace": 30.0, "cpu": 38.0, "load": 1.0},
                    24: {"total": 50.0, "trace": 39.0, "cpu": 47.0, "load": 1.2}},
         "ratio_total_median": 1.25, "ratio_total_min": 1.2, "ratio_cpu_median": 1.24, "ratio_trace_median": 1.3}
    text = "\n".join(render_sharing(o))
    assert "| 24 | 1.2 | 50.0 | 47.0 | 39.0 |" in text and "total 1.25x" in text and ": reached." in text
    o["ratio_total_median"] = 1.4
    assert "not reached" in "\n".join(render_sharing(o))
    o["ratio_total_median"], o["ratio_cpu_median"] = 1.1, 1.45  # a loaded K = 1 run does not make it reached
    assert "not reached" in "\n".join(render_sharing(o))


def test_fits_part_alternates_the_variants_and_states_the_ratio(monkeypatch):
    import bench.perf_overhead as po

    seen = []

    def fake(variant, out):
        seen.append(variant)
        stage = {"one_at_a_time": 100.0, "auto": 55.0}[variant]
        return {"variant": variant, "load": 1.0, "total": stage + 20, "fit_stage": stage, "each_fit": [50.0, 50.0]}

    monkeypatch.setattr(po, "fits_run", fake)
    o = po.measure_fits(2)
    assert seen == ["one_at_a_time", "auto", "auto", "one_at_a_time"]
    assert o["ratio_fit_stage"] == 0.55 and o["ratio_total"] == 0.625
    text = "\n".join(po.render_fits(o))
    assert "| auto | 1.0 | 75.0 | 55.0 |" in text and "fit stage 0.55x" in text
