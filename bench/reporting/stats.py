"""Uncertainty of a cell: a t-interval over noise seeds, or a bootstrap interval over images (one seed)."""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sample std, low, high) of a two-sided Student-t interval for the mean over `values`
    (e.g. one value per noise seed). Fewer than two finite values: std and the interval are NaN."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    from scipy.stats import t

    std = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def metrics_from_totals(totals: np.ndarray, protocol: str) -> dict[str, np.ndarray]:
    """Vectorised `bench.metrics.summarize` over a batch of dataset totals (B, 8 or 4, C) -> mIoU, aAcc, mAcc
    (B,)."""
    from bench.metrics import protocol_rows

    rows = protocol_rows(totals, protocol)
    area_i, area_u, _, area_l = (rows[:, k].astype(np.float64) for k in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(area_u > 0, area_i / area_u, np.nan)
        acc = np.where(area_l > 0, area_i / area_l, np.nan)
        l_sum = area_l.sum(1)
        a_acc = np.where(l_sum > 0, area_i.sum(1) / np.where(l_sum > 0, l_sum, 1), np.nan)
    if protocol == "iseg":
        iou = np.where(area_l > 0, iou, np.nan)
    return {"mIoU": _nanmean_rows(iou) * 100, "aAcc": a_acc * 100, "mAcc": _nanmean_rows(acc) * 100}


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    count = finite.sum(1)
    total = np.where(finite, x, 0).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_intervals(per_image: np.ndarray, protocol: str, draws: int, seed: int = 0,
                        confidence: float = CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Percentile intervals of mIoU, aAcc and mAcc over images resampled with replacement.

    per_image: (n, 8 or 4, C) per-image histograms of one configuration and seed. The dataset metric is computed
    from summed histograms (as the reported number is), so each draw re-sums a multiset of images.
    Fewer than two images or no draws: NaN intervals."""
    per_image = np.asarray(per_image)
    n = len(per_image)
    nan = {k: (math.nan, math.nan) for k in ("mIoU", "aAcc", "mAcc")}
    if n < 2 or draws < 1:
        return nan
    rng = np.random.default_rng(seed)
    flat = per_image.reshape(n, -1).astype(np.float64)
    out: dict[str, list[np.ndarray]] = {k: [] for k in nan}
    chunk = max(1, min(draws, 2_000_000 // max(n, 1)))
    done = 0
    while done < draws:
        b = min(chunk, draws - done)
        picks = rng.integers(0, n, size=(b, n))
        counts = np.zeros((b, n))
        np.add.at(counts, (np.repeat(np.arange(b), n), picks.ravel()), 1)
        totals = (counts @ flat).reshape(b, *per_image.shape[1:])
        for k, v in metrics_from_totals(totals, protocol).items():
            out[k].append(v)
        done += b
    lo_q, hi_q = 50 * (1 - confidence), 100 - 50 * (1 - confidence)
    result = {}
    for k, parts in out.items():
        values = np.concatenate(parts)
        if not np.isfinite(values).any():
            result[k] = (math.nan, math.nan)
        else:
            lo, hi = np.nanpercentile(values, [lo_q, hi_q])
            result[k] = (float(lo), float(hi))
    return result
