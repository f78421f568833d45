"""Reports of runs (the implementation lives in the `bench.reporting` package).

`bench.report.write_report(run_dir, cfg, frame, provenance)` is what `python -m bench.run` calls at the end;
`python -m bench.report RUN_DIR [RUN_DIR ...] [--out DIR]` regenerates one report or combines several runs.
"""

from __future__ import annotations

import sys

from bench.reporting import load_run, save_qualitative, summarize_run, write_report
from bench.reporting.cli import main

__all__ = ["load_run", "main", "save_qualitative", "summarize_run", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
