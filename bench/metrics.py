"""Segmentation metrics computed exactly as MMSegmentation's IoUMetric does.

Per image: `intersect_and_union` -> four per-class pixel histograms (intersection, union, prediction,
label), ignoring label 255. Histograms are summed over the dataset, then
IoU_c = I_c / U_c, Acc_c = I_c / L_c, aAcc = sum I / sum L, reported in percent.
Protocols:
- "mmseg": mean over classes with U_c > 0 (a class absent from ground truth and predictions is NaN and
  excluded; predicted but absent from ground truth counts as IoU 0).
- "iseg": mean over classes that have ground-truth pixels (L_c > 0) only (iSeg's released evaluation).
"""

from __future__ import annotations

import numpy as np

from bench.data.base import IGNORE_INDEX

PROTOCOLS = ("mmseg", "iseg")


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(4, C) int64 histograms [intersect, union, pred, label] of one image."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    intersect = pred[pred == label]
    area_i = np.bincount(intersect, minlength=num_classes)[:num_classes]
    area_p = np.bincount(pred[(pred >= 0) & (pred < num_classes)], minlength=num_classes)[:num_classes]
    area_l = np.bincount(label[label < num_classes], minlength=num_classes)[:num_classes]
    return np.stack([area_i, area_p + area_l - area_i, area_p, area_l]).astype(np.int64)


def summarize(hist: np.ndarray, class_names: list[str], protocol: str = "mmseg") -> dict[str, float]:
    """Dataset totals (4, C) -> {"mIoU", "aAcc", "mAcc", "IoU/<class>", "Acc/<class>"} in percent."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    area_i, area_u, _, area_l = (hist[k].astype(np.float64) for k in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(area_u > 0, area_i / area_u, np.nan)
        acc = np.where(area_l > 0, area_i / area_l, np.nan)
        a_acc = area_i.sum() / area_l.sum() if area_l.sum() > 0 else np.nan
    counted = iou if protocol == "mmseg" else np.where(area_l > 0, iou, np.nan)
    out = {"mIoU": _nanmean(counted) * 100, "aAcc": a_acc * 100, "mAcc": _nanmean(acc) * 100}
    for name, value in zip(class_names, iou):
        out[f"IoU/{name}"] = value * 100
    for name, value in zip(class_names, acc):
        out[f"Acc/{name}"] = value * 100
    return out


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
