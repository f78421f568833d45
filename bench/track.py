"""`python -m bench.track RUN_DIR [--uri URI] [--experiment NAME]`: log a finished run to MLflow.

`tracking=mlflow` on a sweep does the same at the end of the run. Configurations are scored on the driver (not in
Ray Tune trials), so everything is logged from the run directory, after the fact, by MLflow's client:

- one parent MLflow run per bench run: the sweep, method, dataset and model as parameters; the resolved config,
  run.json, summary.csv, the report (Markdown, HTML, figures) as artefacts; each fit's loss curve as the metric
  `fit/<hash>/loss` (one point per logged step; `fit/<hash>/<series>/loss` where a fit logs several series);
- one nested run per configuration: its method parameters (fixed and swept), its metrics (mean over seeds: the
  main metric with its 95% interval, mIoU, mAcc, aAcc, the tied-label share, per-class IoU) and the resolved
  config.

The default store is local, beside the runs: `sqlite:///<runs folder>/mlflow.db`, artefacts in
`<runs folder>/mlartifacts` (`mlflow ui --backend-store-uri sqlite:///...` shows it). `--uri` / `tracking.uri=`
takes a server (`http://host:5000`), which is what runs on several machines should log to. A run directory is
logged once per experiment: logging it again names the MLflow run that already holds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

from bench.errors import BenchError

log = logging.getLogger(__name__)
INSTALL = "pip install 'diffseg-bench[tracking]'"
RUN_DIR_TAG, HASH_TAG = "diffseg.run_dir", "diffseg.config_hash"
ARTEFACTS = ("config.yaml", "run.json", "summary.csv", "results.csv", "report.md", "report.html")
METRIC_NAME = re.compile(r"[^\w\-. /]")  # what MLflow accepts in a metric or parameter name
PARAM_LIMIT = 6000  # MLflow's longest parameter value


def require_mlflow():
    """The mlflow module, or one line naming the install command."""
    try:
        import mlflow
    except ImportError:
        raise BenchError(f"tracking=mlflow needs MLflow, which is not installed; {INSTALL}") from None
    for name in ("mlflow", "alembic"):  # MLflow sets its loggers to INFO on import (store creation, migrations)
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def _name(key: str) -> str:
    return METRIC_NAME.sub("_", str(key))


def _value(value) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text[:PARAM_LIMIT]


def _finite(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _batched(items: list, size: int = 900):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_run(run_dir: str | Path, uri: str | None = None, experiment: str | None = None) -> str:
    """Log a finished run directory to MLflow (see the module's docstring); returns the parent MLflow run's id.
    A run directory this experiment already holds is not logged twice (its id is returned)."""
    require_mlflow()
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    from bench.reporting import load_run, summarize_run
    from bench.reporting.fits import load_fits

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    summary = summarize_run(run)
    cfg = run.cfg
    tracking = cfg.get("tracking") or {}
    uri = uri or tracking.get("uri") or default_uri(run_dir)
    experiment = experiment or tracking.get("experiment") or run.name
    where = str(run_dir.resolve())
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None  # a server's own artefact store
            if uri.startswith("sqlite:///"):  # a local store: artefacts beside it (MLflow's default is ./mlruns)
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        quoted = where.replace("'", "\\'")
        existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{quoted}'",
                                      max_results=1)
        if existing:
            log.info("%s is already logged to MLflow (run %s, experiment %s at %s)", run_dir,
                     existing[0].info.run_id, experiment, uri)
            return existing[0].info.run_id
        parent = _log_parent(client, experiment_id, run, run_dir, where, Metric, Param, load_fits)
        config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
        for _, row in summary.iterrows():
            _log_configuration(client, experiment_id, parent, run, row, config_text, Metric, Param)
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
    except Exception as err:  # noqa: BLE001 (MLflow's, SQLAlchemy's, the network's: the run is finished and kept)
        first = " ".join(str(err).split())[:300]
        raise BenchError(f"MLflow at {uri} refused the run ({first}); the run is kept in {run_dir}: log it with "
                         f"python -m bench.track {run_dir} --uri <a working store>") from None
    log.info("logged %d configurations of %s to MLflow (run %s, experiment %s at %s)", len(summary), run_dir,
             parent, experiment, uri)
    return parent


def _log_parent(client, experiment_id: str, run, run_dir: Path, where: str, Metric, Param, load_fits) -> str:
    cfg, prov = run.cfg, run.prov
    tags = {RUN_DIR_TAG: where, HASH_TAG: str(prov.get("config_hash", "")), "diffseg.sweep": run.name,
            "diffseg.method": str(cfg.get("method")), "mlflow.note.content": str(cfg.get("description") or "")}
    parent = client.create_run(experiment_id, run_name=run.label or run.name, tags=tags).info.run_id
    params = {"sweep": run.name, "sweep_file": cfg.get("sweep_file"), "method": cfg.get("method"),
              "dataset": run.dataset_label, "model": run.model_label, "metric_protocol": run.protocol,
              "images": (prov.get("dataset") or {}).get("num_images", prov.get("num_images")),
              "seeds": cfg.get("seeds"), "configurations": prov.get("num_trials"),
              "forward_settings": prov.get("num_forward_settings"), "unet_passes": prov.get("unet_passes"),
              "swept": ", ".join(run.swept), "overrides": " ".join(map(str, cfg.get("overrides") or []))}
    metrics = [("wall_seconds", prov.get("wall_seconds")), ("trace_seconds", prov.get("trace_seconds"))]
    timestamp = _timestamp()
    batch = [Metric(_name(k), v, timestamp, 0) for k, v in metrics if _finite(v) is not None]
    for fit in load_fits(run_dir):  # each fit's loss curve, one point per logged step
        curve = fit["curve"]
        series = curve["series"].astype(str) if "series" in curve.columns else None
        several = series is not None and series.nunique() > 1
        for k, point in curve.iterrows():
            loss = _finite(point.get("loss"))
            if loss is None:
                continue
            key = f"fit/{fit.get('hash', 'fit')}/" + (f"{series.iloc[k]}/" if several else "") + "loss"
            batch.append(Metric(_name(key), loss, timestamp, int(point.get("step", k))))
    client.log_batch(parent, params=[Param(_name(k), _value(v)) for k, v in params.items() if v is not None])
    for chunk in _batched(batch):
        client.log_batch(parent, metrics=chunk)
    for name in ARTEFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(parent, str(run_dir / name))
    for figure in sorted(run_dir.glob("*.png")):
        client.log_artifact(parent, str(figure), "figures")
    return parent


def _log_configuration(client, experiment_id: str, parent: str, run, row, config_text: str, Metric, Param) -> None:
    """One configuration (a row of the run's summary) as a nested MLflow run."""
    from mlflow.entities import RunStatus

    tags = {"mlflow.parentRunId": parent, "diffseg.trial": str(row["trial"]), "diffseg.sweep": run.name}
    child = client.create_run(experiment_id, run_name=str(row["label"]), tags=tags).info.run_id
    params = {"method": run.cfg.get("method"), "seeds": row.get("seeds"),
              "forward_setting": row.get("forward_setting")}
    given = {**(run.cfg.get("params") or {}), **{p: row[p] for p in run.swept}}  # fixed, then this one's swept
    params.update(_resolved(run.cfg.get("method"), given))
    timestamp = _timestamp()
    metrics = {run.metric: row["mean"], f"{run.metric}_ci_low": row.get("ci_low"),
               f"{run.metric}_ci_high": row.get("ci_high"), f"{run.metric}_std": row.get("std"),
               f"{run.metric}_paper": row.get("paper"), "n_seeds": row.get("n_seeds")}
    for column in ("mIoU", "mAcc", "aAcc", "tied", "unet_passes", *[c for c in row.index if c.startswith("IoU/")],
                   "mIoU_seen", "mIoU_unseen"):
        if column in row.index:
            metrics.setdefault(column, row[column])
    batch = [Metric(_name(k), float(v), timestamp, 0) for k, v in metrics.items() if _finite(v) is not None]
    client.log_batch(child, metrics=batch, params=[Param(_name(k), _value(v)) for k, v in params.items()
                                                     if v is not None])
    if config_text:
        client.log_text(child, config_text, "config.yaml")
    client.set_terminated(child, RunStatus.to_string(RunStatus.FINISHED))


def _resolved(method: str, given: dict) -> dict:
    """The configuration's full method parameters (defaults included), as the run resolved them; what was given
    where the method no longer resolves them (a run of an older version)."""
    from methods import METHODS

    try:
        return METHODS.get(method).resolve({k: (v.item() if hasattr(v, "item") else v) for k, v in given.items()}
                                           ).as_dict()
    except BenchError:
        return given


def _timestamp() -> int:
    import time

    return int(time.time() * 1000)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import setup_logging
    from bench.errors import cli_exit

    parser = argparse.ArgumentParser(prog="python -m bench.track", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run directory (the last line `python -m bench.run` printed)")
    parser.add_argument("--uri", help="MLflow tracking URI (default: the run's tracking.uri, else "
                                      "sqlite:///<runs folder>/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the run's tracking.experiment, else the "
                                             "sweep's name)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    return cli_exit(lambda: log_run(args.run_dir, args.uri, args.experiment))


if __name__ == "__main__":
    from bench.env import exit_process, quiet_environment

    quiet_environment()
    exit_process(main())
