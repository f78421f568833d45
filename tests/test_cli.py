"""`python -m bench.run` end to end (in-process, one shared Ray session, tiny random components) and its
handling of bad input (in-process through the CLI's main: exit status, the one `error:` line, nothing written)."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

import bench.run
from bench.run import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=20"]
LOCAL = "ray.num_actors=0"  # trace in the test process (the actor pool is exercised by test_fit_stage.py)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lambda_sweep_end_to_end(tmp_path, tiny_model, capsys, monkeypatch, caplog):
    out = tmp_path / "run"
    model = f"model.path={tiny_model}"
    code, stdout, stderr = cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", *SMALL, model, LOCAL, f"output_dir={out}")
    assert code == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    # a quiet console: no warning line; the report's warnings and notes as one line, the report says them in full
    assert "WARNING" not in stderr and "accelerate" not in stderr
    summary = [line for line in stderr.splitlines() if line.startswith("report: ")]
    assert len(summary) == 1 and "prompts are longer than the tokenizer's 16 tokens" in summary[0]
    assert str(out / "report.md") in summary[0]
    assert (out / "report.md").read_text().count("Prompts are longer than the tokenizer's") == 1
    assert not (tmp_path / "run.partial").exists()
    for name in ("config.yaml", "results.parquet", "results.csv", "report.md", "report.html", "run.json"):
        assert (out / name).is_file(), name
    assert not (out / "work").exists()  # shards and Tune state are dropped from a finished run
    frame = pd.read_parquet(out / "results.parquet")
    assert sorted(frame["lambda"]) == [0, 0.001, 0.005, 0.01, 0.05, 0.1]
    for column in ("mIoU", "aAcc", "mAcc", "IoU/background", "IoU/circle", "paper_mIoU", "unet_passes", "fit"):
        assert column in frame.columns, column
    assert frame["mIoU"].between(0, 100).all()
    assert frame["tied"].between(0, 100).all()  # the share of labels tie-breaking decided (both images: 2 classes)
    assert "tied" in pd.read_csv(out / "summary.csv").columns
    # one UNet pass per image for the whole six-point sweep, no fit
    assert (frame["unet_passes"] == 2).all() and (frame["fit"] == "").all()
    assert frame.set_index("lambda").loc[0.01, "paper_mIoU"] == 75.2
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["limit"] == 2 and config["sweep"]["lambda"]["grid"][0] == 0
    report = (out / "report.md").read_text()
    assert "75.2" in report and "iSeg Table 5(b)" in report
    assert pd.read_csv(out / "results.csv").shape[0] == 6
    run = yaml.safe_load((out / "run.json").read_text())
    assert run["schema_version"] == 3 and run["fits"] == 0 and run["method_versions"] == {"iseg": "1"}

    # Resume: a run interrupted after tracing (Ctrl-C while writing results) keeps its shards; with one
    # image's shard lost, the same command completes it, re-tracing only that image, with the same numbers.
    again = tmp_path / "again"
    real_write_run = bench.run.write_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.run, "write_run", interrupted)
    code, _, _ = cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", *SMALL, model, LOCAL, f"output_dir={again}")
    assert code == 130  # Ctrl-C
    monkeypatch.setattr(bench.run, "write_run", real_write_run)
    shards = sorted((tmp_path / "again.partial" / "work" / "shards").glob("shard-*.npz"))
    assert len(shards) == 2
    shards[-1].unlink()
    # a changed configuration is refused, and the interrupted run is left as it was
    code, _, stderr = cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", *SMALL, model, LOCAL, "report.bootstrap=21",
                          f"output_dir={again}")
    assert code == 2 and "started with another configuration" in stderr
    caplog.set_level("INFO")
    code, _, stderr = cli(capsys, ROOT / "sweeps/iseg_lambda.yaml", *SMALL, model, LOCAL, f"output_dir={again}")
    assert code == 0, stderr[-3000:]
    assert "resuming: 1 of 2 images already scored" in caplog.text
    resumed = pd.read_parquet(again / "results.parquet")
    pd.testing.assert_series_equal(resumed["mIoU"], frame["mIoU"])
    assert resumed["unet_passes"].tolist() == [2] * 6  # each image traced once over both sessions


BAD_INPUTS = {
    "malformed yaml": ("name: x\nmethod: [iseg\n", [], "malformed YAML"),
    "unknown method": ("method: isge\ndata: {name: shapes}\n", [], "did you mean 'iseg'"),
    "unknown parameter": ("method: iseg\nsweep: {lamda: [0, 1]}\n", [], "did you mean 'lambda'"),
    "unknown dataset": ("method: iseg\ndata: {name: shapez}\n", [], "did you mean 'shapes'"),
    "unknown key": ("method: iseg\ndta: {name: shapes}\n", [], "did you mean 'data'"),
    "bad override": ("method: iseg\n", ["data.limt=3"], "did you mean 'limit'"),
    "bad value": ("method: iseg\nparams: {iterations: many}\n", [], "must be of type int"),
    "bad section value": ("method: iseg\n", ["train.num_workers=two"], "train.num_workers='two' must be int"),
    "unknown train key": ("method: iseg\n", ["train.num_worker=2"], "did you mean 'num_workers'"),
    "negative retries": ("method: iseg\n", ["train.max_failures=-1"], "train.max_failures=-1 must be >= 0"),
    "missing weights": ("method: iseg\n", ["model.path=/nonexistent/sd"], "model_index.json"),
    "missing dataset root": ("method: iseg\ndata: {name: voc2012, root: /nonexistent/voc}\n", [], "VOC 2012"),
    "fit on the evaluated split": ("method: linear_probe\ndata: {name: shapes, split: train}\n", [],
                                   "fitted on the evaluated split"),
    "fit.from missing": ("method: linear_probe\n", ["fit.from=/nonexistent/run"], "fit.from=/nonexistent/run"),
    "fit.from without fits": ("method: iseg\n", ["fit.from=."], "no configuration of this sweep needs a fit"),
    "generation without ground truth": ("method: daam\nparams: {mode: generation}\n", [],
                                        "mode=generation needs ground truth"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    text, overrides, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    code, _, stderr = cli(capsys, sweep, *overrides, f"output_dir={tmp_path / 'out'}")
    assert code == 2
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), stderr[-2000:]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_default_run_directory_is_relative_to_the_working_directory(tmp_path, tiny_model, capsys, monkeypatch):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text((ROOT / "sweeps" / "iseg_lambda.yaml").read_text()
                     .replace("grid: [0, 0.001, 0.005, 0.01, 0.05, 0.1]", "grid: [0.01]"))
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli(capsys, sweep, "data.limit=1", "data.size=32", f"model.path={tiny_model}", LOCAL)
    assert code == 0, stderr[-3000:]
    run_dir = Path(stdout.strip().splitlines()[-1])
    assert run_dir.parent == Path("reports/runs") and run_dir.name.startswith("iseg_lambda-")
    assert (tmp_path / run_dir / "report.html").is_file()
    assert not (tmp_path / "outputs").exists()
    shutil.rmtree(tmp_path / "reports")


def test_missing_sweep_file(tmp_path, capsys):
    code, _, stderr = cli(capsys, tmp_path / "nope.yaml")
    assert code == 2 and "not found" in stderr


def test_usage_without_arguments(capsys):
    code, stdout, _ = cli(capsys)
    assert code == 2 and "usage: python -m bench.run" in stdout
