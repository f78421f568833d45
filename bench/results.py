"""The run directory: config.yaml, results.parquet/.csv, run.json (provenance), report.md/.html, plots."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


log = logging.getLogger(__name__)


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
    import diffusers
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__}


def devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({platform.processor() or platform.machine()})"]


def config_hash(cfg: dict) -> str:
    text = json.dumps({k: v for k, v in cfg.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bootstrap_ci(per_image: np.ndarray, class_names: list[str], protocol: str, draws: int,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mIoU over images resampled with replacement; per_image is (n, 4, C)."""
    from bench.reporting.stats import bootstrap_intervals

    return bootstrap_intervals(per_image, protocol, draws, seed)["mIoU"]


def results_frame(cfg: dict, rows: list[dict], stats: dict) -> pd.DataFrame:
    """One row per (configuration, seed). With per-image histograms, 95% bootstrap intervals over images
    (`<metric>_ci_low/_ci_high` for mIoU, mAcc, aAcc); with the paper's values, `paper_<metric>`."""
    from bench.reporting.stats import bootstrap_intervals

    frame = pd.DataFrame(rows)
    per_image = stats.get("per_image")
    if per_image is not None and len(frame):
        draws = int(cfg["report"]["bootstrap"])
        cis = []
        for row in rows:
            keep = (per_image["trial"] == row["trial"]) & (per_image["seed_of_group"] == row["seed"])
            cis.append(bootstrap_intervals(per_image["hist"][keep], cfg["metric"]["protocol"], draws))
        for metric in ("mIoU", "mAcc", "aAcc"):
            frame[f"{metric}_ci_low"] = [ci[metric][0] for ci in cis]
            frame[f"{metric}_ci_high"] = [ci[metric][1] for ci in cis]
    paper = cfg.get("paper") or {}
    if paper.get("param") and paper.get("values"):
        values = {float(k) if _is_number(k) else k: v for k, v in paper["values"].items()}
        column = frame[paper["param"]].map(lambda v: values.get(float(v) if _is_number(v) else v, np.nan))
        frame[f"paper_{paper.get('metric', 'mIoU')}"] = column.astype(float)
    return frame


def _is_number(value) -> bool:
    try:
        float(value)
        return not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def write_run(cfg: dict, rows: list[dict], stats: dict, work: Path) -> None:
    from bench.report import write_report

    frame = results_frame(cfg, rows, stats)
    stats = {k: v for k, v in stats.items() if k != "per_image"}
    provenance = {"config_hash": config_hash(cfg), "overrides": cfg.get("overrides", []), "git_sha": git_sha(),
                  "versions": versions(), "devices": devices(), "metric_protocol": cfg["metric"]["protocol"],
                  "seeds": cfg["seeds"], "bootstrap_draws": int(cfg["report"]["bootstrap"]),
                  "platform": platform.platform(), **stats}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (work / "run.json").write_text(json.dumps(provenance, indent=2, default=str))
    frame.to_parquet(work / "results.parquet", index=False)
    frame.to_csv(work / "results.csv", index=False)
    write_report(work, cfg, frame, provenance)
