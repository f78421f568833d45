"""COCO in MMSegmentation's `coco_stuff164k` layout: `coco_stuff171`, `coco_stuff27`, `coco_object`.

MMSegmentation (docs/en/user_guides/2_dataset_prepare.md, tools/dataset_converters/coco_stuff164k.py):

    coco_stuff164k/images/{train2017,val2017}/<id>.jpg
    coco_stuff164k/annotations/{train2017,val2017}/<id>_labelTrainIds.png     value 0..170 = train id, 255 unlabelled
    coco_stuff164k/annotations/{train2017,val2017}/<id>_instanceTrainIds.png  (coco_object, see below)

The converter maps the raw stuffthingmaps ids (0..181 with eleven unused thing ids) to contiguous train ids
0..170 in MMSegmentation's COCOStuffDataset order (classes/coco_stuff171.txt). data.split=train|val selects
train2017|val2017 (the folder names are accepted too). Every image of the folder is listed (names only);
`image_list=<file>` restricts it to the ids in a text file (one id or file name per line, COCO 2014 names such as
COCO_val2014_000000182611 match by their number), e.g. a curated subset.

- `coco_stuff171` (DEDOS's training set, COCO-Stuff-171): no background; internal ids 1..171 = train id + 1.
- `coco_stuff27` (iSeg Table 3 "COCO-Stuff-27", unsupervised): the same label files, each train id mapped to its
  COCO-Stuff supercategory (12 things, 15 stuff; classes/coco_stuff171_to_27.txt, the grouping IIC / PiCIE /
  STEGO / DiffSeg evaluate with); internal ids 1..27, no background.
- `coco_object` (iSeg Table 2 "Object"): GroupViT's convert_dataset/convert_coco_object.py run on the same raw
  maps writes <id>_instanceTrainIds.png next to them: 0 = background (every stuff class, and the unlabelled
  pixels, which its uint8 arithmetic wraps from 256 to 0), 1..80 = the 80 thing classes. 81 classes with
  background, ids kept; a 255, if present, is ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data.base import IGNORE_INDEX
from bench.data.layout import (CLASSES_DIR, FileListDataset, class_names, files_with_suffix, lookup_table, missing,
                               shifted_table, under)
from bench.errors import BenchError

PREPARE = ("MMSegmentation's tools/dataset_converters/coco_stuff164k.py (train2017.zip, val2017.zip and "
           "stuffthingmaps_trainval2017.zip -> coco_stuff164k/annotations/<split>/*_labelTrainIds.png)")
PREPARE_OBJECT = ("GroupViT's convert_dataset/convert_coco_object.py on MMSegmentation's coco_stuff164k layout "
                  "(-> coco_stuff164k/annotations/<split>/*_instanceTrainIds.png)")
SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}


def find_coco_root(root: str | None, name: str, prepare: str) -> Path:
    if not root:
        raise BenchError(f"data={name} needs data.root=<path to coco_stuff164k or its parent>")
    base = Path(root).expanduser()
    for candidate in (base, base / "coco_stuff164k"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise missing(name, under(base, "coco_stuff164k") / "images", prepare)


def coco_items(root: str | None, split: str, suffix: str, name: str, prepare: str, image_list: str | None):
    if split not in SPLITS:
        raise BenchError(f"data.split={split!r} is not a COCO split; use train or val")
    coco = find_coco_root(root, name, prepare)
    folder = SPLITS[split]
    labels = files_with_suffix(coco / "annotations" / folder, suffix, name, prepare)
    items = [(p.name[: -len(suffix)], coco / "images" / folder / f"{p.name[: -len(suffix)]}.jpg", p) for p in labels]
    if image_list:
        path = Path(image_list).expanduser()
        if not path.is_file():
            raise BenchError(f"data.image_list={image_list} not found; give a text file of image ids, one per line")
        # ids, file names, or COCO 2014 names (COCO_val2014_000000182611): the 12-digit id is what 2017 uses
        wanted = {Path(line.strip()).stem.split("_")[-1] for line in path.read_text().splitlines() if line.strip()}
        items = [item for item in items if item[0] in wanted]
    return coco, items


def coarse_table() -> np.ndarray:
    """COCO-Stuff train id (0..170) -> COCO-Stuff-27 class (0..26), from classes/coco_stuff171_to_27.txt."""
    rows = [line.split("\t") for line in (CLASSES_DIR / "coco_stuff171_to_27.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    return np.array([int(coarse) for _, coarse, _ in rows], dtype=np.int64)


class COCOStuff171Dataset(FileListDataset):
    """`coco_stuff171`: COCO-Stuff 164k with its 171 classes, no background."""

    name = "coco_stuff171"
    has_background = False
    prepare = PREPARE

    def __init__(self, root: str, split: str = "val", names: str = "prompt", image_list: str | None = None):
        coco, items = coco_items(root, split, "_labelTrainIds.png", self.name, self.prepare, image_list)
        super().__init__(coco, split, items, self.table_(), class_names(self.list_name(), names, background=True),
                         class_names(self.list_name(), "official", background=True))

    @staticmethod
    def list_name() -> str:
        return "coco_stuff171"

    @staticmethod
    def table_() -> np.ndarray:
        return shifted_table(171)


class COCOStuff27Dataset(COCOStuff171Dataset):
    """`coco_stuff27`: COCO-Stuff 164k with the 171 classes grouped into 27 supercategories, no background."""

    name = "coco_stuff27"

    @staticmethod
    def list_name() -> str:
        return "coco_stuff27"

    @staticmethod
    def table_() -> np.ndarray:
        return lookup_table(256, {k: int(c) + 1 for k, c in enumerate(coarse_table())}, IGNORE_INDEX, np.uint8)


class COCOObjectDataset(FileListDataset):
    """`coco_object`: COCO's 80 thing classes plus background."""

    name = "coco_object"
    has_background = True
    prepare = PREPARE_OBJECT

    def __init__(self, root: str, split: str = "val", names: str = "prompt", image_list: str | None = None):
        coco, items = coco_items(root, split, "_instanceTrainIds.png", self.name, self.prepare, image_list)
        table = lookup_table(256, {k: k for k in range(81)}, IGNORE_INDEX, np.uint8)
        super().__init__(coco, split, items, table, class_names("coco_object", names),
                         class_names("coco_object", "official"))
