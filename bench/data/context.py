"""PASCAL-Context: `context59` (MMSegmentation's layout) and `context459` (CAT-Seg's, which MMSegmentation lacks).

`context59` -- MMSegmentation (docs/en/user_guides/2_dataset_prepare.md, tools/dataset_converters/pascal_context.py
run on trainval_merged.json):

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/<id>.png          value 0 = background, 1..59 = the 59 classes
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/<split>.txt  train (4996) | val (5104)

  The converter maps the 59 full-label ids in sorted order to 1..59, so the classes are in alphabetical order
  (classes/context59.txt, the same order as CAT-Seg's pc59 list); MMSegmentation's PascalContextDataset59 uses
  reduce_zero_label=True: 0 is ignored, k is class k - 1. Here 0 -> ignore and k stays k (bench.data.layout).
  (MMSegmentation's CLASSES tuple for this dataset lists the names in another, VOC-first order; the ids its
  converter writes follow the sorted order, which is what the names here follow.)

`context60` -- the same files with background as a class (MMSegmentation's PascalContextDataset, 60 classes,
  reduce_zero_label=False: 0 = background, k = class k): the "Context" column of the training-free
  open-vocabulary papers (GroupViT, TCL, OVDiff, CaR; iSeg Table 2 compares with them), which score background.

`context459` -- CAT-Seg's datasets/prepare_pascal_context_459.py (the full 459-class labels, val only):

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/annotations_detectron2/pc459_val/<id>.tif  uint16: value k = 0..458 = label id k + 1 of
                                                                  labels.txt; anything else is unlabelled
  Internal ids 1..459 (k + 1), ignore 65535.
"""

from __future__ import annotations

import numpy as np

from bench.data.base import IGNORE_INDEX
from bench.data.layout import (WIDE_IGNORE, FileListDataset, class_names, files_with_suffix, lookup_table, missing,
                               read_split_file, shifted_table)
from bench.errors import BenchError

PREPARE_59 = ("MMSegmentation's tools/dataset_converters/pascal_context.py (VOCtrainval_03-May-2010.tar + "
              "trainval_merged.json -> VOCdevkit/VOC2010/SegmentationClassContext)")
PREPARE_459 = ("CAT-Seg's datasets/prepare_pascal_context_459.py (trainval.tar.gz full labels -> "
               "VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif)")


def find_voc2010(root: str, name: str, prepare: str):
    from pathlib import Path

    if not root:
        raise BenchError(f"data={name} needs data.root=<path to VOCdevkit/VOC2010 or its parent>")
    base = Path(root).expanduser()
    for candidate in (base, base / "VOC2010", base / "VOCdevkit" / "VOC2010"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise missing(name, (base / "VOC2010" if base.name == "VOCdevkit" else base / "VOCdevkit" / "VOC2010")
                  / "JPEGImages", prepare)


class Context59Dataset(FileListDataset):
    """`context59`: PASCAL-Context with 59 classes, no background (iSeg Table 2 "Context", DEDOS "PC-59")."""

    name = "context59"
    has_background = False
    prepare = PREPARE_59

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        voc = find_voc2010(root, self.name, self.prepare)
        ids = read_split_file(voc / "ImageSets" / "SegmentationContext" / f"{split}.txt", self.name, self.prepare)
        labels = voc / "SegmentationClassContext"
        if not labels.is_dir():
            raise missing(self.name, labels, self.prepare)
        items = [(i, voc / "JPEGImages" / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        super().__init__(voc, split, items, shifted_table(59, first=1),
                         class_names("context59", names, background=True),
                         class_names("context59", "official", background=True))


class Context60Dataset(Context59Dataset):
    """`context60`: PASCAL-Context 59 classes plus background as a scored class (iSeg Table 2 / 4 "Context")."""

    name = "context60"
    has_background = True

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        super().__init__(root, split, names)
        self.table = lookup_table(256, {k: k for k in range(60)}, IGNORE_INDEX, np.uint8)


class Context459Dataset(FileListDataset):
    """`context459`: PASCAL-Context with all 459 classes, no background (DEDOS "PC-459")."""

    name = "context459"
    has_background = False
    ignore_index = WIDE_IGNORE
    prepare = PREPARE_459

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if split != "val":
            raise BenchError(f"data=context459 has only split=val (CAT-Seg converts the validation labels only), "
                             f"not {split!r}")
        voc = find_voc2010(root, self.name, self.prepare)
        labels = files_with_suffix(voc / "annotations_detectron2" / "pc459_val", ".tif", self.name, self.prepare)
        items = [(p.stem, voc / "JPEGImages" / f"{p.stem}.jpg", p) for p in labels]
        table = shifted_table(459, ignore=WIDE_IGNORE, dtype=np.uint16, size=65536)
        super().__init__(voc, split, items, table, class_names("context459", names, background=True),
                         class_names("context459", "official", background=True))
