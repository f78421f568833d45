"""The run directory's schema: config.yaml, results.parquet/.csv, run.json (provenance), fit/<hash>/.

`SCHEMA_VERSION` is written to run.json; readers (bench.reporting) check it instead of guessing from columns.
  1  (no schema_version) results with unet_passes, forward_setting; shards/ and tune/ left in the run
  2  run.json: schema_version, method_versions, fits / fits_trained / fits_reused; results: `fit` (the fit
     directory of the row's train setting, "" for none); fit/<hash>/ folders; no working folders
  3  config_hash leaves out the overrides' spelling and the sweep file's path (equal configs, equal hashes);
     run.json: invocations (how many processes worked on the run) and invocation_log; wall_seconds,
     trace_seconds and images_per_second summed over invocations
This module holds what both the engine and the reports need (hashes, the paper-value lookup) and imports
neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import subprocess
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.atomic import write_text
from bench.metrics import seen_unseen
from bench.resolved import RESOLVED_KEY, effective_config
from bench.sparse_histograms import dense_rows

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "not a git checkout"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"


def versions() -> dict[str, str]:
    from bench.env import package_versions  # package metadata: nothing is imported (diffusers alone takes seconds)

    return package_versions()


def devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({platform.processor() or platform.machine()})"]


# Columns the engine writes beside a configuration's parameters (results.parquet rows from bench.engine /
# bench.search, summary.csv from the summary): a method parameter of one of these names would be overwritten in
# its rows, or overwrite them (a `seed` parameter once replaced the noise-seed column). Checked for every
# registered method by the contract tests; metric columns also begin with IoU/ or Acc/.
RESERVED_COLUMNS = frozenset({
    "trial", "seed", "model", "unet_passes", "forward_setting", "fit", "mIoU", "mAcc", "aAcc", "tied", "paper_mIoU",
    "mIoU_ci_low", "mIoU_ci_high", "mAcc_ci_low", "mAcc_ci_high", "aAcc_ci_low", "aAcc_ci_high",
    "label", "n_seeds", "seeds", "std", "ci_low", "ci_high", "ci_kind", "paper", "delta", "best", "metric"})
RESERVED_PREFIXES = ("IoU/", "Acc/")


# where a run is written (and logged) and how it was spelled
HASH_EXCLUDED = ("output_dir", "overrides", "sweep_file", "tracking")


def config_hash(cfg: dict, schema: int = SCHEMA_VERSION) -> str:
    """sha256 of the effective config (config.yaml's input with its `resolved:` record) without output_dir, the overrides' spelling and the
    sweep file's path, first 16 hex digits: identical configurations have identical hashes. `schema` < 3: the
    hash as runs of those schemas recorded it (overrides and sweep file included)."""
    excluded = HASH_EXCLUDED if schema >= 3 else ("output_dir",)
    cfg = effective_config(cfg)  # the input with the run's decisions (`resolved:`) laid over it
    text = json.dumps({k: v for k, v in cfg.items() if k not in excluded}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the paper's numbers --------------------------------------------------------------------------------------------
def is_number(value) -> bool:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return False
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def paper_table(cfg: dict) -> tuple[str | None, dict]:
    """(swept parameter, {value: the paper's number}) of the sweep's `paper:` section; keys numeric or text."""
    paper = cfg.get("paper") or {}
    values = paper.get("values") or {}
    if not paper.get("param") or not values:
        return None, {}
    return paper["param"], {float(k) if is_number(k) else str(k): v for k, v in values.items()}


def paper_value(cfg: dict, swept: dict) -> float:
    """The paper's number for one configuration (NaN where the paper has none)."""
    param, table = paper_table(cfg)
    if param is None or param not in swept:
        return math.nan
    v = swept[param]
    got = table.get(float(v) if is_number(v) else str(v))
    return float(got) if is_number(got) else math.nan


# -- run statistics -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunStats:
    """run.json's statistics: one shape for every path (a sweep's trace stage, an adaptive search), built by the
    engine (bench.engine.run_stats), completed over every invocation of the run by `over_invocations`
    (bench.run), written by `as_dict` under the keys run.json has always had. A path that does not do something
    records its zero (no fits: 0 fits; no search: `search` null)."""

    method_versions: dict
    num_images: int
    num_actors: int  # the tracing actors the trace stage settled on (0: in this process)
    execution: str  # driver | actors
    num_trials: int
    num_forward_settings: int
    fits: int
    fits_trained: int
    fits_reused: int
    fit_seconds: float
    unet_passes: int
    trace_seconds: float
    images_per_second: float  # images x forward settings per traced second
    dataset: dict
    scheduler: dict
    backbone: dict | None = None  # one backbone's family and weights (bench.models.model_provenance)
    backbones: dict | None = None  # a sweep over models: the same per backbone label, with the entry as given
    search: dict | None = None  # the adaptive search's settings, rungs and best configuration
    invocations: int = 1  # processes that worked on the run (a resumed run has several)
    invocation_log: list = field(default_factory=list)
    wall_seconds: float | None = None
    finished: str | None = None
    notes: list = field(default_factory=list)  # the preflight's notes, stated once in the report
    inputs: dict | None = None  # the model's and data's fingerprints (what fit.from= compares)
    per_image: dict | None = field(default=None, compare=False)  # histograms for the bootstrap; not in run.json

    def over_invocations(self, totals: dict, finished: str, notes: list, inputs: dict | None) -> "RunStats":
        """The statistics over every invocation that worked on the run (bench.rundir.Claim.totals)."""
        return replace(self, invocations=totals["invocations"], invocation_log=totals["invocation_log"],
                       wall_seconds=totals["wall_seconds"], trace_seconds=totals["trace_seconds"],
                       # images_traced counts (backbone, image) pairs; each backbone has its share of the settings
                       images_per_second=round(totals["images_traced"] * self.num_forward_settings
                                               / len(self.backbones or [None])
                                               / max(totals["trace_seconds"], 1e-9), 4),
                       finished=finished, notes=list(notes), inputs=inputs)

    def as_dict(self) -> dict:
        """run.json's keys (without the per-image histograms); `backbone` for one backbone, `backbones` for a sweep
        over models, never both."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_image"
                and not (f.name in ("backbone", "backbones") and getattr(self, f.name) is None)}


# -- writing a run ---------------------------------------------------------------------------------------------------
def results_frame(cfg: dict, rows: list[dict], per_image: dict | None = None) -> pd.DataFrame:
    """One row per (configuration, seed). With per-image histograms, 95% bootstrap intervals over images
    (`<metric>_ci_low/_ci_high` for mIoU, mAcc, aAcc); with the paper's values, `paper_<metric>`."""
    from bench.stats import bootstrap_intervals  # scipy: imported when results are written, not by the engine

    frame = pd.DataFrame(rows)
    if per_image is not None and len(frame):
        draws = int(cfg["report"]["bootstrap"])
        cis = []
        for row in rows:
            keep = (per_image["trial"] == row["trial"]) & (per_image["seed_of_group"] == row["seed"])
            cis.append(bootstrap_intervals(dense_rows(per_image, keep), cfg["metric"]["protocol"], draws))
        for metric in ("mIoU", "mAcc", "aAcc"):
            frame[f"{metric}_ci_low"] = [ci[metric][0] for ci in cis]
            frame[f"{metric}_ci_high"] = [ci[metric][1] for ci in cis]
    unseen = [c.strip() for c in str((cfg.get("report") or {}).get("unseen") or "").split("+") if c.strip()]
    if unseen and len(frame):
        _seen_unseen(cfg, frame, rows, per_image, unseen)
    param, _ = paper_table(cfg)
    if param is not None and len(frame):
        metric = (cfg.get("paper") or {}).get("metric", "mIoU")
        frame[f"paper_{metric}"] = [paper_value(cfg, {param: v}) for v in frame[param]]
    return frame


def _seen_unseen(cfg: dict, frame: pd.DataFrame, rows: list[dict], per_image, unseen: list[str]) -> None:
    """mIoU over seen and over unseen classes (report.unseen), with bootstrap intervals over images."""
    from bench.stats import bootstrap_intervals  # scipy: imported when results are written
    classes = [c[len("IoU/"):] for c in frame.columns if c.startswith("IoU/")]
    draws, protocol = int(cfg["report"]["bootstrap"]), cfg["metric"]["protocol"]
    seen = [c not in unseen for c in classes]
    parts = [seen_unseen(record, classes, seen) for record in frame.to_dict("records")]
    for part in ("seen", "unseen"):
        frame[f"mIoU_{part}"] = [p[f"mIoU/{part}"] for p in parts]
    frame["hIoU"] = [p["hIoU"] for p in parts]
    for part, names in (("seen", [c for c in classes if c not in unseen]), ("unseen", [c for c in classes if c in unseen])):
        if per_image is None or not names:
            continue
        cols = [classes.index(c) for c in names]
        lows, highs = [], []
        for row in rows:
            keep = (per_image["trial"] == row["trial"]) & (per_image["seed_of_group"] == row["seed"])
            ci = bootstrap_intervals(dense_rows(per_image, keep)[..., cols], protocol, draws)["mIoU"]
            lows.append(ci[0])
            highs.append(ci[1])
        frame[f"mIoU_{part}_ci_low"], frame[f"mIoU_{part}_ci_high"] = lows, highs


def write_run(record: dict, rows: list[dict], stats: RunStats, work: Path) -> tuple[pd.DataFrame, dict]:
    """config.yaml (`record`: the user's input and, under `resolved:`, the run's decisions; bench.resolved),
    run.json (provenance, the statistics and the same `resolved:` record), results.parquet/.csv; returns the
    results frame and the provenance."""
    cfg = effective_config(record)
    frame = results_frame(cfg, rows, stats.per_image)
    provenance = {"schema_version": SCHEMA_VERSION, "config_hash": config_hash(record),
                  "overrides": cfg.get("overrides", []), "git_sha": git_sha(), "versions": versions(),
                  "devices": devices(),
                  "metric_protocol": cfg["metric"]["protocol"], "seeds": cfg["seeds"],
                  "bootstrap_draws": int(cfg["report"]["bootstrap"]), "platform": platform.platform(),
                  **stats.as_dict(), RESOLVED_KEY: record.get(RESOLVED_KEY)}
    write_text(work / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    write_text(work / "run.json", json.dumps(provenance, indent=2, default=str))
    frame.to_parquet(work / ".results.parquet", index=False)
    (work / ".results.parquet").rename(work / "results.parquet")
    frame.to_csv(work / ".results.csv", index=False)
    (work / ".results.csv").rename(work / "results.csv")
    return frame, provenance


def schema_version(provenance: dict) -> int:
    return int(provenance.get("schema_version", 1))
