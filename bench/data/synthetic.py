"""Generation-mode datasets (OVAM Sec. 4.1): `voc_sim` and `coco_cap`.

Each sample is a generation prompt (`caption`) plus a per-image seed (`extra["seed"]`); in mode=generation the
evaluator generates the image from them and scores the methods' masks against the sample's label map.

Ground truth, two sources (the dataset's `generation_gt`):
  "annotated"  data.root=<folder> holds VOC-layout annotations of the images the backbone generates from those
               prompts and seeds: SegmentationClass/<image id>.png, palette index = class id (VOC ids for
               voc_sim). Only annotated samples are listed. The annotations must come from the same backbone,
               scheduler, steps and seeds, or they describe other images.
  "replay"     no root (the embedded default): the shapes generator renders each image and the UNet is run
               along the DDIM trajectory of THAT image (bench.forward.run_traced with images in generation
               mode: x_t = q(x_t | x_0) at every step, guided, both branches), so the traced "generated" image
               IS the rendered one and its ground truth is pixel-exact. voc_sim then becomes "A photograph of a
               <shape>" with one shape per image (the shape classes stand in for the VOC classes); coco_cap uses
               the shapes captions ("a red circle and a blue square").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.base import Sample, SegDataset
from bench.data.shapes import CLASSES as SHAPE_CLASSES
from bench.data.shapes import ShapesDataset
from bench.data.voc import VOC_CLASSES
from bench.errors import BenchError


def _read_label(path: Path) -> np.ndarray:
    img = Image.open(path)
    if img.mode not in ("P", "L"):
        raise BenchError(f"{path} is not a palette (or greyscale) PNG of class ids")
    return np.asarray(img)


def _annotation_dir(root: str) -> Path:
    folder = Path(root).expanduser()
    for candidate in (folder / "SegmentationClass", folder):
        if candidate.is_dir() and any(candidate.glob("*.png")):
            return candidate
    raise BenchError(f"data.root={root} holds no annotations; expected SegmentationClass/<image id>.png "
                     f"(palette index = class id)")


class VOCSim(SegDataset):
    """OVAM's VOC-sim: "A photograph of a <classname>" for each class x `seeds_per_class` seeds."""

    name = "voc_sim"

    def __init__(self, root: str | None = None, seeds_per_class: int = 30, seed_offset: int = 0,
                 template: str = "A photograph of a {name}", size: int = 512, split: str = "val"):
        self.template, self.size, self.root = template, size, root
        if root:
            self.classes, self.generation_gt = VOC_CLASSES, "annotated"
            folder = _annotation_dir(root)
        else:
            self.classes, self.generation_gt = SHAPE_CLASSES, "replay"
            self._shapes = ShapesDataset(num_images=(len(SHAPE_CLASSES) - 1) * seeds_per_class, size=size,
                                         seed=seed_offset, max_objects=1, min_objects=1, split=split)
        # Seed-major order (every class at seed s, then at seed s + 1, ...): any prefix (data.limit) covers
        # the classes evenly.
        self.items: list[tuple[int, int, str]] = []
        for s in range(seed_offset, seed_offset + seeds_per_class):
            for c in range(1, len(self.classes)):
                image_id = f"{self.classes[c].replace(' ', '_')}-{s:05d}"
                if root and not (folder / f"{image_id}.png").is_file():
                    continue
                self.items.append((c, s, image_id))
        self.folder = folder if root else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        c, seed, image_id = self.items[index]
        prompt = self.template.format(name=self.classes[c])
        if self.folder is not None:
            label = _read_label(self.folder / f"{image_id}.png")
            image = np.zeros((*label.shape, 3), np.uint8)  # generated at evaluation time
        else:
            objects = self._shapes.layout(index)
            objects[0]["shape"] = self.classes[c]
            image, label = self._shapes.render(objects, index)
        return Sample(image_id=f"voc_sim-{image_id}", image=image, label=label, caption=prompt,
                      extra={"seed": seed, "class_id": c})

    def describe(self) -> dict:
        return {**super().describe(), "generation_gt": self.generation_gt, "root": self.root,
                "template": self.template}


class COCOCap(SegDataset):
    """OVAM's COCO-cap: generation prompts from a user-supplied captions file (one caption per line, or
    `<image id><TAB><caption>`), seeds = line index + seed_offset, labels from data.root (VOC class ids).
    Without captions: the shapes captions, replayed (see the module docstring)."""

    name = "coco_cap"

    def __init__(self, captions: str | None = None, root: str | None = None, num_images: int = 100,
                 seed_offset: int = 0, size: int = 512, split: str = "val"):
        self.captions_file, self.root, self.size = captions, root, size
        self.seed_offset = seed_offset
        if captions:
            if not root:
                raise BenchError("data=coco_cap with captions= needs data.root=<annotations of the generated "
                                 "images> (no ground truth otherwise)")
            path = Path(captions).expanduser()
            if not path.is_file():
                raise BenchError(f"data.captions={captions} not found (one caption per line, or id<TAB>caption)")
            folder = _annotation_dir(root)
            self.classes, self.generation_gt = VOC_CLASSES, "annotated"
            self.items = []
            for i, line in enumerate(l for l in path.read_text().splitlines() if l.strip()):
                image_id, _, text = line.partition("\t") if "\t" in line else (f"{i:05d}", "", line)
                if (folder / f"{image_id.strip()}.png").is_file():
                    self.items.append((image_id.strip(), text.strip(), i + seed_offset))
            self.folder = folder
        else:
            self.classes, self.generation_gt = SHAPE_CLASSES, "replay"
            self._shapes = ShapesDataset(num_images=num_images, size=size, seed=seed_offset, split=split)
            self.items = [(f"{i:05d}", None, i + seed_offset) for i in range(num_images)]
            self.folder = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        image_id, caption, seed = self.items[index]
        if self.folder is not None:
            label = _read_label(self.folder / f"{image_id}.png")
            return Sample(image_id=f"coco_cap-{image_id}", image=np.zeros((*label.shape, 3), np.uint8),
                          label=label, caption=caption, extra={"seed": seed})
        s = self._shapes[index]
        return Sample(image_id=f"coco_cap-{image_id}", image=s.image, label=s.label, caption=s.caption,
                      extra={"seed": seed})

    def describe(self) -> dict:
        return {**super().describe(), "generation_gt": self.generation_gt, "captions": self.captions_file,
                "root": self.root}
