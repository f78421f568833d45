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
