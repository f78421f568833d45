"""ADE20K: `ade150` (MMSegmentation's layout) and `ade847` (CAT-Seg's ADE20K-Full layout, which MMSegmentation lacks).

`ade150` -- MMSegmentation (docs/en/user_guides/2_dataset_prepare.md; ADEChallengeData2016.zip unpacked as is):

    ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<id>.png   0 = other (unlabelled), 1..150 = classes

  ADE20KDataset uses reduce_zero_label=True (0 ignored, k is class k - 1); here 0 -> ignore and k stays k
  (bench.data.layout). data.split=train|val selects training|validation (2000 validation images).

`ade847` -- CAT-Seg's datasets/prepare_ade20k_full.py (ADE20K_2021_17_01, validation only):

    ADE20K_2021_17_01/images_detectron2/validation/<id>.jpg
    ADE20K_2021_17_01/annotations_detectron2/validation/<id>.tif      uint16: 0..846 = class, 65535 = unlabelled

  Internal ids 1..847 (k + 1), ignore 65535; class names in CAT-Seg's frequency order (classes/ade847.txt).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data.layout import (WIDE_IGNORE, FileListDataset, class_names, files_with_suffix, missing, shifted_table,
                               under)
from bench.errors import BenchError

PREPARE_150 = ("MMSegmentation's dataset preparation for ADE20K (ADEChallengeData2016.zip from "
               "http://data.csail.mit.edu/places/ADEchallenge/, unpacked as is)")
PREPARE_847 = ("CAT-Seg's datasets/prepare_ade20k_full.py (ADE20K_2021_17_01 -> images_detectron2/ and "
               "annotations_detectron2/validation/*.tif)")
SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def find_folder(root: str | None, folder: str, marker: str, name: str, prepare: str) -> Path:
    if not root:
        raise BenchError(f"data={name} needs data.root=<path to {folder} or its parent>")
    base = Path(root).expanduser()
    for candidate in (base, base / folder):
        if (candidate / marker).is_dir():
            return candidate
    raise missing(name, under(base, folder) / marker, prepare)


class ADE150Dataset(FileListDataset):
    """`ade150`: ADE20K SceneParsing, 150 classes, no background (DEDOS "A-150")."""

    name = "ade150"
    has_background = False
    prepare = PREPARE_150

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if split not in SPLITS:
            raise BenchError(f"data.split={split!r} is not an ADE20K split; use train or val")
        ade = find_folder(root, "ADEChallengeData2016", "images", self.name, self.prepare)
        labels = files_with_suffix(ade / "annotations" / SPLITS[split], ".png", self.name, self.prepare)
        items = [(p.stem, ade / "images" / SPLITS[split] / f"{p.stem}.jpg", p) for p in labels]
        super().__init__(ade, split, items, shifted_table(150, first=1),
                         class_names("ade150", names, background=True),
                         class_names("ade150", "official", background=True))


class ADE847Dataset(FileListDataset):
    """`ade847`: ADE20K-Full, 847 classes, no background (DEDOS "A-847" in CAT-Seg's benchmark)."""

    name = "ade847"
    has_background = False
    ignore_index = WIDE_IGNORE
    prepare = PREPARE_847

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if split not in ("val", "validation"):
            raise BenchError(f"data=ade847 has only split=val (CAT-Seg converts the validation set only), "
                             f"not {split!r}")
        ade = find_folder(root, "ADE20K_2021_17_01", "images_detectron2", self.name, self.prepare)
        labels = files_with_suffix(ade / "annotations_detectron2" / "validation", ".tif", self.name, self.prepare)
        items = [(p.stem, ade / "images_detectron2" / "validation" / f"{p.stem}.jpg", p) for p in labels]
        table = shifted_table(847, ignore=WIDE_IGNORE, dtype=np.uint16, size=65536)
        super().__init__(ade, split, items, table, class_names("ade847", names, background=True),
                         class_names("ade847", "official", background=True))
