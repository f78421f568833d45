"""The method x backbone table and plot of a sweep over models (bench.backbones): every configuration's metric
(rows) on every backbone (columns), each column headed by the backbone's label and family (run.json `backbones`).
A backbone with random weights is labelled so in the header, the legend and a note: its column tests the
plumbing only and no conclusion is drawn from it. Written as by_backbone.csv beside the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.reporting.model import RunData, setting_label
from bench.reporting.plots import DPI, Figure, _plt, tx
from bench.reporting.render import Heading, Para
from bench.reporting.tables import Cell, Table, num_cell

RANDOM = "random weights"


def backbones_of(run: RunData) -> dict[str, dict]:
    """label -> {entry, family, random_weights} of a sweep over models, in plan order; {} for one backbone."""
    found = run.prov.get("backbones")
    return dict(found) if isinstance(found, dict) and "model" in run.frame.columns else {}


def column_name(label: str, info: dict) -> str:
    """A backbone's column: its label, family and, where its weights are random, that."""
    text = f"{label} ({info.get('family', '?')})"
    return f"{text} [{RANDOM}]" if info.get("random_weights") else text


def random_note(label: str, info: dict) -> str:
    return (f"{label} ({info.get('entry', label)}) has random weights: its column tests the plumbing only; no "
            f"conclusion is drawn from it.")


def by_backbone_frame(run: RunData, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(mean, CI low, CI high): one row per configuration without its backbone (the method, for `compare`), one
    column per backbone (column_name), in the sweep's order."""
    backbones = backbones_of(run)
    others = [p for p in run.swept if p != "model"]
    rows = summary.assign(setting=[setting_label({p: r[p] for p in others}) if others != ["method"] else
                                   str(r["method"]) for _, r in summary.iterrows()] if len(summary) else [])
    order = list(dict.fromkeys(rows["setting"])) if len(rows) else []
    columns = {label: column_name(label, info) for label, info in backbones.items()}
    out = []
    for field in ("mean", "ci_low", "ci_high"):
        table = rows.pivot_table(index="setting", columns="model", values=field, aggfunc="first", dropna=False) \
            if len(rows) else pd.DataFrame()
        table = table.reindex(index=order, columns=list(backbones)).rename(columns=columns)
        table.index.name = "method" if others == ["method"] else "configuration"
        table.columns.name = None
        out.append(table)
    return out[0], out[1], out[2]


def by_backbone_table(run: RunData, mean: pd.DataFrame) -> Table:
    best = mean.max(axis=0, skipna=True)
    rows = [[Cell(str(setting), str(setting)),
             *(num_cell(v, best=math.isfinite(float(v)) and float(v) == float(best[c])) for c, v in row.items())]
            for setting, row in mean.iterrows()]
    return Table("by_backbone", f"{run.metric} (%) by {mean.index.name} and backbone, one protocol (bold: the best of "
                                f"each backbone)", [mean.index.name, *mean.columns], rows)


def by_backbone_plot(run: RunData, mean: pd.DataFrame, low: pd.DataFrame, high: pd.DataFrame, path: Path,
                     random: set[str]) -> Figure:
    """Grouped bars: configurations on the x axis, one bar per backbone with its 95% interval; random-weight
    backbones hatched and named so in the legend."""
    plt = _plt()
    n, k = len(mean.index), max(1, len(mean.columns))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * n * k / 2 + 2), 3.6))
    width = 0.8 / k
    xs = np.arange(n)
    for j, column in enumerate(mean.columns):
        values = mean[column].to_numpy(dtype=float)
        lo, hi = low[column].to_numpy(dtype=float), high[column].to_numpy(dtype=float)
        err = np.vstack([np.where(np.isfinite(lo), values - lo, 0), np.where(np.isfinite(hi), hi - values, 0)])
        ax.bar(xs + (j - (k - 1) / 2) * width, np.nan_to_num(values), width, yerr=np.clip(err, 0, None),
               capsize=2, label=tx(column), hatch="//" if column in random else None, alpha=0.6 if column in random
               else 1.0)
    ax.set_xticks(xs, [tx(s) for s in mean.index], rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_ylabel(tx(f"{run.metric} (%)"))
    ax.set_title(tx(f"{run.metric} by backbone" + (" (hatched: random weights, plumbing only)" if random else "")),
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    caption = (f"{run.metric} of every {mean.index.name} on every backbone (bars: estimates; whiskers: 95% "
               f"intervals).")
    if random:
        caption += " Hatched bars are random-weight backbones: no conclusion is drawn from them."
    return Figure(path, f"{run.metric} by backbone", caption)


def backbone_blocks(run: RunData, summary: pd.DataFrame, out: Path, prefix: str = "", level: int = 1) -> list:
    """The report's section of a sweep over models (none for one backbone); writes by_backbone.csv and .png."""
    backbones = backbones_of(run)
    if not backbones or not len(summary):
        return []
    mean, low, high = by_backbone_frame(run, summary)
    mean.to_csv(out / f"{prefix}by_backbone.csv")
    random = {column_name(label, info) for label, info in backbones.items() if info.get("random_weights")}
    blocks: list = [Heading(level + 1, "By backbone" if level == 1 else f"By backbone ({run.label})"),
                    by_backbone_table(run, mean)]
    blocks += [Para(random_note(label, info), "warning") for label, info in backbones.items()
               if info.get("random_weights")]
    blocks.append(by_backbone_plot(run, mean, low, high, out / f"{prefix}by_backbone.png", random))
    return blocks
