"""Datasets (`data=`), registered by name with the config options each accepts."""

from __future__ import annotations

import importlib

from bench.data.base import IGNORE_INDEX, Sample, SegDataset
from bench.errors import BenchError
from bench.registry import Registry, unknown_name_message

DATASETS: Registry = Registry("dataset", "data.name")


def _shapes_many(options: dict) -> SegDataset:
    from bench.data.shapes import ManyShapesDataset

    return ManyShapesDataset(**options)


def _shapes(options: dict) -> SegDataset:
    from bench.data.shapes import ShapesDataset

    return ShapesDataset(**options)


def _voc(options: dict) -> SegDataset:
    from bench.data.voc import VOCDataset

    return VOCDataset(**options)


def _voc_sim(options: dict) -> SegDataset:
    from bench.data.synthetic import VOCSim

    return VOCSim(**options)


def _coco_cap(options: dict) -> SegDataset:
    from bench.data.synthetic import COCOCap

    return COCOCap(**options)


# name -> (options with defaults, builder). `name` and `limit` (first N images) are common to all.
DATASETS.register("shapes")(({"num_images": 100, "size": 512, "seed": 0, "split": "val", "min_objects": 1,
                              "max_objects": 3}, _shapes))
DATASETS.register("shapes_many")(({"num_images": 100, "size": 512, "seed": 0, "split": "val", "min_objects": 1,
                                   "max_objects": 3}, _shapes_many))
DATASETS.register("voc2012")(({"root": None, "split": "val"}, _voc))
# The papers' real datasets in MMSegmentation's layouts (CAT-Seg's for PC-459 and ADE-847): one module per
# layout, each docstring states its paths and label encodings; class lists in bench/data/classes/.
_LAYOUTS = {"voc20": "voc:VOC20Dataset", "voc20b": "voc:VOC20bDataset",
            "context59": "context:Context59Dataset", "context60": "context:Context60Dataset",
            "context459": "context:Context459Dataset",
            "coco_stuff171": "coco:COCOStuff171Dataset", "coco_stuff27": "coco:COCOStuff27Dataset",
            "coco_object": "coco:COCOObjectDataset",
            "cityscapes": "cityscapes:CityscapesDataset", "cityscapes27": "cityscapes:Cityscapes27Dataset",
            "ade150": "ade:ADE150Dataset", "ade847": "ade:ADE847Dataset"}


def _layout_builder(target: str):
    def build(options: dict) -> SegDataset:
        module, cls = target.split(":")
        return getattr(importlib.import_module(f"bench.data.{module}"), cls)(**options)

    return build


for _name, _target in _LAYOUTS.items():
    _options = {"root": None, "split": "val", "names": "prompt"}
    if _name.startswith("coco"):
        _options["image_list"] = None
    DATASETS.register(_name)((_options, _layout_builder(_target)))
# Generation-mode datasets (OVAM Sec. 4.1); see bench.data.synthetic.
DATASETS.register("voc_sim")(({"root": None, "seeds_per_class": 30, "seed_offset": 0,
                               "template": "A photograph of a {name}", "size": 512, "split": "val"}, _voc_sim))
DATASETS.register("coco_cap")(({"captions": None, "root": None, "num_images": 100, "seed_offset": 0, "size": 512,
                                "split": "val"}, _coco_cap))


class Subset(SegDataset):
    """The first `limit` images of a dataset (`data.limit`)."""

    def __init__(self, base: SegDataset, limit: int):
        self.base, self.limit = base, min(limit, len(base))
        self.name, self.classes = base.name, base.classes
        self.has_background, self.ignore_index = base.has_background, base.ignore_index
        self.generation_gt = getattr(base, "generation_gt", None)  # generation-mode ground truth, if any

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.limit:
            raise IndexError(index)
        return self.base[index]

    def describe(self) -> dict:
        return {**self.base.describe(), "num_images": self.limit, "limit": self.limit}


def dataset_options(cfg: dict) -> dict:
    """Validated builder options of `data` (everything but name and limit)."""
    defaults, _ = DATASETS.get(cfg.get("name"))
    options = {k: v for k, v in cfg.items() if k not in ("name", "limit")}
    for key in options:
        if key not in defaults:
            raise BenchError(unknown_name_message(f"option of dataset {cfg['name']}", key,
                                                  sorted([*defaults, "name", "limit"]), "data"))
    for key, value in [("limit", cfg.get("limit")), *options.items()]:
        _check_option(key, value, defaults.get(key, 1))
    return {**defaults, **{k: v for k, v in options.items() if v is not None}}


# Options that count something (images, pixels, objects): a positive integer.
POSITIVE_OPTIONS = ("limit", "size", "num_images", "seeds_per_class", "min_objects", "max_objects")


def _check_option(key: str, value, default) -> None:
    """`data.<key>` against the type of its default (paths and templates are text); counts are >= 1."""
    if value is None:
        return
    expected = str if default is None else type(default)
    accepted = (int, float) if expected is float else expected  # an int is a valid float
    if expected is int and (not isinstance(value, int) or isinstance(value, bool)) or \
            expected is not int and not isinstance(value, accepted):
        raise BenchError(f"data.{key}={value!r} must be {expected.__name__}"
                         + (" (a whole number)" if expected is int else ""))
    if key in POSITIVE_OPTIONS and value < 1:
        raise BenchError(f"data.{key}={value} must be >= 1")
    if key in ("seed", "seed_offset") and value < 0:
        raise BenchError(f"data.{key}={value} must be >= 0")


# Options that name stored files: a local path, or a URI (s3://...) whose node-local copy the dataset reads.
STORED_OPTIONS = ("root", "captions", "image_list")


def local_options(options: dict) -> dict:
    """`options` with every URI among STORED_OPTIONS replaced by its copy in this node's cache (bench.node_cache:
    fetched once per node, keyed by the stored folder's fingerprint), so that every layout reads local files."""
    from bench.storage import is_uri

    stored = {k: v for k, v in options.items() if k in STORED_OPTIONS and isinstance(v, str) and is_uri(v)}
    if not stored:
        return options
    from bench.node_cache import local_path

    return {**options, **{k: str(local_path(v, "data", f"data.{k}")) for k, v in stored.items()}}


def _stored_describe(describe, stored: dict) -> dict:
    """A dataset read from a node-local copy describes itself by the URIs the user gave, not the copy's path."""
    return {**describe(), **{k: v for k, v in stored.items() if k in describe()}}


def build_dataset(cfg: dict) -> SegDataset:
    _, builder = DATASETS.get(cfg.get("name"))
    given = dataset_options(cfg)
    options = local_options(given)
    try:
        dataset = builder(options)
    except ValueError as err:  # a builder's own consistency check (e.g. shapes min_objects <= max_objects)
        raise BenchError(f"data ({cfg.get('name')}): {err}; fix the data options") from None
    limit = cfg.get("limit")
    if limit is not None:
        _check_option("limit", limit, 1)
        if int(limit) > len(dataset):
            dataset = _grown(cfg, options, builder, int(limit), len(dataset))
        dataset = Subset(dataset, int(limit))
    if options is not given:
        import functools

        stored = {k: v for k, v in given.items() if options.get(k) != v}
        dataset.describe = functools.partial(_stored_describe, dataset.describe, stored)
    if len(dataset) == 0:
        raise BenchError(f"dataset {cfg.get('name')} has no images; check data.root and data.split")
    return dataset


def _grown(cfg: dict, options: dict, builder, limit: int, size: int) -> SegDataset:
    """data.limit beyond the dataset: a generated dataset whose size the user left to its default grows to the
    limit (any prefix of it is the same images); otherwise the run is refused, never silently capped."""
    name = cfg.get("name")
    if "num_images" in options and cfg.get("num_images") is None:
        dataset = builder({**options, "num_images": limit})
        if len(dataset) >= limit:
            return dataset
    fix = f"data.num_images={limit} or " if "num_images" in options else ""
    raise BenchError(f"data.limit={limit} but dataset {name} has only {size} images; use {fix}data.limit<={size}")


def generation_gt(dataset: SegDataset) -> str | None:
    """How a dataset gives ground truth for generated images ("replay", "labels"), or None."""
    return getattr(getattr(dataset, "base", dataset), "generation_gt", None)


def require_generation_gt(dataset: SegDataset, mode: str) -> str | None:
    """The one check that mode=generation has ground truth; None in inversion mode."""
    if mode != "generation":
        return None
    kind = generation_gt(dataset)
    if not kind:
        raise BenchError(f"mode=generation needs ground truth for generated images, which dataset "
                         f"{dataset.name} does not provide; use mode=inversion or a generation dataset "
                         f"(data.name=voc_sim | coco_cap)")
    return kind


__all__ = ["DATASETS", "IGNORE_INDEX", "Sample", "SegDataset", "build_dataset", "dataset_options",
           "generation_gt", "require_generation_gt"]
