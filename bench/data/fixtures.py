"""Tiny datasets in each real on-disk layout, rendered from `shapes` scenes (tests, `python -m bench.data check`).

`write_fixture(name, root)` writes a few shapes scenes where the layout expects them (folder names, file
names, split files, image format, label encoding) and returns what it wrote: the `data.root` to pass and the
raw label maps. Each shape class is written as one of the layout's own raw class values (`RAW_CLASSES`), the
scene's background as the layout's background / unlabelled / a stuff value, and a 2-pixel frame as the layout's
void value where it has one, so a loader that reads the wrong folder, suffix, dtype or encoding fails its test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.shapes import ShapesDataset

# Per layout: (raw value of the scene background, raw value of the void frame or None, raw values of the five
# shapes). Values follow each layout's encoding (see its module): e.g. VOC palette ids, COCO-Stuff train ids.
RAW_CLASSES: dict[str, tuple[int, int | None, tuple[int, ...]]] = {
    "voc2012": (0, 255, (15, 8, 12, 7, 3)),            # person, cat, dog, car, bird
    "voc20": (0, 255, (15, 8, 12, 7, 3)),
    "voc20b": (0, 255, (15, 8, 12, 7, 3)),
    "context59": (0, None, (37, 15, 23, 14, 59)),      # 0 = background; person, cat, dog, car, wood
    "context60": (0, None, (37, 15, 23, 14, 59)),      # 0 = background, scored
    "context459": (188, 65535, (283, 64, 112, 58, 458)),  # ground; person, cat, dog, car, wool (0-based)
    "coco_stuff171": (112, 255, (0, 15, 16, 2, 14)),   # grass; person, cat, dog, car, bird
    "coco_stuff27": (112, 255, (0, 15, 16, 2, 137)),   # grass; person, cat, dog, car, road
    "coco_object": (0, 255, (1, 16, 17, 3, 15)),       # background; person, cat, dog, car, bird (train id + 1)
    "cityscapes": (0, 255, (11, 13, 18, 2, 10)),       # road; person, car, bicycle, building, sky
    "cityscapes27": (7, 0, (24, 26, 33, 11, 23)),      # label ids: road; person, car, bicycle, building, sky
    "ade150": (0, None, (13, 21, 3, 5, 150)),          # 0 = other; person, car, sky, tree, flag
    "ade847": (0, 65535, (11, 14, 2, 3, 846)),         # wall; person, car, sky, tree, the last class
}
SPLIT_DIRS = {"coco": {"train": "train2017", "val": "val2017"}, "ade": {"train": "training", "val": "validation"}}


@dataclass
class Fixture:
    name: str
    root: Path  # what data.root should be
    split: str
    ids: list[str] = field(default_factory=list)
    raw_labels: list[np.ndarray] = field(default_factory=list)  # as written, one per image
    images: list[np.ndarray] = field(default_factory=list)


def raw_scene(name: str, shape_label: np.ndarray) -> np.ndarray:
    """A shapes label map (0 background, 1..5 shapes) in layout `name`'s raw encoding, void frame included."""
    background, void, shapes = RAW_CLASSES[name]
    wide = max(shapes + (background, void or 0)) > 255
    raw = np.full(shape_label.shape, background, dtype=np.uint16 if wide else np.uint8)
    for k, value in enumerate(shapes, start=1):
        raw[shape_label == k] = value
    if void is not None:
        raw[:2, :], raw[-2:, :], raw[:, :2], raw[:, -2:] = void, void, void, void
    return raw


def _save_png(array: np.ndarray, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # palette index = class id, as VOC's SegmentationClass PNGs store it
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.astype(np.uint8).tobytes())
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    else:
        img = Image.fromarray(array)
    img.save(path)


def _save_tif(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint16)).save(path, "TIFF")


def _save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_fixture(name: str, root: str | Path, split: str = "val", num_images: int = 3, size: int = 40,
                  seed: int = 0) -> Fixture:
    """Render `num_images` shapes scenes into layout `name` under `root`."""
    root = Path(root)
    scenes = ShapesDataset(num_images=num_images, size=size, seed=seed, split=split)
    fx = Fixture(name, root, split)
    for i in range(num_images):
        sample = scenes[i]
        raw = raw_scene(name, sample.label)
        image_id = _write_one(name, root, split, i, sample.image, raw)
        fx.ids.append(image_id)
        fx.raw_labels.append(raw)
        fx.images.append(sample.image)
    _write_lists(name, root, split, fx.ids)
    return fx


def _write_one(name: str, root: Path, split: str, i: int, image: np.ndarray, raw: np.ndarray) -> str:
    if name.startswith("voc"):
        image_id = f"2007_{i:06d}"
        voc = root / "VOCdevkit" / "VOC2012"
        _save_image(image, voc / "JPEGImages" / f"{image_id}.jpg")
        _save_png(raw, voc / "SegmentationClass" / f"{image_id}.png", palette=True)
    elif name in ("context59", "context60"):
        image_id = f"2008_{i:06d}"
        voc = root / "VOCdevkit" / "VOC2010"
        _save_image(image, voc / "JPEGImages" / f"{image_id}.jpg")
        _save_png(raw, voc / "SegmentationClassContext" / f"{image_id}.png")
    elif name == "context459":
        image_id = f"2008_{i:06d}"
        voc = root / "VOCdevkit" / "VOC2010"
        _save_image(image, voc / "JPEGImages" / f"{image_id}.jpg")
        _save_tif(raw, voc / "annotations_detectron2" / "pc459_val" / f"{image_id}.tif")
    elif name.startswith("coco"):
        image_id = f"{i + 139:012d}"
        coco, folder = root / "coco_stuff164k", SPLIT_DIRS["coco"][split]
        _save_image(image, coco / "images" / folder / f"{image_id}.jpg")
        if name == "coco_object":
            _save_png(raw, coco / "annotations" / folder / f"{image_id}_instanceTrainIds.png")
        else:
            _save_png(raw, coco / "annotations" / folder / f"{image_id}_labelTrainIds.png")
    elif name.startswith("cityscapes"):
        city = ["aachen", "lindau"][i % 2]
        image_id = f"{city}_000000_{i:06d}"
        base = root / "cityscapes"
        _save_image(image, base / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png")
        kind = "labelIds" if name == "cityscapes27" else "labelTrainIds"
        _save_png(raw, base / "gtFine" / split / city / f"{image_id}_gtFine_{kind}.png")
    elif name == "ade150":
        image_id = f"ADE_{split}_{i + 1:08d}"
        ade, folder = root / "ADEChallengeData2016", SPLIT_DIRS["ade"][split]
        _save_image(image, ade / "images" / folder / f"{image_id}.jpg")
        _save_png(raw, ade / "annotations" / folder / f"{image_id}.png")
    elif name == "ade847":
        image_id = f"ADE_frame_{i:08d}"
        ade = root / "ADE20K_2021_17_01"
        _save_image(image, ade / "images_detectron2" / "validation" / f"{image_id}.jpg")
        _save_tif(raw, ade / "annotations_detectron2" / "validation" / f"{image_id}.tif")
    else:
        raise ValueError(f"no fixture writer for layout {name!r}")
    return image_id


def _write_lists(name: str, root: Path, split: str, ids: list[str]) -> None:
    """The split files the layout reads its image ids from (VOC, Context-59)."""
    if name.startswith("voc"):
        folder = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    elif name in ("context59", "context60"):
        folder = root / "VOCdevkit" / "VOC2010" / "ImageSets" / "SegmentationContext"
    else:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


FIXTURE_LAYOUTS = tuple(RAW_CLASSES)
