"""Whether a run measures what a paper's table measures, and whether it reproduces it.

A sweep's `paper:` section states the paper's setup: `backbone` (the model family, e.g. sd2.1), `dataset` (the
dataset layout's name, e.g. voc2012) and `protocol` (the metric protocol), plus `tolerance`, the largest
|ours - paper| in metric points that counts as reproducing the table. A report shows the paper's number and the
delta only where the run's backbone family, dataset and protocol are the paper's; otherwise the column says
why it is hidden. Where they match, each row gets a verdict: "reproduced" when |delta| <= tolerance.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

# backbone families by the name of a diffusers model id or folder (lower case), first match wins
_SD = r"(?:stable-?diffusion|sd)[-_ ]?v?"
FAMILIES = (("sdxl", r"xl"), ("sd3", _SD + r"3"), ("flux", r"flux"), ("sd2.1", _SD + r"2[-_.]?1"),
            ("sd2", _SD + r"2"), ("sd1.5", _SD + r"1[-_.]?5"), ("sd1.4", _SD + r"1[-_.]?4"))
NAMES = {"sd2.1": "SD 2.1", "sd1.5": "SD 1.5", "sd1.4": "SD 1.4", "sdxl": "SDXL", "sd2": "SD 2", "sd3": "SD 3",
         "flux": "FLUX"}


def backbone_family(model: dict) -> str:
    """The family of a run's `model:` section: embedded, random weights, or one of FAMILIES by the name of the
    diffusers model id or folder ("unknown" where the name says none)."""
    if model.get("random"):
        return "random weights"
    source = model.get("id") or (Path(model["path"]).name if model.get("path") else None)
    if not source:
        name = str(model.get("name") or "embedded")
        return "random weights" if name == "sd21-base-arch" else name
    text = str(source).lower()
    for family, pattern in FAMILIES:
        if re.search(pattern, text):
            return family
    return "unknown"


def hidden_reason(cfg: dict, prov: dict) -> str | None:
    """Why a run's paper column is hidden (None: the run's setup is the paper's)."""
    paper = cfg.get("paper") or {}
    missing = [k for k in ("backbone", "dataset", "protocol") if not paper.get(k)]
    if missing:
        return f"hidden: the sweep's paper section does not state the paper's {', '.join(missing)}"
    family = backbone_family(cfg.get("model") or {})
    want = str(paper["backbone"]).lower()
    if family != want:
        ours = "embedded model" if family == "embedded" else family
        return f"hidden: {ours}, not {NAMES.get(want, want)}"
    data = prov.get("dataset") or {}
    name = data.get("name") or (cfg.get("data") or {}).get("name")
    if name != paper["dataset"]:
        return f"hidden: dataset {name}, not {paper['dataset']}"
    if name in ("voc_sim", "coco_cap") and not (cfg.get("data") or {}).get("root"):
        return f"hidden: {name} replayed on shapes (no data.root), not the paper's annotated set"
    if data.get("synthetic"):
        return f"hidden: a synthetic set in {name}'s layout, not {paper['dataset']}"
    protocol = prov.get("metric_protocol") or (cfg.get("metric") or {}).get("protocol")
    if protocol != paper["protocol"]:
        return f"hidden: metric protocol {protocol}, not {paper['protocol']}"
    return None


def verdict(delta: float, tolerance) -> str:
    """A row's reproduction verdict against the sweep's tolerance (metric points)."""
    if not math.isfinite(delta):
        return ""
    if tolerance is None:
        return "no tolerance stated"
    return "reproduced" if abs(delta) <= float(tolerance) else "not reproduced"
