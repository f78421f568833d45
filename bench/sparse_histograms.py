"""Per-image histograms by their nonzero class columns: what travels from the tracing actors to the driver and
what the shards hold.

One image's (8, C) histograms (bench.metrics.ImageScorer.histograms) are zero in every class that is neither
in its ground truth nor predicted: a handful of columns out of 21, 459 or 847. A row (one image, one
configuration) is stored as the ids of its nonzero columns and their counts, padded to the widest row of the
batch:

- `hist_classes` (R, M): class ids in ascending order, -1 where a row has fewer than M nonzero columns;
- `hist_counts` (R, H, M): the counts of those columns (0 in padding), in the smallest unsigned dtype that holds
  the batch's largest count (uint16, uint32; int64 beyond).

Decoding restores the dense int64 histograms exactly (every nonzero count is kept, every other is 0), so sums,
metrics and bootstrap intervals are those of the dense histograms. Fixed-width rows keep a batch a set of
plain arrays (Ray Data blocks, .npz shards) that index, mask and reorder row by row like the dense column."""

from __future__ import annotations

import numpy as np

CLASSES, COUNTS = "hist_classes", "hist_counts"


def encode(hist: np.ndarray) -> dict[str, np.ndarray]:
    """(R, H, C) nonnegative integer histograms -> {hist_classes: (R, M), hist_counts: (R, H, M)}, M the most
    nonzero columns of any row (at least 1: a batch of empty rows is one padding column)."""
    hist = np.asarray(hist)
    rows, height, classes = hist.shape
    nonzero = hist.any(axis=1)  # (R, C)
    width = max(1, int(nonzero.sum(1).max(initial=0)))  # one padding column where every row is empty
    # nonzero columns first, in ascending class order (a stable sort of the "is zero" flags)
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(nonzero, order, 1)
    counts = np.take_along_axis(hist, np.broadcast_to(order[:, None, :], (rows, height, width)), 2)
    return {CLASSES: np.where(kept, order, -1).astype(_class_dtype(classes)),
            COUNTS: np.where(kept[:, None, :], counts, 0).astype(_count_dtype(counts))}


def decode(columns: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """{hist_classes, hist_counts} -> the (R, H, C) int64 histograms they encode."""
    classes, counts = columns[CLASSES], columns[COUNTS]
    rows, height, _ = counts.shape
    out = np.zeros((rows, height, num_classes + 1), dtype=np.int64)  # the last column takes the padding
    cols = np.where(classes >= 0, classes, num_classes).astype(np.intp)
    out[np.arange(rows)[:, None, None], np.arange(height)[None, :, None], cols[:, None, :]] = counts
    return out[..., :num_classes]


def totals(columns: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """The (H, C) int64 sum of the encoded rows' histograms, without decoding them: one weighted bincount over
    (row of the histogram, class). Its float64 sums are exact while the total stays below 2**53 (a billion
    images of a billion pixels), checked; past it, integer adds."""
    classes, counts = columns[CLASSES], columns[COUNTS]
    height = counts.shape[1]
    cols = np.where(classes >= 0, classes, num_classes).astype(np.int64)  # padding: a column cut off below
    keys = (np.arange(height, dtype=np.int64)[None, :, None] * (num_classes + 1) + cols[:, None, :]).ravel()
    if counts.size == 0 or int(counts.max()) * counts.size < 2 ** 53:
        sums = np.bincount(keys, weights=counts.ravel().astype(np.float64), minlength=height * (num_classes + 1))
        out = sums.astype(np.int64)
    else:
        out = np.zeros(height * (num_classes + 1), dtype=np.int64)
        np.add.at(out, keys, counts.ravel().astype(np.int64))
    return out.reshape(height, num_classes + 1)[:, :num_classes]


def widen(parts: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Encoded batches of different widths padded to the widest, so that their columns concatenate."""
    width = max(p[CLASSES].shape[1] for p in parts)
    out = []
    for p in parts:
        pad = width - p[CLASSES].shape[1]
        out.append({**p, CLASSES: np.pad(p[CLASSES], ((0, 0), (0, pad)), constant_values=-1),
                    COUNTS: np.pad(p[COUNTS], ((0, 0), (0, 0), (0, pad)))} if pad else p)
    return out


def stack_rows(column: np.ndarray, fill: int) -> np.ndarray:
    """A column that arrives as an object array of per-row arrays of different widths (Ray Data's variable-shaped
    tensors, when blocks of different widths are joined) -> one array padded with `fill` along the last axis."""
    if column.dtype != object:
        return column
    width = max((np.shape(r)[-1] for r in column), default=0)
    return np.stack([np.pad(np.asarray(r), [(0, 0)] * (np.ndim(r) - 1) + [(0, width - np.shape(r)[-1])],
                            constant_values=fill) for r in column])


def dense_rows(per_image: dict, keep: np.ndarray) -> np.ndarray:
    """The (n, H, C) int64 histograms of the rows `keep` selects from a run's per-image columns: a dense `hist`
    (the search's trace cache) as it is, encoded columns decoded."""
    if "hist" in per_image:
        return np.asarray(per_image["hist"])[keep]
    return decode({CLASSES: per_image[CLASSES][keep], COUNTS: per_image[COUNTS][keep]},
                  int(per_image["num_classes"]))


def _class_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def _count_dtype(counts: np.ndarray) -> type:
    if counts.size == 0 or counts.min() >= 0 and counts.max() <= np.iinfo(np.uint16).max:
        return np.uint16
    if counts.min() >= 0 and counts.max() <= np.iinfo(np.uint32).max:
        return np.uint32
    return np.int64
