"""`python -m bench.run SWEEP.yaml [key=value ...]`: run a sweep and write its run directory.

The run directory appears complete or not at all: everything is written under `<run>.partial/` and renamed
at the end. An interrupted run keeps `<run>.partial/`; the same command with `output_dir=<run>` resumes it.
The last line on stdout is the run directory's path.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import BenchError, cli_exit

log = logging.getLogger("bench")


def _quiet_environment() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "ray-bench"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_run_dir(cfg: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / "runs" / f"{cfg['name']}-{stamp}"


def run(sweep_path: str, overrides: list[str]) -> Path:
    from bench.config import compose
    from bench.results import write_run

    from bench.engine import preflight

    cfg = compose(sweep_path, overrides)  # validation: nothing is written before this passes
    preflight(cfg)
    final = Path(cfg["output_dir"]) if cfg["output_dir"] else default_run_dir(cfg)
    if final.exists():
        raise BenchError(f"run directory {final} already exists; choose another output_dir=")
    work = final.with_name(final.name + ".partial")
    if work.exists():
        log.info("resuming the interrupted run in %s", work)
    work.mkdir(parents=True, exist_ok=True)
    cfg["output_dir"] = str(final)
    started = time.time()
    try:
        from bench.engine import run_engine

        rows, stats = run_engine(cfg, work)
    except KeyboardInterrupt:
        log.error("interrupted; finished images are kept in %s; resume with: python -m bench.run %s %s",
                  work, sweep_path, " ".join([*overrides, f"output_dir={final}"]))
        raise
    except Exception as err:
        if not any((work / "shards").glob("shard-*.npz")):
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.error("failed; finished images are kept in %s and are reused by the same command", work)
        cause = _bench_cause(err)
        if cause is not None:
            raise cause from None
        raise
    stats["wall_seconds"] = round(time.time() - started, 3)
    stats["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_run(cfg, rows, stats, work)
    work.rename(final)
    return final


def _bench_cause(err: BaseException) -> BenchError | None:
    """A BenchError raised inside a Ray actor reaches the driver wrapped; unwrap it."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, BenchError):
            return err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("ray", "ray.data", "ray.tune", "filelock", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("usage: python -m bench.run SWEEP.yaml [key=value ...]   (e.g. data.limit=8 output_dir=runs/x)")
        return 0 if argv else 2
    _quiet_environment()
    return cli_exit(lambda: run(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
