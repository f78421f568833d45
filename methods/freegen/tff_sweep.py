"""`python -m methods.freegen.tff_sweep FOLDER [FOLDER ...] --out DIR`: the Temporal Fluctuation Factor's K and
threshold (FreeGen Eq. 4) from synthetic datasets' cards.

Each FOLDER is a `python -m bench.synthesize` dataset of the same prompts and seeds made with another
`params.tff_k` (K changes every sample's TFF, so each K is one synthesis; the threshold does not: every
threshold is read off one card's per-sample TFF). For each K and threshold: the fraction of samples kept
(TFF <= threshold), the mean per-image pseudo-mask mIoU of the kept and of the dropped ones (where the card has
exact ground truth), and Spearman's rho of TFF against per-image mIoU (Eq. 4's premise: rho < 0). Writes
DIR/report.md and DIR/tff_sweep.csv (temporary names, renamed when complete).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError

log = logging.getLogger(__name__)
THRESHOLDS = (0.01, 0.02, 0.05, 0.1)  # absolute thresholds (0.05: the default tff_threshold)
KEEP = (0.25, 0.5, 0.75)  # and the thresholds that keep these fractions (TFF's scale changes with K)


def sweep_rows(card: dict) -> list[dict]:
    """One card -> a row per threshold (absolute ones and per-K quantiles)."""
    from scipy.stats import spearmanr

    samples = [s for s in card.get("samples") or [] if s.get("tff") is not None]
    if len(samples) < 2:
        raise BenchError(f"card {card.get('name')!r} has fewer than 2 samples with a TFF; synthesise more")
    tff = np.array([float(s["tff"]) for s in samples])
    miou = np.array([float(s.get("mIoU", np.nan)) for s in samples])
    k = int((card.get("filter") or {}).get("tff_k") or (card.get("params") or {}).get("tff_k"))
    rho = float(spearmanr(tff, miou).statistic) if np.isfinite(miou).all() else float("nan")
    thresholds = [(f"{t:g}", t) for t in THRESHOLDS]
    thresholds += [(f"q{int(100 * q)} = {np.quantile(tff, q):.4f}", float(np.quantile(tff, q))) for q in KEEP]
    rows = []
    for label, threshold in thresholds:
        kept = tff <= threshold

        def mean(mask):
            return float(np.nanmean(miou[mask])) if mask.any() and np.isfinite(miou[mask]).any() else float("nan")

        rows.append({"K": k, "threshold": label, "kept %": round(100 * kept.mean(), 1), "kept": int(kept.sum()),
                     "mIoU kept": round(mean(kept), 2), "mIoU dropped": round(mean(~kept), 2),
                     "mIoU all": round(mean(np.ones_like(kept)), 2), "TFF mean": round(float(tff.mean()), 4),
                     "spearman rho": round(rho, 3)})
    return rows


def markdown_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---:" if frame[c].dtype.kind in "if" else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join("–" if isinstance(v, float) and np.isnan(v) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_report(folders: list[Path], out: Path) -> Path:
    cards = []
    for folder in folders:
        path = Path(folder) / "dataset.json"
        if not path.is_file():
            raise BenchError(f"{path} is missing; give folders written by python -m bench.synthesize")
        cards.append(json.loads(path.read_text()))
    frame = pd.DataFrame([row for card in sorted(cards, key=lambda c: c["params"]["tff_k"])
                          for row in sweep_rows(card)])
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# FreeGen TFF: K and threshold (Eq. 4)", "",
             "Samples kept by each threshold (kept when TFF <= threshold) for each K (one synthesis per K: "
             + ", ".join(f"{c['name']} ({c['counts']['synthesised']} images, K = {c['params']['tff_k']})"
                         for c in cards)
             + "); mean per-image pseudo-mask mIoU against the exact ground truth of the generated shapes "
               "(replay) of the kept and the dropped samples. qNN: the threshold keeping NN% of that K's "
               "samples. Spearman rho: TFF against per-image mIoU (Eq. 4's premise: negative).", "",
             markdown_table(frame), ""]
    for name, text in (("report.md", "\n".join(lines)), ("tff_sweep.csv", frame.to_csv(index=False))):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        tmp.rename(out / name)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods.freegen.tff_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="synthetic dataset folders (one per K)")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.folders, args.out))
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
