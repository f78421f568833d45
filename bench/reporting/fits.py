"""The report's section on trained methods: one row per fit of the run (`fit/<hash>/train_config.json`) and
their loss curves (`fit/<hash>/loss.csv`) in one figure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.reporting.model import RunData, fmt_value
from bench.reporting.plots import Figure, _plt, _save, tx
from bench.reporting.tables import Cell, Table, num_cell


def load_fits(run_dir: Path | None) -> list[dict]:
    """Finished fits of a run directory, each its train config plus `curve` (a DataFrame)."""
    if run_dir is None or not (run_dir / "fit").is_dir():
        return []
    fits = []
    for folder in sorted((run_dir / "fit").iterdir()):
        if not (folder / "done").is_file():
            continue
        config = json.loads((folder / "train_config.json").read_text())
        config["curve"] = pd.read_csv(folder / "loss.csv", keep_default_na=False)
        fits.append(config)
    return fits


def _setting_label(fit: dict) -> str:
    values = (fit.get("setting") or {}).get("values") or {}
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items())


def fits_table(run: RunData, fits: list[dict]) -> Table:
    header = ["fit", "fitter", "train setting", "workers", "steps", "final loss", "seconds", "origin"]
    rows = []
    for fit in fits:
        curve = fit["curve"]
        # the last logged loss, and the series it belongs to where the fit names them (FreeGen's ASR, then its
        # EGD "egd" and "egd+hst"; per-class fits): a staged fit's final loss is its last stage's
        final = float(curve["loss"].iloc[-1]) if len(curve) else float("nan")
        series = str(curve["series"].iloc[-1]) if len(curve) else ""
        origin = "copied from " + fit["copied_from"] if fit.get("copied_from") else (
            f"resumed at step {fit['resumed_from']}" if fit.get("resumed_from") else "fitted")
        rows.append([Cell(str(fit.get("hash", ""))), Cell(f"{fit.get('fitter')} v{fit.get('version')}"),
                     Cell(_setting_label(fit)), num_cell(fit.get("world_size"), 0), num_cell(fit.get("steps"), 0),
                     _loss_cell(final, series), num_cell(fit.get("fit_seconds"), 1), Cell(origin)])
    return Table(f"fits-{run.label or run.name}",
                 "Fits of this run (one per train setting, shared by every configuration that needs it; "
                 "artefacts in fit/<fit>/ of the run directory). Final loss: the last logged training loss "
                 "(with its series where the fit logs several). Seconds: the fit's wall time; a resumed fit's "
                 "includes the earlier invocation's training up to the checkpoint it resumed from.",
                 header, rows, label_columns=3, wrap_columns=(2, 7))


def _loss_cell(loss: float, series: str) -> Cell:
    cell = num_cell(loss, 4)
    return Cell(f"{cell.text} ({series})", cell.sort) if series else cell  # series: escaped


def loss_figure(fits: list[dict], path: Path) -> Figure | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = 0
    for fit in fits:
        curve = fit["curve"]
        for series, part in curve.groupby("series", sort=False):
            label = fit.get("hash", "")[:8] + (f" {series}" if series else "")
            ax.plot(part["step"], part["loss"], label=tx(label), linewidth=1.2)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves of the fits")
    if drawn <= 12:
        ax.legend(fontsize="small")
    _save(fig, path)
    return Figure(path, "training loss curves of the fits",
                  "Training loss per step of every fit (legend: fit, and series such as the class for "
                  "per-class fits).")
