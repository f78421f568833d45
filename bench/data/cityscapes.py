"""`cityscapes`: Cityscapes with its 19 evaluation classes, in MMSegmentation's layout.

MMSegmentation (docs/en/user_guides/2_dataset_prepare.md, tools/dataset_converters/cityscapes.py, which runs
cityscapesscripts' json2labelImg with "trainIds"):

    cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   0..18, 255 ignore

Without the converter's output, the dataset's own <..>_gtFine_labelIds.png are read through the official
id -> train id table (cityscapesscripts labels.py: 7 road, 8 sidewalk, 11 building, ... 33 bicycle; every other
id, including the void ones, is ignored). No background: internal ids 1..19 = train id + 1 (bench.data.layout).

`cityscapes27`: the 27-class evaluation of the unsupervised benchmarks (STEGO, DiffSeg's benchmarks.ipynb; iSeg
Table 3 reports DiffSeg's protocol): the <..>_gtFine_labelIds.png maps, ids 7..33 (road .. bicycle, including
parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) -> classes 1..27 (DiffSeg: id - 7),
ids 0..6 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground) ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data.base import IGNORE_INDEX
from bench.data.layout import FileListDataset, class_names, lookup_table, missing, shifted_table, under
from bench.errors import BenchError

PREPARE = ("MMSegmentation's tools/dataset_converters/cityscapes.py (leftImg8bit_trainvaltest.zip and "
           "gtFine_trainvaltest.zip -> cityscapes/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png)")
IMAGE_SUFFIX = "_leftImg8bit.png"
# cityscapesscripts helpers/labels.py: label id -> train id of the 19 evaluated classes.
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class CityscapesDataset(FileListDataset):
    """`cityscapes`: 19 train ids, no background (iSeg Table 3 / Table 4 "Cityscapes")."""

    name = "cityscapes"
    has_background = False
    prepare = PREPARE

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if not root:
            raise BenchError("data=cityscapes needs data.root=<path to the cityscapes folder>")
        base = Path(root).expanduser()
        city = next((c for c in (base, base / "cityscapes") if (c / "leftImg8bit").is_dir()), None)
        if city is None:
            raise missing(self.name, under(base, "cityscapes") / "leftImg8bit", self.prepare)
        images = city / "leftImg8bit" / split
        if not images.is_dir():
            raise missing(self.name, images, self.prepare)
        items, self.label_ids = [], False
        for path in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = path.name[: -len(IMAGE_SUFFIX)]
            items.append((stem, path, city / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelTrainIds.png"))
        if items and not items[0][2].is_file():
            # the converter has not run: read the labelIds maps through the official table
            raw = items[0][2].with_name(f"{items[0][0]}_gtFine_labelIds.png")
            if not raw.is_file():
                raise missing(self.name, items[0][2], self.prepare)
            items = [(i, p, lbl.with_name(f"{i}_gtFine_labelIds.png")) for i, p, lbl in items]
            self.label_ids = True
        table = shifted_table(19)
        if self.label_ids:
            table = lookup_table(256, {k: v + 1 for k, v in LABEL_ID_TO_TRAIN_ID.items()}, IGNORE_INDEX, np.uint8)
        super().__init__(city, split, items, table, class_names("cityscapes", names, background=True),
                         class_names("cityscapes", "official", background=True))

    def describe(self) -> dict:
        return {**super().describe(), "labels": "labelIds" if self.label_ids else "labelTrainIds"}


class Cityscapes27Dataset(FileListDataset):
    """`cityscapes27`: label ids 7..33 as 27 classes, no background (iSeg Table 3 / DiffSeg "Cityscapes")."""

    name = "cityscapes27"
    has_background = False
    prepare = "the Cityscapes download as is (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)"

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if not root:
            raise BenchError("data=cityscapes27 needs data.root=<path to the cityscapes folder>")
        base = Path(root).expanduser()
        city = next((c for c in (base, base / "cityscapes") if (c / "leftImg8bit").is_dir()), None)
        if city is None or not (city / "leftImg8bit" / split).is_dir():
            raise missing(self.name, (city or under(base, "cityscapes")) / "leftImg8bit" / split, self.prepare)
        items = []
        for path in sorted((city / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")):
            stem = path.name[: -len(IMAGE_SUFFIX)]
            items.append((stem, path, city / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelIds.png"))
        if items and not items[0][2].is_file():
            raise missing(self.name, items[0][2], self.prepare)
        super().__init__(city, split, items, shifted_table(27, first=7),
                         class_names("cityscapes27", names, background=True),
                         class_names("cityscapes27", "official", background=True))
