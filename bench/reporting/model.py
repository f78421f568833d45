"""A run as the report sees it (config, results frame, provenance) and its per-configuration summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.errors import BenchError
from bench.resolved import effective_config
from bench.results import READABLE_SCHEMAS, is_number, paper_value, schema_version
from bench.stats import t_interval

PROTOCOL_TEXT = {
    "mmseg": "MMSegmentation IoUMetric: per-class IoU from dataset-summed histograms, label 255 ignored; "
             "mIoU = mean over classes present in ground truth or predictions",
    "iseg": "iSeg's released evaluation: per-class IoU from dataset-summed histograms, label 255 ignored; "
            "mIoU = mean over classes with ground-truth pixels only",
    "hungarian": "unsupervised (DiffSeg's evaluation, iSeg Table 3): predicted segments matched to classes per "
                 "image by Hungarian matching; ACC (aAcc) = matched pixels / labelled pixels; "
                 "mIoU = mean of TP / (TP + FP + FN) over classes with any",
}


@dataclass
class RunData:
    cfg: dict
    frame: pd.DataFrame
    prov: dict
    path: Path | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.cfg.get("name") or "run")

    @property
    def metric(self) -> str:
        """The number the tables lead with: the paper's metric when the sweep names one, else metric.main."""
        paper = self.cfg.get("paper") or {}
        metric = paper.get("metric") or (self.cfg.get("metric") or {}).get("main") or "mIoU"
        return metric if metric in self.frame.columns else "mIoU"

    @property
    def swept(self) -> list[str]:
        """The swept parameters that the results hold, the backbone first in a sweep over models."""
        axis = ["model"] if self.cfg.get("models") and "model" in self.frame.columns else []
        return axis + [k for k in (self.cfg.get("sweep") or {}) if k in self.frame.columns]

    @property
    def classes(self) -> list[str]:
        names = (self.prov.get("dataset") or {}).get("classes")
        if names:
            return list(names)
        return [c.split("/", 1)[1] for c in self.frame.columns if c.startswith("IoU/")]

    @property
    def dataset_label(self) -> str:
        data = self.prov.get("dataset") or {}
        name = data.get("name") or (self.cfg.get("data") or {}).get("name") or "?"
        split = data.get("split") or (self.cfg.get("data") or {}).get("split")
        return f"{name} {split}" if split else str(name)

    @property
    def model_label(self) -> str:
        model = self.cfg.get("model") or {}
        base = model.get("id") or (Path(model["path"]).name if model.get("path") else None) or model.get("name")
        extras = []
        if model.get("random"):
            extras.append("random weights")
        if model.get("resolution"):
            extras.append(f"{model['resolution']} px")
        return f"{base} ({', '.join(extras)})" if extras else str(base)

    @property
    def protocol(self) -> str:
        return str(self.prov.get("metric_protocol") or (self.cfg.get("metric") or {}).get("protocol") or "?")


def load_run(path: str | Path) -> RunData:
    """Read a finished run directory; a BenchError names what is missing and how to fix it."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"run directory {path} does not exist; pass the directory that `python -m bench.run` "
                         f"printed as its last line")
    if not path.is_dir():
        raise BenchError(f"{path} is not a directory; pass a run directory (it holds results.parquet)")
    if path.name.endswith(".partial"):
        raise BenchError(f"{path} is an interrupted run; finish it first with `python -m bench.run SWEEP.yaml "
                         f"... output_dir={str(path)[:-len('.partial')]}`")
    missing = [n for n in ("config.yaml", "run.json", "results.parquet") if not (path / n).is_file()]
    if missing:
        raise BenchError(f"{path} is not a run directory: it has no {', '.join(missing)}; pass the directory "
                         f"that `python -m bench.run` printed as its last line")
    try:
        # the configuration as the run ran it: the input with the run's own decisions (`resolved:`) over it
        cfg = effective_config(yaml.safe_load((path / "config.yaml").read_text()))
        prov = json.loads((path / "run.json").read_text())
        frame = pd.read_parquet(path / "results.parquet")
    except Exception as err:  # noqa: BLE001 (corrupt files of any kind: name the file, no traceback)
        raise BenchError(f"cannot read run directory {path}: {type(err).__name__}: {str(err).splitlines()[0]}; "
                         f"re-run the sweep") from None
    if not isinstance(cfg, dict) or not isinstance(prov, dict) or "mIoU" not in frame.columns:
        raise BenchError(f"{path} does not hold a bench run (config.yaml/run.json/results.parquet of another "
                         f"version?); re-run the sweep")
    if schema_version(prov) not in READABLE_SCHEMAS:
        raise BenchError(f"{path} was written with run schema {schema_version(prov)}, which this version cannot "
                         f"read (it reads {', '.join(map(str, READABLE_SCHEMAS))}); update diffseg-bench")
    return RunData(cfg=cfg, frame=frame, prov=prov, path=path, label=path.name, extra={"loaded": True})


def fmt_value(value) -> str:
    """A swept parameter's value as a table row label: 0.001, 16, True, 'both'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"
    return str(value)


def fmt_num(value, digits: int = 1) -> str:
    if value is None or not is_number(value) or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def setting_label(swept: dict) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in swept.items())


SEEN_UNSEEN_COLUMNS = tuple(f"mIoU_{part}{end}" for part in ("seen", "unseen") for end in ("", "_ci_low", "_ci_high"))


def summarize_run(run: RunData) -> pd.DataFrame:
    """One row per configuration, in sweep (trial) order: swept values, `label`, `n_seeds`, `mean`, `std`,
    `ci_low`, `ci_high`, `ci_kind`, `paper`, `delta`, `best`, the other metrics' means, IoU/<class> means."""
    frame = run.frame
    metric = run.metric
    swept = run.swept
    key = "trial" if "trial" in frame.columns else None
    groups = frame.groupby(key, sort=True) if key else [(i, frame.iloc[[i]]) for i in range(len(frame))]
    n_images = (run.prov.get("dataset") or {}).get("num_images", run.prov.get("num_images"))
    draws = (run.cfg.get("report") or {}).get("bootstrap")
    rows = []
    for trial, part in groups:
        first = part.iloc[0]
        values = {p: _plain(first[p]) for p in swept}
        mean, std, lo, hi = t_interval(part[metric].tolist())
        n = int(part[metric].notna().sum())
        kind = f"t-interval over {n} seeds" if n >= 2 else ""
        if n < 2 and f"{metric}_ci_low" in part.columns and np.isfinite(part[f"{metric}_ci_low"]).any():
            lo, hi = float(part[f"{metric}_ci_low"].iloc[0]), float(part[f"{metric}_ci_high"].iloc[0])
            kind = f"bootstrap over {n_images} images, {draws} draws" if n_images else "bootstrap over images"
        paper_col = f"paper_{metric}"
        paper = float(first[paper_col]) if paper_col in part.columns and is_number(first[paper_col]) \
            else paper_value(run.cfg, values)
        row = {"trial": trial if key else str(trial), **values, "label": setting_label(values) or str(trial),
               "n_seeds": n, "seeds": ", ".join(fmt_value(s) for s in part["seed"]) if "seed" in part else "",
               "mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "ci_kind": kind,
               "paper": paper, "delta": mean - paper if math.isfinite(paper) else math.nan}
        for col in ("mIoU", "aAcc", "mAcc", "tied", "unet_passes"):
            if col in part.columns:
                row[col] = float(part[col].mean())
        for col in SEEN_UNSEEN_COLUMNS:  # open-vocabulary runs (report.unseen): bootstrap intervals per part
            if col in part.columns:
                row[col] = float(part[col].mean())
        if "forward_setting" in part.columns:
            row["forward_setting"] = "; ".join(sorted(set(map(str, part["forward_setting"]))))
        for c in part.columns:
            if c.startswith("IoU/") or c.startswith("Acc/"):
                row[c] = float(part[c].mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        _paper_setup(run, table)
        best = table["mean"].max()
        table["best"] = np.isfinite(table["mean"]) & (table["mean"] == best)
        pbest = table["paper"].max()
        table["paper_best"] = np.isfinite(table["paper"]) & (table["paper"] == pbest)
    return table


def _paper_setup(run: RunData, table: pd.DataFrame) -> None:
    """The paper's number and delta only where the run's setup is the paper's (bench.reporting.paper): else
    both NaN and `paper_hidden` says why; where it is, `verdict` against the sweep's tolerance."""
    from bench.reporting.paper import hidden_reason, verdict

    paper = run.cfg.get("paper") or {}
    if not paper or not np.isfinite(table["paper"]).any():
        return
    reason = hidden_reason(run.cfg, run.prov)
    if reason:
        table["paper"] = math.nan
        table["delta"] = math.nan
        table["paper_hidden"] = reason
    else:
        table["verdict"] = [verdict(d, paper.get("tolerance")) for d in table["delta"]]


def _plain(value):
    return value.item() if hasattr(value, "item") else value
