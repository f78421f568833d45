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

- "hungarian": the unsupervised protocol of iSeg Table 3, which takes DiffSeg's evaluation (google/diffseg
  benchmarks.ipynb, diffseg/utils.py hungarian_matching): predicted ids are segments without class names; per
  image, the (class x segment) pixel histogram of the pixels with 0 <= label < C is matched one-to-one by
  scipy.optimize.linear_sum_assignment (maximising matched pixels); TP_c = pixels of the segment matched to c,
  FN_c = c's other pixels, FP_c = the matched segment's other pixels (unmatched segments count for no class).
  Summed over images: ACC = sum TP / valid pixels (reported as aAcc), IoU_c = TP / (TP + FP + FN), mIoU = the
  mean over classes with TP + FP + FN > 0; the (intersect, union, pred, label) rows carry exactly these.
  `hungarian_match_dataset` is the other convention (IIC / PiCIE / STEGO): one matching of the summed histogram.

`image_histograms` stores all three (12, C): rows 0-3 are mmseg's, 4-7 iseg's, 8-11 hungarian's; `protocol_rows`
picks one. 4-row histograms are one protocol's rows, read as they are (older runs stored mmseg's); 8-row ones
(mmseg, iseg) lack hungarian's.

Layouts without a background class (`SegDataset.has_background` False) keep id 0 as an empty slot: with
`first_class=1` the slot's column is zeroed (never in a mean, never a false positive) and Hungarian matching
runs over the real classes only.

Beside the protocols, `tied_percent` pools per-image tie counts (methods.maps.tie_counts) into a run's `tied`
column: the share of class-score cells whose label tie-breaking decided.

Open-vocabulary reporting by seen / unseen classes (`seen_classes`, `seen_unseen`): DEDOS trains on
COCO-Stuff-171 and evaluates on other datasets; classes whose names are COCO-Stuff classes are "seen".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.data.base import IGNORE_INDEX

PROTOCOLS = ("mmseg", "iseg", "hungarian")
ROWS = 4


@dataclass(frozen=True)
class CountedLabels:
    """How a prediction whose labels are shared with other configurations is scored: `counter` counts every
    configuration's labels against the ground truth at once (`joint_counts(gt_codes, num_classes)`: one
    (C + 2, C + 1) joint histogram per configuration) and builds one configuration's label map when a protocol
    needs the map itself (`labels(index)`); this prediction is configuration `index`
    (methods.tiled_labels.TiledLabels is such a counter)."""

    counter: Any
    index: int


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX, protocol: str = "mmseg") -> np.ndarray:
    """(4, C) int64 histograms [intersect, union, pred, label] of one image under `protocol`."""
    _check(protocol)
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
    if protocol == "hungarian":
        return hungarian_histograms(pred, label, num_classes, ignore_index)
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
                     ignore_index: int = IGNORE_INDEX, first_class: int = 0) -> np.ndarray:
    """(12, C): the mmseg (rows 0-3), iseg (4-7) and hungarian (8-11) histograms of one image. first_class=1:
    the layout has no background class; its id-0 slot is left out (module docstring)."""
    if first_class:
        pred, label = np.asarray(pred), np.asarray(label)
        hists = [intersect_and_union(pred, label, num_classes, ignore_index, p) for p in PROTOCOLS[:2]]
        hists.append(hungarian_histograms(pred, label, num_classes, ignore_index, first_class))
        out = np.concatenate(hists)
        out[:, :first_class] = 0
        return out
    return np.concatenate([intersect_and_union(pred, label, num_classes, ignore_index, p) for p in PROTOCOLS])


def protocol_rows(hist: np.ndarray, protocol: str) -> np.ndarray:
    """The 4 rows of `protocol` along axis -2 of (..., 12, C) histograms; (..., 4, C) ones are mmseg's."""
    _check(protocol)
    hist = np.asarray(hist)
    if hist.shape[-2] == ROWS:  # one protocol's rows (one image's, or older runs' mmseg rows)
        return hist
    start = ROWS * PROTOCOLS.index(protocol)
    if hist.shape[-2] < start + ROWS:
        raise ValueError(f"these histograms ({hist.shape[-2]} rows) predate metric protocol {protocol!r}; "
                         f"score the run again")
    return hist[..., start:start + ROWS, :]


def summarize(hist: np.ndarray, class_names: list[str], protocol: str = "mmseg") -> dict[str, float]:
    """Dataset totals (8 or 4, C) -> {"mIoU", "aAcc", "mAcc", "IoU/<class>", "Acc/<class>"} in percent."""
    area_i, area_u, _, area_l = (r.astype(np.float64) for r in protocol_rows(hist, protocol))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(area_u > 0, area_i / area_u, np.nan)
        acc = np.where(area_l > 0, area_i / area_l, np.nan)
        a_acc = area_i.sum() / area_l.sum() if area_l.sum() > 0 else np.nan
    counted = np.where(area_l > 0, iou, np.nan) if protocol == "iseg" else iou
    out = {"mIoU": _nanmean(counted) * 100, "aAcc": a_acc * 100, "mAcc": _nanmean(acc) * 100}
    for name, value in zip(class_names, iou):
        out[f"IoU/{name}"] = value * 100
    for name, value in zip(class_names, acc):
        out[f"Acc/{name}"] = value * 100
    return out


def tied_percent(ties: np.ndarray) -> float:
    """Per-image [tied, counted] score cells (methods.maps.tie_counts) -> the percentage of counted cells whose
    label tie-breaking decided; NaN where no image has two classes to tell apart."""
    tied, counted = np.asarray(ties, dtype=np.int64).reshape(-1, 2).sum(0)
    return float(100.0 * tied / counted) if counted else float("nan")


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# -- unsupervised: Hungarian matching of predicted segments to classes (iSeg Table 3, DiffSeg's evaluation) --------
def segment_class_histogram(pred: np.ndarray, label: np.ndarray, num_classes: int,
                            ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, K) pixel counts of class c (rows) under segment k (columns) over pixels with 0 <= label < C and
    label != ignore_index; K = max(C, largest segment id + 1). Negative segment ids are dropped."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    keep = (label >= 0) & (label < num_classes) & (label != ignore_index) & (pred >= 0)
    pred, label = pred[keep], label[keep]
    k = max(num_classes, int(pred.max(initial=-1)) + 1)
    return np.bincount(label * k + pred, minlength=num_classes * k).reshape(num_classes, k)


def hungarian_rows(confusion: np.ndarray, first_class: int = 0) -> np.ndarray:
    """(4, C) [TP, TP + FP + FN, TP + FP, TP + FN] of one (C, K) class x segment histogram after the one-to-one
    matching that maximises matched pixels (rows before `first_class` take no part)."""
    from scipy.optimize import linear_sum_assignment

    num_classes = confusion.shape[0]
    sub = confusion[first_class:]
    rows, cols = linear_sum_assignment(sub, maximize=True)
    tp, fp = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    tp[rows + first_class] = sub[rows, cols]
    fp[rows + first_class] = sub[:, cols].sum(0) - sub[rows, cols]
    fn = confusion.sum(1) - tp
    if first_class:
        fn[:first_class] = 0
    return np.stack([tp, tp + fp + fn, tp + fp, tp + fn]).astype(np.int64)


def hungarian_histograms(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX,
                         first_class: int = 0) -> np.ndarray:
    """(4, C) rows of the "hungarian" protocol for one image: its own matching (DiffSeg's per-image evaluation)."""
    return hungarian_rows(segment_class_histogram(pred, label, num_classes, ignore_index), first_class)


def hungarian_match_dataset(confusions: list[np.ndarray] | np.ndarray, first_class: int = 0) -> np.ndarray:
    """(4, C) rows of ONE matching of the summed (C, K) histograms (IIC / PiCIE / STEGO: segment ids are cluster
    ids shared by every image). Histograms of different widths are padded with empty segments."""
    confusions = [np.asarray(c) for c in confusions]
    width = max(c.shape[1] for c in confusions)
    total = sum(np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in confusions)
    return hungarian_rows(total, first_class)


# -- seen / unseen classes (open-vocabulary reporting: classes of the training set vs new ones) -----------------------
def seen_classes(classes: list[str], training_classes: list[str]) -> list[bool]:
    """Per class of the evaluated dataset: is its name (case and spacing folded) a class of the training set?"""
    fold = {" ".join(str(c).lower().replace("-", " ").split()) for c in training_classes}
    return [" ".join(str(c).lower().replace("-", " ").split()) in fold for c in classes]


def seen_unseen(metrics: dict[str, float], classes: list[str], seen: list[bool]) -> dict[str, float]:
    """mIoU over the seen and the unseen classes (from the `IoU/<class>` entries of `summarize`, NaN ones left
    out) and their harmonic mean hIoU = 2 s u / (s + u), the zero-shot segmentation summary (ZS3Net, ZegCLIP)."""
    def mean(flag: bool) -> float:
        values = [metrics.get(f"IoU/{c}", np.nan) for c, s in zip(classes, seen) if s == flag]
        values = np.asarray([v for v in values if v is not None], dtype=np.float64)
        return _nanmean(values) if len(values) else float("nan")

    s, u = mean(True), mean(False)
    h = 2 * s * u / (s + u) if np.isfinite(s) and np.isfinite(u) and s + u > 0 else float("nan")
    return {"mIoU/seen": s, "mIoU/unseen": u, "hIoU": h}


class ImageScorer:
    """Histograms of many predictions of one image: the ground truth is read once, every prediction costs one
    bincount of a joint (label, prediction) code, and identical label maps are counted once.

    Equal to `image_histograms` for each prediction: the joint counts J[l, p] over label codes (0..C-1, C = any
    other value but the ignore index, C + 1 = ignored) and prediction codes (0..C-1, C = out of range) give
    both protocols' rows (mmseg: every label code but the ignored one; iseg: label codes 0..C-1)."""

    def __init__(self, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX, first_class: int = 0):
        shape = np.shape(label)
        label = np.asarray(label).ravel().astype(np.int64)
        c = self.num_classes = num_classes
        self.label, self.ignore_index, self.first_class = label, ignore_index, first_class
        in_range = (label >= 0) & (label < c)
        code = np.where(in_range, label, np.where(label == ignore_index, c + 1, c))
        self.size, self.shape = label.size, shape
        self.codes = code  # label code of every pixel (0..C - 1 classes, C other values, C + 1 ignored)
        # see intersect_and_union (iSeg test_step): skipped when the label, ignored pixels read as 0, holds one
        # value (min == max: two reductions instead of np.unique's sort of every pixel)
        values = np.where(label == ignore_index, 0, label)
        self._iseg_skipped = values.size == 0 or values.min() == values.max()
        self._base = None  # the label part of the joint code, for label-map predictions (made when first needed)

    def joint_counts(self, preds: np.ndarray) -> np.ndarray:
        """(K, P) predictions -> (K, C + 2, C + 1) joint counts, in one bincount."""
        c = self.num_classes
        preds = np.asarray(preds).reshape(len(preds), -1)
        if preds.shape[1] != self.size:
            raise ValueError(f"prediction has {preds.shape[1]} pixels, label {self.size}")
        if len(preds) and (preds.min() < 0 or preds.max() >= c):
            preds = np.where((preds >= 0) & (preds < c), preds, c)
        cells = (c + 2) * (c + 1)
        if self._base is None:
            self._base = self.codes * (c + 1)
        codes = preds + self._base + (np.arange(len(preds), dtype=np.int64) * cells)[:, None]
        return np.bincount(codes.ravel(), minlength=len(preds) * cells).reshape(len(preds), c + 2, c + 1)

    def histograms(self, preds: list, hungarian: bool = False) -> np.ndarray:
        """(K, 8, C) int64 (mmseg, iseg rows) of each prediction, (K, 12, C) with `hungarian` (its matching costs
        a linear assignment per distinct label map: asked for only when that protocol is scored); identical
        label maps are counted once. A prediction is a label map, or `CountedLabels` (what
        `Prediction.scored_as` gives: e.g. labels by tiles, every configuration of one counter counted at once)."""
        c = self.num_classes
        rows = 3 * ROWS if hungarian else 2 * ROWS
        if not preds:
            return np.zeros((0, rows, c), dtype=np.int64)
        if hungarian:  # the matching reads label maps
            preds = [np.asarray(p.counter.labels(p.index)) if isinstance(p, CountedLabels) else p for p in preds]
        first, distinct = {}, []
        index, shared_joints = [], {}
        for pred in preds:
            if isinstance(pred, CountedLabels):
                key = id(pred.counter)
                if key not in shared_joints:
                    shared_joints[key] = pred.counter.joint_counts(self.codes.reshape(self.shape), c)
                index.append((key, pred.index))
                continue
            pred = np.ascontiguousarray(pred, dtype=np.int64)
            key = (pred.shape, hash(pred.tobytes()))
            if key not in first or not np.array_equal(distinct[first[key]], pred):
                first[key] = len(distinct)
                distinct.append(pred)
            index.append(first[key])
        dense = self.joint_counts(np.stack(distinct)) if distinct else np.zeros((0, c + 2, c + 1), dtype=np.int64)
        parts = [dense]
        offsets = {}
        for key, joint in shared_joints.items():
            offsets[key] = sum(len(p) for p in parts)
            parts.append(joint.astype(np.int64))
        joint = np.concatenate(parts)
        index = [offsets[i[0]] + i[1] if isinstance(i, tuple) else i for i in index]
        classes = np.arange(c)
        area_i = joint[:, classes, classes]
        area_l = joint[:, :c, :].sum(2)
        pred_mmseg = joint[:, :c + 1, :c].sum(1)
        pred_iseg = joint[:, :c, :c].sum(1)
        mmseg = np.stack([area_i, pred_mmseg + area_l - area_i, pred_mmseg, area_l], 1)
        iseg = np.stack([area_i, pred_iseg + area_l - area_i, pred_iseg, area_l], 1)
        if self._iseg_skipped:
            iseg = np.zeros_like(iseg)
        parts = [mmseg, iseg]
        if hungarian:
            parts.append(np.stack([self._hungarian(pred, joint[k]) for k, pred in enumerate(distinct)]))
        out = np.concatenate(parts, 1).astype(np.int64)
        if self.first_class:
            out[:, :, :self.first_class] = 0
        return out[index]

    def _hungarian(self, pred: np.ndarray, joint: np.ndarray) -> np.ndarray:
        c = self.num_classes
        if pred.min(initial=0) < 0 or pred.max(initial=0) >= c:  # segments beyond the class ids: count them apart
            return hungarian_histograms(pred, self.label, c, self.ignore_index, self.first_class)
        return hungarian_rows(joint[:c, :c], self.first_class)
