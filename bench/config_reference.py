"""The configuration reference, read from the code that validates it: `SweepConfig` and its sections (key, type,
default, and the comment the declaration carries) and each method's `Param` declarations.

One source for `python -m bench.run --help` (`format_keys`) and the generated documentation page (`sweep_keys`,
`method_params`), so neither can drift from what a sweep file may say.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass

from bench.config import Section, SweepConfig

# Keys the composer fills in itself (never written in a sweep file).
INTERNAL_KEYS = ("overrides", "sweep_file")
# What the top-level keys are, where the declaration carries no comment of its own.
TOP_LEVEL_HELP = {
    "name": "run directory prefix (default: the sweep file's name)",
    "method": "a registered method (python -m bench.run --list)",
    "description": "one paragraph: what the sweep measures and which paper table it mirrors",
    "data": "the dataset: name (a registered dataset), limit (first N images) and the dataset's own options",
    "params": "fixed method parameters (defaults: the paper's)",
    "sweep": "swept method parameters: name: {grid | choice | uniform | loguniform | randint: [...]}",
    "num_samples": "random-search draws of the non-grid parameters",
    "search_seed": "seed of those draws",
    "seeds": "noise / generation seeds; each one is a forward setting",
    "paper": "the paper's numbers for the table: table, param, metric, values, note",
    "output_dir": "the run directory (default: reports/runs/<name>-<time>)",
}


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as written in an override (`ray.num_actors`)
    type: str
    default: object
    help: str = ""


def _field_comments(cls) -> dict[str, str]:
    """Comments written with a dataclass's fields: a trailing `# ...` on the field's line and the `# ...` lines
    just above it (joined), read from the class's source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    field_line = re.compile(r"^\s+([A-Za-z_]\w*)\s*:\s*[^=]+?(?:=\s*(.*?))?$")
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        code, _, trailing = line.partition("  # ")
        match = field_line.match(code)
        if match and not stripped.startswith(("def ", "@", "return")):
            text = " ".join([*above, trailing.strip()]).strip()
            out[match.group(1)] = " ".join(text.split())
        above = []
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_name(annotation) -> str:
    return str(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", annotation))


def section_keys(name: str, section: type[Section]) -> list[KeyDoc]:
    comments = _field_comments(section)
    inverse = {v: k for k, v in section.KEY_NAMES.items()}
    return [KeyDoc(f"{name}.{inverse.get(f.name, f.name)}", _type_name(f.type), _default(f), comments.get(f.name, ""))
            for f in dataclasses.fields(section)]


def sweep_keys() -> list[KeyDoc]:
    """Every key of a sweep file, in declaration order; a section's keys follow its name (`ray.num_actors`)."""
    out = []
    for f in dataclasses.fields(SweepConfig):
        if f.name in INTERNAL_KEYS:
            continue
        section = SweepConfig.SECTIONS.get(f.name)
        if section is not None:
            out += section_keys(f.name, section)
        else:
            out.append(KeyDoc(f.name, _type_name(f.type), _default(f), TOP_LEVEL_HELP.get(f.name, "")))
    return out


def method_params(method: str) -> list[KeyDoc]:
    """A method's parameters (`params.<name>` / `sweep.<name>`) from its `Param` declarations, with kind
    (train / forward / post), choices and bounds in the type column."""
    from methods import METHODS

    out = []
    for name, p in METHODS.get(method).all_params().items():
        kind = p.value_type.__name__ + (" | None" if p.nullable else "")
        if p.choices:
            kind = " | ".join(map(str, p.choices))
        bounds = [f">= {p.low:g}" if p.low is not None else "", f"<= {p.high:g}" if p.high is not None else "",
                  "> 0" if p.positive else ""]
        bounds = ", ".join(b for b in bounds if b)
        out.append(KeyDoc(name, f"{kind} ({p.kind}{', ' + bounds if bounds else ''})", p.default, p.help))
    return out


def fmt_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return str(value)


def format_keys(keys: list[KeyDoc], width: int = 110) -> str:
    """Aligned plain-text lines `key  type  default  help`, the help wrapped under itself."""
    import textwrap

    if not keys:
        return ""
    k_w = max(len(k.key) for k in keys)
    t_w = min(max(len(k.type) for k in keys), 22)
    d_w = min(max(len(fmt_default(k.default)) for k in keys), 18)
    indent = 2 + k_w + 2 + t_w + 2 + d_w + 2
    lines = []
    for k in keys:
        head = f"  {k.key:<{k_w}}  {k.type:<{t_w}}  {fmt_default(k.default):<{d_w}}  "
        wrapped = textwrap.wrap(k.help, max(30, width - indent)) or [""]
        if len(head) > indent:  # a long type or default: the help starts on the next line
            lines.append(head.rstrip())
            lines += [" " * indent + w for w in wrapped if w]
            continue
        lines.append(head + wrapped[0])
        lines += [" " * indent + w for w in wrapped[1:]]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(keys: list[KeyDoc]) -> str:
    """The same keys as a Markdown table (`key | type | default | meaning`), for the documentation."""

    def cell(text) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.key}` | {cell(k.type)} | `{cell(fmt_default(k.default))}` | {cell(k.help)} |" for k in keys]
    return "\n".join(lines)
