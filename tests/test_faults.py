"""Fault injection: the resume contract (a changed config refused by key, exclusive run directories, stale
`.partial`s, timings over invocations), a worker killed mid-run healing by itself, a worker's error carried back
as one line, and (slow) SIGINT and SIGKILL of the driver followed by the printed resume command, and a
two-node cluster losing a node mid-run."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from racing import race, winners

import bench.run
from bench.config import compose
from bench.errors import BenchError, RunFailed
from bench.faults import TRACE_FAULT_ENV
from bench.results import config_hash
from bench.run import main
from bench.rundir import LOCK, STARTED, WORK, claim, unique_default_dir

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "iseg_lambda.yaml"
SMALL = ["data.limit=3", "data.size=32", "report.bootstrap=20", "report.qualitative=1"]
LOCAL = "ray.num_actors=0"


class Payload:
    """Unpickling it creates a file: the proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def results(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results.parquet").drop(columns=["fit"]).sort_values(["trial", "seed"])


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, tiny_model) -> Path:
    """The reference: the small lambda sweep run once without any fault."""
    out = tmp_path_factory.mktemp("undisturbed") / "run"
    assert main([str(SWEEP), *SMALL, f"model.path={tiny_model}", LOCAL, f"output_dir={out}"]) == 0
    return out


# -- the resume contract ---------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_by_the_printed_command_and_refuses_a_changed_config(
        tmp_path, tiny_model, undisturbed, capsys, caplog, monkeypatch):
    out = tmp_path / "run"
    args = [SWEEP, *SMALL, f"model.path={tiny_model}", LOCAL, f"output_dir={out}"]
    real_write_run = bench.run.write_run

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C after every image is traced

    monkeypatch.setattr(bench.run, "write_run", interrupted)
    caplog.set_level("INFO")
    code, _, _ = cli(capsys, *args)
    assert code == 130
    monkeypatch.setattr(bench.run, "write_run", real_write_run)
    partial = tmp_path / "run.partial"
    started = json.loads((partial / WORK / STARTED).read_text())
    assert "output_dir" not in started["config"] and started["config"]["sweep"]["lambda"]["grid"][0] == 0
    assert len(started["invocations"]) == 1 and started["invocations"][0]["wall_seconds"] > 0
    hint = next(r.getMessage() for r in caplog.records if "resume with:" in r.getMessage())
    command = shlex.split(hint.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "bench.run"] and command[-1] == f"output_dir={out}"

    # a changed configuration: one line naming what differs; the interrupted run is left as it was
    for change, key in (("sweep.lambda.grid=[0.1,0]", "sweep.lambda"), ("report.bootstrap=21", "report.bootstrap"),
                        ("data.limit=2", "data.limit")):
        code, _, stderr = cli(capsys, *args, change)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "started with another configuration" in lines[0], stderr
        assert f"differs in: {key}" in lines[0], lines[0]
    assert json.loads((partial / WORK / STARTED).read_text()) == started

    # a tampered .partial cannot execute code: a pickle planted where Ray Tune kept its state is never read, and
    # a shard holding pickled objects is refused (one line), not loaded
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(str(marker)))
    (partial / "tune").mkdir()
    (partial / "tune" / "tuner.pkl").write_bytes(payload)
    evil = partial / WORK / "shards" / "shard-99999.npz"
    np.savez(evil, index=np.array([Payload(str(marker))], dtype=object))
    code, _, stderr = cli(capsys, *command[3:])
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "allow_pickle=False" in lines[0], stderr[-2000:]
    assert f"resume with: python -m bench.run {SWEEP}" in lines[0]
    assert not marker.exists()
    evil.unlink()
    # planted between invocations: a foreign folder and file, a writer's stale temporary file; none of them
    # reaches the finished run (bench.hygiene)
    (partial / "notes.txt").write_text("not the run's")
    (partial / "qualitative" / ".x.g000.npz.123.tmp").write_bytes(b"half a file")

    # where and how parallel it runs may change: the printed command with ray.batch_size spelled differently
    code, stdout, stderr = cli(capsys, *command[3:], "ray.batch_size=2")
    assert code == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out) and not partial.exists()
    pd.testing.assert_frame_equal(results(out), results(undisturbed))
    run = json.loads((out / "run.json").read_text())
    assert run["invocations"] == 3 and len(run["invocation_log"]) == 3  # interrupted, refused shard, finished
    assert run["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in run["invocation_log"]), abs=1e-2)
    assert run["images_per_second"] > 0 and run["trace_seconds"] > 0
    assert run["config_hash"] == config_hash(yaml.safe_load((out / "config.yaml").read_text()))
    assert not (out / WORK).exists()
    assert not (out / "tune").exists() and not (out / "notes.txt").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_config_hash_is_the_same_for_identical_configs(tmp_path):
    a = compose(SWEEP, ["output_dir=a", "data.limit=3"]).as_dict()
    b = compose(SWEEP, ["data.limit=3", "output_dir=b/c"]).as_dict()
    assert a["overrides"] != b["overrides"] and config_hash(a) == config_hash(b)
    assert config_hash(compose(SWEEP, ["data.limit=4"]).as_dict()) != config_hash(a)


def test_concurrent_starts_claim_the_run_directory_once(tmp_path):
    cfg = compose(SWEEP, [])
    work = tmp_path / "run.partial"
    outcomes = race(lambda: claim(work, cfg), 6)
    held = winners(outcomes)
    assert len(held) == 1, outcomes
    assert all("in use by another process" in str(o) for o in outcomes if isinstance(o, BenchError))
    with pytest.raises(BenchError, match="in use by another process"):
        claim(work, cfg)  # a resume while the run is working
    held[0].release()
    again = claim(work, cfg)  # the lock is free again: a resume
    assert again.resumed and len(again.state["invocations"]) == 2
    again.release()


def test_default_run_directories_are_unique_within_a_second(tmp_path):
    names = {unique_default_dir(tmp_path, "x") for _ in range(50)}
    assert len(names) == 50 and all(n.parent == tmp_path and n.name.startswith("x-") for n in names)


def test_stale_partial_is_reset_but_one_with_files_is_refused(tmp_path, caplog):
    cfg = compose(SWEEP, [])
    empty = tmp_path / "a.partial"
    (empty / WORK).mkdir(parents=True)
    (empty / WORK / LOCK).write_text("12345")  # a start killed between mkdir and started.json
    held = claim(empty, cfg)
    assert not held.resumed and (empty / WORK / STARTED).is_file()
    held.release()
    other = tmp_path / "b.partial"
    (other / "qualitative").mkdir(parents=True)
    with pytest.raises(BenchError, match="no record of the configuration"):
        claim(other, cfg)


def test_killed_invocation_is_timed_from_the_files_it_left(tmp_path):
    cfg = compose(SWEEP, [])
    work = tmp_path / "run.partial"
    held = claim(work, cfg)
    held.state["invocations"][-1]["started"] -= 30  # it began 30 s ago ...
    held.save()
    os.close(held.lock_fd)  # ... and was SIGKILLed: no end recorded, the lock freed by the kernel
    again = claim(work, cfg)
    first = again.state["invocations"][0]
    assert first["estimated"] and first["wall_seconds"] >= 30
    again.release()


# -- a full disk ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs (root only): room for the run's record and a shard or two, not for the run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_keeps_the_finished_work_and_resumes_to_the_undisturbed_result(
        small_disk, tiny_model, undisturbed, capsys):
    out = small_disk / "run"
    args = [SWEEP, *SMALL, f"model.path={tiny_model}", LOCAL, f"output_dir={out}"]
    code, _, stderr = cli(capsys, *args)
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "the disk is full" in lines[0] and "free space there" in lines[0], lines[0]
    partial = small_disk / "run.partial"
    if partial.exists():  # finished images are kept, with the command that resumes
        assert "resume with:" in lines[0] and list((partial / WORK / "shards").glob("shard-*.npz"))
        assert not list(partial.rglob(f".{STARTED}.tmp"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    code, _, stderr = cli(capsys, *args)
    assert code == 0, stderr[-3000:]
    pd.testing.assert_frame_equal(results(out), results(undisturbed))
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# -- self-healing and errors inside workers ---------------------------------------------------------------------------
@pytest.mark.slow  # an actor pool started twice: ~1 min on 2 shared cores
def test_a_killed_trace_worker_is_restarted_and_the_results_are_identical(
        tmp_path, tiny_model, undisturbed, capsys, monkeypatch, ray_session):
    monkeypatch.setenv(TRACE_FAULT_ENV, "1")  # the actor that gets image 1 exits (os._exit) once
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, SWEEP, *SMALL, f"model.path={tiny_model}", "ray.num_actors=1",
                          f"output_dir={out}")
    assert code == 0, stderr[-3000:]
    pd.testing.assert_frame_equal(results(out), results(undisturbed))
    assert json.loads((out / "run.json").read_text())["invocations"] == 1


@pytest.mark.slow  # an actor pool started twice: ~1 min on 2 shared cores
def test_without_retries_a_killed_worker_fails_in_one_line_with_the_resume_command(
        tmp_path, tiny_model, capsys, monkeypatch, ray_session):
    monkeypatch.setenv(TRACE_FAULT_ENV, "1")
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, SWEEP, *SMALL, f"model.path={tiny_model}", "ray.num_actors=1", "ray.batch_size=1",
                          "ray.max_retries=0", f"output_dir={out}")
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    if (tmp_path / "run.partial").exists():  # image 0 finished first: kept, with the exact command
        assert f"resume with: python -m bench.run {SWEEP}" in lines[0] and f"output_dir={out}" in lines[0]


def test_errors_raised_in_ray_data_workers_come_back_as_their_own_line(tmp_path, ray_session):
    import ray

    def bench_error(batch):
        raise BenchError("image 3 of data.name=x is broken; fix it")

    def runtime_error(batch):
        raise RuntimeError("boom in the worker")

    work = tmp_path / "run.partial"
    for udf, kind, text in ((bench_error, BenchError, "image 3 of data.name=x is broken; fix it"),
                            (runtime_error, RunFailed, "RuntimeError: boom in the worker")):
        (work / WORK / "shards").mkdir(parents=True)
        with pytest.raises(Exception) as info:
            ray.data.range(2).map_batches(udf).materialize()
        line = bench.run._one_line(info.value, work, "python -m bench.run s.yaml output_dir=run")
        assert type(line) is kind and str(line) == text  # no progress: nothing to resume, the folder removed
        assert not work.exists()


def test_worker_errors_come_back_typed_on_the_installed_ray(tmp_path, ray_session):
    """Pins the mechanism on the installed Ray: the exception a trace worker (on the stage's Ray Data actor,
    bench.stages.trace.PoolWorker; raised in a batch or while the worker is built) or a Ray task raised comes
    back as a RayTaskError whose `.cause` is that exception (Ray Data's map workers: because init_ray sets
    DataContext.raise_original_map_exception), raised as `as_instanceof_cause()` (an instance of its class
    too); the one-line error is read from that object, its type and its own message, with no text parsing."""
    import ray
    from ray.data import DataContext

    from bench.stages.trace import PoolWorker

    assert DataContext.get_current().raise_original_map_exception  # set by init_ray (the fixture's Ray)

    class Raising:  # a trace worker that fails where it is told to (defined here: pickled by value)
        def __init__(self, error: Exception, building: bool):
            self.error = error
            if building:
                raise error

        def __call__(self, batch):
            raise self.error

    @ray.remote(max_retries=0)
    def failing(error):
        raise error

    def pool(error, building):
        return lambda: ray.data.range(1).map_batches(
            PoolWorker, fn_constructor_args=(Raising, {"error": error, "building": building}),
            concurrency=1).materialize()

    bench_error, value_error = BenchError("image 3 of data.name=x is broken; fix it"), ValueError("bad value")
    cases = (("a batch", bench_error, pool(bench_error, False)), ("the worker built", value_error,
                                                                   pool(value_error, True)),
             ("a task", bench_error, lambda: ray.get(failing.remote(bench_error))),
             ("a task", value_error, lambda: ray.get(failing.remote(value_error))))
    for where, error, run in cases:
        raised, cause, one = failure(run, tmp_path / "a.partial")
        gc.collect()  # the failed dataset's executor, in reference cycles, holds its actor and that actor's CPU
        assert issubclass(raised, type(error)), where  # as_instanceof_cause: the worker's class
        assert type(cause) is type(error) and bench.run.first_line(cause) == str(error), where
        if isinstance(error, BenchError):  # the whole message, without the retry note Ray Data appended
            assert str(cause) == str(error), where
        kind, line = (BenchError, str(error)) if isinstance(error, BenchError) else (RunFailed, "ValueError: bad value")
        assert type(one) is kind and str(one) == line, where


def failure(run, work: Path) -> tuple[type, BaseException, BenchError]:
    """(the class of what `run` raised, its root_cause (asserted to be RayTaskError.cause), the one-line
    error). The exception is not kept: it holds the failed dataset's executor, and so its actor."""
    from ray.exceptions import RayTaskError

    try:
        run()
    except RayTaskError as err:
        cause = bench.run.root_cause(err)
        assert cause is err.cause
        return type(err), cause, bench.run._one_line(err, work, "resume")
    pytest.fail("no RayTaskError")


# -- the driver killed (slow: a fresh interpreter each) ----------------------------------------------------------------
def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _wait_for_shard(partial: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any((partial / WORK / "shards").glob("shard-*.npz")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_driver_killed_mid_run_resumes_to_the_undisturbed_result(how, tmp_path, tiny_model, undisturbed):
    """SIGTERM (schedulers, Kubernetes, `timeout`) is Ctrl-C: exit 130, one line with the resume command, the
    lock removed; SIGKILL leaves the lock file (its flock freed by the kernel) and the same command resumes."""
    out = tmp_path / "run"
    args = [str(SWEEP), *SMALL, f"model.path={tiny_model}", LOCAL, "ray.batch_size=1", f"output_dir={out}"]
    proc = _start(args, tmp_path)
    _wait_for_shard(tmp_path / "run.partial", proc)
    proc.send_signal(getattr(signal, how))
    _, stderr = proc.communicate(timeout=120)
    if how != "SIGKILL":
        assert proc.returncode == 130, stderr[-3000:]
        hints = [line for line in stderr.splitlines() if "resume with: " in line]
        assert len(hints) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert not (tmp_path / "run.partial" / WORK / LOCK).exists()
        command = shlex.split(hints[0].split("resume with: ", 1)[1])
    else:
        assert proc.returncode == -signal.SIGKILL
        command = ["python", "-m", "bench.run", *args]
    resumed = _start(command[3:], tmp_path)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    pd.testing.assert_frame_equal(results(out), results(undisturbed))
    assert json.loads((out / "run.json").read_text())["invocations"] == 2


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_node_lost_mid_run_heals_on_a_two_node_cluster(tmp_path, tiny_model, undisturbed, capsys):
    """Head (no CPUs: it only drives) + two one-CPU worker nodes; the node running the tracing actor is removed
    after its first batch; the actor restarts on the other node and the results equal the undisturbed run."""
    import ray
    from ray._private.state import available_resources_per_node
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test needs its own cluster, not the shared local session
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    out = tmp_path / "run"
    removed = []

    def remove_the_tracing_node():
        partial = tmp_path / "run.partial"
        deadline = time.time() + 300
        while not any((partial / WORK / "shards").glob("shard-*.npz")) and time.time() < deadline:
            time.sleep(0.1)
        # the tracing actor holds its node's one CPU: that node has none available
        for _ in range(100):
            busy = [n for n in nodes if available_resources_per_node().get(n.node_id, {}).get("CPU", 0) < 1]
            if len(busy) == 1:
                cluster.remove_node(busy[0])
                removed.append(busy[0])
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=remove_the_tracing_node)
    try:
        watcher.start()
        code, _, stderr = cli(capsys, SWEEP, *SMALL, "data.limit=6", f"model.path={tiny_model}", "ray.num_actors=1",
                              f"ray.address={cluster.address}", f"output_dir={out}")
        watcher.join()
        assert code == 0, stderr[-3000:]
        assert removed, "the tracing node was not removed mid-run"
        reference = results(undisturbed)
        got = results(out)
        assert len(got) == len(reference)
    finally:
        ray.shutdown()
        cluster.shutdown()
    # the same sweep on 6 images, undisturbed, in this process
    clean = tmp_path / "clean"
    assert main([str(SWEEP), *SMALL, "data.limit=6", f"model.path={tiny_model}", LOCAL, f"output_dir={clean}"]) == 0
    pd.testing.assert_frame_equal(got, results(clean))
