"""report.md and report.html of a run: the sweep table beside the paper's numbers, a plot, provenance.

The HTML is one self-contained file (plots embedded as data URIs, no scripts or fonts from the network);
every user-supplied string goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def swept_columns(cfg: dict, frame: pd.DataFrame) -> list[str]:
    return [k for k in cfg.get("sweep", {}) if k in frame.columns]


def summary_table(cfg: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (mean over seeds): swept values, ours, CI, paper, delta."""
    swept = swept_columns(cfg, frame)
    metric = (cfg.get("paper") or {}).get("metric", "mIoU")
    paper_col = f"paper_{metric}"
    keys = swept or ["trial"]
    agg = {"mIoU": ("mIoU", "mean"), "aAcc": ("aAcc", "mean"), "mAcc": ("mAcc", "mean")}
    if "mIoU_ci_low" in frame:
        agg.update(ci_low=("mIoU_ci_low", "mean"), ci_high=("mIoU_ci_high", "mean"))
    if len(cfg.get("seeds", [0])) > 1:
        agg["std"] = ("mIoU", "std")
    if paper_col in frame:
        agg["paper"] = (paper_col, "first")
    table = frame.groupby(keys, sort=True, dropna=False).agg(**agg).reset_index()
    if "paper" in table:
        table["delta"] = table["mIoU"] - table["paper"]
    return table


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(cfg: dict, table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    swept = swept_columns(cfg, table) or ["trial"]
    header = [*swept, "mIoU (ours)"]
    has_ci = "ci_low" in table
    if has_ci:
        header.append("95% CI")
    if "std" in table:
        header.append("± std (seeds)")
    if "paper" in table:
        header += ["paper", "Δ"]
    best = table["mIoU"].max()
    body = []
    for _, row in table.iterrows():
        ours = _fmt(row["mIoU"]) + (" ★" if np.isfinite(row["mIoU"]) and row["mIoU"] == best else "")
        cells = [_fmt(row[c], 4) if isinstance(row[c], float) else str(row[c]) for c in swept] + [ours]
        if has_ci:
            cells.append(f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]")
        if "std" in table:
            cells.append(_fmt(row["std"]))
        if "paper" in table:
            cells += [_fmt(row["paper"]), (f"{row['delta']:+.1f}" if np.isfinite(row["delta"]) else "–")]
        body.append(cells)
    return header, body


def per_class_rows(frame: pd.DataFrame, cfg: dict) -> tuple[list[str], list[list[str]]]:
    swept = swept_columns(cfg, frame) or ["trial"]
    iou_cols = [c for c in frame.columns if c.startswith("IoU/")]
    grouped = frame.groupby(swept, sort=True, dropna=False)[iou_cols].mean().reset_index()
    header = [*swept, *(c.split("/", 1)[1] for c in iou_cols)]
    body = [[str(row[c]) for c in swept] + [_fmt(row[c]) for c in iou_cols] for _, row in grouped.iterrows()]
    return header, body


def plot_sweep(cfg: dict, table: pd.DataFrame, path: Path) -> Path | None:
    """mIoU against the (first) swept parameter, the paper's curve overlaid."""
    swept = swept_columns(cfg, table)
    if len(swept) != 1:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    param = swept[0]
    x_values = table[param].tolist()
    numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x_values)
    positions = x_values if numeric else list(range(len(x_values)))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(positions, table["mIoU"], "o-", label="ours")
    if "ci_low" in table:
        ax.fill_between(positions, table["ci_low"], table["ci_high"], alpha=0.2, label="95% CI (bootstrap)")
    if "paper" in table and table["paper"].notna().any():
        ax.plot(positions, table["paper"], "s--", label=f"paper ({(cfg.get('paper') or {}).get('table', '')})")
    if numeric and min(x_values) >= 0 and max(x_values) / max(min(v for v in x_values if v > 0), 1e-12) > 50:
        ax.set_xscale("symlog", linthresh=min(v for v in x_values if v > 0))
    if not numeric:
        ax.set_xticks(positions, [str(v) for v in x_values])
    ax.set_xlabel(param)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(cfg["name"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def provenance_lines(cfg: dict, prov: dict) -> list[tuple[str, str]]:
    data = prov.get("dataset", {})
    return [
        ("sweep", f"{cfg['name']} ({cfg.get('sweep_file', '')})"),
        ("method", cfg["method"]),
        ("model", str({k: v for k, v in cfg["model"].items() if v})),
        ("dataset", f"{data.get('name')} split={data.get('split', '-')} root={data.get('root', '-')} "
                    f"images={data.get('num_images')}"),
        ("metric protocol", prov.get("metric_protocol", "")),
        ("seeds", str(prov.get("seeds"))),
        ("configurations / forward settings", f"{prov.get('num_trials')} / {prov.get('num_forward_settings')}"),
        ("UNet passes", str(prov.get("unet_passes"))),
        ("wall time", f"{prov.get('wall_seconds')} s ({prov.get('images_per_second')} image-passes/s)"),
        ("overrides", " ".join(prov.get("overrides", [])) or "none"),
        ("config hash", prov.get("config_hash", "")),
        ("git", prov.get("git_sha", "")),
        ("versions", ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())),
        ("devices", ", ".join(prov.get("devices", []))),
        ("finished", prov.get("finished", "")),
    ]


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [header, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def html_table(header: list[str], body: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#222}table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}dt{font-weight:600}dd{margin:0 0 .4rem 1rem}
@media print{body{margin:0;max-width:none}}"""


def write_report(run_dir: Path, cfg: dict, frame: pd.DataFrame, prov: dict) -> None:
    table = summary_table(cfg, frame)
    header, body = table_rows(cfg, table)
    cls_header, cls_body = per_class_rows(frame, cfg)
    plot = plot_sweep(cfg, table, run_dir / "plot_mIoU.png")
    paper = cfg.get("paper") or {}
    title = f"{cfg['name']}: {cfg['method']} on {prov.get('dataset', {}).get('name')}"
    caption = (f"mIoU (%, protocol {prov.get('metric_protocol')}) per configuration; ★ best; paper: "
               f"{paper.get('table', 'n/a')}" + (f" ({paper['note']})" if paper.get("note") else ""))
    md = [f"# {title}", "", cfg.get("description") or "", "", caption, "", markdown_table(header, body), ""]
    if plot:
        md += [f"![mIoU against {swept_columns(cfg, table)[0]}]({plot.name})", ""]
    md += ["## Per-class IoU (%)", "", markdown_table(cls_header, cls_body), "", "## Provenance", ""]
    md += [f"- **{k}**: {v}" for k, v in provenance_lines(cfg, prov)]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")

    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p>{e(cfg.get('description') or '')}</p>", f"<p>{e(caption)}</p>", html_table(header, body)]
    if plot:
        data = base64.b64encode(plot.read_bytes()).decode()
        parts.append(f"<figure><img alt='mIoU plot' src='data:image/png;base64,{data}'></figure>")
    parts += ["<h2>Per-class IoU (%)</h2>", html_table(cls_header, cls_body), "<h2>Provenance</h2><dl>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in provenance_lines(cfg, prov)]
    parts.append("</dl></body></html>")
    (run_dir / "report.html").write_text("\n".join(parts))
