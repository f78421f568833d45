"""The configuration reference, read from the code that validates it: `SweepConfig` and its sections (key, type,
default, and the comment the declaration carries) and each method's `Param` declarations.

The one source of what keys and parameters exist: `python -m bench.run --help` prints it (`format_keys`) and the
manual's generated pages (bench.docs_reference) show it (`markdown_table`), so neither can drift from what a
sweep file may say. A key's description is the comment beside (or right above) its declaration in
`bench/config.py`; keys whose declaration carries none take theirs from `KEY_HELP`, and `undocumented_keys()`
(tested) lists any key that has neither.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass

import yaml

from bench.config import Section, SweepConfig

# Keys the composer fills in itself (never written in a sweep file).
INTERNAL_KEYS = ("overrides", "sweep_file")

# Descriptions of the keys whose declaration in bench/config.py carries no comment.
KEY_HELP = {
    "name": "run name: prefix of the run directory (`reports/runs/<name>-<timestamp>/`), one path component; "
            "default: the sweep file's name",
    "method": "a registered method (`python -m bench.run --list`), or `compare` for several on the same traces",
    "description": "one or more sentences: what the sweep measures and which paper table it mirrors (shown in "
                   "reports and in the sweep list)",
    "model": "the backbone: `name` (`embedded`, `sd21-base-arch`, `diffusers`), `path`, `id`, ...",
    "data": "the evaluated dataset: `name` (a registered dataset) plus that dataset's options; `limit`: first N "
            "images",
    "params": "fixed method parameters (`python -m bench.run --help METHOD`); defaults are the paper's",
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
    "model.path": "a diffusers pipeline folder (safetensors only): a local path, or a URI (`s3://...`) that "
                  "each node copies once into its cache (`DIFFSEG_CACHE`)",
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


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as written in an override (`ray.num_actors`); a method parameter's own name
    type: str  # the value's type (`int | str`); `section` for a section's own entry
    default: object
    help: str = ""
    section: bool = False  # a section's own entry: its keys follow as `<key>.<name>`
    kind: str = ""  # a method parameter's kind: train | forward | post
    choices: tuple = ()  # a method parameter's allowed values
    bounds: tuple[str, ...] = ()  # ... and its declared range (`>= 0`, `<= 1`, `> 0`)


def field_comments(cls) -> dict[str, str]:
    """The comment written with each dataclass field: the `# ...` lines right above its declaration and the one
    on its line, joined (read from the class's source with the tokenizer, so a `#` inside a string is no
    comment)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for number, line in enumerate(lines, start=1):
        match = re.match(r"    (\w+)\s*:", line)  # a declaration in the class body (not in a method's)
        if not match:
            continue
        above, k = [], number - 1
        while k in comments and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        text = " ".join([*above, comments.get(number, "")])
        if text.strip():
            out[match.group(1)] = " ".join(text.split())
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_name(annotation) -> str:
    return str(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", annotation))


def config_keys() -> list[KeyDoc]:
    """Every key of `SweepConfig` in declaration order: each section's own entry followed by its keys
    (`ray`, `ray.address`, ...), and the keys the composer fills in (INTERNAL_KEYS)."""
    out = []
    top_comments = field_comments(SweepConfig)
    for f in dataclasses.fields(SweepConfig):
        section = SweepConfig.SECTIONS.get(f.name)
        help_text = top_comments.get(f.name) or KEY_HELP.get(f.name, "")
        if section is None:
            out.append(KeyDoc(f.name, _type_name(f.type), _default(f), help_text))
            continue
        out.append(KeyDoc(f.name, "section", None, help_text, section=True))
        out += section_keys(f.name, section)
    return out


def section_keys(name: str, section: type[Section]) -> list[KeyDoc]:
    """A section's keys under their YAML spelling (`fit.from`, not the attribute `source`)."""
    comments = field_comments(section)
    inverse = {v: k for k, v in section.KEY_NAMES.items()}
    out = []
    for f in dataclasses.fields(section):
        key = f"{name}.{inverse.get(f.name, f.name)}"
        out.append(KeyDoc(key, _type_name(f.type), _default(f), comments.get(f.name) or KEY_HELP.get(key, "")))
    return out


def sweep_keys() -> list[KeyDoc]:
    """Every key a sweep file or an override may set, in declaration order (sections expanded in place)."""
    return [k for k in config_keys() if not k.section and k.key not in INTERNAL_KEYS]


def undocumented_keys() -> list[str]:
    """Keys with neither a comment on their declaration nor an entry in KEY_HELP."""
    return [k.key for k in config_keys() if not k.help]


def method_params(method: str) -> list[KeyDoc]:
    """A method's parameters (`params.<name>` / `sweep.<name>`) from its `Param` declarations, in declaration
    order: type, default, kind (train / forward / post), choices and bounds."""
    from methods import METHODS

    out = []
    for name, p in METHODS.get(method).all_params().items():
        bounds = ((f">= {p.low:g}",) if p.low is not None else ()) + \
                 ((f"<= {p.high:g}",) if p.high is not None else ()) + (("> 0",) if p.positive else ())
        out.append(KeyDoc(name, p.value_type.__name__ + (" | None" if p.nullable else ""), p.default, p.help,
                          kind=p.kind, choices=tuple(p.choices or ()), bounds=bounds))
    return out


def fmt_default(value) -> str:
    """A default as it is written in a sweep file (YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    if isinstance(value, (dict, list, tuple)):
        try:
            return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                                  sort_keys=False, width=10_000).strip().removesuffix("...").strip()
        except yaml.YAMLError:
            return str(value)
    return str(value)


def type_text(k: KeyDoc) -> str:
    """The plain-text type column: the type, or a parameter's choices, then its kind and bounds
    (`float (post, >= 0)`)."""
    text = " | ".join(map(str, k.choices)) if k.choices else k.type
    extra = ", ".join(b for b in (k.kind, *k.bounds) if b)
    return f"{text} ({extra})" if extra else text


def format_keys(keys: list[KeyDoc], width: int = 110) -> str:
    """Aligned plain-text lines `key  type  default  help`, the help wrapped under itself."""
    if not keys:
        return ""
    k_w = max(len(k.key) for k in keys)
    t_w = min(max(len(type_text(k)) for k in keys), 22)
    d_w = min(max(len(fmt_default(k.default)) for k in keys), 18)
    indent = 2 + k_w + 2 + t_w + 2 + d_w + 2
    lines = []
    for k in keys:
        head = f"  {k.key:<{k_w}}  {type_text(k):<{t_w}}  {fmt_default(k.default):<{d_w}}  "
        wrapped = textwrap.wrap(k.help, max(30, width - indent)) or [""]
        if len(head) > indent:  # a long type or default: the help starts on the next line
            lines.append(head.rstrip())
            lines += [" " * indent + w for w in wrapped if w]
            continue
        lines.append(head + wrapped[0])
        lines += [" " * indent + w for w in wrapped[1:]]
    return "\n".join(line.rstrip() for line in lines)


def md_cell(text) -> str:
    """Text for one Markdown table cell: one line; outside code spans `|` escaped and `<...>` shown rather than
    taken for an HTML tag (`<run>/work`); inside them left as written (a code span shows `\\|` literally)."""
    parts = " ".join(str(text).split()).split("`")
    return "`".join(re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p.replace("|", "\\|")) if i % 2 == 0 else p
                    for i, p in enumerate(parts))


def md_code(text) -> str:
    """Text as one inline code span of a table cell."""
    text = " ".join(str(text).split())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def markdown_table(keys: list[KeyDoc]) -> str:
    """The same keys as a Markdown table: `key | type | default | meaning`; method parameters also show their
    kind and what values are allowed. A section's own entry links to its heading (`## <section>`)."""

    def default(k: KeyDoc) -> str:
        return f"see [`{k.key}`](#{k.key})" if k.section else md_code(fmt_default(k.default))

    if any(k.kind for k in keys):
        lines = ["| parameter | kind | type | default | allowed | meaning |", "|---|---|---|---|---|---|"]
        for k in keys:
            allowed = [" / ".join(md_code(c) for c in k.choices)] if k.choices else []
            allowed = ", ".join(allowed + [md_cell(b) for b in k.bounds])
            lines.append(f"| `{k.key}` | {k.kind} | {md_cell(k.type)} | {default(k)} | {allowed} | "
                         f"{md_cell(k.help)} |")
        return "\n".join(lines)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.key}` | {md_cell(k.type)} | {default(k)} | {md_cell(k.help)} |" for k in keys]
    return "\n".join(lines)
