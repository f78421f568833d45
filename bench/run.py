"""`python -m bench.run SWEEP.yaml [key=value ...]`: run a sweep and write its run directory.

The run directory appears complete or not at all: everything is written under `<run>.partial/` and renamed
at the end. An interrupted run keeps `<run>.partial/`; the same command with `output_dir=<run>` resumes it
(finished fits and images are kept; a changed configuration is refused). The last line on stdout is the run
directory's path.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.env import NOISY_LOGGERS, quiet_environment

quiet_environment()  # before torch is imported below: its thread count is read at import

from bench.config import SweepConfig, compose  # noqa: E402
from bench.engine import WORK, run_engine  # noqa: E402
from bench.errors import BenchError, cli_exit  # noqa: E402
from bench.preflight import preflight  # noqa: E402
from bench.results import config_hash, write_run  # noqa: E402

log = logging.getLogger("bench")
STARTED = "started.json"  # in <run>.partial/work/: the configuration an interrupted run was started with


def default_run_dir(cfg: SweepConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / "runs" / f"{cfg.name}-{stamp}"


def resume_hash(cfg: SweepConfig) -> str:
    """What must not change between an interrupted run and its resumption: everything but the overrides'
    spelling, output_dir, `ray` and the fit's workers and devices (where and how parallel it runs, not what
    it computes; as for the fit directories' hash, bench.plan.fit_hash)."""
    data = {k: v for k, v in cfg.as_dict().items() if k not in ("overrides", "ray")}
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("num_workers", "use_gpu", "max_failures")}
    return config_hash(data)


def run(sweep_path: str, overrides: list[str]) -> Path:
    cfg = compose(sweep_path, overrides)  # validation: nothing is written before this and preflight pass
    plan = preflight(cfg)
    final = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg)
    if final.exists():
        raise BenchError(f"run directory {final} already exists; choose another output_dir=")
    work = final.with_name(final.name + ".partial")
    cfg.output_dir = str(final)
    started_file = work / WORK / STARTED
    if started_file.is_file():
        before = json.loads(started_file.read_text()).get("hash")
        if before != resume_hash(cfg):
            raise BenchError(f"the interrupted run in {work} was started with another configuration; resume it "
                             f"with the same sweep and overrides, or choose another output_dir=")
        log.info("resuming the interrupted run in %s", work)
    (work / WORK).mkdir(parents=True, exist_ok=True)
    started_file.write_text(json.dumps({"hash": resume_hash(cfg), "config": cfg.as_dict()}, default=str))
    started = time.time()
    try:
        rows, stats = run_engine(cfg, work, plan)
    except KeyboardInterrupt:
        log.error("interrupted; finished fits and images are kept in %s; resume with: python -m bench.run %s %s",
                  work, sweep_path, " ".join([*overrides, f"output_dir={final}"]))
        raise
    except Exception as err:
        if _has_progress(work):
            log.error("failed; finished fits and images are kept in %s and are reused by the same command", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        cause = _bench_cause(err)
        if cause is not None:
            raise cause from None
        raise
    stats["wall_seconds"] = round(time.time() - started, 3)
    stats["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = cfg.as_dict()
    frame, provenance = write_run(data, rows, stats, work)
    from bench.reporting import write_report  # matplotlib and scipy: imported once there is a report to write

    write_report(work, data, frame, provenance)
    shutil.rmtree(work / WORK)  # shards: only needed to resume
    work.rename(final)
    return final


def _has_progress(work: Path) -> bool:
    """Whether an interrupted run holds anything worth resuming (finished images, fits or checkpoints)."""
    return any((work / WORK / "shards").glob("shard-*.npz")) or any((work / "fit").glob("*/*"))


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
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("usage: python -m bench.run SWEEP.yaml [key=value ...]   (e.g. data.limit=8 output_dir=runs/x)")
        return 0 if argv else 2
    return cli_exit(lambda: run(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
