"""Uncertainty of a result (the run's results and the reports): a t-interval over noise seeds, or a bootstrap
interval over images (one seed)."""

from __future__ import annotations

import math

import numpy as np

from bench.metrics import summarize

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
    from scipy.stats import t as student_t  # here: scipy.stats costs ~0.6 s to import, and one seed needs none

    std = float(x.std(ddof=1))
    half = float(student_t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def metrics_from_totals(totals: np.ndarray, protocol: str) -> dict[str, np.ndarray]:
    """`bench.metrics.summarize` (the one home of the metric formulas) over a batch of dataset totals
    (B, 8 or 4, C) -> mIoU, aAcc, mAcc (B,)."""
    names = [str(c) for c in range(totals.shape[-1])]
    rows = [summarize(t, names, protocol) for t in totals]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("mIoU", "aAcc", "mAcc")}


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
