"""The backbone as a sweep axis: `models: [embedded, /models/sdxl, org/hub-id]` (or `models=embedded,/models/sdxl`
on the command line) runs the sweep's every configuration on each backbone under one protocol, in one run.

An entry is a registered model name (`embedded`, the default model), a diffusers folder, local or stored
(`model.path`, e.g. s3://bucket/models/sdxl) or,
when no such folder exists, a hub id already in the local cache (`model.id`). Every other `model.*` option
(device, dtype, resolution, ...) applies to every backbone. Each backbone gets a label (its folder's name, the
hub id's last part, or the registered name): the results' `model` column, the per-backbone shard folder
(`work/shards/<label>/`) and the column of the method x backbone table (bench.reporting.backbones).

The backbone is the plan's outermost group (bench.plan): each backbone's fits and one trace pass run before the
next backbone's, so a tracing actor (or the driver) loads one backbone once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError


@dataclass(frozen=True)
class BackboneEntry:
    """One entry of `models:` resolved: its label and the `model:` options that load it."""

    entry: str  # as the user wrote it
    label: str  # a folder-safe name: the results' `model` column
    options: dict  # name / path / id, replacing the sweep's own


def resolve_entry(entry: str) -> BackboneEntry:
    """embedded (or any registered model name) | an existing diffusers folder -> model.path | else a cached hub id
    -> model.id (its existence is checked with the rest of the model's options: bench.config.validate)."""
    from bench.models import MODELS
    from bench.storage import is_uri

    text = str(entry).strip()
    if text in MODELS.names() and text != "diffusers":
        return BackboneEntry(text, text, {"name": text, "path": None, "id": None})
    if is_uri(text) or Path(text).expanduser().exists():  # a stored folder (s3://...) is copied by each node
        return BackboneEntry(text, entry_label(text), {"path": text, "id": None})
    return BackboneEntry(text, entry_label(text), {"path": None, "id": text})


def entry_label(entry: str) -> str:
    """A folder's or hub id's last part, reduced to letters, digits, '.', '_' and '-'."""
    name = Path(entry.rstrip("/")).name or entry
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip(".-")
    return name or "model"


def resolve_models(models: list) -> list[BackboneEntry]:
    """The `models:` list resolved; a malformed list, an empty entry or two entries of one label are refused."""
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise BenchError(f"models={models!r} must be a list of backbones: embedded, diffusers folders or cached hub "
                         f"ids (models=embedded,/models/sdxl)")
    entries = [resolve_entry(m) for m in models]
    seen: dict[str, str] = {}
    for item in entries:
        if item.label in seen:
            raise BenchError(f"models entries {seen[item.label]} and {item.entry} share the label {item.label}; "
                             f"give the folders distinct names")
        seen[item.label] = item.entry
    return entries


def backbone_config(cfg, item: BackboneEntry):
    """The sweep's config on one backbone: its `model:` section with the entry's name / path / id, no `models`."""
    model = dataclasses.replace(cfg.model, **{k: v for k, v in item.options.items()})
    return dataclasses.replace(cfg, model=model, models=[])


def backbone_configs(cfg) -> list[tuple[BackboneEntry, object]]:
    """(entry, config on that backbone) for every backbone of the sweep, in the order given."""
    return [(item, backbone_config(cfg, item)) for item in resolve_models(cfg.models)]


def check_models(cfg) -> None:
    """`models:` validated before anything runs: each entry's model options (folder, family, hub cache, transformer
    options) checked as `model:` is, and any error is one line naming the entry; `model.path` / `model.id` and
    adaptive search are refused beside it."""
    from bench.models import validate_model_config

    if cfg.model.path or cfg.model.id:
        raise BenchError("models= sets model.path / model.id per backbone; drop model.path / model.id (or list that "
                         "backbone in models=)")
    if cfg.search.algo is not None:
        raise BenchError("search.algo searches one backbone; drop models= or search, and run one search per backbone")
    for item, sub in backbone_configs(cfg):
        try:
            validate_model_config(sub.model.as_dict())
        except BenchError as err:
            raise BenchError(f"models entry {item.entry}: {err}") from None
