"""PASCAL VOC 2012 in MMSegmentation's layout (docs/en/user_guides/2_dataset_prepare.md) under `data.root`:

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG: index = class id (0 background, 1-20), 255 void
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png     (split=aug only; mmseg's voc_aug.py from SBD, greyscale ids)
    VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt   train (1464) | val (1449) | trainval | aug

root may be the VOCdevkit folder, VOCdevkit/VOC2012, or its parent. Three datasets read it:
- `voc2012`: 21 classes, background included (MMSegmentation's PascalVOCDataset; iSeg Tables 1, 2 and 4);
- `voc20` (DEDOS / CAT-Seg "PAS-20"): the 20 object classes only; background pixels are ignored, exactly what
  CAT-Seg's prepare_voc.py writes to annotations_detectron2 (0 -> 255, k -> k - 1; here k stays k, see
  bench.data.layout). That script also skips images without an object pixel, which score nothing here;
- `voc20b` ("PAS-20b"): the same 20 classes plus background as a class, scored like `voc2012`
  (CAT-Seg's annotations_detectron2_bg maps 0 to class 20; the ids differ, the per-class IoUs do not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.base import IGNORE_INDEX, Sample, SegDataset
from bench.data.layout import FileListDataset, class_names, lookup_table, read_split_file
from bench.errors import BenchError

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
               "train", "tv monitor"]


PREPARE = ("MMSegmentation's dataset preparation: VOCtrainval_11-May-2012.tar unpacked to VOCdevkit/VOC2012 "
           "(+ tools/dataset_converters/voc_aug.py for split=aug)")


def find_voc_root(root: str | Path, name: str = "voc2012") -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    raise BenchError(f"dataset {name} not found at {root} (data.root: a VOC 2012 folder, VOCdevkit/VOC2012 with "
                     f"JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt); prepare it with {PREPARE}")


class VOCDataset(SegDataset):
    name = "voc2012"
    classes = VOC_CLASSES

    def __init__(self, root: str, split: str = "val"):
        if not root:
            raise BenchError("data=voc2012 needs data.root=<path to VOCdevkit/VOC2012>")
        self.root = find_voc_root(root)
        self.split = split
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise BenchError(f"split file {list_file} not found; use data.split=train|val|trainval")
        self.ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        card = self.root / "dataset.json"  # a synthetic dataset (bench.synthesize) names its own classes
        if card.is_file():
            import json

            classes = json.loads(card.read_text()).get("classes")
            if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
                self.classes = classes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        image = np.asarray(Image.open(self.root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        label_img = Image.open(self.root / "SegmentationClass" / f"{image_id}.png")
        if label_img.mode != "P":
            raise BenchError(f"{image_id}.png is not a palette PNG; VOC labels store class ids as palette indices")
        return Sample(image_id=image_id, image=image, label=np.asarray(label_img))

    def describe(self) -> dict:
        synthetic = (self.root / "dataset.json").is_file()  # a synthesised set in VOC's layout (bench.synthesize)
        return {**super().describe(), "root": str(self.root), "split": self.split,
                **({"synthetic": True} if synthetic else {})}


class VOC20Dataset(FileListDataset):
    """`voc20`: VOC's 20 object classes without background (background pixels ignored)."""

    name = "voc20"
    has_background = False
    prepare = PREPARE

    def __init__(self, root: str, split: str = "val", names: str = "prompt"):
        if not root:
            raise BenchError(f"data={self.name} needs data.root=<path to VOCdevkit/VOC2012>")
        voc = find_voc_root(root, self.name)
        ids = read_split_file(voc / "ImageSets" / "Segmentation" / f"{split}.txt", self.name, PREPARE)
        labels = voc / ("SegmentationClassAug" if split == "aug" else "SegmentationClass")
        items = [(i, voc / "JPEGImages" / f"{i}.jpg", labels / f"{i}.png") for i in ids]
        names_ = class_names("voc", names)
        official = class_names("voc", "official")
        table = self.voc_table()
        super().__init__(voc, split, items, table, names_, official)

    @staticmethod
    def voc_table():
        return lookup_table(256, {k: k for k in range(1, 21)}, IGNORE_INDEX, np.uint8)  # 0 (background) ignored


class VOC20bDataset(VOC20Dataset):
    """`voc20b`: the 20 object classes plus background as a scored class (the VOC 2012 ids)."""

    name = "voc20b"
    has_background = True

    @staticmethod
    def voc_table():
        return lookup_table(256, {k: k for k in range(21)}, IGNORE_INDEX, np.uint8)
