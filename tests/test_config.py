"""Sweep files: composition with overrides, search-space expansion, forward-setting grouping."""

from pathlib import Path

import numpy as np
import pytest

from bench.config import compose
from bench.plan import expand_trials
from bench.errors import BenchError
from bench.metrics import protocol_rows
from bench.evaluate import evaluate_batch, group_trials
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_overrides_reach_any_key_and_defaults_fill_the_rest(tmp_path):
    cfg = compose(ROOT / "sweeps" / "iseg_lambda.yaml",
                  ["data.limit=3", "ray.address=auto", "output_dir=x/y", "params.iterations=4", "model.dtype=float32"])
    assert cfg.data["limit"] == 3 and cfg.ray.address == "auto" and cfg.output_dir == "x/y"
    assert cfg.params["iterations"] == 4 and cfg.model.name == "embedded" and cfg.model.dtype == "float32"
    assert cfg.overrides[0] == "data.limit=3"
    assert cfg.train.num_workers == 1 and cfg.fit.source is None
    assert cfg.as_dict()["fit"] == {"from": None}  # config.yaml keeps the YAML spelling
    assert not (Path.cwd() / "outputs").exists()


@pytest.mark.parametrize("order", ["switch first", "switch last"])
def test_a_bare_section_name_switches_the_dataset_or_model(order):
    """`data=coco_cap data.size=64` runs coco_cap (it once ran shapes: the later data.* overrides merged over the
    bare name and the default dataset's name came back), without the options the file gave its own dataset."""
    switch, options = ["data=coco_cap", "model=embedded"], ["data.size=64", "data.split=train", "model.dtype=float32"]
    overrides = switch + options if order == "switch first" else options + switch
    cfg = compose(ROOT / "sweeps" / "freegen_synthesis.yaml", overrides)
    assert cfg.data == {"name": "coco_cap", "limit": None, "size": 64, "split": "train"}  # no seeds_per_class
    assert cfg.model.name == "embedded" and cfg.model.dtype == "float32"
    assert compose(ROOT / "sweeps" / "iseg_lambda.yaml", ["data=voc_sim"]).data["name"] == "voc_sim"
    assert cfg.overrides == overrides  # recorded as spelled


def test_grid_times_random_samples_is_reproducible(tmp_path):
    path = write(tmp_path, "method: iseg\nsweep:\n  iterations: [1, 2]\n  lambda: {loguniform: [0.0001, 0.1]}\n"
                           "num_samples: 3\nsearch_seed: 7\n")
    a, b = expand_trials(compose(path, [])), expand_trials(compose(path, []))
    assert len(a) == 6
    assert [t.swept for t in a] == [t.swept for t in b]
    assert all(0.0001 <= t.swept["lambda"] <= 0.1 for t in a)
    assert {t.swept["iterations"] for t in a} == {1, 2}
    assert len({t.swept["lambda"] for t in a}) == 6


def test_post_processing_params_share_one_forward_setting_and_forward_params_do_not(tmp_path):
    iseg = METHODS.get("iseg")
    lam = expand_trials(compose(write(tmp_path, "method: iseg\nsweep: {lambda: [0, 0.1], iterations: [1, 5]}\n"), []))
    assert len(group_trials(iseg, lam, [0])) == 1
    gamma = expand_trials(compose(write(tmp_path, "method: iseg\nsweep: {gamma: [1, 1.6], lambda: [0, 0.1]}\n"), []))
    groups = group_trials(iseg, gamma, [0, 1])
    assert len(groups) == 4 and all(len(g.trials) == 2 for g in groups)


@pytest.mark.parametrize("text,message", [
    ("method: iseg\nsweep: {lambda: {grid: []}}\n", "non-empty list"),
    ("method: iseg\nsweep: {lambda: {normal: [0, 1]}}\n", "must be one of"),
    ("method: iseg\nsweep: {self_layer: [-1, -7]}\n", "not one of"),
    ("method: iseg\nseeds: 3\n", "list of integers"),
    ("method: iseg\nmetric: {protocol: coco}\n", "protocol"),
    ("method: iseg\npaper: {param: gamma}\nsweep: {lambda: [0]}\n", "not a swept parameter"),
    ("data: {name: shapes}\n", "names no method"),
])
def test_invalid_sweeps(tmp_path, text, message):
    with pytest.raises(BenchError, match=message):
        compose(write(tmp_path, text), [])


def test_batched_images_score_like_single_images(tiny):
    from bench.data import build_dataset

    dataset = build_dataset({"name": "shapes", "size": 32, "limit": 2})
    iseg = METHODS.get("iseg")
    trials = expand_trials(compose(write_tmp(), []))
    (group,) = group_trials(iseg, trials, [0])
    method = iseg(tiny)
    samples = [dataset[0], dataset[1]]
    together, passes = evaluate_batch(method, dataset, samples, group, resolution=0)
    alone = evaluate_batch(method, dataset, [samples[0]], group, resolution=0)[0] + \
        evaluate_batch(method, dataset, [samples[1]], group, resolution=0)[0]
    assert passes == 2 and len(together) == 2 * len(trials)
    for x, y in zip(together, alone):
        # equal up to float rounding of batched kernels, which may flip a few boundary pixels (<= 1%): each
        # flipped pixel moves one count between classes of the prediction row
        x, y = protocol_rows(x, "mmseg"), protocol_rows(y, "mmseg")
        assert np.abs(x[2] - y[2]).sum() / 2 <= 0.01 * y[3].sum(), (x, y)


def write_tmp():
    import tempfile

    path = Path(tempfile.mkdtemp()) / "batch.yaml"
    path.write_text("method: iseg\nsweep: {lambda: [0, 0.01]}\n")
    return path
