"""A two-node Ray cluster whose nodes share no filesystem, simulated on this machine: a head node with no CPUs
(`ray start --head --num-cpus=0`, its own temp dir and ports) and a worker node started inside a private mount
namespace (`unshare -m`) with a tmpfs over the driver's folder, so the worker sees an empty folder where the
driver keeps its run directories, a model copy and a dataset. The driver is `python -m bench.run ...
ray.address=<head>`, as a user runs it. Object storage: S3 on localhost (moto), reached by both nodes.

    a trace sweep with a driver-local run directory equals the single-node run, figures included
    a fit sweep with output_dir=s3://... equals the single-node run, every artefact in the bucket
    a fit sweep with a driver-local run directory is refused in one line (exit 2), nothing written
    a dataset root or model folder only the driver has is refused in one line naming the node
    a trace sweep whose model and dataset are on S3 (each node copies them into its own cache) equals the
    single-node run from the local folders

Skipped with the reason where the machine does not allow a mount namespace (unshare needs root)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from test_bad_inputs import write_voc
from test_storage import BUCKET, s3_server  # noqa: F401 (the S3 endpoint fixture)

from bench.node_cache import CACHE_ENV
from bench.storage import COMPLETE, Location, local_copy

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=20", "report.qualitative=1"]
PROBE = ["params.train_images=4", "params.epochs=20", "train.num_workers=1"]
NODE_LINE = re.compile(r"^error: node \S+ \([0-9a-f]{8}\) cannot reach ")  # the node by address and id
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two Ray nodes and several runs: minutes


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _namespace_refusal() -> str | None:
    """Why this machine cannot give a node a private filesystem (None where it can)."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {folder}"], capture_output=True,
                              text=True)
    if done.returncode != 0:
        return f"a private mount namespace is not permitted here ({done.stderr.strip() or done.returncode})"
    return None


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"})
    env.update(extra or {})
    return env


class Cluster:
    def __init__(self, base: Path, hidden: Path, address: str, head: subprocess.Popen):
        self.base, self.hidden, self.address, self.head = base, hidden, address, head
        self.worker: subprocess.Popen | None = None

    def run(self, *args: str, cluster: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args, cluster=cluster), env=_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def command(self, *args: str, cluster: bool = True) -> list[str]:
        return [sys.executable, "-m", "bench.run", *args, *([f"ray.address={self.address}"] if cluster else [])]

    def start_worker(self) -> None:
        """A worker node with two CPUs in a private mount namespace: a tmpfs over the driver's folder."""
        ports = _free_ports(3)
        start = " ".join([RAY, "start", "--block", f"--address={self.address}", "--num-cpus=2",
                          f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
                          f"--metrics-export-port={ports[2]}", "--disable-usage-stats"])
        self.worker = subprocess.Popen(["unshare", "-m", "sh", "-c",
                                        f"mount -t tmpfs tmpfs {self.hidden} && exec {start}"],
                                       env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        _wait_for_nodes(self.address, 2)

    def kill_worker(self) -> None:
        """The worker node lost as a machine is: every process of it SIGKILLed at once (its own session)."""
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=60)
        _wait_for_nodes(self.address, 1)

    def stop(self) -> None:
        processes = [p for p in (self.worker, self.head) if p is not None]
        for process in processes:  # `ray start --block` stops its node's processes when terminated
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(s3_server):  # noqa: F811 (the S3 endpoint fixture, imported above, is requested by name)
    why = _namespace_refusal()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir="/tmp"))
    hidden = base / "driver"  # what only the driver's machine has
    hidden.mkdir()
    # every process's node cache (bench.node_cache) in the driver's private folder: the worker node sees its own
    # empty tmpfs there, so it copies a stored model or dataset itself
    caches = pytest.MonkeyPatch()
    caches.setenv(CACHE_ENV, str(hidden / "node-cache"))
    gcs, client, *agents = _free_ports(5)
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=0", f"--port={gcs}",
                             f"--temp-dir={base / 'ray'}", "--include-dashboard=false",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agents[0]}",
                             f"--dashboard-agent-grpc-port={agents[1]}", f"--metrics-export-port={agents[2]}",
                             "--disable-usage-stats"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = Cluster(base, hidden, f"127.0.0.1:{gcs}", head)
    try:
        nodes.start_worker()
        yield nodes
    finally:
        nodes.stop()
        caches.undo()
        shutil.rmtree(base, ignore_errors=True)



def _wait_for_nodes(address: str, count: int, timeout: float = 240) -> None:
    script = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
              f"print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the simulated cluster did not reach {count} nodes")


def _assert_same_run(single: Path, other: Path) -> None:
    """Results equal exactly; the same files (figures included), the qualitative maps equal array for array."""
    a = pd.read_parquet(single / "results.parquet").sort_values(["trial", "seed"]).reset_index(drop=True)
    b = pd.read_parquet(other / "results.parquet").sort_values(["trial", "seed"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    files = sorted(str(p.relative_to(single)) for p in single.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file() and p.name != COMPLETE)
    qualitative = sorted(f for f in files if f.startswith("qualitative/"))
    assert qualitative, "no qualitative maps"
    for name in qualitative:
        with np.load(single / name) as x, np.load(other / name) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
    for run in (single, other):
        assert "Qualitative results" in (run / "report.md").read_text()


def test_a_trace_sweep_with_a_driver_local_run_directory_equals_the_single_node_run(cluster, tiny_model):
    args = [str(ROOT / "sweeps/iseg_lambda.yaml"), *SMALL, f"model.path={tiny_model}", "ray.execution=actors",
            "ray.num_actors=1"]
    single = cluster.base / "single-trace"
    done = cluster.run(*args, f"output_dir={single}", cluster=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = cluster.hidden / "runs" / "trace"
    done = cluster.run(*args, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "run.json").read_text())["num_actors"] == 1
    _assert_same_run(single, out)


def test_a_trace_sweep_reading_its_model_and_dataset_from_s3_equals_the_single_node_run(cluster, tiny_model):
    """model.path and data.root on S3: the worker node, which sees neither the driver's folders nor its cache,
    copies both into its own cache; the results equal a single-node run from the local folders."""
    root = write_voc(cluster.base / "voc-data")
    stored = f"s3://{BUCKET}/inputs-{os.getpid()}"
    model, data = f"{stored}/{tiny_model.name}", f"{stored}/voc"
    Location.of(model).upload(tiny_model)
    Location.of(data).upload(root)
    voc = cluster.base / "voc-stored.yaml"
    voc.write_text("method: iseg\ndata: {name: voc2012}\nparams: {background_words: ''}\n")
    sweep = [str(voc), "data.limit=2", "report.bootstrap=20", "report.qualitative=1", "ray.execution=actors",
             "ray.num_actors=1"]
    single = cluster.base / "single-local-inputs"
    done = cluster.run(*sweep, f"model.path={tiny_model}", f"data.root={root}", f"output_dir={single}",
                       cluster=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = cluster.hidden / "runs" / "stored-inputs"
    done = cluster.run(*sweep, f"model.path={model}", f"data.root={data}", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["num_actors"] == 1
    _assert_same_run(single, out)
    assert len(list((cluster.hidden / "node-cache" / "models").glob("*.json"))) == 1  # the driver's one copy


FIT = [str(ROOT / "sweeps/linear_probe.yaml"), *SMALL, *PROBE, "ray.execution=actors", "ray.num_actors=1"]


@pytest.fixture(scope="module")
def single_fit(cluster, tiny_model) -> Path:
    """The fit sweep run once on a single node (a local Ray of the driver's own), the reference."""
    out = cluster.base / "single-fit"
    done = cluster.run(*FIT, f"model.path={tiny_model}", f"output_dir={out}", cluster=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _assert_same_fit_run(single: Path, uri: str) -> None:
    """Every artefact in the bucket, none of the work folder; the run equal to the single-node one, the fit's
    weights bit for bit."""
    stored = Location.of(uri).files()
    assert COMPLETE in stored and any(f.startswith("fit/") and f.endswith("weights.safetensors") for f in stored)
    assert not any(f.startswith("work/") for f in stored)
    with local_copy(uri) as copy:
        _assert_same_run(single, copy)
        (fit,) = (single / "fit").iterdir()
        ours, theirs = fit / "weights.safetensors", copy / "fit" / fit.name / "weights.safetensors"
        with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # bit for bit


def test_a_fit_sweep_on_s3_equals_the_single_node_run_every_artefact_in_the_bucket(cluster, tiny_model, single_fit):
    uri = f"s3://{BUCKET}/cluster-fit-{os.getpid()}"
    done = cluster.run(*FIT, f"model.path={tiny_model}", f"output_dir={uri}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == uri
    _assert_same_fit_run(single_fit, uri)


def test_a_fit_sweep_with_a_driver_local_run_directory_is_refused_before_ray_train(cluster, tiny_model):
    out = cluster.hidden / "runs" / "fit-local"
    done = cluster.run(str(ROOT / "sweeps/linear_probe.yaml"), *SMALL, f"model.path={tiny_model}", *PROBE,
                       f"output_dir={out}")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and NODE_LINE.match(lines[0]), lines
    assert f"the fit storage {out}" in lines[0] and "output_dir=s3://" in lines[0]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()  # nothing written


def test_a_model_or_dataset_only_the_driver_has_is_one_line_naming_the_node(cluster, tiny_model):
    model = cluster.hidden / "model"
    if not model.exists():
        shutil.copytree(tiny_model, model)
    root = write_voc(Path(tempfile.mkdtemp(dir=cluster.hidden)))
    sweep = cluster.hidden / "voc.yaml"
    sweep.write_text(f"method: iseg\ndata: {{name: voc2012, root: {root}}}\nparams: {{background_words: ''}}\n")
    out = cluster.base / "refused"
    for args, what in (([str(ROOT / "sweeps/iseg_lambda.yaml"), *SMALL, f"model.path={model}"], f"model.path={model}"),
                       ([str(sweep), f"model.path={tiny_model}"], f"data.root={root}")):
        done = cluster.run(*args, "ray.execution=actors", f"output_dir={out}")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert NODE_LINE.match(lines[0]) and what in lines[0] and "shares" in lines[0], lines
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


_PLANT = """
import shutil, sys
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, source, target, name = sys.argv[1:]
ray.init(address=address, logging_level="ERROR")
(node,) = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


@ray.remote(num_cpus=0)
def plant():
    shutil.copytree(source, target)
    weights = Path(target) / name
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


ray.get(plant.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote())
"""


def test_a_node_with_another_copy_of_the_model_is_refused_naming_the_node_and_the_file(cluster, tiny_model):
    """The same folder names at the same path on both nodes, one weight file differing by a byte on the worker
    node (planted there by a task, in its private folder): refused in preflight, one line naming the node, the
    path and the file, nothing written."""
    model = cluster.hidden / "model-copy"
    shutil.copytree(tiny_model, model)
    weights = "unet/diffusion_pytorch_model.safetensors"
    planted = subprocess.run([sys.executable, "-c", _PLANT, cluster.address, str(tiny_model), str(model), weights],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert planted.returncode == 0, planted.stderr[-3000:]
    out = cluster.base / "other-weights"
    done = cluster.run(str(ROOT / "sweeps/iseg_lambda.yaml"), *SMALL, f"model.path={model}", "ray.execution=actors",
                       f"output_dir={out}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert re.match(rf"^error: node \S+ \([0-9a-f]{{8}}\) sees other files at model.path={model} ", lines[0]), lines
    assert f"the model: changed {weights}" in lines[0], lines
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def _wait_for_checkpoint(uri: str, driver: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        if any("checkpoint_" in f for f in Location.of(uri).files()):
            return
        time.sleep(1)
    raise AssertionError(f"no checkpoint in {uri} (driver exit {driver.poll()})")


def test_a_node_killed_during_a_fit_on_s3_resumes_and_ends_identical(cluster, tiny_model, single_fit, tmp_path):
    """The fit stands still after its first checkpoint (stored in the bucket) while its node is SIGKILLed, every
    process at once; a new node joins and Ray Train (train.max_failures=1) restarts the fit there from that
    checkpoint. The run ends identical to the single-node run, the fit resumed at step 10, not refitted."""
    from bench.stages.fit import FAULT_ENV

    uri = f"s3://{BUCKET}/cluster-node-killed-{os.getpid()}"
    command = cluster.command(*FIT, f"model.path={tiny_model}", "train.max_failures=1", f"output_dir={uri}")
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        driver = subprocess.Popen(command, env=_env({FAULT_ENV: "fit:1:1:stall"}), cwd=ROOT, stdout=stdout,
                                  stderr=stderr)
        try:
            _wait_for_checkpoint(uri, driver)
            cluster.kill_worker()
            cluster.start_worker()
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
    err = (tmp_path / "stderr").read_text()
    assert driver.returncode == 0, err[-3000:]
    assert (tmp_path / "stdout").read_text().strip().splitlines()[-1] == uri
    _assert_same_fit_run(single_fit, uri)
    (config,) = [f for f in Location.of(uri).files() if f.startswith("fit/") and f.endswith("/train_config.json")]
    assert (Location.of(uri) / config).read_json()["resumed_from"] == 10
