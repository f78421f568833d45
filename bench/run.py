"""`python -m bench.run SWEEP.yaml [key=value ...]`: run a sweep and write its run directory.

The run directory appears complete or not at all: everything is written under `<run>.partial/` and renamed
at the end (on object storage, `output_dir=s3://...`, which has no rename: in place, finished once its
`complete.json` is written, last; bench.storage). An interrupted run keeps `<run>.partial/`; the same command with `output_dir=<run>` resumes it
(finished fits and images are kept; a changed configuration is refused, naming the keys that differ). The
last line on stdout is the run directory's path. Bad input is one `error:` line and exit 2 before anything is
written; a failure while running (here or in a Ray worker) is one line too, with the command that resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.env import quiet_environment

quiet_environment()  # before torch is imported below: its thread count is read at import

from bench.config import SweepConfig, compose
from bench.engine import run_engine
from bench.errors import BenchError, RunFailed, cli_exit, run_started
from bench.hygiene import prune_foreign
from bench.preflight import check_cluster, preflight
from bench.resolved import Resolved, effective_config, run_record
from bench.results import RunStats, config_hash, write_run
from bench.rundir import WORK, Claim, claim, discard, has_progress, run_target, scored_images
from bench.storage import COMPLETE, Location

log = logging.getLogger("bench")


def resume_command(sweep_path: str, overrides: list[str], final: Path | str, module: str = "bench.run") -> str:
    """The exact command that resumes this run: the same sweep and overrides, output_dir= the run."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "output_dir"]
    return shlex.join(["python", "-m", module, sweep_path, *kept, f"output_dir={final}"])


def run(sweep_path: str, overrides: list[str]) -> Path | str:
    cfg = compose(sweep_path, overrides)  # validation: nothing is written before this and preflight pass
    return run_command(cfg, sweep_path, overrides, sweep_results)


def run_command(cfg: SweepConfig, sweep_path: str, overrides: list[str], produce, final: Path | str | None = None,
                module: str = "bench.run", noun: str = "run directory", plan_hook=None) -> Path | str:
    """The one runner behind every command that writes a run folder (bench.run, bench.synthesize): preflight
    (every node on a cluster), an exclusive claim of the folder in the run's storage (a resume refuses a changed
    configuration), `produce(cfg, plan, claim)` writing everything the folder keeps through that storage, then
    publication: a local folder renamed from `.partial`, an object-store folder finished by its completion
    marker, written last. `plan_hook(plan)` returns the checked plan adjusted, before the claim. `cfg` is never
    changed: what the run decides (the default sweep, the output directory, the trace pool) goes to its
    Resolved record (bench.resolved), which `produce` completes and returns with the time it finished."""
    final = run_target(cfg) if final is None else final
    target = Location.of(final)
    resolved = Resolved.of(cfg, final)

    def probe_nodes(plan) -> None:  # one probe per node: every node reaches what it needs (check_cluster)
        if on_cluster(cfg, plan):
            from bench.env import init_ray

            init_ray(cfg.ray.address, cfg.ray.object_store_mb, cfg.ray.quiet)
            check_cluster(cfg, plan, target)

    plan = preflight(cfg, probe_nodes)
    if plan_hook is not None:
        plan = plan_hook(plan)
    if target.is_local:
        if final.exists():
            raise BenchError(f"{noun} {final} already exists; choose another output_dir=")
        work = Location.of(final.with_name(final.name + ".partial"))
    else:  # an object store: written in place, finished when its completion marker exists (bench.storage)
        work = target
    held = claim(work, cfg, plan.inputs)  # exclusive; a changed config stops here
    run_started()  # the log lines held back while the input was checked (bench.errors)
    if held.resumed:
        log.info("resuming the interrupted run in %s", held.work)
    try:
        return _run_claimed(cfg, resolved, plan, held, final, resume_command(sweep_path, overrides, final, module),
                            produce, prune=module == "bench.run")
    finally:
        held.release()


def on_cluster(cfg: SweepConfig, plan) -> bool:
    """Whether the run joins an existing Ray cluster (ray.address, or RAY_ADDRESS as in a submitted job) and
    uses Ray there (an actor pool or fits); a local Ray started by the run is one node."""
    joins = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    return joins and (cfg.ray.execution != "driver" or bool(plan.fits))


def _run_claimed(cfg: SweepConfig, resolved: Resolved, plan, held: Claim, final: Path | str, resume: str, produce,
                 prune: bool = True) -> Path | str:
    work = held.work
    try:
        finished, resolved = produce(cfg, resolved, plan, held)
    except KeyboardInterrupt:
        held.finish_invocation()
        log.error("interrupted; finished fits and images are kept in %s; resume with: %s", work, resume)
        raise
    except Exception as err:  # noqa: BLE001 (every failure becomes one line; the traceback goes to a file)
        held.finish_invocation()
        raise _one_line(err, work.local if work.is_local else work, resume) from None
    if not work.is_local:
        files = [rel for rel in work.files() if rel.split("/", 1)[0] != WORK]
        (work / COMPLETE).write_json({"config_hash": config_hash(run_record(cfg, resolved)), "files": files,
                                      "finished": finished})
        (work / WORK).rmtree()  # after the marker: a reader never sees a finished run without it
        return str(final)
    work, final = work.local, Path(final)
    # shards, the started configuration, the lock: only needed to resume. Moved out first, so no reader sees a
    # finished run with them; a process that finds the .partial meanwhile is refused (it is not empty)
    if final.exists():
        raise BenchError(f"{final} was created by another process while this run worked; the finished run stays "
                         f"in {work}")
    if prune:
        prune_foreign(work, WORK)  # a finished run holds only what the run wrote (bench.hygiene)
    trash = work.with_name(f".{work.name}.done-{held.lock_fd}-{time.time_ns()}")
    (work / WORK).rename(trash)
    work.rename(final)
    shutil.rmtree(trash, ignore_errors=True)
    return final


def sweep_results(cfg: SweepConfig, resolved: Resolved, plan, held: Claim) -> tuple[str, Resolved]:
    """bench.run's work in a claimed run folder: the engine, then results and report written into the run's
    storage; returns the time it finished and the run's Resolved record, its trace pool settled."""
    work = held.work
    shards = work / WORK / "shards"
    before = scored_images(shards)
    rows, stats = run_engine(cfg, work, plan)
    held.finish_invocation(stats.trace_seconds, scored_images(shards) - before)
    stats = stats.over_invocations(held.totals(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   plan.notes, held.state.get("inputs"))
    resolved = resolved.with_pool(stats.execution, stats.num_actors)
    record = run_record(cfg, resolved)
    if work.is_local:
        _write_results(record, rows, stats, work.local)
    else:
        _publish_to_store(record, rows, stats, work)
    return stats.finished, resolved


def _write_results(record: dict, rows: list[dict], stats: RunStats, folder: Path) -> None:
    # matplotlib and scipy: imported once there is a report to write
    from bench.reporting import write_report

    frame, provenance = write_run(record, rows, stats, folder)
    write_report(folder, effective_config(record), frame, provenance)


def _publish_to_store(record: dict, rows: list[dict], stats: RunStats, run: Location) -> None:
    """An object-store run's results and report: composed in a node-local copy of what the run keeps (the
    report reads its fits and qualitative maps) and the new files uploaded (the runner writes the completion
    marker last)."""
    with tempfile.TemporaryDirectory(prefix="diffseg-publish-") as tmp:
        stage = run.download(Path(tmp) / "run", skip=(WORK,))
        kept = set(run.files())
        _write_results(record, rows, stats, stage)
        for path in sorted(stage.rglob("*")):
            rel = path.relative_to(stage).as_posix()
            if path.is_file() and rel not in kept:
                (run / rel).write_bytes(path.read_bytes())


def _one_line(err: BaseException, work: Path, resume: str) -> BenchError:
    """A failure of the engine (here or inside a Ray worker) as one line: the original exception's own class
    and message, not Ray's wrapper, and how to resume when something is kept. The full traceback goes to a file
    beside the kept work (or nowhere, when nothing is kept: the run directory is removed)."""
    cause = root_cause(err)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {cause.filename}" if cause.filename else ""
        text = f"the disk is full ({cause.strerror}{where}); free space there"
    else:
        text = str(cause) if isinstance(cause, BenchError) else f"{type(cause).__name__}: {first_line(cause)}"
    if has_progress(work):
        log_file = work / WORK / "error.log"
        try:
            log_file.write_text("".join(traceback.format_exception(err)))
        except OSError:
            pass
        text = f"{text}; finished fits and images are kept in {work} (traceback in {log_file}); resume with: {resume}"
    else:
        discard(work)
    return BenchError(text) if isinstance(cause, BenchError) else RunFailed(text)


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray task, actor or Ray Data worker raised, unwrapped from Ray's wrappers by their typed
    links (cause_chain); a BenchError anywhere in the chain wins. Ray's `as_instanceof_cause()` wrapper is an
    instance of the cause's class too (RayTaskError(BenchError)), but its text is Ray's traceback: it is
    skipped for the cause itself."""
    chain = [item for item in cause_chain(err) if not (is_ray_error(item) and getattr(item, "cause", None))]
    for item in chain:
        if isinstance(item, BenchError):
            return item
    return chain[-1] if chain else err


def cause_chain(err: BaseException) -> list[BaseException]:
    """`err` and what caused it, outermost first: RayTaskError keeps the exception the worker raised as
    `.cause` (Ray Data's map workers too, as bench.env.init_ray asks them to raise the original, not a
    UserCodeException that keeps only its text), Ray Train's WorkerGroupError its workers' exceptions, others
    `__cause__`; cycles and runaway chains stop at 20."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen and len(chain) < 20:
        seen.add(id(err))
        chain.append(err)
        err = getattr(err, "cause", None) or worker_failure(err) or err.__cause__
    return chain


def worker_failure(err: BaseException) -> BaseException | None:
    """The exception the lowest-rank failed worker raised, where Ray Train reports a failed worker group
    (WorkerGroupError keeps them by rank as `worker_failures`; its own text is "Training failed due to worker
    errors:"); None for any other exception."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        return first if isinstance(first, BaseException) else None
    return None


def is_ray_error(err: BaseException) -> bool:
    """Whether `err` is one of Ray's own exceptions (an error cannot be Ray's where Ray was never imported)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(err, ray_exceptions.RayError)


def first_line(err: BaseException) -> str:
    """An exception's own message, one line: its first line, read from the message it was raised with where
    that is one string (a KeyError's str() is its repr; Ray Data appends a retry note to it on later lines).
    Ray's own errors (a dead actor, a lost object) say why on their last line."""
    own = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    lines = [line.strip() for line in own.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    return lines[-1] if is_ray_error(err) and len(lines) > 1 else lines[0]


def main(argv: list[str] | None = None) -> int:
    """A sweep (`SWEEP.yaml [key=value ...] [--dry-run]`), `--list` or `--help [METHOD]` (bench.cli)."""
    from bench.cli import run_main

    return run_main(argv, run)


def sweep_command(argv: list[str] | None, doc: str, usage: str, work) -> int:
    """The shell of a `SWEEP.yaml [key=value ...]` command (bench.run, bench.synthesize): logging set up once,
    -h / no arguments print the usage, `work(sweep, overrides)` runs under cli_exit (one-line errors, exit 2)."""
    from bench.cli import resolve_sweep, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(doc.strip().splitlines()[0])
        print(f"usage: {usage}")
        return 0 if argv else 2
    return cli_exit(lambda: work(resolve_sweep(argv[0]), argv[1:]), hold_logs=True)


if __name__ == "__main__":
    from bench.env import exit_process

    exit_process(main())
