"""Report figures (matplotlib, Agg, PNG): metric against each swept parameter with the paper's curve,
a heatmap for 2-D grids, parallel coordinates for 3+ swept parameters, per-class bars, cross-run overlays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.reporting.model import RunData, fmt_value, is_number

DPI = 130


@dataclass
class Figure:
    path: Path
    alt: str
    caption: str


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def tx(text) -> str:
    """A user string as literal matplotlib text (no mathtext between dollar signs)."""
    return str(text).replace("\\", "\\\\").replace("$", r"\$")


def _axis(values: list) -> tuple[list[float], list[str] | None, bool]:
    """Positions for a parameter's values: numeric values as themselves, others as categories."""
    if values and all(is_number(v) for v in values):
        return [float(v) for v in values], None, True
    cats = list(dict.fromkeys(fmt_value(v) for v in values))
    return [float(cats.index(fmt_value(v))) for v in values], cats, False


def _maybe_log(ax, xs: list[float]) -> None:
    pos = [x for x in xs if x > 0]
    if pos and min(xs) >= 0 and max(pos) / min(pos) > 50:
        ax.set_xscale("symlog", linthresh=min(pos), linscale=0.5)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    _plt().close(fig)
    return path


def _points(ax, xs, mean, low, high, color: str, label: str, offset: float = 0.0, marker: str = "o") -> None:
    """Estimates on a categorical axis: a marker per category with its 95% interval as an error bar, no line
    (the categories lie on no scale)."""
    xs, mean = np.asarray(xs, float) + offset, np.asarray(mean, float)
    low, high = np.asarray(low, float), np.asarray(high, float)
    ok = np.isfinite(low) & np.isfinite(high)
    err = np.where(ok, np.stack([mean - low, high - mean]), 0.0)
    ax.errorbar(xs, mean, yerr=np.clip(err, 0, None), fmt=marker, color=color, ecolor=color, elinewidth=1.2,
                capsize=3, markersize=6, label=label)


def _category_ticks(ax, cats: list[str]) -> None:
    """Category names under their points, tilted where they would run into each other."""
    names = [c if len(c) <= 24 else c[:23] + "…" for c in cats]
    crowded = sum(len(c) for c in names) > 48 or len(names) > 8
    ax.set_xticks(range(len(cats)), [tx(c) for c in names], rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_xlim(-0.6, len(cats) - 0.4)


def _title(text: str, width: int = 64) -> str:
    """A figure title wrapped to the figure's width (a long sweep name or table never runs off the edge)."""
    import textwrap

    return "\n".join(textwrap.wrap(tx(text), width)) or tx(text)


def _legend_label(text: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(tx(text), width)) or tx(text)


def _series_param(swept: list[str], p: str, d: pd.DataFrame, max_series: int = 5) -> str | None:
    """With exactly two swept parameters, the other one when it has few enough values to draw as curves."""
    if len(swept) != 2:
        return None
    other = swept[1] if swept[0] == p else swept[0]
    return other if d[other].nunique() <= max_series else None


def sweep_plots(run: RunData, s: pd.DataFrame, out: Path, prefix: str = "") -> list[Figure]:
    """One figure per swept parameter. With one parameter: ours with its 95% CI band and the paper's curve.
    With several: every configuration as a dot and the best over the other parameters as a line."""
    if not len(s) or not run.swept:
        return []
    plt = _plt()
    paper = run.cfg.get("paper") or {}
    figs = []
    for p in run.swept:
        xs, cats, numeric = _axis(s[p].tolist())
        d = s.assign(_x=xs).sort_values("_x", kind="stable")
        fig, ax = plt.subplots(figsize=(5.6, 3.5) if numeric else (max(5.6, 0.9 * len(cats) + 1.5), 3.8))
        paper_drawn = p == paper.get("param") and np.isfinite(d["paper"]).any()
        if not numeric and (len(run.swept) == 1 or _series_param(run.swept, p, d) is not None):
            # categories (methods, backbones, block sets): points with their intervals, dodged per series
            series = _series_param(run.swept, p, d) if len(run.swept) > 1 else None
            parts = list(d.groupby(series, sort=True)) if series else [(None, d)]
            width = 0.5 / max(1, len(parts) + (1 if paper_drawn else 0))
            for k, (value, part) in enumerate(parts):
                label = f"ours ({run.model_label})" if series is None else f"{series} = {fmt_value(value)}"
                _points(ax, part["_x"], part["mean"], part["ci_low"], part["ci_high"], f"C{k}",
                        _legend_label(label), offset=(k - (len(parts) - 1) / 2) * width)
        elif not numeric:
            ax.plot(d["_x"], d["mean"], "o", color="C0", alpha=0.35, label="every configuration")
            top = d.groupby("_x")["mean"].max()
            ax.plot(top.index, top.values, "_", color="C0", markersize=18, mew=2,
                    label="best over the other parameters")
        elif len(run.swept) == 1:
            ax.plot(d["_x"], d["mean"], "o-", color="C0", label=tx(f"ours ({run.model_label})"))
            if np.isfinite(d["ci_low"]).any():
                kind = next((k for k in d["ci_kind"] if k), "")
                ax.fill_between(d["_x"], d["ci_low"], d["ci_high"], color="C0", alpha=0.18,
                                label=tx(f"95% CI ({kind.split(' over')[0]})"))
        elif (series := _series_param(run.swept, p, d)) is not None:
            # two swept parameters, the other with few values: one curve per value (e.g. iSeg Fig. 1f)
            for k, (value, part) in enumerate(d.groupby(series, sort=True)):
                ax.plot(part["_x"], part["mean"], "o-", color=f"C{k}", label=tx(f"{series} = {fmt_value(value)}"))
                if np.isfinite(part["ci_low"]).any():
                    ax.fill_between(part["_x"], part["ci_low"], part["ci_high"], color=f"C{k}", alpha=0.12)
        else:
            ax.plot(d["_x"], d["mean"], "o", color="C0", alpha=0.35, label="every configuration")
            top = d.groupby("_x")["mean"].max()
            ax.plot(top.index, top.values, "-", color="C0", label="best over the other parameters")
        if paper_drawn:
            pp = d.dropna(subset=["paper"]).drop_duplicates("_x")
            label = _legend_label(f"paper ({paper.get('table', '')})")
            if numeric:
                ax.plot(pp["_x"], pp["paper"], "s--", color="C3", label=label)
            else:  # beside ours, unconnected
                ax.plot(pp["_x"] + 0.18, pp["paper"], "s", color="C3", markersize=6, label=label)
        if numeric:
            _maybe_log(ax, list(d["_x"]))
        else:
            _category_ticks(ax, cats)
            ax.grid(axis="x", visible=False)
        ax.set_xlabel(tx(p))
        ax.set_ylabel(tx(f"{run.metric} (%)"))
        ax.set_title(_title(f"{run.name}: {run.metric} against {p}"), fontsize=10)
        ax.grid(axis="y" if not numeric else "both", alpha=0.3)
        ax.legend(fontsize=7)
        path = _save(fig, out / f"{prefix}plot_{run.metric}_{_safe(p)}.png")
        cap = f"{run.metric} against {p}"
        if not numeric and (len(run.swept) == 1 or _series_param(run.swept, p, d) is not None):
            series = _series_param(run.swept, p, d)
            cap += (f", one colour per value of {series}" if series else "") + \
                " (points: estimates; bars: 95% CI; categories, so no line joins them)"
        elif not numeric:
            cap += " (dots: every configuration; bars: best over the other swept parameters)"
        elif (series := _series_param(run.swept, p, d)) is not None:
            cap += f", one curve per value of {series} (bands: 95% CI)"
        elif len(run.swept) > 1:
            cap += " (dots: every configuration; line: best over the other swept parameters)"
        if paper_drawn:
            cap += f"; {'dashed' if numeric else 'squares'}: the paper's values ({paper.get('table', '')})"
        figs.append(Figure(path, f"{run.metric} against {p}", cap + "."))
    return figs


def heatmap(run: RunData, s: pd.DataFrame, out: Path, prefix: str = "") -> Figure | None:
    if len(run.swept) != 2 or not len(s):
        return None
    plt = _plt()
    a, b = run.swept
    ra = _axis(s[a].tolist())
    rb = _axis(s[b].tolist())
    av = sorted(set(ra[0]))
    bv = sorted(set(rb[0]))
    grid = np.full((len(av), len(bv)), np.nan)
    for xa, xb, m in zip(ra[0], rb[0], s["mean"]):
        i, j = av.index(xa), bv.index(xb)
        grid[i, j] = m if not np.isfinite(grid[i, j]) else max(grid[i, j], m)
    lab_a = [fmt_value(v) if ra[1] is None else ra[1][int(v)] for v in av]
    lab_b = [fmt_value(v) if rb[1] is None else rb[1][int(v)] for v in bv]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(bv) + 2.5), max(3.0, 0.5 * len(av) + 1.8)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=tx(f"{run.metric} (%)"))
    ax.set_xticks(range(len(bv)), [tx(v) for v in lab_b])
    ax.set_yticks(range(len(av)), [tx(v) for v in lab_a])
    ax.set_xlabel(tx(b))
    ax.set_ylabel(tx(a))
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(av)):
        for j in range(len(bv)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > mid else "white")
    ax.set_title(_title(f"{run.name}: {run.metric}"), fontsize=10)
    path = _save(fig, out / f"{prefix}heatmap_{run.metric}.png")
    return Figure(path, f"heatmap of {run.metric} over {a} and {b}",
                  f"{run.metric} over the {a} × {b} grid (cells: mean over seeds).")


def parallel_coordinates(run: RunData, s: pd.DataFrame, out: Path, prefix: str = "") -> Figure | None:
    if len(run.swept) < 3 or not len(s):
        return None
    plt = _plt()
    from matplotlib import cm, colors

    axes = [*run.swept, run.metric]
    cols, ticks = [], []
    for p in run.swept:
        pos, cats, numeric = _axis(s[p].tolist())
        pos = np.asarray(pos)
        if numeric and pos.min() > 0 and pos.max() / pos.min() > 50:
            pos = np.log10(pos)
        lo, hi = pos.min(), pos.max()
        cols.append((pos - lo) / (hi - lo) if hi > lo else np.full_like(pos, 0.5))
        raw = s[p].tolist()
        ticks.append((raw[int(np.argmin(pos))], raw[int(np.argmax(pos))]))
    m = s["mean"].to_numpy(dtype=float)
    lo, hi = np.nanmin(m), np.nanmax(m)
    cols.append((m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5))
    data = np.stack(cols, 1)
    norm = colors.Normalize(lo, hi)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(axes)), 3.6))
    order = np.argsort(m)
    for k in order:
        ax.plot(range(len(axes)), data[k], color=cm.viridis(norm(m[k])), alpha=0.8, lw=2 if s["best"].iloc[k] else 1)
    for i in range(len(axes)):
        ax.axvline(i, color="#888", lw=0.8)
    ax.set_xticks(range(len(axes)), [tx(a) for a in axes])
    ax.set_yticks([])
    for i, (low, high) in enumerate(ticks):
        ax.text(i, -0.08, tx(fmt_value(low)), ha="center", va="top", fontsize=7)
        ax.text(i, 1.04, tx(fmt_value(high)), ha="center", va="bottom", fontsize=7)
    ax.text(len(axes) - 1, -0.08, f"{lo:.1f}", ha="center", va="top", fontsize=7)
    ax.text(len(axes) - 1, 1.04, f"{hi:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(-0.15, 1.12)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=tx(f"{run.metric} (%)"))
    ax.set_title(_title(f"{run.name}: configurations in parallel coordinates"), fontsize=10)
    path = _save(fig, out / f"{prefix}parallel_{run.metric}.png")
    return Figure(path, "parallel coordinates of the swept parameters",
                  f"Every configuration as a line across the swept parameters (axes scaled min to max, log scale "
                  f"for parameters spanning > 50×), coloured by {run.metric}; thick: best.")


def class_bars(run: RunData, s: pd.DataFrame, out: Path, prefix: str = "") -> Figure | None:
    classes = [c for c in run.classes if f"IoU/{c}" in s.columns]
    if not classes or not len(s):
        return None
    plt = _plt()
    if len(s) <= 4:
        pick = s
    else:  # best, worst, and the first configuration (usually the baseline row of the paper's table)
        idx = [int(np.nanargmax(s["mean"])), 0, int(np.nanargmin(s["mean"]))]
        pick = s.iloc[list(dict.fromkeys(idx))]
    width = 0.8 / len(pick)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(classes) * max(1, len(pick)) / 1.5 + 1.5), 3.4))
    for k, (_, r) in enumerate(pick.iterrows()):
        vals = [r[f"IoU/{c}"] for c in classes]
        ax.bar(np.arange(len(classes)) + (k - (len(pick) - 1) / 2) * width, np.nan_to_num(vals), width,
               label=_legend_label(r["label"] + (" (best)" if r["best"] else "")))
    names = [c if len(c) <= 24 else c[:23] + "…" for c in classes]
    tilt = len(classes) > 8 or max(len(c) for c in names) * len(classes) > 60
    ax.set_xticks(range(len(classes)), [tx(c) for c in names], rotation=35 if tilt else 0,
                  ha="right" if tilt else "center")
    ax.set_ylabel("IoU (%)")
    ax.set_title(_title(f"{run.name}: per-class IoU"), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    path = _save(fig, out / f"{prefix}classes_IoU.png")
    which = "every configuration" if len(s) <= 4 else "the best, the first and the worst configuration"
    return Figure(path, "per-class IoU bars", f"Per-class IoU of {which}.")


def overlay_plot(runs: list[RunData], summaries: list[pd.DataFrame], out: Path) -> Figure | None:
    """Several runs sweeping the same single parameter: one curve per run (and the papers' curves)."""
    params = {tuple(r.swept) for r in runs}
    if len(params) != 1 or len(next(iter(params))) != 1:
        return None
    p = next(iter(params))[0]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    numeric = all(all(is_number(v) for v in s[p]) for s in summaries)
    cats = list(dict.fromkeys(fmt_value(v) for s in summaries for v in s[p]))
    papers_drawn = set()
    for k, (run, s) in enumerate(zip(runs, summaries)):
        xs = [float(v) for v in s[p]] if numeric else [float(cats.index(fmt_value(v))) for v in s[p]]
        d = s.assign(_x=xs).sort_values("_x", kind="stable")
        if numeric:
            ax.plot(d["_x"], d["mean"], "o-", color=f"C{k % 10}", label=_legend_label(run.label))
            if np.isfinite(d["ci_low"]).any():
                ax.fill_between(d["_x"], d["ci_low"], d["ci_high"], color=f"C{k % 10}", alpha=0.12)
        else:  # categories: points with intervals, dodged per run
            _points(ax, d["_x"], d["mean"], d["ci_low"], d["ci_high"], f"C{k % 10}", _legend_label(run.label),
                    offset=(k - (len(runs) - 1) / 2) * 0.5 / max(1, len(runs)))
        table = (run.cfg.get("paper") or {}).get("table")
        if table and table not in papers_drawn and np.isfinite(d["paper"]).any():
            papers_drawn.add(table)
            pp = d.dropna(subset=["paper"])
            ax.plot(pp["_x"], pp["paper"], "s--" if numeric else "s", color="#444", alpha=0.7,
                    label=_legend_label(f"paper ({table})"))
    if numeric:
        _maybe_log(ax, [float(v) for s in summaries for v in s[p]])
    else:
        _category_ticks(ax, cats)
    ax.set_xlabel(tx(p))
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(f"runs compared against {p}"), fontsize=10)
    path = _save(fig, out / f"combined_{_safe(p)}.png")
    return Figure(path, f"runs compared against {p}",
                  f"Each run's metric against {p} " + ("(bands: 95% intervals); dashed: published values." if numeric
                                                        else "(points with 95% intervals; categories, so no line "
                                                             "joins them); squares: published values."))


def _safe(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))
    return out[:60] or "param"


def figures_for_run(run: RunData, s: pd.DataFrame, out: Path, prefix: str = "") -> list[Figure]:
    figs = sweep_plots(run, s, out, prefix)
    for extra in (heatmap(run, s, out, prefix), parallel_coordinates(run, s, out, prefix)):
        if extra is not None:
            figs.append(extra)
    return figs


def is_finite(x) -> bool:
    return is_number(x) and math.isfinite(float(x))
