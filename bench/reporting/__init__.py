"""Reports of runs: paper-shaped tables with uncertainty, plots, qualitative figures and provenance, as
Markdown and one self-contained HTML file. `python -m bench.report RUN_DIR [RUN_DIR ...]` (bench.reporting.cli).

Modules: model (loading a run, per-configuration summary), tables, fits (trained methods), plots,
qualitative (the engine's `save_qualitative` hook and the figure), render (Markdown/HTML), build, cli.
Reports read run directories only (bench.results is their schema), never the engine."""

from bench.reporting.build import warning_summary, write_combined, write_report, write_single
from bench.reporting.model import RunData, load_run, summarize_run
from bench.reporting.qualitative import save_qualitative

__all__ = ["RunData", "load_run", "save_qualitative", "summarize_run", "warning_summary", "write_combined",
           "write_report", "write_single"]
