"""Models and datasets on object storage (bench.node_cache), against an S3 bucket served on localhost by moto:
`model.path=s3://...` loads the pipeline the local folder loads, from one copy per node keyed by the stored
folder's fingerprint; `data.root=s3://...` gives every layout's samples exactly as the local root does; a
missing or unreadable URI is one error line before anything is written; each node's probe lists the driver's
version of every stored input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from racing import race
from test_storage import BUCKET, s3_server  # noqa: F401 (the S3 endpoint fixture, used by name below)

import bench.node_cache as node_cache
from bench.data import build_dataset
from bench.data.fixtures import FIXTURE_LAYOUTS, write_fixture
from bench.errors import BenchError
from bench.fingerprint import model_fingerprint
from bench.node_cache import CACHE_ENV, node_copy
from bench.storage import Location

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps/iseg_lambda.yaml"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A node cache of this test's own (DIFFSEG_CACHE)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


@pytest.fixture
def copies(monkeypatch) -> list[str]:
    """The URI of every object copied into a node cache meanwhile."""
    calls, original = [], node_cache._copy_one

    def counting(loc, *args):
        calls.append(loc.uri)
        return original(loc, *args)

    monkeypatch.setattr(node_cache, "_copy_one", counting)
    return calls


def _upload(folder: Path, name: str) -> str:
    uri = f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
    Location.of(uri).upload(folder)
    return uri


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)


# -- models ---------------------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("s3_server")
def test_a_model_uri_loads_the_local_folders_pipeline_from_one_copy_per_node(tiny_model, cache, copies):
    from bench.models import load_backbone, model_folder_path

    uri = _upload(tiny_model, "model")
    stored = Location.of(uri).files()
    remote = load_backbone({"path": uri, "device": "cpu"})
    local = load_backbone({"path": str(tiny_model), "device": "cpu"})
    assert all(_states_equal(getattr(remote, p), getattr(local, p)) for p in ("unet", "vae", "text_encoder"))
    assert type(remote.scheduler) is type(local.scheduler) and remote.name == uri.rsplit("/", 1)[-1]
    assert remote.describe()["stored"] == uri and "stored" not in local.describe()
    assert sorted(copies) == sorted(f"{uri}/{rel}" for rel in stored)  # every object copied once
    copy = model_folder_path({"path": uri})
    assert copy.parent == cache / "models" and model_fingerprint(copy) == model_fingerprint(tiny_model)
    times = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    copies.clear()
    load_backbone({"path": uri, "device": "cpu"})  # a second load on this node: the copy, nothing fetched
    assert copies == [] and {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == times


@pytest.mark.usefixtures("s3_server")
def test_a_changed_stored_model_is_a_new_copy_and_the_old_one_is_never_read(tiny_model, cache, copies):
    from bench.models import model_folder_path

    uri = _upload(tiny_model, "model")
    first = model_folder_path({"path": uri})
    config = Location.of(uri) / "scheduler" / "scheduler_config.json"
    changed = {**config.read_json(), "steps_offset": 7}
    config.write_text(json.dumps(changed))  # same names, another content: another ETag
    copies.clear()
    second = model_folder_path({"path": uri})
    assert second != first and first.is_dir()  # a new key; the old copy stays (eviction is the user's)
    assert json.loads((second / "scheduler" / "scheduler_config.json").read_text()) == changed
    assert len(copies) == len(Location.of(uri).files())
    assert model_fingerprint(second) != model_fingerprint(first)


@pytest.mark.usefixtures("s3_server")
def test_concurrent_fetchers_on_one_node_copy_once(tiny_model, cache, copies):
    uri = _upload(tiny_model, "model")
    outcomes = race(lambda: node_copy(uri, "models", "model.path"), 4)
    assert len(set(outcomes)) == 1 and isinstance(outcomes[0], Path)
    assert sorted(copies) == sorted(f"{uri}/{rel}" for rel in Location.of(uri).files())
    assert [p.name for p in (cache / "models").iterdir() if p.name.startswith(".")] == []  # no staging left


@pytest.mark.usefixtures("s3_server")
def test_an_unfinished_copy_is_fetched_again(tiny_model, cache, copies):
    """A copy whose files do not match its listing (a killed copy, a file the user removed) is not read."""
    uri = _upload(tiny_model, "model")
    copy = node_copy(uri, "models", "model.path")
    (copy / "model_index.json").unlink()
    copies.clear()
    assert node_copy(uri, "models", "model.path") == copy and (copy / "model_index.json").is_file()
    assert len(copies) == len(Location.of(uri).files())


@pytest.mark.usefixtures("s3_server")
@pytest.mark.parametrize("where", ["no-such-bucket/models/x", f"{BUCKET}/no-such-folder"])
def test_a_bad_model_uri_is_one_line_naming_it_and_the_fix_before_anything_is_written(where, cache, tmp_path,
                                                                                      capsys):
    from bench.run import main

    uri = f"s3://{where}"
    assert main([str(SWEEP), "data.limit=1", f"model.path={uri}", f"output_dir={tmp_path / 'run'}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: model.path={uri} ") and "check the URI" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# -- datasets -------------------------------------------------------------------------------------------------------------
def _generation_root(root: Path, name: str) -> dict:
    """Annotations of generated images (voc_sim, coco_cap with captions): VOC palette PNGs by image id."""
    folder = root / "SegmentationClass"
    folder.mkdir(parents=True)
    ids = ["aeroplane-00000", "bicycle-00000"] if name == "voc_sim" else ["00000", "00001"]
    for i, image_id in enumerate(ids):
        label = np.zeros((24, 24), np.uint8)
        label[4:12, 4 + i:14] = i + 1
        png = Image.fromarray(label, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
        png.save(folder / f"{image_id}.png")
    options = {"seeds_per_class": 1} if name == "voc_sim" else {"num_images": 2}
    if name == "coco_cap":
        (root / "captions.txt").write_text("00000\tan aeroplane\n00001\ta bicycle on grass\n")
        options["captions"] = str(root / "captions.txt")
    return options


def _synthesized(root: Path) -> None:
    """A synthesised dataset (bench.synthesize): VOC's layout with its own card naming its classes."""
    fixture = write_fixture("voc2012", root, num_images=2, size=32)
    voc = next(p.parent for p in root.rglob("JPEGImages"))
    (voc / "dataset.json").write_text(json.dumps({"classes": ["background", *[f"c{i}" for i in range(20)]]}))
    del fixture


DATASETS = [*FIXTURE_LAYOUTS, "synthesized", "voc_sim", "coco_cap"]


@pytest.mark.usefixtures("s3_server")
@pytest.mark.parametrize("layout", DATASETS)
def test_a_data_root_uri_gives_every_layouts_samples_as_the_local_root(layout, cache, tmp_path):
    root, options, name = tmp_path / "data", {}, layout
    if layout == "synthesized":
        _synthesized(root)
        name = "voc2012"
    elif layout in ("voc_sim", "coco_cap"):
        options = _generation_root(root, layout)
    else:
        write_fixture(layout, root, num_images=2, size=32)
    uri = _upload(root, f"data-{layout}")
    stored = {k: (f"{uri}/{Path(v).relative_to(root)}" if isinstance(v, str) and v.startswith(str(root)) else v)
              for k, v in options.items()}
    local = build_dataset({"name": name, "root": str(root), **options})
    remote = build_dataset({"name": name, "root": uri, **stored})
    assert len(local) == len(remote) == 2 and remote.classes == local.classes
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert (a.image_id, a.caption, a.extra, a.ignore_index) == (b.image_id, b.caption, b.extra, b.ignore_index)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    described = remote.describe()
    assert described["root"] == uri and described.get("captions", stored.get("captions")) == stored.get("captions")
    assert all(str(cache) not in str(v) for v in described.values())  # the user's URIs, not the node's copy


@pytest.mark.usefixtures("s3_server")
def test_a_missing_data_root_uri_is_one_line_naming_it(cache):
    with pytest.raises(BenchError, match=rf"^data.root=s3://{BUCKET}/no-such-data holds nothing .*check the URI"):
        build_dataset({"name": "voc2012", "root": f"s3://{BUCKET}/no-such-data"})


# -- the per-node probe -------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("s3_server")
def test_the_node_probe_lists_the_drivers_version_of_every_stored_input(tiny_model, cache, tmp_path, monkeypatch):
    """Stored inputs (model.path and data.root URIs) are checked on each node by listing them: reachable, and
    the version the driver listed; a node whose store differs (or that cannot reach it) is named."""
    from bench.config import compose
    from bench.preflight import _probe_node, cluster_checks, preflight

    model = _upload(tiny_model, "model")
    write_fixture("voc2012", tmp_path / "data", num_images=2, size=64)
    data = _upload(tmp_path / "data", "data")
    cfg = compose(SWEEP, [f"model.path={model}", "data.name=voc2012", f"data.root={data}", "data.limit=2",
                          "ray.num_actors=0", f"output_dir={tmp_path / 'run'}"])
    plan = preflight(cfg)
    checks = cluster_checks(cfg, plan, Location.of(tmp_path / "run"))
    stored = {c["what"]: c for c in checks if c["kind"] == "remote"}
    assert sorted(stored) == [f"data.root={data}", f"model.path={model}"]
    assert all(r["ok"] for r in _probe_node(checks))
    (Location.of(data) / "extra.txt").write_text("another version")
    results = dict(zip([c["what"] for c in checks], _probe_node(checks)))
    assert results[f"data.root={data}"]["other"] and results[f"data.root={data}"]["why"].startswith("stored version")
    assert results[f"model.path={model}"]["ok"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # a node whose endpoint answers nothing
    (dead,) = _probe_node([stored[f"model.path={model}"]])  # one check: pyarrow retries each for seconds
    assert not dead["ok"] and not dead.get("other")


def test_the_node_probe_resolves_a_hub_id_in_the_nodes_own_cache(tmp_path, tiny_model, monkeypatch):
    """model.id: each node resolves the id in its own Hugging Face cache and must find the driver's snapshot."""
    from bench.preflight import _probe_node

    commit = "a" * 40
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    check = {"kind": "hub", "path": "org/tiny", "expect": {"kind": "hf", "repo": "org/tiny", "commit": commit}}
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert _probe_node([check]) == [{"ok": True}]
    other = {**check, "expect": {**check["expect"], "commit": "b" * 40}}
    (result,) = _probe_node([other])
    assert result["other"] and result["why"].startswith("the model: snapshot bbbbbbbbbbbb -> aaaaaaaaaaaa")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    (result,) = _probe_node([check])
    assert not result["ok"] and "not in that node's Hugging Face cache" in result["why"]


# -- runs and fits read from object storage -------------------------------------------------------------------------------
@pytest.mark.usefixtures("s3_server")
def test_bench_report_reads_a_run_from_object_storage_and_writes_its_report_back(tmp_path, capsys):
    from test_report import make_cfg, make_frame, make_prov, make_run_dir

    from bench.report import main as report_main
    from bench.storage import COMPLETE

    cfg = make_cfg()
    run = make_run_dir(tmp_path / "run", cfg, make_frame({0: [70.0], 0.01: [72.5], 0.1: [71.0]}), make_prov(cfg))
    uri = _upload(run, "run")
    assert report_main([uri]) == 2  # no completion marker: an unfinished run is not reported
    assert "unfinished" in capsys.readouterr().err
    (Location.of(uri) / COMPLETE).write_json({"files": Location.of(uri).files()})
    (Location.of(uri) / "report.md").delete()
    assert report_main([uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == uri
    assert "72.5" in (Location.of(uri) / "report.md").read_text()
    out = tmp_path / "combined"
    assert report_main([uri, str(run), "--out", str(out)]) == 0  # a stored run and a local one, combined
    assert (out / "report.md").is_file()


@pytest.mark.usefixtures("s3_server")
def test_fit_from_a_uri_refuses_fits_made_on_other_inputs(tmp_path):
    """fit.from=s3://...: the inputs the lending run recorded (its run.json) are read from the store."""
    from bench.fingerprint import refuse_changed_fit_source

    source = Location.of(f"s3://{BUCKET}/lender-{uuid.uuid4().hex[:8]}")
    inputs = {"model": {"kind": "files", "mode": "full", "files": {"unet/w.safetensors": [4, "aa"]}},
              "train_data": {"kind": "generated"}}
    (source / "run.json").write_json({"inputs": inputs})
    refuse_changed_fit_source(source.uri, inputs)  # the same inputs: accepted
    now = {**inputs, "model": {**inputs["model"], "files": {"unet/w.safetensors": [4, "bb"]}}}
    with pytest.raises(BenchError, match=r"fitted on other inputs .*changed unet/w.safetensors"):
        refuse_changed_fit_source(source.uri, now)
    fit = source / "fit" / "abc"
    (fit / "done").write_text("abc\n")
    with pytest.raises(BenchError, match="fitted on other inputs"):
        refuse_changed_fit_source(fit.uri, now)  # one fit directory: its run's record two levels up


def test_where_the_node_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert node_cache.cache_root() == tmp_path / "xdg" / "diffseg-bench"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert node_cache.cache_root() == tmp_path / "elsewhere"
    assert node_cache.local_path(str(tmp_path / "x"), "data", "data.root") == tmp_path / "x"  # a path is itself
    assert os.fspath(node_cache.local_path(f"file://{tmp_path}/x", "data", "data.root")) == f"{tmp_path}/x"


@pytest.mark.usefixtures("s3_server")
def test_the_report_reads_a_stored_synthetic_datasets_card_without_the_dataset(tmp_path):
    from bench.reporting.dataset_card import CARD, SAMPLES, card_folder

    _synthesized(tmp_path / "data")
    voc = next(p.parent for p in (tmp_path / "data").rglob("JPEGImages"))
    (voc / SAMPLES).write_bytes(b"png bytes")
    uri = _upload(tmp_path / "data", "synthesized")
    folder = card_folder(uri)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD, SAMPLES])  # the card and grid, no images
    assert (folder / CARD).read_text() == (voc / CARD).read_text() and folder.name == voc.name
    assert card_folder(f"s3://{BUCKET}/no-such-data") is None


_FETCH = """
import sys

import bench.node_cache as node_cache

copied, original = [], node_cache._copy_one
node_cache._copy_one = lambda loc, *args: (copied.append(loc.uri), original(loc, *args))
print(node_cache.node_copy(sys.argv[1], "models", "model.path"), len(copied))
"""


@pytest.mark.usefixtures("s3_server")
def test_concurrent_processes_on_one_node_copy_once(tiny_model, cache):
    """Processes (the actors of one node), not threads: one copies under the lock, the others wait and reuse."""
    import subprocess
    import sys

    uri = _upload(tiny_model, "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH, uri], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    paths, counts = zip(*(out.split() for out, _ in outputs))
    assert len(set(paths)) == 1 and sorted(int(c) for c in counts) == [0, 0, len(Location.of(uri).files())]


@pytest.mark.usefixtures("s3_server")
def test_an_object_that_arrives_unlike_its_etag_is_refused_and_leaves_no_copy(tiny_model, cache, monkeypatch):
    import boto3

    uri = _upload(tiny_model, "model")
    index = (tiny_model / "model_index.json").read_bytes()
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{uri.split('/', 3)[3]}/model_index.json", Body=index)
    listing = node_cache.read_listing(uri)
    assert listing["model_index.json"][1] == hashlib.md5(index, usedforsecurity=False).hexdigest()  # one PUT
    assert node_copy(uri, "models", "model.path").is_dir()  # its content checked against that MD5
    shutil.rmtree(cache)
    listing["model_index.json"][1] = "0" * 32  # as if the object changed between the listing and the copy
    monkeypatch.setattr(node_cache, "read_listing", lambda _: listing)
    with pytest.raises(BenchError, match=rf"model.path={uri} cannot be read .*another content than its ETag"):
        node_copy(uri, "models", "model.path")
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.usefixtures("s3_server")
def test_a_node_cache_that_cannot_be_written_is_one_line_naming_the_setting(tiny_model, tmp_path, monkeypatch):
    uri = _upload(tiny_model, "model")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(BenchError, match=rf"^model.path={uri}: cannot copy it into the node cache .*point "
                                         rf"{CACHE_ENV} at a writable local disk$"):
        node_copy(uri, "models", "model.path")
