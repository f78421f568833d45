"""Report tables as plain data (`Table` of `Cell`s), rendered by `bench.reporting.render` to Markdown/HTML."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.reporting.model import RunData, fmt_num, fmt_value, is_number, summarize_run


@dataclass
class Cell:
    text: str
    sort: float | str | None = None  # sort key for the HTML table (numbers sort numerically)
    best: bool = False  # rendered bold
    title: str = ""  # tooltip in HTML
    trusted: bool = False  # our own number formatting: Markdown needs no escaping


@dataclass
class Table:
    id: str
    caption: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    label_columns: int = 1  # leading columns that are labels (left-aligned)
    wrap_columns: tuple = ()  # long text columns (wrapped, left-aligned)


def num_cell(value, digits: int = 1, best: bool = False, signed: bool = False, title: str = "") -> Cell:
    finite = is_number(value) and math.isfinite(float(value))
    text = (f"{float(value):+.{digits}f}" if signed else fmt_num(value, digits)) if finite else "–"
    return Cell(text, float(value) if finite else None, best and finite, title, trusted=True)


def value_cell(value) -> Cell:
    if is_number(value):
        return Cell(fmt_value(value), float(value), trusted=True)
    return Cell(fmt_value(value), fmt_value(value))


def main_table(run: RunData, summary: pd.DataFrame | None = None) -> Table:
    """The paper-shaped table: one row per setting; ours (± std over seeds), 95% CI, paper, Δ; best in bold."""
    s = summarize_run(run) if summary is None else summary
    metric = run.metric
    swept = run.swept
    multi_seed = bool(len(s)) and int(s["n_seeds"].max()) >= 2
    has_ci = bool(len(s)) and bool(np.isfinite(s["ci_low"]).any())
    has_paper = bool(len(s)) and bool(np.isfinite(s["paper"]).any())
    hidden = str(s["paper_hidden"].iloc[0]) if len(s) and "paper_hidden" in s.columns else ""
    has_verdict = has_paper and "verdict" in s.columns
    header = [*(swept or ["configuration"]), f"{metric} (ours)"]
    if multi_seed:
        header.append("± std")
    if has_ci:
        header.append("95% CI")
    if has_paper:
        header += [f"{metric} (paper)", "Δ (ours − paper)"] + (["verdict"] if has_verdict else [])
    elif hidden:
        header.append(f"{metric} (paper)")
    rows = []
    for _, r in s.iterrows():
        cells = [value_cell(r[p]) for p in swept] if swept else [Cell(str(r["label"]), str(r["trial"]))]
        cells.append(num_cell(r["mean"], best=bool(r["best"]), title=f"trial {r['trial']}, seeds {r['seeds']}"))
        if multi_seed:
            cells.append(num_cell(r["std"]))
        if has_ci:
            ci = f"[{fmt_num(r['ci_low'])}, {fmt_num(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else "–"
            cells.append(Cell(ci, r["ci_low"] if math.isfinite(r["ci_low"]) else None, title=r["ci_kind"],
                              trusted=True))
        if has_paper:
            cells.append(num_cell(r["paper"], best=bool(r["paper_best"])))
            cells.append(num_cell(r["delta"], signed=True))
            if has_verdict:
                cells.append(Cell(str(r["verdict"] or "–"), trusted=True))
        elif hidden:
            cells.append(Cell(hidden))
        rows.append(cells)
    paper = run.cfg.get("paper") or {}
    caption = (f"{metric} (%) per configuration, metric protocol {run.protocol}, {run.dataset_label}, "
               f"{run.model_label}. Bold: best of the column.")
    if has_paper:
        caption += f" Paper: {paper.get('table', '?')}" + (f" ({paper['note']})" if paper.get("note") else "") + "."
        if has_verdict and paper.get("tolerance") is not None:
            caption += f" Verdict: reproduced where |Δ| <= {fmt_num(paper['tolerance'])} (the sweep's tolerance)."
    elif hidden:
        caption += (f" Paper ({paper.get('table', '?')}): its numbers are shown only for a run with the paper's "
                    f"backbone, dataset and metric protocol; {hidden}.")
    notes = []
    kinds = sorted({k for k in s.get("ci_kind", []) if k}) if len(s) else []
    if kinds:
        notes.append("95% CI: " + "; ".join(kinds) + ("." if not multi_seed else
                     "; ± std: sample standard deviation over seeds."))
    return Table(f"main-{run.label or run.name}", caption, header, rows, notes, label_columns=max(1, len(swept)))


def details_table(run: RunData, summary: pd.DataFrame) -> Table:
    from methods.maps import TIE

    settings = [str(r.get("forward_setting", "") or "") for _, r in summary.iterrows()]
    shared, own = shared_setting_parts(settings)
    differ = any(own)
    header = ["configuration", "trial", "seeds", "mIoU", "mAcc", "aAcc", "tied (%)", "UNet passes"] + \
        (["forward setting (where it differs)" if shared else "forward setting"] if differ else [])
    rows = []
    for (_, r), mine in zip(summary.iterrows(), own):
        rows.append([Cell(str(r["label"])), Cell(str(r["trial"])), Cell(str(r["seeds"])),
                     num_cell(r.get("mIoU")), num_cell(r.get("mAcc")), num_cell(r.get("aAcc")),
                     num_cell(r.get("tied")), num_cell(r.get("unet_passes"), 0)] + ([Cell(mine)] if differ else []))
    caption = ("All metrics per configuration (mean over seeds); tied: the share of the class-score cells of "
               f"multi-class images whose two best classes lie within {TIE:g}, i.e. whose label the tie rule decided "
               "(– where not measured); UNet passes of the configuration's forward setting over the dataset "
               "(configurations sharing a forward setting share the passes).")
    if shared:  # said once here instead of in every row
        caption += (" Forward setting of every configuration: " if not differ else
                    " Forward setting shared by every configuration: ") + "; ".join(shared) + "."
    return Table(f"details-{run.label or run.name}", caption, header, rows, label_columns=3,
                 wrap_columns=(8,) if differ else ())


SETTING_PART = re.compile(r",(?=[A-Za-z_]\w*=)")  # `k=v,k=v`: a comma before the next `key=` (values hold ", ")


def shared_setting_parts(settings: list[str]) -> tuple[list[str], list[str]]:
    """Forward-setting strings (`k=v,k=v`, several joined by '; ' where a configuration has several seeds) ->
    (the `k=v` parts every one of them holds, in their order; each string without those parts)."""
    split = [[SETTING_PART.split(one) for one in text.split("; ")] if text else [] for text in settings]
    every = [part for row in split for one in row for part in one]
    if not every or any(not row for row in split):
        return [], settings
    shared = [part for part in dict.fromkeys(every) if all(part in one for row in split for one in row)]
    own = ["; ".join(",".join(part for part in one if part not in shared) for one in row) for row in split]
    own = [text if text.strip("; ,") else "" for text in own]
    return shared, own


def seen_unseen_table(run: RunData, summary: pd.DataFrame) -> Table | None:
    """mIoU over the classes the fits saw and over those they did not (report.unseen; the open-vocabulary
    protocol of DEDOS and CAT-Seg), each with its bootstrap interval over images; None for other runs."""
    if "mIoU_unseen" not in summary.columns:
        return None
    unseen = str((run.cfg.get("report") or {}).get("unseen") or "").replace("+", ", ")
    best = {part: np.nanmax(summary[f"mIoU_{part}"]) for part in ("seen", "unseen")}
    rows = []
    for _, r in summary.iterrows():
        cells = [Cell(str(r["label"])), num_cell(r["mean"], best=bool(r["best"]))]
        for part in ("seen", "unseen"):
            cells += [num_cell(r[f"mIoU_{part}"], best=r[f"mIoU_{part}"] == best[part], digits=2),
                      Cell(f"[{r[f'mIoU_{part}_ci_low']:.2f}, {r[f'mIoU_{part}_ci_high']:.2f}]",
                           r[f"mIoU_{part}_ci_low"], trusted=True)]  # numbers only: nothing to escape
        rows.append(cells)
    return Table(f"seen-unseen-{run.label or run.name}",
                 f"mIoU (%) over seen and unseen classes (unseen: {unseen}; never in the fits' training targets), "
                 f"95% bootstrap intervals over images (with several seeds: means over seeds, of the bounds too).",
                 ["configuration", run.metric, "mIoU seen", "95% CI", "mIoU unseen", "95% CI"], rows)


def per_class_table(run: RunData, summary: pd.DataFrame) -> Table:
    """Classes as columns (OVAM Table 2, FreeGen Table 1); best configuration per class in bold."""
    classes = [c for c in run.classes if f"IoU/{c}" in summary.columns]
    header = ["configuration", *classes, run.metric]
    best = {c: np.nanmax(summary[f"IoU/{c}"]) if np.isfinite(summary[f"IoU/{c}"]).any() else math.nan
            for c in classes}
    rows = []
    for _, r in summary.iterrows():
        cells = [Cell(str(r["label"]))]
        cells += [num_cell(r[f"IoU/{c}"], best=r[f"IoU/{c}"] == best[c]) for c in classes]
        cells.append(num_cell(r["mean"], best=bool(r["best"])))
        rows.append(cells)
    return Table(f"classes-{run.label or run.name}",
                 f"Per-class IoU (%) per configuration (mean over seeds); '–': class absent from ground truth "
                 f"and predictions. Last column: {run.metric} (protocol {run.protocol}).", header, rows)


# -- several runs ------------------------------------------------------------------------------------------------
def run_axes(runs: list[RunData]) -> tuple[list[str], list[str]]:
    """Which run attributes distinguish the runs: (row attributes, column attributes)."""
    attrs = {"method": lambda r: str(r.cfg.get("method")), "sweep": lambda r: r.name,
             "dataset": lambda r: r.dataset_label, "model": lambda r: r.model_label,
             "protocol": lambda r: r.protocol}
    varies = [a for a, f in attrs.items() if len({f(r) for r in runs}) > 1]
    cols = [a for a in ("dataset", "model", "protocol") if a in varies] or ["dataset"]
    rows = ["method"] + [a for a in ("sweep",) if a in varies]
    return rows, cols


def _attr(run: RunData, name: str) -> str:
    return {"method": str(run.cfg.get("method")), "sweep": run.name, "dataset": run.dataset_label,
            "model": run.model_label, "protocol": f"protocol {run.protocol}"}[name]


def combined_table(runs: list[RunData], summaries: list[pd.DataFrame]) -> Table:
    """Rows: method (+ setting), columns: datasets / models / protocols (OVAM Tables 1-2)."""
    row_attrs, col_attrs = run_axes(runs)
    col_keys, row_keys, cells = [], [], {}
    paper_cols = set()
    for run, s in zip(runs, summaries):
        labels = [" · ".join(_attr(run, a) for a in row_attrs) + (f" ({r['label']})" if r["label"] != r["trial"]
                                                                  else "") for _, r in s.iterrows()]
        col = " · ".join(_attr(run, a) for a in col_attrs)
        if any((row, col) in cells for row in labels):  # same setting twice in one column: tell runs apart
            col = f"{col} [{run.label}]"
        for row, (_, r) in zip(labels, s.iterrows()):
            cells[(row, col)] = (r, run)
            if row not in row_keys:
                row_keys.append(row)
            if math.isfinite(r["paper"]):
                paper_cols.add(col)
        if col not in col_keys:
            col_keys.append(col)
    metrics = sorted({run.metric for run in runs})
    multi_seed = any(int(s["n_seeds"].max()) >= 2 for s in summaries if len(s))
    header = [" / ".join(row_attrs) + (" (setting)" if any(len(r.swept) for r in runs) else "")]
    for col in col_keys:
        header.append(col)
        if col in paper_cols:
            header += [f"{col}: paper", f"{col}: Δ"]
    best = {col: max((v[0]["mean"] for (rk, ck), v in cells.items() if ck == col and math.isfinite(v[0]["mean"])),
                     default=math.nan) for col in col_keys}
    rows = []
    for row in row_keys:
        out = [Cell(row)]
        for col in col_keys:
            got = cells.get((row, col))
            if got is None:
                out.append(Cell("–"))
                if col in paper_cols:
                    out += [Cell("–"), Cell("–")]
                continue
            r, run = got
            text = fmt_num(r["mean"]) + (f" ± {fmt_num(r['std'])}" if multi_seed and math.isfinite(r["std"]) else "")
            ci = f"95% CI [{fmt_num(r['ci_low'])}, {fmt_num(r['ci_high'])}] ({r['ci_kind']})" \
                if math.isfinite(r["ci_low"]) else "no interval"
            out.append(Cell(text, r["mean"] if math.isfinite(r["mean"]) else None,
                            math.isfinite(r["mean"]) and r["mean"] == best[col], f"run {run.label}; {ci}",
                            trusted=True))
            if col in paper_cols:
                out += [num_cell(r["paper"]), num_cell(r["delta"], signed=True)]
        rows.append(out)
    caption = (f"{' / '.join(metrics)} (%) of every configuration of every run; columns: "
               f"{', '.join(col_attrs)}. Bold: best of the column."
               + (" ± std over seeds." if multi_seed else ""))
    notes = []
    protocols = {run.protocol for run in runs}
    if len(protocols) > 1 and "protocol" not in col_attrs:
        notes.append(f"Warning: the runs use different metric protocols ({', '.join(sorted(protocols))}).")
    if len(metrics) > 1:
        notes.append(f"Warning: the runs lead with different metrics ({', '.join(metrics)}).")
    return Table("combined", caption, header, rows, notes)


def combined_class_table(runs: list[RunData], summaries: list[pd.DataFrame]) -> Table | None:
    """Per-class IoU of each run's best configuration; classes as columns (union over runs)."""
    classes: list[str] = []
    for run in runs:
        classes += [c for c in run.classes if c not in classes]
    if not classes:
        return None
    rows = []
    best_rows = []
    for run, s in zip(runs, summaries):
        if not len(s) or not s["best"].any():
            continue
        r = s[s["best"]].iloc[0]
        best_rows.append((run, r))
    best = {c: max((r.get(f"IoU/{c}", math.nan) for _, r in best_rows
                    if math.isfinite(r.get(f"IoU/{c}", math.nan))), default=math.nan) for c in classes}
    for run, r in best_rows:
        label = f"{run.cfg.get('method')} ({r['label']})" if r["label"] != r["trial"] else str(run.cfg.get("method"))
        cells = [Cell(label, title=f"run {run.label}"), Cell(run.dataset_label), Cell(run.model_label)]
        cells += [num_cell(r.get(f"IoU/{c}", math.nan), best=r.get(f"IoU/{c}", math.nan) == best[c])
                  for c in classes]
        rows.append(cells)
    return Table("combined-classes", "Per-class IoU (%) of each run's best configuration. Bold: best per class.",
                 ["method (setting)", "dataset", "model", *classes], rows, label_columns=3)
