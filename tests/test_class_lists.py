"""Class lists, ids and ignore handling of each dataset layout against MMSegmentation's own definitions.

tests/fixtures/mmseg_classes.json holds facts read from the mmsegmentation 1.2.2 wheel on PyPI (its `source`
field names the files): the METAINFO class tuples of mmseg/datasets/{voc,cityscapes,ade,coco_stuff,
pascal_context}.py, the full-label ids that tools/dataset_converters/pascal_context.py keeps (`_mapping`, the 60
PASCAL-Context classes among the 459 of labels.txt) and coco_stuff164k.py's clsID_to_trID. Each layout, written
as a fixture (bench.data.fixtures), must read every raw label value as MMSegmentation's loader would: the same
class name, or ignored where MMSegmentation ignores it (255, and 0 under reduce_zero_label).

Layouts MMSegmentation 1.2.2 does not define (context459, ade847, coco_stuff27, cityscapes27, coco_object)
are checked where its sources say something about them: context459's names at the converter's 59 kept ids
are context59's names, in context59's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.data import build_dataset
from bench.data.fixtures import write_fixture
from bench.data.layout import class_names

MMSEG = json.loads((Path(__file__).parent / "fixtures" / "mmseg_classes.json").read_text())

# layout -> (the MMSegmentation class list it follows, reduce_zero_label of MMSegmentation's dataset class)
LAYOUTS = {
    "voc2012": ("voc", False),  # PascalVOCDataset
    "cityscapes": ("cityscapes", False),  # CityscapesDataset (labelTrainIds)
    "ade150": ("ade150", True),  # ADE20KDataset
    "coco_stuff171": ("coco_stuff171", False),  # COCOStuffDataset (labelTrainIds of coco_stuff164k.py)
    "context59": ("context59", True),  # PascalContextDataset59
    "context60": ("context60", False),  # PascalContextDataset
}


def mmseg_reads(value: int, classes: list[str], reduce_zero_label: bool) -> str | None:
    """The class name MMSegmentation's LoadAnnotations + IoUMetric give a raw label value (None: ignored)."""
    if value == 255:
        return None
    if reduce_zero_label:
        if value == 0:
            return None
        value -= 1
    return classes[value].strip() if value < len(classes) else None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_raw_value_reads_as_mmsegmentation_reads_it(layout, tmp_path):
    which, reduce = LAYOUTS[layout]
    classes = MMSEG[which]
    write_fixture(layout, tmp_path, num_images=1)
    ds = build_dataset({"name": layout, "root": str(tmp_path), "split": "val"})
    # VOC's palette PNGs are read as they are (palette index = class id, 255 void): no lookup table
    table = getattr(ds, "table", np.arange(256))
    official = getattr(ds, "official_classes", None) or class_names("voc", "official")
    for value in [*range(len(classes) + 1), 255]:
        theirs = mmseg_reads(value, classes, reduce)
        ours = int(table[value])
        if theirs is None:
            assert ours == ds.ignore_index or ours >= len(official), (layout, value, ours)
        else:
            assert ours != ds.ignore_index and official[ours].strip() == theirs, (layout, value, ours)
    # and a fixture image's labels: every value a class of the list or ignored
    label = ds[0].label
    assert set(np.unique(label).tolist()) <= {*range(len(official)), ds.ignore_index}


def test_context459_keeps_context59_at_the_converters_ids():
    """tools/dataset_converters/pascal_context.py maps full-label id _mapping[k] to class k (k = 1..59, sorted
    ids): the 459 list's names at those ids (internal id = labels.txt id) are the 59 list's, in its order."""
    full = class_names("context459", "official", background=True)
    kept = MMSEG["context_full_ids_of_60"]
    assert kept[0] == 0 and kept == sorted(kept) and len(kept) == 60
    assert [full[i] for i in kept[1:]] == class_names("context59", "official")
    assert class_names("context59", "official") == MMSEG["context59"]


def test_coco_stuff171_follows_the_converters_train_ids():
    """coco_stuff164k.py's clsID_to_trID: the raw COCO ids kept map to 0..170 in order, the class list's order."""
    mapping = {int(k): v for k, v in MMSEG["coco_stuff164k_clsID_to_trID"].items() if v != 255}
    assert sorted(mapping.values()) == list(range(171))
    assert [mapping[k] for k in sorted(mapping)] == list(range(171))  # increasing: the train ids keep COCO's order
    assert len(class_names("coco_stuff171", "official")) == 171
    assert np.array_equal(class_names("coco_stuff171", "official"), MMSEG["coco_stuff171"])
