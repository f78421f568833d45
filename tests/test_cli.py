"""`python -m bench.run` end to end (with Ray) and its handling of bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.limit=2", "data.size=64", "model.resolution=64", "report.bootstrap=20"]


def run_cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench.run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_lambda_sweep_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("sweeps/iseg_lambda.yaml", *SMALL, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert not (tmp_path / "run.partial").exists()
    for name in ("config.yaml", "results.parquet", "results.csv", "report.md", "report.html", "run.json"):
        assert (out / name).is_file(), name
    frame = pd.read_parquet(out / "results.parquet")
    assert sorted(frame["lambda"]) == [0, 0.001, 0.005, 0.01, 0.05, 0.1]
    for column in ("mIoU", "aAcc", "mAcc", "IoU/background", "IoU/circle", "paper_mIoU", "unet_passes"):
        assert column in frame.columns, column
    assert frame["mIoU"].between(0, 100).all()
    # one UNet pass per image for the whole six-point sweep
    assert (frame["unet_passes"] == 2).all()
    assert frame.set_index("lambda").loc[0.01, "paper_mIoU"] == 75.2
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["limit"] == 2 and config["sweep"]["lambda"]["grid"][0] == 0
    report = (out / "report.md").read_text()
    assert "75.2" in report and "iSeg Table 5(b)" in report
    assert pd.read_csv(out / "results.csv").shape[0] == 6

    # Resume: an interrupted copy of this run (one image's shard lost, no results yet) is completed by the
    # same command and reproduces the same numbers, re-tracing only the missing image.
    import shutil

    again = tmp_path / "again"
    partial = tmp_path / "again.partial"
    shutil.copytree(out / "shards", partial / "shards")
    shards = sorted((partial / "shards").glob("shard-*.npz"))
    assert len(shards) == 2
    shards[-1].unlink()
    proc = run_cli("sweeps/iseg_lambda.yaml", *SMALL, f"output_dir={again}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 1 of 2 images already scored" in proc.stderr
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
    "missing weights": ("method: iseg\n", ["model.path=/nonexistent/sd"], "model_index.json"),
    "missing dataset root": ("method: iseg\ndata: {name: voc2012, root: /nonexistent/voc}\n", [], "VOC 2012"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(case, tmp_path):
    text, overrides, message = BAD_INPUTS[case]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    out = tmp_path / "out"
    proc = run_cli(sweep, *overrides, f"output_dir={out}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_default_run_directory_is_relative_to_the_working_directory(tmp_path):
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text((ROOT / "sweeps" / "iseg_lambda.yaml").read_text().replace("grid: [0, 0.001, 0.005, 0.01, 0.05, 0.1]", "grid: [0.01]"))
    proc = run_cli(sweep, "data.limit=1", "data.size=64", "model.resolution=64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == Path("reports/runs") and run_dir.name.startswith("iseg_lambda-")
    assert (tmp_path / run_dir / "report.html").is_file()
    assert not (tmp_path / "outputs").exists()


def test_missing_sweep_file(tmp_path):
    proc = run_cli(tmp_path / "nope.yaml", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr
