"""`python -m bench.backbones SWEEP.yaml backbones=embedded,/models/sdxl,/models/sd3 [key=value ...]`: one sweep
on several backbones under one protocol, and a method x backbone table and plot (GoCA's question: do the
training-free segmentors improve with stronger backbones?).

Each backbone is one ordinary run (`bench.run`, a run directory of its own under `output_dir/<label>/`, loaded
once per tracing actor), with the same sweep, overrides, data and seeds; `embedded` is the embedded default, any
other entry a diffusers folder (`model.path=`) or, when no such folder exists, a hub id from the local cache
(`model.id=`). A finished backbone's run is kept and read back when the command runs again. The table reads each
run's results only. A backbone with random weights (run.json `backbone.random_weights`) is labelled so in the
table and its plot, and no conclusion is drawn from it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from bench.env import quiet_environment

quiet_environment()

from bench.errors import BenchError

log = logging.getLogger("bench.backbones")


def parse_backbones(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(backbones, the other overrides); `backbones=` is required, comma-separated."""
    spec = [o for o in overrides if o.startswith("backbones=")]
    rest = [o for o in overrides if not o.startswith("backbones=")]
    if not spec or not spec[-1].split("=", 1)[1].strip():
        raise BenchError("name the backbones: backbones=embedded,/path/to/diffusers/folder,... (embedded = the "
                         "default model)")
    if any(o.split("=", 1)[0].lstrip("+~").startswith("model.") and o.split("=", 1)[0].lstrip("+~") in
           ("model.path", "model.id", "model.name") for o in rest):
        raise BenchError("model.path / model.id / model.name are set per backbone by backbones=; drop them")
    names = [b.strip() for b in spec[-1].split("=", 1)[1].split(",") if b.strip()]
    if len(set(names)) != len(names):
        raise BenchError(f"backbones={spec[-1].split('=', 1)[1]} names a backbone twice")
    return names, rest


def backbone_overrides(backbone: str) -> list[str]:
    if backbone == "embedded":
        return ["model.name=embedded"]
    if Path(backbone).expanduser().exists():
        return [f"model.path={backbone}"]
    return [f"model.id={backbone}"]


def label(backbone: str) -> str:
    name = "embedded" if backbone == "embedded" else Path(backbone.rstrip("/")).name or backbone
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def run_backbones(sweep: str, overrides: list[str]) -> Path:
    from bench.config import compose
    from bench.run import run

    backbones, rest = parse_backbones(overrides)
    labels = [label(b) for b in backbones]
    if len(set(labels)) != len(labels):
        raise BenchError(f"backbones {', '.join(backbones)} share a folder name; give them distinct names")
    base = [o for o in rest if not o.startswith("output_dir=")]
    out = next((Path(o.split("=", 1)[1]) for o in rest if o.startswith("output_dir=")), None)
    cfg = compose(sweep, base)
    out = out or Path("reports") / "runs" / f"{cfg.name}_by_backbone"
    for backbone in backbones:  # every backbone's config and weights checked before any runs
        compose(sweep, [*base, *backbone_overrides(backbone)])
    runs = {}
    for backbone, name in zip(backbones, labels):
        target = out / name
        if (target / "run.json").is_file():
            log.info("backbone %s: finished run %s kept", backbone, target)
        else:
            log.info("backbone %s -> %s", backbone, target)
            run(sweep, [*base, *backbone_overrides(backbone), f"output_dir={target}"])
        runs[name] = target
    write_table(runs, out, cfg.metric.main)
    print(out)
    return out


def write_table(runs: dict[str, Path], out: Path, metric: str) -> None:
    """by_backbone.csv / .md / .png: the metric of every method (rows) on every backbone (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    columns, notes = {}, []
    for name, path in runs.items():
        frame = pd.read_csv(path / "results.csv")
        key = "method" if "method" in frame else "trial"
        prov = json.loads((path / "run.json").read_text())
        backbone = prov.get("backbone") or {}
        head = f"{name} ({backbone.get('family', '?')})"
        if backbone.get("random_weights"):
            head += " [random weights]"
            notes.append(f"{name} has random weights: its column tests the plumbing only; draw no conclusion "
                         f"from it.")
        columns[head] = frame.groupby(key)[metric].mean()
    table = pd.DataFrame(columns)
    table.index.name = "method"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "by_backbone.csv")
    lines = [f"# {metric} by method and backbone", "",
             "| method | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for method, row in table.iterrows():
        lines.append(f"| {method} | " + " | ".join("–" if pd.isna(v) else f"{v:.1f}" for v in row) + " |")
    lines += ["", *(f"- {n}" for n in notes), *([""] if notes else []),
              "Each column is the run directory of the same name (results.csv, run.json)."]
    (out / "by_backbone.md").write_text("\n".join(lines) + "\n")
    ax = table.plot.bar(figsize=(max(5, 1.2 * len(table)), 3.5), rot=0)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by backbone" + (" (random-weight backbones: plumbing only)" if notes else ""))
    plt.tight_layout()
    plt.savefig(out / "by_backbone.png", dpi=100)
    plt.close("all")


def main(argv: list[str] | None = None) -> int:
    from bench.run import sweep_command

    return sweep_command(argv, __doc__, "python -m bench.backbones SWEEP.yaml backbones=embedded,/path/a,... "
                         "[key=value ...]", run_backbones)


if __name__ == "__main__":
    from bench.env import exit_process

    exit_process(main())
