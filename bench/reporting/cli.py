"""`python -m bench.report RUN_DIR [RUN_DIR ...] [--out DIR]`

One run directory: regenerate its report.md / report.html in place (or in --out DIR).
Several: one comparison report (rows: methods and settings; columns: datasets / models), written to --out DIR
(default reports/combined-<timestamp>/). Output appears complete or not at all; the last stdout line is the
report directory. Bad input: one `error:` line naming the fix, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from bench.atomic import staged_dir
from bench.env import quiet_environment
from bench.errors import BenchError, cli_exit

USAGE = "python -m bench.report RUN_DIR [RUN_DIR ...] [--out DIR]"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as bench.run does
        raise BenchError(f"{message}; usage: {USAGE}")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.report", description=__doc__.strip().splitlines()[2], add_help=False)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where to write (default: in place for one run, reports/combined-<timestamp>/ for several)")
    p.add_argument("--qualitative", type=int, default=None, metavar="N", help="images in qualitative figures")
    p.add_argument("-h", "--help", action="store_true")
    return p.parse_args(argv)


def make(run_dirs: list[str], out: str | None = None, qualitative: int | None = None) -> Path | str:
    """The report of one run (in place, or into --out) or of several (combined); a run may be a URI (s3://...):
    it is read from a local copy, and a report in place is uploaded beside it (figures first, reports last)."""
    from contextlib import ExitStack

    from bench.storage import Location, is_uri, local_copy

    if not any(is_uri(r) for r in run_dirs):
        return _make(run_dirs, out, qualitative)
    if len(set(run_dirs)) != len(run_dirs):
        raise BenchError("the same run directory is given twice; pass each run once")
    with ExitStack() as stack:
        local = [str(stack.enter_context(local_copy(r))) if is_uri(r) else r for r in run_dirs]
        if not (len(run_dirs) == 1 and out is None):
            return _make(local, out, qualitative)
        folder = Path(local[0])
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        _make(local, None, qualitative)
        run = Location.of(run_dirs[0])
        changed = [p for p in sorted(folder.iterdir()) if p.is_file() and before.get(p.name) != p.read_bytes()]
        for path in sorted(changed, key=lambda p: p.name in ("report.md", "report.html")):
            (run / path.name).write_bytes(path.read_bytes())
        return run.uri


def _make(run_dirs: list[str], out: str | None = None, qualitative: int | None = None) -> Path:
    from bench.reporting.build import write_combined, write_single
    from bench.reporting.model import load_run

    if not run_dirs:
        raise BenchError(f"no run directory given; usage: {USAGE}")
    resolved = [Path(r).resolve() for r in run_dirs]
    if len(set(resolved)) != len(resolved):
        raise BenchError("the same run directory is given twice; pass each run once")
    runs = [load_run(r) for r in run_dirs]  # validates every input before anything is written
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):  # distinct labels for runs whose directories share a name
        if labels.count(run.label) > 1:
            run.label = f"{run.label}#{i + 1}"
    in_place = len(runs) == 1 and out is None
    if in_place:
        target = runs[0].path
    else:
        target = Path(out) if out else Path("reports") / f"combined-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise BenchError(f"--out {target} already exists and is not empty; choose another --out or remove it")
    def write(work: Path) -> None:
        if len(runs) == 1:
            write_single(runs[0], work, 4 if qualitative is None else qualitative)
        else:
            write_combined(runs, work, 2 if qualitative is None else qualitative)

    if not in_place:
        with staged_dir(target, "--out DIR", "report-") as work:
            write(work)
        return target
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.report-", dir=target))
    except OSError as err:
        raise BenchError(f"cannot write to {target}: {err.strerror}; choose a writable --out DIR") from None
    try:  # in place: each file replaced atomically; figures first, reports last
        write(work)
        for f in sorted(work.iterdir()):
            if f.name not in ("report.md", "report.html"):
                os.replace(f, target / f.name)
        for name in ("report.md", "report.html"):
            os.replace(work / name, target / name)
        work.rmdir()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_environment()
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0 if argv else 2
    return cli_exit(lambda: make(*_args(argv)))


def _args(argv: list[str]) -> tuple:
    args = _parse(argv)  # a usage error is a BenchError, reported by cli_exit
    return args.runs, args.out, args.qualitative
