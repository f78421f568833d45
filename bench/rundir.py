"""A run directory's life: claimed exclusively, locked while a process works in it, resumable only with the
configuration it was started with, and timed over every invocation that worked on it.

    <run>.partial/work/started.json   written first: the resolved configuration (without output_dir, the
                                      overrides' spelling and where/how parallel it runs), its hash, and one
                                      record per invocation (start, wall and trace seconds, images traced)
    <run>.partial/work/lock           flock()ed by the invocation working in the directory

A new run creates `<run>.partial/` with mkdir (atomic: of two concurrent starts exactly one succeeds) and locks
it before it writes started.json; a second process that finds the directory waits for started.json, then
fails to take the lock (in use) or compares configurations (resume). A `.partial` without started.json whose
lock is free and which holds nothing resumable is stale (a start killed within milliseconds): it is reset.

On an object store (bench.storage: s3://, gs://) there is no rename and no flock. The run is written in place
under `<run>/`, finished when `<run>/complete.json` exists (written last), and claimed by creating
`<run>/work/lock` exclusively (S3 `If-None-Match: *`, GCS `if_generation_match=0`): of two concurrent starts
exactly one creates it. The lock names its holder (host, pid) and is deleted when the invocation ends; one left
by a killed process on this host is taken over, one held elsewhere is refused with the object to delete.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from bench.config import SweepConfig
from bench.errors import BenchError
from bench.fingerprint import refuse_changed_resume
from bench.frozen import thaw
from bench.results import config_hash
from bench.storage import COMPLETE, STORAGE_ENV, Location, is_uri

log = logging.getLogger(__name__)
WORK = "work"  # the run directory's working subfolder (shards, the configuration, the lock); not in a result
STARTED = "started.json"
LOCK = "lock"
STARTED_WAIT_SECONDS = 5.0  # how long a second process waits for a fresh run's started.json
# Where and how parallel a run works, not what it computes: may change between invocations.
RUNTIME_KEYS = ("output_dir", "overrides", "sweep_file", "ray", "tracking")
RUNTIME_TRAIN_KEYS = ("num_workers", "use_gpu", "max_failures", "max_concurrent", "gpus_per_worker")


def resume_config(cfg: SweepConfig) -> dict:
    """What must not change between an interrupted run and its resumption: the resolved configuration without
    output_dir, the overrides' spelling, the sweep file's path, `ray` and the fit's workers and devices (as for
    the fit directories' hash, bench.plan.fit_hash)."""
    data = {k: v for k, v in cfg.as_dict().items() if k not in RUNTIME_KEYS}
    data["sweep"] = thaw(cfg.swept)  # with the method's default sweep, as runs have always recorded it
    data["train"] = {k: v for k, v in data["train"].items() if k not in RUNTIME_TRAIN_KEYS}
    return json.loads(json.dumps(data, default=str))  # plain JSON types, as read back from started.json


def differing_keys(before: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key, "<absent>"), now.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differing_keys(a, b, name + "."))
        elif a != b:
            out.append(name)
    return out


def unique_default_dir(base: Path, name: str) -> Path:
    """`<base>/<name>-<date>-<time>-<microseconds>`, not taken by a finished or an unfinished run."""
    while True:
        final = base / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        if not final.exists() and not final.with_name(final.name + ".partial").exists():
            return final
        time.sleep(1e-6)


def run_target(cfg: SweepConfig) -> Path | str:
    """Where the run goes: `output_dir=` (a path, or a URI such as s3://bucket/runs/x), else a fresh name under
    the storage root `DIFFSEG_STORAGE` (a path or URI, as Ray's storage_path), else under reports/runs. Inside a
    submitted Ray job a relative path would land in the job's working_dir copy, which Ray evicts: refused."""
    root = os.environ.get(STORAGE_ENV)
    given = cfg.output_dir
    if in_ray_job() and not root and (not given or (not is_uri(given) and not Path(given).expanduser().is_absolute())):
        where = f"output_dir={given}" if given else "the default run directory (reports/runs/...)"
        raise BenchError(f"{where} is relative inside a Ray job, so it would be written into the job's working_dir "
                         f"copy on the head node, which Ray deletes; give output_dir=s3://bucket/runs/x (or a "
                         f"shared mount's absolute path), or set {STORAGE_ENV}=s3://bucket/runs in the job's "
                         f"runtime_env")
    if given:
        if is_uri(given) or Path(given).is_absolute() or not root:
            return given if is_uri(given) else Path(given)
        return _join(root, given)
    if root and is_uri(root):
        return f"{root.rstrip('/')}/{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    return unique_default_dir(Path(root) if root else Path("reports") / "runs", cfg.name)


def _join(root: str, rel: str) -> Path | str:
    return f"{root.rstrip('/')}/{rel}" if is_uri(root) else Path(root) / rel


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a job submitted with Ray's job client."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


@dataclass
class Claim:
    """A run directory held by this process (its lock fd open, or its lock object present, until `release`)."""

    work: Location  # <run>.partial (local), <run> (object store)
    resumed: bool
    state: dict
    lock_fd: int | None
    started: float = field(default_factory=time.time)

    @property
    def started_file(self) -> Location:
        return self.work / WORK / STARTED

    def save(self) -> None:
        self.started_file.write_bytes(json.dumps(self.state, indent=1, default=str).encode())

    def finish_invocation(self, trace_seconds: float | None = None, images_traced: int | None = None) -> None:
        """Close this invocation's record (on success, failure and Ctrl-C alike)."""
        record = self.state["invocations"][-1]
        record["wall_seconds"] = round(time.time() - self.started, 3)
        if trace_seconds is not None:
            record["trace_seconds"] = round(trace_seconds, 3)
        if images_traced is not None:
            record["images_traced"] = int(images_traced)
        if self.started_file.parent.is_dir():
            try:
                self.save()
            except OSError:  # a full disk: the invocation's timing is lost, not the work (the error says why)
                log.debug("could not record the end of this invocation", exc_info=True)

    def totals(self) -> dict:
        """run.json's timing over every invocation: a killed invocation's wall time is estimated from the
        newest file it left (it could not record its end)."""
        records = self.state["invocations"]
        wall = sum(r.get("wall_seconds", 0.0) for r in records)
        timed = [r for r in records if r.get("trace_seconds") is not None and r.get("images_traced") is not None]
        trace = sum(r["trace_seconds"] for r in timed)
        return {"invocations": len(records), "invocation_log": records, "wall_seconds": round(wall, 3),
                "trace_seconds": round(trace, 3), "images_traced": sum(r["images_traced"] for r in timed)}

    def release(self) -> None:
        if self.lock_fd is None:  # an object store's lock object
            (self.work / WORK / LOCK).delete()
            return
        path = self.work.local / WORK / LOCK
        try:
            if os.stat(path).st_ino == os.fstat(self.lock_fd).st_ino:  # ours, not a later run's at this path
                path.unlink()
        except OSError:
            pass
        os.close(self.lock_fd)


def _lock(work: Path) -> int | None:
    """An exclusive non-blocking flock on <work>/work/lock; None when another process holds it."""
    (work / WORK).mkdir(parents=True, exist_ok=True)
    fd = os.open(work / WORK / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.stat(work / WORK / LOCK).st_ino == os.fstat(fd).st_ino
    except (BlockingIOError, FileNotFoundError):
        same = None
    if not same:  # held by another process, or unlinked by its holder between our open and flock
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _holder(work: Path) -> str:
    try:
        return f" (pid {(work / WORK / LOCK).read_text().strip()})"
    except OSError:
        return ""


def has_progress(work: Path | Location) -> bool:
    """Whether an interrupted run holds anything worth resuming (finished images, fits or checkpoints)."""
    work = Location.of(work)
    return bool(shard_files(work / WORK / "shards")) or \
        any((work / "fit" / name).names() for name in (work / "fit").names())


def discard(work: Path | Location) -> None:
    """Remove an unfinished run that holds nothing worth resuming."""
    Location.of(work).rmtree()


def shard_indices(shards: Location, name: str) -> np.ndarray:
    import io

    with np.load(io.BytesIO((shards / name).read_bytes()), allow_pickle=False) as shard:
        return shard["index"]


def shard_files(shards: Path | Location) -> list[str]:
    """The shards below `shards`, relative to it: `shard-*.npz`, and `<backbone>/shard-*.npz` in a sweep over
    models (bench.engine)."""
    return [rel for rel in Location.of(shards).files() if fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], "shard-*.npz")
            and rel.count("/") <= 1]


def scored_images(shards: Path | Location) -> int:
    """How many distinct (backbone, image) pairs the shards hold (traced by an invocation: the difference)."""
    shards = Location.of(shards)
    done = set()
    for rel in shard_files(shards):
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        done.update((folder, int(i)) for i in shard_indices(shards, rel))
    return len(done)


def _estimate_end(work: Path, since: float) -> float:
    newest = since
    for path in work.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            pass
    return newest


def claim(work: Path | Location, cfg: SweepConfig, inputs: dict | None = None) -> Claim:
    """Create or resume `work` (<run>.partial locally, the run itself on an object store) for `cfg`,
    exclusively; BenchError naming the fix otherwise. `inputs` (bench.fingerprint) is recorded by a new run and
    must match on a resume."""
    if isinstance(work, Location) and not work.is_local:
        return claim_in_store(work, cfg, inputs)
    work = Location.of(work).local
    config = resume_config(cfg)
    digest = config_hash(config)
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        fresh = True
    except FileExistsError:
        fresh = False
    except OSError as err:
        raise BenchError(f"cannot create {work}: {err.strerror}; choose a writable output_dir=") from None
    started_file = work / WORK / STARTED
    if not fresh:
        if not work.is_dir():
            raise BenchError(f"{work} exists and is not a run folder; remove it or choose another output_dir=")
        deadline = time.time() + STARTED_WAIT_SECONDS
        while not started_file.is_file() and time.time() < deadline and (work / WORK / LOCK).is_file():
            time.sleep(0.05)  # a concurrent start between its mkdir and started.json
    fd = _lock(work)
    if fd is None:
        raise BenchError(f"the run in {work} is in use by another process{_holder(work)}; wait for it to finish "
                         f"or choose another output_dir=")
    try:
        if fresh or not started_file.is_file():
            if not fresh:
                if has_progress(work) or any(c.name != WORK for c in work.iterdir()):
                    raise BenchError(f"{work} holds files but no record of the configuration they came from; "
                                     f"remove it or choose another output_dir=")
                log.warning("%s was left by a start that stopped before it began; starting it afresh", work)
            state = {"hash": digest, "config": config, "inputs": inputs, "invocations": []}
            resumed = False
        else:
            try:
                state = json.loads(started_file.read_text())
            except (OSError, ValueError):
                raise BenchError(f"{started_file} is unreadable; remove {work} or choose another output_dir=") from None
            refuse_changed_start(state, config, digest, inputs, work)
            resumed = True
            state.setdefault("invocations", [])
            last = state["invocations"][-1] if state["invocations"] else None
            if last is not None and "wall_seconds" not in last:  # killed: no end recorded
                last["wall_seconds"] = round(_estimate_end(work, last["started"]) - last["started"], 3)
                last["estimated"] = True
        result = Claim(Location.of(work), resumed, state, fd)
        state["invocations"].append({"started": result.started, "pid": os.getpid()})
        result.save()
        return result
    except BaseException:
        os.close(fd)
        raise


def refuse_changed_start(state, config: dict, digest: str, inputs: dict | None, where) -> None:
    """A resume whose recorded start (started.json) had another configuration or other inputs: one line naming
    what differs (local and object-store runs alike)."""
    before = state.get("config") if isinstance(state, dict) else None
    if not isinstance(before, dict) or state.get("hash") != digest:
        keys = differing_keys(before, config) if isinstance(before, dict) else ["(no recorded config)"]
        raise BenchError(f"the interrupted run in {where} was started with another configuration (differs "
                         f"in: {', '.join(keys) or 'its hash'}); resume it with the same sweep and "
                         f"overrides, or choose another output_dir=")
    refuse_changed_resume(state.get("inputs"), inputs, where)


def claim_in_store(run: Location, cfg: SweepConfig, inputs: dict | None = None) -> Claim:
    """`claim` on an object store: the lock object created exclusively (bench.storage.create_exclusive), then
    started.json compared (resume) or written (fresh)."""
    if (run / COMPLETE).is_file():
        raise BenchError(f"run directory {run} already exists; choose another output_dir=")
    config = resume_config(cfg)
    digest = config_hash(config)
    lock = run / WORK / LOCK
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    if not lock.create_exclusive(json.dumps(holder).encode()):
        try:
            other = lock.read_json()
        except (OSError, ValueError):
            other = {}
        if not _stale(other):
            raise BenchError(f"the run in {run} is in use by another process (host {other.get('host', '?')}, pid "
                             f"{other.get('pid', '?')}); wait for it to finish, or if no process works on it "
                             f"delete {lock} and run again, or choose another output_dir=")
        log.warning("taking over %s from process %s, which is no longer running", lock, other.get("pid"))
        lock.delete()
        if not lock.create_exclusive(json.dumps(holder).encode()):
            raise BenchError(f"the run in {run} is in use by another process; choose another output_dir=")
    try:
        started = run / WORK / STARTED
        if started.is_file():
            try:
                state = started.read_json()
            except (OSError, ValueError):
                raise BenchError(f"{started} is unreadable; delete {run} or choose another output_dir=") from None
            refuse_changed_start(state, config, digest, inputs, run)
            resumed = True
            last = state["invocations"][-1] if state.get("invocations") else None
            if last is not None and "wall_seconds" not in last:  # killed: no end recorded
                end = started.mtime() or last["started"]
                last["wall_seconds"] = round(max(end - last["started"], 0.0), 3)
                last["estimated"] = True
        else:
            if has_progress(run) or any(name != WORK for name in run.names()):
                raise BenchError(f"{run} holds files but no record of the configuration they came from; delete "
                                 f"it or choose another output_dir=")
            state, resumed = {"hash": digest, "config": config, "inputs": inputs, "invocations": []}, False
        result = Claim(run, resumed, state, None)
        state.setdefault("invocations", []).append({"started": result.started, "pid": os.getpid()})
        result.save()
        return result
    except BaseException:
        lock.delete()
        raise


def _stale(holder: dict) -> bool:
    """A lock object left by a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
