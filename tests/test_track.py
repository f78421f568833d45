"""MLflow tracking (bench.track) against a real local MLflow store (SQLite), read back with MlflowClient: a run
logged from its run directory, with `tracking=mlflow` at the end of `python -m bench.run`, and after the fact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_report import CLASSES, make_cfg, make_frame, make_prov, make_run_dir

from bench.config import compose
from bench.errors import BenchError
from bench.reporting import write_report

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient

from bench import track

ROOT = Path(__file__).resolve().parents[1]


def finished_run(tmp_path: Path) -> Path:
    """A finished run directory of three configurations with its report and one fit's loss curve."""
    cfg = make_cfg()
    frame = make_frame({0: [60.0], 0.01: [64.5], 0.1: [62.0]})
    run_dir = make_run_dir(tmp_path / "runs" / "iseg_lambda-1", cfg, frame, make_prov(cfg))
    write_report(run_dir, cfg, frame, make_prov(cfg))
    fit = run_dir / "fit" / "abc123"
    fit.mkdir(parents=True)
    (fit / "train_config.json").write_text(json.dumps({"hash": "abc123", "fitter": "probe", "steps": 3}))
    pd.DataFrame({"series": ["", "", ""], "step": [1, 2, 3], "loss": [0.9, 0.5, 0.25]}).to_csv(fit / "loss.csv",
                                                                                              index=False)
    (fit / "done").write_text("")
    return run_dir


def runs_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_a_finished_run_is_logged_per_configuration_and_once(tmp_path):
    run_dir = finished_run(tmp_path)
    parent_id = track.log_run(run_dir)  # the default store: beside the runs
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = MlflowClient(uri)
    parents, children = runs_of(client, "iseg_lambda")
    assert [p.info.run_id for p in parents] == [parent_id]
    summary = pd.read_csv(run_dir / "summary.csv")
    assert len(children) == len(summary) == 3
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.status == "FINISHED"
        lam = float(child.data.params["lambda"])
        expected = summary.loc[summary["lambda"] == lam].iloc[0]
        assert child.data.metrics["mIoU"] == pytest.approx(expected["mIoU"])
        assert child.data.metrics["mIoU_ci_low"] == pytest.approx(expected["ci_low"])
        assert child.data.params["iterations"] == "10"  # the method's resolved defaults, not only the swept value
        assert f"IoU/{CLASSES[1]}" in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["config.yaml"]
    artefacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"config.yaml", "run.json", "summary.csv", "report.md", "report.html", "figures"} <= artefacts
    curve = client.get_metric_history(parent_id, "fit/abc123/loss")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(1, 0.9), (2, 0.5), (3, 0.25)]
    assert parents[0].data.tags[track.RUN_DIR_TAG] == str(run_dir.resolve())

    # after the fact, again: the same MLflow run, nothing logged twice
    assert track.main([str(run_dir)]) == 0
    parents, children = runs_of(client, "iseg_lambda")
    assert len(parents) == 1 and len(children) == 3


def test_tracking_option_is_validated_before_anything_runs(monkeypatch):
    sweep = ROOT / "sweeps" / "iseg_lambda.yaml"
    cfg = compose(sweep, ["tracking=mlflow", "tracking.uri=http://tracking.example:5000"])
    assert cfg.tracking.name == "mlflow" and cfg.tracking.uri == "http://tracking.example:5000"
    assert compose(sweep, []).tracking.name is None
    with pytest.raises(BenchError, match="did you mean mlflow"):
        compose(sweep, ["tracking=mlfow"])
    with pytest.raises(BenchError, match="add tracking=mlflow"):
        compose(sweep, ["tracking.uri=http://x:5000"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(BenchError, match=r"pip install 'diffseg-bench\[tracking\]'"):
        compose(sweep, ["tracking=mlflow"])


def test_a_store_that_refuses_is_one_line_that_keeps_the_run(tmp_path):
    run_dir = finished_run(tmp_path)
    with pytest.raises(BenchError) as err:
        track.log_run(run_dir, uri="nosuchscheme://tracking")
    assert "\n" not in str(err.value) and f"python -m bench.track {run_dir}" in str(err.value)
    assert (run_dir / "report.md").is_file()


@pytest.mark.slow
def test_tracking_mlflow_at_the_end_of_a_run(tmp_path, tiny_model, capsys, monkeypatch):
    """`tracking=mlflow` on the command line: the run directory as the last stdout line, one MLflow run per
    configuration in the store given by tracking.uri, its artefacts beside that store (not in the working
    folder)."""
    from bench.run import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    code = main([str(ROOT / "sweeps/iseg_lambda.yaml"), "data.limit=2", "data.size=32", "report.bootstrap=20",
                 f"model.path={tiny_model}", "ray.num_actors=0", "tracking=mlflow", f"tracking.uri={uri}",
                 "tracking.experiment=tiny", f"output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert captured.out.strip().splitlines()[-1] == str(out)
    parents, children = runs_of(MlflowClient(uri), "tiny")
    assert len(parents) == 1 and len(children) == 6
    assert sorted(float(c.data.params["lambda"]) for c in children) == [0, 0.001, 0.005, 0.01, 0.05, 0.1]
    assert not (tmp_path / "mlflow.db").exists()  # the store named, not the default
    assert (tmp_path / "mlartifacts" / "tiny").is_dir() and not (tmp_path / "mlruns").exists()
