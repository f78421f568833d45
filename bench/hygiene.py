"""What a finished run may hold: only what the run writes. Before a `.partial` is published, everything else in
it is removed: temporary files a killed or failed writer left (`.<name>.tmp`, hidden partial files), unfinished
fit folders, and anything planted in the folder between invocations (a `tune/` folder, a pickle). The run's own
outputs are named here once:

    config.yaml run.json results.parquet results.csv summary.csv report.md report.html *.png *.svg
    qualitative/*.npz   fit/<hash>/ (finished: holds `done`)   work/ (dropped by the publisher itself)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = (".yaml", ".json", ".parquet", ".csv", ".md", ".html", ".png", ".svg")
OUTPUT_DIRS = ("qualitative", "fit")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def foreign_entries(run: Path, work_dir: str = "work") -> list[Path]:
    """Entries of a run folder that the run did not write as output (see the module docstring)."""
    out = []
    for entry in sorted(run.iterdir()):
        name = entry.name
        if name == work_dir:
            continue
        hidden = name.startswith(".") or name.endswith(".tmp")
        if entry.is_symlink() or hidden:
            out.append(entry)
        elif entry.is_dir():
            if name not in OUTPUT_DIRS:
                out.append(entry)
            elif name == "qualitative":
                out += [p for p in sorted(entry.iterdir()) if p.suffix != ".npz" or p.name.startswith(".")
                        or not p.is_file() or p.is_symlink()]
            else:  # fit/: finished fits only
                out += [p for p in sorted(entry.iterdir()) if not (p / "done").is_file() or p.is_symlink()]
                out += [p for d in entry.iterdir() if d.is_dir() for p in d.rglob("*")
                        if p.name.startswith(".") or p.name.endswith(".tmp")]
        elif entry.suffix not in OUTPUT_SUFFIXES:
            out.append(entry)
    return out


def prune_foreign(run: Path, work_dir: str = "work") -> list[str]:
    """Remove what `foreign_entries` finds; returns their names relative to the run (logged)."""
    removed = []
    for entry in foreign_entries(run, work_dir):
        removed.append(entry.relative_to(run).as_posix())
        _remove(entry)
    if removed:
        log.info("left out of the finished run (not written by it): %s", ", ".join(removed[:5])
                 + (f" and {len(removed) - 5} more" if len(removed) > 5 else ""))
    return removed
