"""The report's section on synthetic datasets: when the evaluated data or a fit's training data is a folder
written by `python -m bench.synthesize` (a VOC layout with a `dataset.json` card), the card's facts (what was
generated from what, how it was filtered, how good its masks are), the effect of the TFF threshold on what is
kept, and the grid of samples with their masks (`samples.png`, copied beside the report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from bench.reporting.model import RunData, fmt_value
from bench.reporting.plots import Figure
from bench.reporting.render import Defs, Heading, Para
from bench.reporting.tables import Cell, Table, num_cell

CARD = "dataset.json"
SAMPLES = "samples.png"


def card_folder(root) -> Path | None:
    """The folder of a synthetic dataset's card under a `data.root` (the folder, VOC2012/ or VOCdevkit/VOC2012/)."""
    if not root:
        return None
    from bench.storage import is_uri

    if is_uri(str(root)):
        return _stored_card_folder(str(root))
    base = Path(str(root)).expanduser()
    for candidate in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
        if (candidate / CARD).is_file():
            return candidate
    return None


def _stored_card_folder(root: str) -> Path | None:
    """A stored dataset's card and sample grid, fetched alone into node-local scratch (not the whole dataset)."""
    from bench.storage import Location, scratch_dir

    base = Location.of(root)
    for candidate in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
        if (candidate / CARD).is_file():
            folder = scratch_dir("card", candidate.uri) / candidate.name
            folder.mkdir(exist_ok=True)
            for name in (CARD, SAMPLES):
                if (candidate / name).is_file():
                    (folder / name).write_bytes((candidate / name).read_bytes())
            return folder
    return None


def synthetic_sources(run: RunData) -> list[tuple[str, dict, Path]]:
    """(role, data config, card folder) of every synthetic dataset the run read: the evaluated data and the
    training data of its fits (the run's train.data, or what each fit recorded)."""
    configs = [("evaluated data", run.cfg.get("data") or {})]
    train = (run.cfg.get("train") or {}).get("data")
    if train:
        configs.append(("training data", train))
    if run.path is not None and (run.path / "fit").is_dir():
        for config in sorted((run.path / "fit").glob("*/train_config.json")):
            configs.append(("training data", json.loads(config.read_text()).get("data") or {}))
    found, seen = [], set()
    for role, data in configs:
        folder = card_folder(data.get("root"))
        if folder is not None and folder.resolve() not in seen:
            seen.add(folder.resolve())
            found.append((role, data, folder))
    return found


def _fmt(value) -> str:
    return "–" if value is None else fmt_value(value)


def card_pairs(card: dict, data: dict, folder: Path) -> list[tuple[str, str]]:
    counts, quality = card.get("counts") or {}, card.get("pseudo_mask_quality") or {}
    params, throughput = card.get("params") or {}, card.get("throughput") or {}
    pairs = [("folder", str(folder)), ("read as", ", ".join(f"{k}={_fmt(v)}" for k, v in data.items())),
             ("synthesised by", f"{card.get('method')} v{card.get('method_version')}, model "
                                f"{(card.get('model') or {}).get('name')}, seed {card.get('seed')}"),
             ("prompts", f"{(card.get('data') or {}).get('name')}: "
                         f"{(card.get('dataset') or {}).get('template') or params.get('template', '–')}"),
             ("classes", ", ".join(card.get("classes") or [])),
             ("samples", f"{counts.get('synthesised')} synthesised, {counts.get('kept')} kept, "
                         f"{counts.get('filtered')} filtered"),
             ("filter", f"{(card.get('filter') or {}).get('rule')}, K = {(card.get('filter') or {}).get('tff_k')}")]
    tff = card.get("tff") or {}
    if tff.get("mean") is not None:
        quantiles = ", ".join(f"p{q} {float(v):.4f}" for q, v in (tff.get("quantiles") or {}).items())
        pairs.append(("TFF (Eq. 4)", f"mean {float(tff['mean']):.4f}; {quantiles}"))
    for part in ("all", "kept", "filtered"):
        if part in quality:
            pairs.append((f"pseudo-mask mIoU ({part})", f"{quality[part]['mIoU']:.2f} over {quality[part]['images']} "
                                                        f"images"))
    rho = quality.get("tff_vs_mIoU_spearman")
    if rho:
        pairs.append(("TFF vs per-image mIoU", f"Spearman rho {rho['rho']}, p {rho['p']}"))
    if throughput.get("images_per_second"):
        pairs.append(("throughput", f"{throughput['images_per_second']} images/s "
                                    f"({throughput.get('device')}, {throughput.get('actors')} actor(s), batch "
                                    f"{throughput.get('batch_size')})"))
    return pairs


def threshold_table(card: dict, key: str) -> Table | None:
    """What each TFF threshold would keep (the samples' TFF does not depend on the threshold): kept fraction and
    the mean per-image pseudo-mask mIoU of the kept samples, at the card's threshold and at TFF quantiles."""
    samples = [s for s in card.get("samples") or [] if s.get("tff") is not None]
    if len(samples) < 2:
        return None
    tff = np.array([float(s["tff"]) for s in samples])
    miou = np.array([float(s["mIoU"]) if s.get("mIoU") is not None else np.nan for s in samples])
    params = card.get("params") or {}
    used = params.get("tff_threshold")
    mark = " (this set)" if params.get("tff", True) else " (not applied: tff=false)"
    thresholds = sorted({*(float(np.quantile(tff, q)) for q in (0.25, 0.5, 0.75)), float(tff.max()),
                         *([float(used)] if used is not None else [])})
    rows = []
    for threshold in thresholds:
        kept = tff <= threshold
        quality = float(np.nanmean(miou[kept])) if kept.any() and np.isfinite(miou[kept]).any() else None
        rows.append([Cell(f"{threshold:.4f}" + (mark if used is not None and threshold == float(used) else ""),
                          threshold),
                     num_cell(100 * kept.mean(), 1), num_cell(int(kept.sum()), 0), num_cell(quality, 2)])
    return Table(f"tff-{key}", "Samples kept by each TFF threshold (FreeGen Eq. 4: kept when TFF <= threshold), "
                               "from the card's per-sample TFF; mean per-image pseudo-mask mIoU of the kept ones "
                               "where the card has exact ground truth.",
                 ["TFF threshold", "kept %", "kept", "mean per-image mIoU"], rows)


def dataset_card_blocks(run: RunData, out: Path, prefix: str = "", level: int = 1) -> list:
    blocks: list = []
    for k, (role, data, folder) in enumerate(synthetic_sources(run)):
        try:
            card = json.loads((folder / CARD).read_text())
        except (OSError, ValueError):
            continue
        title = f"Synthetic dataset ({role}): {card.get('name', folder.name)}"
        blocks.append(Heading(level + 1, title if level == 1 else f"{title} ({run.label})"))
        blocks.append(Defs(card_pairs(card, data, folder)))
        table = threshold_table(card, f"{run.label or run.name}-{k}")
        if table is not None:
            blocks.append(table)
        if (folder / SAMPLES).is_file():
            target = out / f"{prefix}synthetic{k}_samples.png"
            shutil.copyfile(folder / SAMPLES, target)
            blocks.append(Figure(target, "synthetic samples with their masks",
                                 "The first synthetic samples: image and pseudo-mask (filtered ones marked red)."))
        else:
            blocks.append(Para(f"{folder / SAMPLES} is missing: no sample grid.", "note"))
    return blocks
