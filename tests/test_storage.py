"""The storage layer (bench.storage) and the run contract on every kind of storage: a local folder and an S3
bucket served on localhost by moto (server mode, as Ray's own tests use it). Claim exclusively, stage, write the
completion marker last, resume from what is stored, refuse a changed configuration; whole runs on S3 equal the
same runs on a local disk, every artefact in the bucket (slow set)."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from racing import race, winners

from bench.config import compose
from bench.errors import BenchError
from bench.rundir import LOCK, STARTED, WORK, claim, has_progress, run_target
from bench.storage import COMPLETE, STORAGE_ENV, Location, local_copy

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps/iseg_lambda.yaml"
BUCKET = "bench-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint on localhost (moto's ThreadedMotoServer), its address in AWS_ENDPOINT_URL for pyarrow,
    boto3 and every process started from here; one bucket."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    """An empty folder on each kind of storage."""
    if request.param == "local":
        return Location.of(tmp_path / "store")
    request.getfixturevalue("s3_server")
    return Location.of(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}")


def test_location_files_are_whole_listed_and_removed(folder):
    assert not folder.exists() and folder.names() == [] and folder.files() == []
    (folder / "a" / "x.json").write_json({"v": 1})
    (folder / "b.bin").write_bytes(b"\x00\x01")
    assert (folder / "a" / "x.json").read_json() == {"v": 1} and (folder / "b.bin").read_bytes() == b"\x00\x01"
    assert folder.is_dir() and (folder / "b.bin").is_file() and not (folder / "b.bin").is_dir()
    assert folder.names() == ["a", "b.bin"] and folder.names("*.bin") == ["b.bin"]
    assert folder.files() == ["a/x.json", "b.bin"]  # no temporary names left behind
    (folder / "a").rmtree()
    assert folder.files() == ["b.bin"]
    folder.rmtree()
    assert not folder.exists()


def test_exclusive_create_has_exactly_one_winner(folder):
    target = folder / "lock"
    tokens = iter(range(6))
    wins = race(lambda: target.create_exclusive(str(next(tokens)).encode()), 6)
    assert sorted(wins) == [False] * 5 + [True]
    assert target.read_text() in {str(i) for i in range(6)}


def test_a_missing_client_library_for_the_exclusive_claim_is_one_line_naming_the_install(monkeypatch):
    import sys

    from bench.storage import _gcs_create_exclusive, _s3_create_exclusive

    for name in ("boto3", "google.cloud.storage"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(BenchError, match=r"an s3:// output_dir needs boto3 .*\(S3 conditional writes\); pip "
                                         r"install 'diffseg-bench\[cluster\]'"):
        _s3_create_exclusive("bucket/run/work/lock", b"")
    with pytest.raises(BenchError, match=r"a gs:// output_dir needs google-cloud-storage .*\(generation "
                                         r"preconditions\); pip install google-cloud-storage"):
        _gcs_create_exclusive("bucket/run/work/lock", b"")


def _work(folder: Location):
    """Where a run works on this kind of storage: <run>.partial locally, the run itself on an object store."""
    return folder.with_name(folder.name + ".partial").local if folder.is_local else folder


def test_claim_resume_and_refusals_on_every_storage(folder):
    cfg = compose(SWEEP, ["data.limit=3"])
    work = _work(folder)
    outcomes = race(lambda: claim(work, cfg), 4)
    held = winners(outcomes)
    assert len(held) == 1 and all("in use by another process" in str(o) for o in outcomes if o not in held)
    assert not held[0].resumed and (held[0].work / WORK / STARTED).is_file()
    (held[0].work / WORK / "shards" / "shard-00000.npz").write_bytes(_shard([0, 1]))
    assert has_progress(held[0].work)
    held[0].finish_invocation(1.0, 2)
    held[0].release()
    assert not (held[0].work / WORK / LOCK).exists()
    with pytest.raises(BenchError, match=r"another configuration \(differs in: data.limit\)"):
        claim(work, compose(SWEEP, ["data.limit=4"]))
    again = claim(work, cfg)  # the same configuration: a resume from what is stored
    assert again.resumed and len(again.state["invocations"]) == 2
    assert again.state["invocations"][0]["images_traced"] == 2
    again.release()


def _shard(indices) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, index=np.array(indices, dtype=np.int64))
    return buffer.getvalue()


def test_an_object_store_run_with_its_marker_is_finished_and_never_claimed_again(s3_server):
    run = Location.of(f"s3://{BUCKET}/finished-{os.getpid()}")
    (run / "results.csv").write_text("a\n1\n")
    with pytest.raises(BenchError, match="holds files but no record"):
        claim(run, compose(SWEEP, []))  # files without started.json: not a run this command started
    assert not (run / WORK / LOCK).exists()  # the refused claim leaves no lock behind
    (run / COMPLETE).write_json({"files": ["results.csv"]})
    with pytest.raises(BenchError, match="already exists"):
        claim(run, compose(SWEEP, []))
    with local_copy(run.uri) as copy:
        assert (copy / "results.csv").read_text() == "a\n1\n"


def test_an_unfinished_object_store_run_is_not_read_as_finished(s3_server):
    run = Location.of(f"s3://{BUCKET}/unfinished-{os.getpid()}")
    (run / "results.csv").write_text("a\n1\n")  # no completion marker
    with pytest.raises(BenchError, match="unfinished"), local_copy(run.uri):
        pass


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(s3_server):
    cfg = compose(SWEEP, [])
    run = Location.of(f"s3://{BUCKET}/stale-{os.getpid()}")
    held = claim(run, cfg)
    held.state["invocations"][-1]["started"] -= 30
    held.save()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (run / WORK / LOCK).write_json({"host": socket.gethostname(), "pid": dead, "since": 0})  # killed holder
    again = claim(run, cfg)
    assert again.resumed and again.state["invocations"][0]["estimated"]
    again.release()
    (run / WORK / LOCK).write_json({"host": "another-node", "pid": 1, "since": 0})
    with pytest.raises(BenchError, match="in use by another process .host another-node"):
        claim(run, cfg)


def test_where_runs_go(monkeypatch, tmp_path):
    """output_dir= wins; without it the storage root (DIFFSEG_STORAGE, a path or a URI); a relative output_dir
    joins the root; inside a submitted Ray job a relative one without a root is refused with the fix."""
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert run_target(compose(SWEEP, ["output_dir=s3://b/x"])) == "s3://b/x"
    assert run_target(compose(SWEEP, ["output_dir=runs/x"])) == Path("runs/x")
    assert str(run_target(compose(SWEEP, []))).startswith("reports/runs/iseg_lambda-")
    monkeypatch.setenv(STORAGE_ENV, "s3://b/runs")
    assert run_target(compose(SWEEP, ["output_dir=x"])) == "s3://b/runs/x"
    assert run_target(compose(SWEEP, [])).startswith("s3://b/runs/iseg_lambda-")
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path))
    assert run_target(compose(SWEEP, ["output_dir=x"])) == tmp_path / "x"
    monkeypatch.delenv(STORAGE_ENV)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    for overrides in ([], ["output_dir=runs/x"]):
        with pytest.raises(BenchError, match=f"relative inside a Ray job.*{STORAGE_ENV}=s3://"):
            run_target(compose(SWEEP, overrides))
    assert run_target(compose(SWEEP, [f"output_dir={tmp_path}/x"])) == tmp_path / "x"


def test_a_relative_run_directory_inside_a_ray_job_is_one_error_line(monkeypatch, capsys, tmp_path):
    from bench.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main([str(SWEEP), "data.limit=1", "output_dir=runs/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output_dir=runs/x is relative inside a Ray job")
    assert not any(tmp_path.iterdir())  # nothing written


def test_joining_a_cluster_passes_no_object_store_size(monkeypatch):
    """Inside a submitted job (RAY_ADDRESS set) ray.init joins the cluster: object_store_memory, which Ray
    refuses when connecting, is not passed."""
    import ray

    from bench.env import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_ray()
    monkeypatch.delenv("RAY_ADDRESS")
    init_ray()
    assert "object_store_memory" not in calls[0] and "object_store_memory" in calls[1]


def test_an_unreachable_bucket_is_refused_before_anything_is_written(s3_server, capsys):
    from bench.run import main

    assert main([str(SWEEP), "data.limit=1", "output_dir=s3://no-such-bucket/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bucket no-such-bucket does not exist" in err[0]


def test_a_run_on_object_storage_prints_its_uri_last_and_is_not_tracked_into_a_temporary_copy(s3_server, capsys):
    """The run's address stays a URI (a Path would fold s3:// into s3:/); tracking=mlflow without tracking.uri
    has no store beside an object-store run: one error line (exit 1), the finished run named."""
    from bench.cli import run_sweep

    uri = f"s3://{BUCKET}/tracked-{os.getpid()}"
    (Location.of(uri) / "config.yaml").write_text("tracking: {name: mlflow}\n")
    assert run_sweep(str(SWEEP), [], lambda sweep, overrides: uri) == 1
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == uri
    (line,) = err.strip().splitlines()
    assert line.startswith("error: tracking=mlflow of a run on object storage needs tracking.uri=") and uri in line


# -- whole runs on S3 (slow set) ----------------------------------------------------------------------------------------
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=20", "report.qualitative=1"]


def _bucket_files(uri: str) -> list[str]:
    return Location.of(uri).files()


def _same_results(local: Path, remote: str) -> None:
    with local_copy(remote) as copy:
        a, b = pd.read_parquet(local / "results.parquet"), pd.read_parquet(copy / "results.parquet")
        pd.testing.assert_frame_equal(a, b)
        for name in sorted(p.name for p in (local / "qualitative").glob("*.npz")):
            with np.load(local / "qualitative" / name) as x, np.load(copy / "qualitative" / name) as y:
                assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trace_sweep_on_s3_equals_the_local_run(s3_server, tmp_path, tiny_model, capsys):
    from bench.report import main as report_main
    from bench.run import main

    local = tmp_path / "local"
    common = [str(SWEEP), *SMALL, f"model.path={tiny_model}", "ray.execution=driver"]
    assert main([*common, f"output_dir={local}"]) == 0
    uri = f"s3://{BUCKET}/trace-{os.getpid()}"
    assert main([*common, f"output_dir={uri}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == uri  # the run's address is the last line
    files = _bucket_files(uri)
    expected = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == sorted([*expected, COMPLETE])  # every artefact, nothing of the work folder
    marker = Location.of(uri) / COMPLETE
    assert marker.read_json()["files"] == expected
    _same_results(local, uri)
    assert "Qualitative results" in (Location.of(uri) / "report.md").read_text()
    assert report_main([uri]) == 0  # bench.report reads (and writes back) a URI
    assert capsys.readouterr().out.strip().splitlines()[-1] == uri


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_fit_sweep_on_s3_equals_the_local_run_every_artefact_in_the_bucket(s3_server, tmp_path, tiny_model,
                                                                             ray_session):
    from bench.run import main

    probe = ["params.train_images=4", "params.epochs=20", "train.num_workers=2"]
    common = [str(ROOT / "sweeps/linear_probe.yaml"), *SMALL, f"model.path={tiny_model}", *probe]
    local = tmp_path / "local"
    assert main([*common, f"output_dir={local}"]) == 0
    uri = f"s3://{BUCKET}/fit-{os.getpid()}"
    assert main([*common, f"output_dir={uri}"]) == 0
    expected = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert _bucket_files(uri) == sorted([*expected, COMPLETE])
    assert any(f.startswith("fit/") and f.endswith("/weights.safetensors") for f in expected)
    _same_results(local, uri)
    with local_copy(uri) as copy:
        (fit,) = (local / "fit").iterdir()
        from safetensors.torch import load_file

        a, b = load_file(fit / "weights.safetensors"), load_file(copy / "fit" / fit.name / "weights.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        assert json.loads((copy / "fit" / fit.name / "train_config.json").read_text())["world_size"] == 2


def test_the_driver_writes_each_image_once_and_the_qualitative_records_it_receives(folder):
    """bench.stages.trace.absorb: a batch repeated by a retried actor (or images a resumed run already holds)
    adds nothing; the qualitative records that came back with the histograms are written into the run."""
    from bench.perf_driver import result_batch
    from bench.sparse_histograms import decode
    from bench.stages.trace import absorb, load_shards

    rng = np.random.default_rng(0)
    first, second = result_batch(0, 2, 3, 5, rng), result_batch(2, 2, 3, 5, rng)
    second["qualitative_name"] = np.array(["img2.g000.npz"] + [""] * 5)  # as SweepWorker sends it
    second["qualitative_data"][0] = b"npz bytes"
    repeat = {k: v.copy() for k, v in first.items()}
    absorb(iter([first, repeat, second]), folder / "shards", folder / "qualitative", {5}, 0, 6, "test")
    assert folder.names() == ["qualitative", "shards"]
    assert (folder / "shards").names() == ["shard-00000.npz", "shard-00001.npz"]
    assert (folder / "qualitative" / "img2.g000.npz").read_bytes() == b"npz bytes"
    scores = load_shards(folder / "shards")
    assert sorted(set(scores["index"].tolist())) == [0, 1, 2, 3] and len(scores["index"]) == 12
    assert "qualitative_data" not in scores
    assert np.array_equal(decode(scores, 5)[:6], decode(first, 5))


def test_the_driver_gathers_batches_into_shards_and_keeps_them_when_the_stage_stops(tmp_path, monkeypatch):
    """bench.stages.trace.absorb: the first batch is a shard at once (progress shows early), later ones are
    gathered up to SHARD_IMAGES images; an error in the stage (a worker out of retries, Ctrl-C) still writes the
    images gathered so far, and a resume re-traces none of them."""
    import bench.stages.trace as trace
    from bench.perf_driver import result_batch

    monkeypatch.setattr(trace, "SHARD_SECONDS", 3600.0)
    monkeypatch.setattr(trace, "SHARD_IMAGES", 3)
    rng = np.random.default_rng(0)

    def batches():
        for i in range(6):
            yield result_batch(i, 1, 2, 4, rng, present=1 + i % 3)
        raise KeyboardInterrupt

    shards = Location.of(tmp_path / "shards")
    with pytest.raises(KeyboardInterrupt):
        trace.absorb(batches(), shards, None, set(), 0, 10, "test")
    assert shards.names() == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    done, next_shard = trace.sharded(shards)
    assert done == set(range(6)) and next_shard == 3
    sizes = []
    for name in shards.names():
        with np.load(tmp_path / "shards" / name) as shard:
            sizes.append(len(np.unique(shard["index"])))
    assert sizes == [1, 3, 2]  # the first at once, then SHARD_IMAGES, then what the error left


def test_fit_from_reads_a_finished_fit_from_object_storage(s3_server, tmp_path):
    """`fit.from=s3://...` (a run or one fit directory): the finished fit is found by its hash, copied into the
    run with `done` last, and a fit of another setting is refused naming both hashes."""
    from bench.plan import make_plan
    from bench.stages.fit import CONFIG, DONE, copy_fit, fit_source

    source = f"s3://{BUCKET}/lent-{os.getpid()}"
    cfg = compose(ROOT / "sweeps/linear_probe.yaml", [f"fit.from={source}"])
    (unit,) = make_plan(cfg).fits
    fit = Location.of(source) / "fit" / unit.hash
    for name, data in (("weights.safetensors", b"w"), ("loss.csv", b"series,step,loss\n")):
        (fit / name).write_bytes(data)
    (fit / CONFIG).write_json({"hash": unit.hash})
    (fit / DONE).write_text(unit.hash + "\n")
    found = fit_source(cfg, unit)
    assert found == fit
    target = Location.of(tmp_path / "run" / "fit" / unit.hash)
    copy_fit(found, target)
    assert sorted(target.names()) == sorted(["weights.safetensors", "loss.csv", CONFIG, DONE])
    assert (target / CONFIG).read_json()["copied_from"] == fit.uri
    (fit / CONFIG).write_json({"hash": "another"})
    with pytest.raises(BenchError, match=f"holds fit another, but this sweep needs {unit.hash}"):
        fit_source(compose(ROOT / "sweeps/linear_probe.yaml", [f"fit.from={fit.uri}"]), unit)
