"""A validated sweep config is read-only; what the run decides is its `Resolved` record, kept beside the input in
config.yaml and run.json; run.json's statistics have one shape (RunStats) on every path."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import yaml

from bench.config import compose
from bench.resolved import Resolved, effective_config, run_record
from bench.results import RunStats, config_hash

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "iseg_lambda.yaml"
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=0", "report.qualitative=0", "ray.num_actors=0"]


@pytest.mark.parametrize("change", [
    lambda c: setattr(c, "output_dir", "/elsewhere"),
    lambda c: setattr(c.ray, "num_actors", 0),
    lambda c: setattr(c.ray, "execution", "driver"),
    lambda c: setattr(c.train, "num_workers", 2),
    lambda c: c.data.__setitem__("limit", 3),
    lambda c: c.data.update(limit=3),
    lambda c: c.params.__setitem__("iterations", 3),
    lambda c: c.sweep.__setitem__("iterations", {"grid": [1, 2]}),
    lambda c: c.sweep["lambda"]["grid"].append(0.2),
    lambda c: c.sweep.pop("lambda"),
    lambda c: c.seeds.append(1),
    lambda c: c.paper["values"].clear(),
], ids=["output_dir", "ray.num_actors", "ray.execution", "train.num_workers", "data item", "data update",
        "params", "sweep", "sweep grid", "sweep pop", "seeds", "paper values"])
def test_mutating_a_validated_config_raises(change):
    cfg = compose(SWEEP, ["params.iterations=2"])
    before = cfg.as_dict()
    with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
        change(cfg)
    assert cfg.as_dict() == before


def test_train_data_is_read_only_and_variants_are_derived(tmp_path):
    cfg = compose(SWEEP, ["+train.data={name: shapes, split: train}"])
    with pytest.raises(TypeError):
        cfg.train.data["split"] = "val"
    settled = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, execution="driver", num_actors=0))
    assert (settled.ray.execution, cfg.ray.execution) == ("driver", "auto")
    with pytest.raises(TypeError):
        settled.sweep["lambda"] = [0]
    # Ray pickles the config to its actors; copies stay read-only and equal
    for twin in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert twin == cfg and twin.as_dict() == cfg.as_dict()
        with pytest.raises(TypeError):
            twin.data["limit"] = 1
    assert yaml.safe_load(yaml.safe_dump(cfg.as_dict())) == cfg.as_dict()  # config.yaml: plain data


def test_the_default_sweep_is_resolved_not_written_into_the_input():
    cfg = compose(ROOT / "sweeps" / "methods_compare.yaml", ["data.limit=2"])
    assert "method" not in cfg.sweep and "method" in cfg.swept  # compare sweeps its methods by default
    resolved = Resolved.of(cfg, "/runs/x")
    record = run_record(cfg, resolved)
    assert "method" not in record["sweep"] and record["resolved"]["sweep"]["method"] == cfg.swept["method"]
    effective = effective_config(record)
    assert effective["sweep"] == dict(cfg.swept) and effective["output_dir"] == "/runs/x"
    assert "resolved" not in effective
    # the hash covers what the run ran: the same as a config.yaml written with the decisions inline
    assert config_hash(record) == config_hash(effective)


def test_config_yaml_and_run_json_hold_the_resolved_record_beside_the_input(tmp_path, tiny_model):
    from bench.run import run

    out = run(str(SWEEP), [*SMALL, f"model.path={tiny_model}", f"output_dir={tmp_path / 'run'}"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    prov = json.loads((out / "run.json").read_text())
    # the input as the user gave it: ray.num_actors=0 given, ray.execution left to auto, no output_dir decision
    assert config["ray"]["execution"] == "auto" and config["output_dir"] == str(tmp_path / "run")
    assert config["resolved"] == {"sweep": {}, "ray": {"num_actors": 0, "execution": "driver"},
                                  "output_dir": str(out)}
    assert prov["resolved"] == config["resolved"]
    assert prov["execution"] == "driver" and prov["num_actors"] == 0
    assert prov["config_hash"] == config_hash(config)
    # the statistics: exactly RunStats' fields (per-image histograms stay out of run.json)
    stat_keys = {f.name for f in dataclasses.fields(RunStats)} - {"per_image", "backbones"}  # one backbone
    assert stat_keys <= set(prov) and prov["search"] is None
    # a report reads the run as it ran (the record laid over the input), and finds config.yaml unedited
    from bench.reporting.build import _hash_check
    from bench.reporting.model import load_run

    loaded = load_run(out)
    assert loaded.cfg["ray"]["execution"] == "driver" and "resolved" not in loaded.cfg
    assert _hash_check(loaded) is None


def test_run_stats_have_one_shape_on_the_trace_and_search_paths(tmp_path, tiny_model):
    from bench.run import run

    common = [*SMALL, f"model.path={tiny_model}"]
    traced = run(str(SWEEP), [*common, f"output_dir={tmp_path / 'trace'}"])
    searched = run(str(SWEEP), [*common, "search.algo=random", "search.num_samples=2", "search.grace_images=1",
                                "search.reduction_factor=2", f"output_dir={tmp_path / 'search'}"])
    a, b = (json.loads((p / "run.json").read_text()) for p in (traced, searched))
    assert list(a) == list(b)  # the same keys, in the same order
    assert a["search"] is None and b["search"]["pairs_scored"] >= 2
    for prov in (a, b):
        assert prov["execution"] == "driver" and prov["num_images"] == 2 and prov["backbone"]
