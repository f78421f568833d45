"""`python -m bench.data check NAME data.root=...`: what a dataset layout holds, on one screen.

For each split the layout knows: how many images it lists and how many of those have their image and label
file on disk; for the asked split (data.split, default val) the class list and the pixel frequencies of the
most frequent classes over a few evenly spaced label maps. A missing or malformed layout is the loader's own
one-line error ("dataset X not found at PATH; prepare it with ..."), exit 2.
"""

from __future__ import annotations

import numpy as np
import yaml

from bench.data import DATASETS, build_dataset, dataset_options
from bench.data.layout import FileListDataset
from bench.errors import BenchError

# The splits each layout may hold (the first one that exists is enough for `check` to succeed).
SPLITS = {"voc2012": ("train", "val", "trainval", "aug"), "voc20": ("train", "val", "trainval", "aug"),
          "voc20b": ("train", "val", "trainval", "aug"), "context59": ("train", "val"),
          "context60": ("train", "val"), "context459": ("val",), "coco_stuff171": ("train", "val"),
          "coco_stuff27": ("train", "val"), "coco_object": ("train", "val"), "cityscapes": ("train", "val", "test"),
          "cityscapes27": ("train", "val", "test"), "ade150": ("train", "val"), "ade847": ("val",)}


TEXT_OPTIONS = ("root", "split", "names", "image_list", "captions", "template")  # kept as written (paths, names)


def parse_overrides(items: list[str]) -> dict:
    """`data.root=/x data.limit=8` (the `data.` prefix is optional) -> {"root": "/x", "limit": 8}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"argument {item!r} is not key=value (e.g. data.root=/datasets/VOCdevkit)")
        key = key.removeprefix("data.")
        options[key] = value if key in TEXT_OPTIONS else yaml.safe_load(value)  # numbers typed, as overrides are
    return options


def _files_present(dataset) -> tuple[int, int]:
    """(images on disk, label maps on disk) among the listed items of a file-list layout."""
    items = getattr(dataset, "items", None)
    if items is None or not isinstance(dataset, FileListDataset):
        return len(dataset), len(dataset)
    return sum(p.is_file() for _, p, _ in items), sum(q.is_file() for _, _, q in items)


def class_frequencies(dataset, samples: int) -> tuple[np.ndarray, int]:
    """Pixel counts per class id over `samples` evenly spaced label maps, and the ignored pixels."""
    counts = np.zeros(len(dataset.classes), np.int64)
    ignored = 0
    for index in np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int)):
        label = dataset[int(index)].label
        ignore = getattr(dataset, "ignore_index", 255)
        ignored += int((label == ignore).sum())
        valid = label[(label != ignore) & (label < len(counts))].astype(np.int64)
        counts += np.bincount(valid.ravel(), minlength=len(counts))
    return counts, ignored


def check(name: str, options: dict, samples: int = 16, top: int = 8) -> str:
    """The report text; raises the loader's BenchError when the asked split is missing or malformed."""
    if name not in DATASETS:
        DATASETS.get(name)  # the registry's "did you mean" error
    split = options.get("split", "val")
    cfg = {"name": name, **options}
    dataset_options(cfg)  # unknown options: the usual one-line error
    dataset = build_dataset(cfg)  # the asked split: its error is the answer
    lines = [f"dataset {name}: {dataset.describe().get('root', '(generated)')}"]
    for other in SPLITS.get(name, (split,)):
        if other == split:
            found = dataset
        else:
            try:
                found = build_dataset({**cfg, "split": other})
            except BenchError:
                lines.append(f"  split {other:<9} absent")
                continue
        images, labels = _files_present(found)
        lines.append(f"  split {other:<9} {len(found):>7} listed, {images:>7} images, {labels:>7} label maps"
                     + ("   <- checked" if other == split else ""))
    background = "with" if getattr(dataset, "has_background", True) else "without"
    lines.append(f"  {len(dataset.classes) - (0 if dataset.has_background else 1)} classes, {background} "
                 f"background; ignore index {getattr(dataset, 'ignore_index', 255)}")
    counts, ignored = class_frequencies(dataset, samples)
    total = counts.sum() + ignored
    shown = min(samples, len(dataset))
    lines.append(f"  most frequent classes in {shown} label map(s) of split {split} (% of pixels):")
    for cid in np.argsort(-counts)[:top]:
        if counts[cid] == 0:
            break
        lines.append(f"    {cid:>4} {dataset.classes[cid]:<28} {100 * counts[cid] / max(total, 1):6.2f}")
    lines.append(f"    ignored {'':<28} {100 * ignored / max(total, 1):6.2f}")
    return "\n".join(lines)
