"""`voc2012`: PASCAL VOC 2012 segmentation in the standard VOCdevkit layout under `data.root`.

root may be the VOCdevkit folder, VOCdevkit/VOC2012, or its parent. Labels are the palette PNGs of
SegmentationClass (palette index = class id, 255 = ignore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.base import Sample, SegDataset
from bench.errors import BenchError

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
               "train", "tv monitor"]


def find_voc_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    raise BenchError(f"data.root={root} is not a VOC 2012 folder; expected VOCdevkit/VOC2012 with JPEGImages/, "
                     f"SegmentationClass/ and ImageSets/Segmentation/<split>.txt there")


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
        return {**super().describe(), "root": str(self.root), "split": self.split}
