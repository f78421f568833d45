"""The generated pages of the manual (`docs/`): configuration keys, sweeps, datasets and methods, read from the code.

`mkdocs build` calls `pages()` through `docs/hooks.py`, so the reference cannot drift from `SweepConfig`, the
methods' `Param` declarations, the dataset registry and the sweep files. `python -m bench.docs_reference --out DIR`
writes the same pages to a folder (to read them without mkdocs).

What keys and parameters exist, with their types, defaults and descriptions, is bench.config_reference's (the
source `python -m bench.run --help` prints too); this module lays them out as pages.
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import yaml

from bench.config_reference import (
    config_keys,
    fmt_default,
    markdown_table,
    md_cell,
    md_code,
    method_params,
)

ROOT = Path(__file__).resolve().parents[1]


def config_page() -> str:
    """The configuration reference: the top-level keys, then one table per section."""
    keys = config_keys()
    out = ["# Configuration reference", "",
           "Generated from `SweepConfig` (`bench/config.py`) when the site is built. Every key can be set in a sweep",
           "file or on the command line (`key=value`, `section.key=value`); unknown keys are errors with a",
           "\"did you mean\" suggestion, and nothing is written until the configuration validates.",
           "`python -m bench.run --help` prints the same list.", "",
           "## Top-level keys", "", markdown_table([k for k in keys if "." not in k.key])]
    for section in (k for k in keys if k.section):
        out += ["", f"## {section.key}", "", md_cell(section.help), "",
                markdown_table([k for k in keys if k.key.startswith(section.key + ".")])]
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
                   f"{md_cell(raw.get('description', ''))} |")
    return "\n".join(out) + "\n"


def datasets_table() -> str:
    from bench.data import DATASETS

    out = ["| `data.name` | options (defaults) |", "|---|---|"]
    for name in DATASETS.names():
        options, _ = DATASETS.get(name)
        text = ", ".join(f"`{k}`: {md_code(fmt_default(v))}" for k, v in options.items())
        out.append(f"| `{name}` | {text} |")
    return "\n".join(out) + "\n"


def param_table(method_name: str) -> str:
    """A method's parameters grouped by kind (train, forward, post), each group in declaration order."""
    from methods import METHODS

    params = method_params(method_name)
    ordered = [p for kind in ("train", "forward", "post") for p in params if p.kind == kind]
    return "\n".join([
        f"Method version {METHODS.get(method_name).version}. Parameters (`params.<name>=` or swept under `sweep:`;",
        f"`python -m bench.run --help {method_name}` prints them too): *train* values are fitted once each,",
        "*forward* values change the UNet pass, *post* values are scored on the same trace.", "",
        markdown_table(ordered)]) + "\n"


def _readme_sections(text: str) -> dict[str, str]:
    """methods/README.md's `## ` sections by the method folder or file they name (`methods/<name>`)."""
    sections = {}
    for block in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
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
