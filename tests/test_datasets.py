"""Every real-dataset layout, offline: shapes scenes written in that layout (bench.data.fixtures) read back through
its loader, against the encodings its module documents, re-stated here independently of the loaders' tables."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from bench.data import build_dataset
from bench.data.fixtures import FIXTURE_LAYOUTS, write_fixture
from bench.data.layout import class_names
from bench.errors import BenchError

# name -> (len(classes) including the id-0 slot, has a background class)
EXPECTED = {"voc2012": (21, True), "voc20": (21, False), "voc20b": (21, True), "context59": (60, False),
            "context60": (60, True), "context459": (460, False), "coco_stuff171": (172, False),
            "coco_stuff27": (28, False), "coco_object": (81, True), "cityscapes": (20, False),
            "cityscapes27": (28, False), "ade150": (151, False), "ade847": (848, False)}


def _coarse(train_id: int) -> int:
    """The few COCO-Stuff-27 facts the fixture uses, from COCO-Stuff's label hierarchy (not the loader's table)."""
    names = class_names("coco_stuff171", "official")
    coarse = {"person": "person", "cat": "animal", "dog": "animal", "car": "vehicle", "grass": "plant",
              "road": "ground", "bird": "animal"}[names[train_id]]
    return class_names("coco_stuff27", "official").index(coarse)


def expected_internal(name: str, raw: np.ndarray) -> np.ndarray:
    """The internal ids (0 = background slot, classes from 1, ignore) each layout's documentation promises."""
    raw = raw.astype(np.int64)
    out = np.empty_like(raw)
    for value in np.unique(raw):
        v = int(value)
        if name in ("voc2012", "voc20b", "coco_object", "context60"):
            new = v  # ids kept, 255 void
        elif name == "voc20":
            new = 255 if v == 0 else v
        elif name in ("context59", "ade150"):  # 0 = background / other -> ignored, k stays
            new = 255 if v == 0 else v
        elif name in ("context459", "ade847"):  # uint16 0..C-1 -> k + 1, 65535 ignored
            new = 65535 if v == 65535 else v + 1
        elif name in ("coco_stuff171", "cityscapes"):  # train ids -> k + 1, 255 ignored
            new = 255 if v == 255 else v + 1
        elif name == "cityscapes27":  # label ids 7..33 -> 1..27, 0..6 ignored
            new = v - 6 if 7 <= v <= 33 else 255
        elif name == "coco_stuff27":
            new = 255 if v == 255 else _coarse(v) + 1
        out[raw == v] = new
    return out


@pytest.mark.parametrize("name", FIXTURE_LAYOUTS)
def test_layout_reads_back_what_the_fixture_wrote(name, tmp_path):
    fx = write_fixture(name, tmp_path, num_images=3, size=40)
    ds = build_dataset({"name": name, "root": str(tmp_path)})
    num_classes, has_background = EXPECTED[name]
    assert len(ds) == 3 and sorted(ds[i].image_id for i in range(3)) == sorted(fx.ids)
    assert len(ds.classes) == num_classes and ds.has_background is has_background
    assert len(set(ds.classes)) == num_classes, "class names are unique (report columns are keyed by them)"
    wide = num_classes > 256
    assert ds.ignore_index == (65535 if wide else 255)
    for i in range(3):
        sample = ds[i]
        k = fx.ids.index(sample.image_id)  # listing order is the layout's (Cityscapes: by city folder)
        assert sample.image.shape == (40, 40, 3) and sample.image.dtype == np.uint8
        assert np.abs(sample.image.astype(int) - fx.images[k].astype(int)).mean() < 8  # JPEG where the layout has it
        np.testing.assert_array_equal(sample.label.astype(np.int64), expected_internal(name, fx.raw_labels[k]))
        assert sample.ignore_index == ds.ignore_index
        if not has_background:
            assert 0 not in np.unique(sample.label), "a layout without background never labels the id-0 slot"
        assert all(0 < c < num_classes for c in sample.present_class_ids())
    assert ds.describe()["has_background"] is has_background
    limited = build_dataset({"name": name, "root": str(tmp_path), "limit": 2})
    assert len(limited) == 2 and limited.has_background is has_background
    assert limited.ignore_index == ds.ignore_index


@pytest.mark.parametrize("name", FIXTURE_LAYOUTS)
def test_preflight_accepts_each_layouts_masks_with_their_ignore_value(name, tmp_path):
    """The preflight's mask check takes the layout's own ignore value (65535 for the uint16 layouts), not 255."""
    from bench.preflight import check_images

    write_fixture(name, tmp_path, num_images=2, size=24)
    ds = build_dataset({"name": name, "root": str(tmp_path)})
    kept = check_images(ds, {"name": name, "root": str(tmp_path)})
    assert len(kept) == 2
    for light, full in zip(kept, ds):  # what the prompt check reads, without the pixels
        assert light.image.size == 0 and light.label.size <= len(ds.classes) + 1
        assert light.present_class_ids() == full.present_class_ids() and light.caption == full.caption

    class OnePastTheLastClass:  # the layout's samples with every mask value one past its last class id
        def __len__(self):
            return 1

        def __getitem__(self, index):
            sample = ds[index]
            return replace(sample, label=np.full(sample.label.shape, len(ds.classes), np.uint16))

    stray = OnePastTheLastClass()
    stray.name, stray.classes = ds.name, ds.classes
    with pytest.raises(BenchError, match=f"no class id of {name} .*, {ds.ignore_index} = ignore"):
        check_images(stray, {"name": name})


@pytest.mark.parametrize("name", FIXTURE_LAYOUTS)
def test_missing_layout_is_one_line_naming_the_path_and_how_to_prepare(name, tmp_path):
    with pytest.raises(BenchError) as err:
        build_dataset({"name": name, "root": str(tmp_path / "nowhere")})
    message = str(err.value)
    assert "\n" not in message and "not found at" in message and "prepare it with" in message
    assert str(tmp_path / "nowhere") in message


@pytest.mark.parametrize("name", FIXTURE_LAYOUTS)
def test_listing_decodes_nothing_on_the_driver(name, tmp_path, monkeypatch):
    """Building a dataset lists file names only; images and labels are opened by __getitem__ (in the actors)."""
    write_fixture(name, tmp_path, num_images=2, size=24)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    ds = build_dataset({"name": name, "root": str(tmp_path)})
    assert opened == []
    ds[1]
    assert len(opened) == 2  # one image, one label


def test_class_lists_have_prompt_and_official_names():
    voc = class_names("voc")
    assert "potted plant" in voc and "tv monitor" in voc and "dining table" in voc
    assert "pottedplant" in class_names("voc", "official")
    context = class_names("context59", "official")
    assert context == sorted(context), "the converter's sorted full-label ids give alphabetical order"
    assert class_names("context59")[context.index("pottedplant")] == "potted plant"
    assert class_names("ade847")[1] == "building"  # first WordNet synonym of "building, edifice"
    assert class_names("ade847", "official")[1] == "building, edifice"
    assert class_names("coco_stuff171")[class_names("coco_stuff171", "official").index("sky-other")] == "sky"
    assert [len(class_names(n)) for n in ("context459", "ade150", "coco_stuff171", "coco_stuff27", "cityscapes",
                                           "coco_object")] == [459, 150, 171, 27, 19, 81]


def test_names_option_switches_to_the_official_names(tmp_path):
    write_fixture("context59", tmp_path, num_images=1)
    ds = build_dataset({"name": "context59", "root": str(tmp_path), "names": "official"})
    assert "pottedplant" in ds.classes and "potted plant" not in ds.classes
    with pytest.raises(BenchError, match="prompt or official"):
        build_dataset({"name": "context59", "root": str(tmp_path), "names": "fancy"})


def test_coco_stuff27_groups_every_train_id_into_a_supercategory():
    from bench.data.coco import coarse_table

    table = coarse_table()
    fine, coarse = class_names("coco_stuff171", "official"), class_names("coco_stuff27", "official")
    assert len(table) == 171 and set(table.tolist()) == set(range(27))
    grouped = {fine[t]: coarse[c] for t, c in enumerate(table)}
    assert grouped["wall-brick"] == "wall" and grouped["tv"] == "electronic" and grouped["sky-other"] == "sky"
    assert grouped["banana"] == "food-things" and grouped["salad"] == "food-stuff"
    assert all(coarse[c].endswith("things") or c < 12 for c in table[:80]), "things map to the first 12 classes"


def test_splits_select_their_folders(tmp_path):
    write_fixture("coco_stuff171", tmp_path, split="train", num_images=2)
    write_fixture("ade150", tmp_path, split="train", num_images=1)
    assert len(build_dataset({"name": "coco_stuff171", "root": str(tmp_path), "split": "train"})) == 2
    assert len(build_dataset({"name": "ade150", "root": str(tmp_path / "ADEChallengeData2016"), "split": "train"})) == 1
    with pytest.raises(BenchError, match="not found at .*val2017"):
        build_dataset({"name": "coco_stuff171", "root": str(tmp_path)})
    with pytest.raises(BenchError, match="not a COCO split"):
        build_dataset({"name": "coco_stuff171", "root": str(tmp_path), "split": "test"})


def test_coco_image_list_restricts_the_images(tmp_path):
    fx = write_fixture("coco_stuff27", tmp_path, num_images=3)
    (tmp_path / "curated.txt").write_text(f"{fx.ids[2]}.jpg\nCOCO_val2014_{fx.ids[0]}\n")
    ds = build_dataset({"name": "coco_stuff27", "root": str(tmp_path), "image_list": str(tmp_path / "curated.txt")})
    assert [ds[i].image_id for i in range(len(ds))] == [fx.ids[0], fx.ids[2]]


def test_cityscapes_reads_label_ids_when_train_ids_are_absent(tmp_path):
    fx = write_fixture("cityscapes", tmp_path, num_images=2)
    to_label_id = {0: 7, 2: 11, 10: 23, 11: 24, 13: 26, 18: 33, 255: 0}  # train id -> official label id
    for path in sorted((tmp_path / "cityscapes" / "gtFine").rglob("*_labelTrainIds.png")):
        train = np.asarray(Image.open(path))
        label_ids = np.vectorize(to_label_id.get)(train).astype(np.uint8)
        Image.fromarray(label_ids).save(str(path).replace("_labelTrainIds", "_labelIds"))
        path.unlink()
    ds = build_dataset({"name": "cityscapes", "root": str(tmp_path)})
    assert ds.describe()["labels"] == "labelIds"
    k = fx.ids.index(ds[0].image_id)
    np.testing.assert_array_equal(ds[0].label.astype(np.int64), expected_internal("cityscapes", fx.raw_labels[k]))


def test_voc20_and_voc20b_differ_only_in_the_background(tmp_path):
    write_fixture("voc2012", tmp_path, num_images=2)
    voc, v20, v20b = (build_dataset({"name": n, "root": str(tmp_path)}) for n in ("voc2012", "voc20", "voc20b"))
    a, b, c = voc[0].label, v20[0].label, v20b[0].label
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, np.where(a == 0, 255, a))
    assert voc[0].present_class_ids() == v20[0].present_class_ids() == v20b[0].present_class_ids()


@pytest.mark.parametrize("name", ["voc20b", "context459", "cityscapes"])
def test_check_says_what_a_layout_holds(name, tmp_path, capsys):
    from bench.data.__main__ import main

    write_fixture(name, tmp_path, num_images=3)
    assert main(["check", name, f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "3 listed,       3 images,       3 label maps   <- checked" in out
    assert "most frequent classes" in out and "person" in out and len(out.splitlines()) < 25


@pytest.mark.parametrize("name", FIXTURE_LAYOUTS)
def test_check_of_a_missing_layout_is_one_line_and_exit_2(name, tmp_path, capsys):
    from bench.data.__main__ import main

    assert main(["check", name, f"data.root={tmp_path}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "not found at" in err and "prepare it with" in err


def test_check_rejects_unknown_names_and_options(tmp_path, capsys):
    from bench.data.__main__ import main

    assert main(["check", "ade15", f"data.root={tmp_path}"]) == 2
    assert "Did you mean 'ade150'" in capsys.readouterr().err
    assert main(["check", "ade150", f"data.rot={tmp_path}"]) == 2
    assert "unknown option of dataset ade150 'rot'" in capsys.readouterr().err


# -- sweep files of the papers' dataset tables ------------------------------------------------------------------------
def _dataset_sweeps():
    import yaml

    from bench.config import compose  # noqa: F401  (fail at collection if the config module breaks)

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "sweeps"
    return [p for p in sorted(root.glob("*.yaml")) if (yaml.safe_load(p.read_text()).get("data") or {}).get("root")]


DATASET_SWEEPS = _dataset_sweeps()


def test_the_papers_dataset_tables_have_sweeps():
    names = {p.stem for p in DATASET_SWEEPS}
    assert {"iseg_voc_wsss", "iseg_coco_wsss", "iseg_voc_ov", "iseg_context_ov", "iseg_coco_object_ov",
            "iseg_cityscapes_unsup", "iseg_coco_stuff27_unsup", "dedos_context459_ov", "dedos_ade150_ov",
            "dedos_context59_ov", "dedos_voc20_ov", "dedos_voc20b_ov"} <= names


@pytest.mark.parametrize("path", DATASET_SWEEPS, ids=[p.stem for p in DATASET_SWEEPS])
def test_dataset_sweep_without_its_data_fails_before_ray_with_one_line(path, tmp_path, monkeypatch):
    from bench.config import compose
    from bench.preflight import preflight

    monkeypatch.chdir(tmp_path)  # the sweeps' data.root is relative (MMSegmentation's data/ convention)
    cfg = compose(path, [])
    assert cfg.paper.get("table") and (cfg.paper.get("values") or cfg.paper.get("note"))
    with pytest.raises(BenchError) as err:
        preflight(cfg)
    message = str(err.value)
    assert message.startswith(f"dataset {cfg.data['name']} not found at {cfg.data['root']}") and \
        "prepare it with" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_dataset_sweep_cli_exits_2_with_the_line_and_writes_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(repo / "sweeps" / "iseg_context_ov.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset context60 not found at data/VOCdevkit/VOC2010/JPEGImages; prepare it with")
    assert list(tmp_path.iterdir()) == []


def on_fixtures(path, tmp_path) -> list[str]:
    """Writes the sweep's data (and a trained method's fit data) as layout fixtures under tmp_path; returns the
    overrides that point the sweep at them (a short fit where it fits)."""
    import yaml

    sweep = yaml.safe_load(path.read_text())
    data = sweep["data"]
    write_fixture(data["name"], tmp_path / "data", split=data.get("split", "val"), num_images=1, size=64)
    extra = [f"data.root={tmp_path / 'data'}"]
    train = (sweep.get("train") or {}).get("data") or {}
    if train.get("name"):  # a trained method's fit data (DEDOS on COCO-Stuff-171): its own fixture, a short fit
        write_fixture(train["name"], tmp_path / "train", split=train.get("split", "train"), num_images=2, size=64)
        extra += [f"train.data.root={tmp_path / 'train'}", "params.dedos__train_steps=2"]
    return extra


@pytest.mark.parametrize("path", DATASET_SWEEPS, ids=[p.stem for p in DATASET_SWEEPS])
def test_dataset_sweep_passes_preflight_as_written(path, tmp_path):
    """Each dataset sweep, unchanged but for its data roots, passes the preflight on its layout fixture: its
    prompts fit the embedded model's 16 tokens (and so CLIP's 77), its masks are read in the layout's encoding."""
    from bench.config import compose
    from bench.preflight import preflight

    plan = preflight(compose(path, [*on_fixtures(path, tmp_path), f"output_dir={tmp_path / 'run'}"]))
    assert plan.trials


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("path", DATASET_SWEEPS, ids=[p.stem for p in DATASET_SWEEPS])
def test_dataset_sweep_runs_on_its_layout_fixture(path, tmp_path):
    """Each dataset sweep end to end on the embedded model, on a shapes scene written in its layout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    extra = on_fixtures(path, tmp_path)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), *extra,
                           "ray.num_actors=0", "report.bootstrap=10", f"output_dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def test_check_options_are_typed_like_overrides():
    from bench.data.check import parse_overrides

    assert parse_overrides(["data.num_images=3", "root=/data/2012", "data.split=val"]) == \
        {"num_images": 3, "root": "/data/2012", "split": "val"}
    with pytest.raises(BenchError, match="key=value"):
        parse_overrides(["data.root"])
