"""The generated pages of the manual (`docs/`): configuration keys, sweeps, datasets and methods, read from the code.

`mkdocs build` calls `pages()` through `docs/hooks.py`, so the reference cannot drift from `SweepConfig`, the
methods' `Param` declarations, the dataset registry and the sweep files. `python -m bench.docs_reference --out DIR`
writes the same pages to a folder (to read them without mkdocs).

Key descriptions come from the comment beside (or above) each field in `bench/config.py`; keys without one take
theirs from `KEY_HELP` below, and `undocumented_keys()` (tested) lists any key that has neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Descriptions of the keys whose declaration carries no comment in bench/config.py.
KEY_HELP = {
    "name": "run name: prefix of the run directory (`reports/runs/<name>-<timestamp>/`); one path component",
    "method": "a registered method (see Methods), or `compare` for several on the same traces",
    "description": "one or more sentences shown in reports and in the sweep list",
    "model": "the backbone: `name` (`embedded`, `sd21-base-arch`, `diffusers`), `path`, `id`, ...",
    "data": "the evaluated dataset: `name` plus that dataset's options (see Datasets); `limit`: first N images",
    "params": "fixed method parameters (see Methods); defaults are the paper's",
    "sweep": "swept method parameters: `{grid: [...]}`, `{choice: [...]}`, `{uniform: [lo, hi]}`, "
             "`{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`",
    "num_samples": "random-search draws of the non-grid parameters",
    "search_seed": "seed of the random draws of `num_samples`",
    "seeds": "noise / generation seeds; each one is a forward setting",
    "metric": "how predictions are scored",
    "paper": "the paper's published numbers for the side-by-side column: `table`, `param`, `metric`, `values`, "
             "`note`",
    "ray": "tracing: Ray Data actor pool or this process",
    "report": "what the report computes and shows",
    "train": "trained methods: how fits run (Ray Train workers, GPUs, Tune trials)",
    "fit": "trained methods: reuse existing fits",
    "search": "adaptive search of post-processing parameters (bench.search)",
    "output_dir": "the run directory (default `reports/runs/<name>-<timestamp>/`); an existing unfinished one "
                  "resumes",
    "overrides": "set by the command line (recorded in config.yaml); not written in sweep files",
    "sweep_file": "set by the command line (recorded in config.yaml); not written in sweep files",
    "model.name": "`embedded` (default, shipped), `sd21-base-arch` (SD 2.1-base architecture, random weights), "
                  "`diffusers`; `path` or `id` selects `diffusers` whatever `name` says",
    "model.path": "a diffusers Stable Diffusion 1.x/2.x folder (safetensors only)",
    "model.id": "a hub id resolved from the local Hugging Face cache only (no download)",
    "model.device": "`auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`",
    "model.dtype": "`auto` (fp16 on CUDA, fp32 on CPU), `float32`, `float16`, `bfloat16`",
    "model.random": "seeded random weights in the backbone's layout (mechanics, not quality)",
    "model.resolution": "feed images at this size (0: the model's native resolution)",
    "metric.protocol": "`mmseg` (MMSegmentation's IoUMetric), `iseg` (iSeg's released metric), `hungarian` "
                       "(unsupervised, segments matched to classes per image)",
    "metric.main": "the metric the report's table and plots lead with",
    "ray.address": "a running Ray cluster (`auto`), or none: a local one is started when needed",
    "ray.batch_size": "images per traced batch",
    "ray.object_store_mb": "object store size of a locally started Ray",
    "ray.quiet": "keep Ray's own console output out of the run's",
    "report.bootstrap": "bootstrap draws over images for the 95% intervals (one seed)",
    "report.qualitative": "images in the qualitative figure",
    "train.num_workers": "Ray Train workers per fit (DDP)",
    "train.use_gpu": "one GPU (or `gpus_per_worker`) per worker",
    "train.split": "the split fits learn from; fitting on the evaluated split is refused",
}


def _field_comments(cls) -> dict[str, str]:
    """Comment text of each dataclass field: the comment on its line, else the comment lines right above it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for number, line in enumerate(lines, start=1):
        match = re.match(r"\s+(\w+): [^=]+=", line)
        if not match:
            continue
        name = match.group(1)
        if number in comments:
            out[name] = comments[number]
            continue
        above, k = [], number - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _value(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, str) and value == "":
        return '`""`'
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_keys() -> list[dict]:
    """Every key of a sweep file, sections expanded: key, type, default, description."""
    from bench.config import SweepConfig

    rows = []
    top_help = _field_comments(SweepConfig)
    for f in dataclasses.fields(SweepConfig):
        section = SweepConfig.SECTIONS.get(f.name)
        rows.append({"key": f.name, "type": "section" if section else str(f.type),
                     "default": None if section else _default(f), "section": bool(section),
                     "help": top_help.get(f.name) or KEY_HELP.get(f.name, "")})
        if section is None:
            continue
        inverse = {v: k for k, v in section.KEY_NAMES.items()}
        comments = _field_comments(section)
        for sf in dataclasses.fields(section):
            key = f"{f.name}.{inverse.get(sf.name, sf.name)}"
            rows.append({"key": key, "type": str(sf.type), "default": _default(sf), "section": False,
                         "help": comments.get(sf.name) or KEY_HELP.get(key, "")})
    return rows


def undocumented_keys() -> list[str]:
    return [row["key"] for row in config_keys() if not row["help"]]


def config_page() -> str:
    rows = config_keys()
    header = ["| key | type | default | description |", "|---|---|---|---|"]

    def line(row):
        default = f"see [`{row['key']}`](#{row['key']})" if row["section"] else _value(row["default"])
        return f"| `{row['key']}` | {_cell(row['type'])} | {default} | {_cell(row['help'])} |"

    out = ["# Configuration reference", "",
           "Generated from `SweepConfig` (`bench/config.py`) when the site is built. Every key can be set in a sweep",
           "file or on the command line (`key=value`, `section.key=value`); unknown keys are errors with a",
           "\"did you mean\" suggestion, and nothing is written until the configuration validates.", "",
           "## Top-level keys", "", *header]
    out += [line(row) for row in rows if "." not in row["key"]]
    for section in (row for row in rows if row["section"]):
        out += ["", f"## {section['key']}", "", _cell(section["help"]), "", *header]
        out += [line(row) for row in rows if row["key"].startswith(section["key"] + ".")]
    return "\n".join(out) + "\n"


def sweeps_page(root: Path = ROOT) -> str:
    out = ["# Shipped sweeps", "",
           "Generated from `sweeps/*.yaml` when the site is built: each file's `method`, dataset and `description`.",
           "Run one with `python -m bench.run sweeps/<file>`.", "",
           "| file | method | dataset | description |", "|---|---|---|---|"]
    for path in sorted((root / "sweeps").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        data = raw.get("data") or {}
        dataset = data.get("name", "shapes") if isinstance(data, dict) else data
        out.append(f"| `{path.name}` | `{raw.get('method', '')}` | `{dataset}` | "
                   f"{_cell(' '.join(str(raw.get('description', '')).split()))} |")
    return "\n".join(out) + "\n"


def datasets_table() -> str:
    from bench.data import DATASETS

    out = ["| `data.name` | options (defaults) |", "|---|---|"]
    for name in DATASETS.names():
        options, _ = DATASETS.get(name)
        text = ", ".join(f"`{k}`: {_value(v)}" for k, v in options.items())
        out.append(f"| `{name}` | {text} |")
    return "\n".join(out) + "\n"


def param_table(method_name: str) -> str:
    from methods import METHODS

    cls = METHODS.get(method_name)
    out = [f"Method version {cls.version}. Parameters (`params.<name>=` or swept under `sweep:`); *train* values",
           "are fitted once each, *forward* values change the UNet pass, *post* values are scored on the same trace.",
           "", "| parameter | kind | default | allowed | description |", "|---|---|---|---|---|"]
    for kind in ("train", "forward", "post"):
        for name, p in sorted(cls.all_params().items()):
            if p.kind != kind:
                continue
            allowed = []
            if p.choices:
                allowed.append(" / ".join(f"`{c}`" for c in p.choices))
            if p.low is not None or p.high is not None:
                allowed.append(f"[{'' if p.low is None else p.low}, {'' if p.high is None else p.high}]")
            if p.positive:
                allowed.append("> 0")
            out.append(f"| `{name}` | {kind} | {_value(p.default)} | {_cell(', '.join(allowed))} | {_cell(p.help)} |")
    return "\n".join(out) + "\n"


def _readme_sections(text: str) -> dict[str, str]:
    """methods/README.md's `## ` sections by the method folder or file they name (`methods/<name>`)."""
    sections = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        match = re.search(r"`methods/(\w+)", title)
        sections[match.group(1) if match else title.strip().lower()] = (title.strip(), body.strip())
    return sections


def method_pages(root: Path = ROOT) -> dict[str, str]:
    """One page per registered method: its divergence table from methods/README.md (paper vs released code and
    the option that chooses) and its parameters from its `Param` declarations."""
    import importlib

    from methods import METHODS

    sections = _readme_sections((root / "methods" / "README.md").read_text())
    pages = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        module = cls.__module__.split(".")[1]
        if module in sections:
            title, body = sections[module]
            intro = body
        else:
            title = f"{name} (`{cls.__module__.replace('.', '/')}`)"
            doc = inspect.getdoc(importlib.import_module(cls.__module__)) or ""
            intro = doc
        pages[f"methods/{name}.md"] = "\n".join([
            f"# {title}", "", intro, "", "## Parameters", "", param_table(name)])
    shared = sections.get("shared")
    if shared:
        pages["methods/shared.md"] = f"# Shared choices (metrics, schedulers, inversion)\n\n{shared[1]}\n"
    return pages


def pages(root: Path = ROOT) -> dict[str, str]:
    """Every generated page, by its path under docs/."""
    out = {"reference/config.md": config_page(), "reference/sweeps.md": sweeps_page(root),
           "reference/datasets.md": "# Dataset registry\n\nGenerated from `bench.data.DATASETS` when the site is "
                                    "built; see [Datasets](../datasets.md) for what each one is.\n\n"
                                    + datasets_table()}
    out.update(method_pages(root))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.docs_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the generated pages into")
    args = parser.parse_args(argv)
    for rel, text in pages().items():
        path = Path(args.out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
