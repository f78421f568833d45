"""What every on-disk layout shares: a list of (image, label) file names found on the driver, decoded on access.

Construction only lists file names (a directory listing or a split file), so a large dataset costs the driver
its names; `__getitem__` opens one image and one label map, which the trace stage calls inside the Ray Data
actors (each actor builds its own dataset from the config and reads only the indices it is given).

Internal label ids (what methods, metrics and reports see). Class id 0 is always the background slot
(`SegDataset.classes[0]`), because methods label unassigned pixels 0:
- layouts with a background class (VOC, COCO-Object) keep their ids: 0 = background, k = class k;
- layouts without one (Context-59/459, COCO-Stuff, Cityscapes, ADE) shift their classes to 1..C and never put 0
  in the ground truth (`has_background = False`): the metrics leave the background slot out of the mean, so a
  pixel a method leaves as background is a miss of its true class and nothing else (MMSegmentation's
  reduce_zero_label / train-id evaluation over the C classes gives the same per-class IoUs).
Pixels the layout marks as unlabelled become `ignore_index`: 255 for label maps that fit in uint8, 65535 for the
uint16 maps of the 459- and 847-class layouts (whose class ids pass 255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.base import IGNORE_INDEX, Sample, SegDataset
from bench.errors import BenchError

CLASSES_DIR = Path(__file__).with_name("classes")
WIDE_IGNORE = 65535  # uint16 label maps (PC-459, ADE-847): the value CAT-Seg's converters write for "unlabelled"


def read_class_file(name: str) -> list[list[str]]:
    """Rows of `classes/<name>.txt` (comments dropped): [official, prompt, ...] per class, tab-separated."""
    rows = []
    for line in (CLASSES_DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            cells = line.split("\t")
            rows.append(cells if len(cells) > 1 else [cells[0], cells[0]])
    return rows


def class_names(name: str, which: str = "prompt", background: bool = False) -> list[str]:
    """The class names of list `name`: `prompt` (the names the papers prompt with) or `official`; with
    `background`, a leading background slot for layouts that have none (internal id 0)."""
    if which not in ("prompt", "official"):
        raise BenchError(f"data.names={which!r} must be prompt or official")
    column = 1 if which == "prompt" else 0
    names = [row[column] for row in read_class_file(name)]
    return ["background", *names] if background else names


def lookup_table(size: int, mapping: dict[int, int] | np.ndarray, ignore: int, dtype) -> np.ndarray:
    """A raw value -> internal id table of `size` entries: `mapping` where given, `ignore` elsewhere."""
    table = np.full(size, ignore, dtype=dtype)
    if isinstance(mapping, dict):
        for raw, internal in mapping.items():
            table[raw] = internal
    else:
        table[: len(mapping)] = mapping
    return table


def shifted_table(num_classes: int, ignore: int = IGNORE_INDEX, first: int = 0, dtype=np.uint8,
                  size: int = 256) -> np.ndarray:
    """Raw ids first..first+C-1 -> internal 1..C, every other value -> ignore (no-background layouts)."""
    return lookup_table(size, {first + k: k + 1 for k in range(num_classes)}, ignore, dtype)


def under(base: Path, folder: str) -> Path:
    """`base/folder`, or `base` itself when it already is that folder (for the expected path of an error)."""
    return base if base.name == folder else base / folder


def missing(name: str, path: Path, prepare: str) -> BenchError:
    """The one-line error for a layout that is not on disk."""
    return BenchError(f"dataset {name} not found at {path}; prepare it with {prepare}")


class FileListDataset(SegDataset):
    """A layout's (image id, image path, label path) triples; labels decoded through `table` (raw -> internal)."""

    name = "files"
    has_background = True
    ignore_index = IGNORE_INDEX
    prepare = ""  # how to prepare the layout (the "prepare it with ..." of the missing-data error)

    def __init__(self, root: Path, split: str, items: list[tuple[str, Path, Path]], table: np.ndarray,
                 classes: list[str], official_classes: list[str]):
        self.root, self.split, self.items, self.table = root, split, items, table
        self.classes, self.official_classes = classes, official_classes
        if not items:
            raise BenchError(f"dataset {self.name} at {root} lists no images for split {split}; "
                             f"prepare it with {self.prepare}")

    def __len__(self) -> int:
        return len(self.items)

    def read_label(self, index: int) -> np.ndarray:
        """The internal label map of image `index` (see the module docstring)."""
        path = self.items[index][2]
        try:
            raw = np.asarray(Image.open(path))
        except FileNotFoundError:
            raise BenchError(f"label {path} of dataset {self.name} is missing; prepare it with {self.prepare}") \
                from None
        if raw.ndim != 2:
            raise BenchError(f"label {path} is not a single-channel map of class ids ({raw.shape}); "
                             f"prepare it with {self.prepare}")
        direct = (raw.dtype == np.uint8 and len(self.table) >= 256) or (raw.dtype == np.uint16
                                                                         and len(self.table) >= 65536)
        if direct:
            return self.table[raw]
        values = raw.astype(np.int64)
        inside = (values >= 0) & (values < len(self.table))
        out = self.table[np.where(inside, values, 0)]
        out[~inside] = self.ignore_index
        return out

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.items):
            raise IndexError(index)
        image_id, image_path, _ = self.items[index]
        try:
            image = np.asarray(Image.open(image_path).convert("RGB"))
        except FileNotFoundError:
            raise BenchError(f"image {image_path} of dataset {self.name} is missing; prepare it with "
                             f"{self.prepare}") from None
        return Sample(image_id=image_id, image=image, label=self.read_label(index), ignore_index=self.ignore_index)

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "split": self.split, "ignore_index": self.ignore_index}


def read_split_file(path: Path, name: str, prepare: str) -> list[str]:
    if not path.is_file():
        raise missing(name, path, prepare)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def files_with_suffix(folder: Path, suffix: str, name: str, prepare: str) -> list[Path]:
    """Sorted files of `folder` whose name ends with `suffix` (names only; nothing is opened)."""
    if not folder.is_dir():
        raise missing(name, folder, prepare)
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
