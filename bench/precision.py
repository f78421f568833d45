"""Precision agreement: the same methods, images and settings traced in two dtypes (fp32 against bf16 on the CPU,
fp32 against fp16 on a GPU); per method the share of pixels whose label agrees and the mIoU of each.

    python -m bench.precision --images 16 --other bfloat16 --out reports/precision/cpu-bf16

Writes results.csv (one row per method) and README.md (the table and the command) under --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)
METHODS_COMPARED = ("iseg", "ovam", "daam", "attn2mask")


def labels_per_method(dtype: str, images: int, device: str) -> tuple[dict[str, list[np.ndarray]], list, list]:
    """Every method's labels on the first `images` shapes images, traced in `dtype` (methods_compare_inversion's
    setting: the compare meta-method, one inversion pass shared by the methods)."""
    from bench.data import build_dataset
    from bench.evaluate import group_request, predict_image, trace_samples
    from bench.models import load_backbone
    from bench.plan import ForwardGroup, Trial
    from methods import METHODS

    backbone = load_backbone({"name": "embedded", "device": device, "dtype": dtype})
    method = METHODS.get("compare")(backbone)
    cfgs = [method.resolve({"method": m}) for m in METHODS_COMPARED]
    group = ForwardGroup(seed=0, forward=tuple((k, cfgs[0][k]) for k in method.forward_keys()),
                         trials=[Trial(m, c, {}) for m, c in zip(METHODS_COMPARED, cfgs)])
    dataset = build_dataset({"name": "shapes", "limit": images, "split": "val"})
    req = group_request(method, group)
    out: dict[str, list[np.ndarray]] = {m: [] for m in METHODS_COMPARED}
    gts = []
    for i in range(images):
        sample = dataset[i]
        batch = trace_samples(method, dataset, [sample], cfgs[0], 0, req, backbone.resolution)
        preds = predict_image(method, batch.traces[0], batch.queries[0], cfgs, tuple(sample.label.shape))
        for m, p in zip(METHODS_COMPARED, preds):
            out[m].append(p.labels.cpu().numpy())
        gts.append(sample.label)
    return out, gts, dataset.classes


def compare(images: int, other: str, device: str) -> pd.DataFrame:
    from bench.metrics import image_histograms, protocol_rows, summarize

    ref, gts, classes = labels_per_method("float32", images, device)
    low, _, _ = labels_per_method(other, images, device)
    rows = []
    for m in METHODS_COMPARED:
        agree = sum(int((a == b).sum()) for a, b in zip(ref[m], low[m])) / sum(a.size for a in ref[m])
        miou = []
        for labels in (ref[m], low[m]):
            hist = sum(image_histograms(p, g, len(classes)) for p, g in zip(labels, gts))
            miou.append(summarize(protocol_rows(hist, "iseg"), classes, "iseg")["mIoU"])
        rows.append({"method": m, "images": images, "device": device, "dtype": other,
                     "label_agreement_percent": 100 * agree, "mIoU_fp32": miou[0], f"mIoU_{other}": miou[1],
                     "mIoU_difference": miou[1] - miou[0]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--other", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    frame = compare(args.images, args.other, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "results.csv", index=False)
    command = "python -m bench.precision " + " ".join(sys.argv[1:] if argv is None else argv)
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    table = "\n".join("| " + " | ".join(r) + " |" for r in
                      [list(frame.columns), ["---"] * len(frame.columns), *cells])
    (out / "README.md").write_text(
        f"# Precision agreement: float32 against {args.other} on {args.device}\n\n"
        f"The embedded model, the methods of `sweeps/methods_compare_inversion.yaml` at their defaults, the first "
        f"{args.images} shapes val images, iSeg's metric protocol. Agreement: the share of pixels whose label is the "
        f"same in both dtypes.\n\n{table}\n\nMade with `{command}` (torch {torch.__version__}).\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
