"""Segmentation metrics, each protocol exactly as its reference computes it.

Per image, four per-class pixel histograms [intersection, union, prediction, label]; histograms are summed over
the dataset, then IoU_c = I_c / U_c, Acc_c = I_c / L_c, aAcc = sum I / sum L, reported in percent.
Protocols (references in methods/README.md):
- "mmseg": MMSegmentation's IoUMetric (intersect_and_union + total_area_to_metrics). Pixels labelled 255 are
  dropped; a pixel whose label is another value outside [0, C) is kept: its prediction counts in the prediction
  histogram (a false positive), its label in none. The mean runs over classes with U_c > 0 (absent from ground
  truth and prediction: NaN, excluded; predicted but absent from ground truth: IoU 0).
- "iseg": iSeg's released evaluation (util/miou.py ShowSegmentResult, wsss/iSeg.py test_step). Only pixels
  with 0 <= label < C count (255 and every other out-of-range label are dropped, prediction included); an
  image whose ground truth holds a single value once 255 is read as background (no foreground class, or no
  background) is skipped; the mean runs over classes with ground-truth pixels only.

`image_histograms` stores both (8, C): rows 0-3 are mmseg's, rows 4-7 iseg's; `protocol_rows` picks one.
Older 4-row histograms are read as mmseg's for either protocol.
"""

from __future__ import annotations

import numpy as np

from bench.data.base import IGNORE_INDEX

PROTOCOLS = ("mmseg", "iseg")
ROWS = 4


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX, protocol: str = "mmseg") -> np.ndarray:
    """(4, C) int64 histograms [intersect, union, pred, label] of one image under `protocol`."""
    _check(protocol)
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
    if protocol == "iseg":
        values = np.unique(np.where(label == ignore_index, 0, label))
        if len(values) <= 1:  # iSeg test_step returns before scoring: no foreground class (or no background)
            return np.zeros((ROWS, num_classes), dtype=np.int64)
        keep = (label >= 0) & (label < num_classes)
    else:
        keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    intersect = pred[pred == label]
    area_i = np.bincount(intersect[(intersect >= 0) & (intersect < num_classes)], minlength=num_classes)[:num_classes]
    area_p = np.bincount(pred[(pred >= 0) & (pred < num_classes)], minlength=num_classes)[:num_classes]
    area_l = np.bincount(label[(label >= 0) & (label < num_classes)], minlength=num_classes)[:num_classes]
    return np.stack([area_i, area_p + area_l - area_i, area_p, area_l]).astype(np.int64)


def image_histograms(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(8, C): the mmseg histograms (rows 0-3) and the iseg ones (rows 4-7) of one image."""
    return np.concatenate([intersect_and_union(pred, label, num_classes, ignore_index, p) for p in PROTOCOLS])


def protocol_rows(hist: np.ndarray, protocol: str) -> np.ndarray:
    """The 4 rows of `protocol` along axis -2 of (..., 8, C) histograms; (..., 4, C) ones are mmseg's."""
    _check(protocol)
    hist = np.asarray(hist)
    if hist.shape[-2] == ROWS:
        return hist
    start = ROWS * PROTOCOLS.index(protocol)
    return hist[..., start:start + ROWS, :]


def summarize(hist: np.ndarray, class_names: list[str], protocol: str = "mmseg") -> dict[str, float]:
    """Dataset totals (8 or 4, C) -> {"mIoU", "aAcc", "mAcc", "IoU/<class>", "Acc/<class>"} in percent."""
    area_i, area_u, _, area_l = (r.astype(np.float64) for r in protocol_rows(hist, protocol))
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


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class ImageScorer:
    """Histograms of many predictions of one image: the ground truth is read once, every prediction costs one
    bincount of a joint (label, prediction) code, and identical label maps are counted once.

    Equal to `image_histograms` for each prediction: the joint counts J[l, p] over label codes (0..C-1, C = any
    other value but the ignore index, C + 1 = ignored) and prediction codes (0..C-1, C = out of range) give
    both protocols' rows (mmseg: every label code but the ignored one; iseg: label codes 0..C-1)."""

    def __init__(self, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX):
        label = np.asarray(label).ravel().astype(np.int64)
        c = self.num_classes = num_classes
        in_range = (label >= 0) & (label < c)
        code = np.where(in_range, label, np.where(label == ignore_index, c + 1, c))
        self.size = label.size
        self._base = code * (c + 1)  # the label part of the joint code
        values = np.unique(np.where(label == ignore_index, 0, label))
        self._iseg_skipped = len(values) <= 1  # see intersect_and_union (iSeg test_step)

    def joint_counts(self, preds: np.ndarray) -> np.ndarray:
        """(K, P) predictions -> (K, C + 2, C + 1) joint counts, in one bincount."""
        c = self.num_classes
        preds = np.asarray(preds).reshape(len(preds), -1)
        if preds.shape[1] != self.size:
            raise ValueError(f"prediction has {preds.shape[1]} pixels, label {self.size}")
        if len(preds) and (preds.min() < 0 or preds.max() >= c):
            preds = np.where((preds >= 0) & (preds < c), preds, c)
        cells = (c + 2) * (c + 1)
        codes = preds + self._base + (np.arange(len(preds), dtype=np.int64) * cells)[:, None]
        return np.bincount(codes.ravel(), minlength=len(preds) * cells).reshape(len(preds), c + 2, c + 1)

    def histograms(self, preds: list[np.ndarray]) -> np.ndarray:
        """(K, 8, C) int64: `image_histograms` of each prediction; identical label maps are counted once."""
        c = self.num_classes
        if not preds:
            return np.zeros((0, 2 * ROWS, c), dtype=np.int64)
        first, distinct = {}, []
        index = []
        for pred in preds:
            pred = np.ascontiguousarray(pred, dtype=np.int64)
            key = (pred.shape, hash(pred.tobytes()))
            if key not in first or not np.array_equal(distinct[first[key]], pred):
                first[key] = len(distinct)
                distinct.append(pred)
            index.append(first[key])
        joint = self.joint_counts(np.stack(distinct))
        classes = np.arange(c)
        area_i = joint[:, classes, classes]
        area_l = joint[:, :c, :].sum(2)
        pred_mmseg = joint[:, :c + 1, :c].sum(1)
        pred_iseg = joint[:, :c, :c].sum(1)
        mmseg = np.stack([area_i, pred_mmseg + area_l - area_i, pred_mmseg, area_l], 1)
        iseg = np.stack([area_i, pred_iseg + area_l - area_i, pred_iseg, area_l], 1)
        if self._iseg_skipped:
            iseg = np.zeros_like(iseg)
        return np.concatenate([mmseg, iseg], 1).astype(np.int64)[index]
