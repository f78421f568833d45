"""NOT USED BY iSeg (kept with its tests and the scorer's block histograms as the base for a fix): on real iSeg
maps of the embedded default the written-out bilinear below labels up to 1.8% of an image's pixels differently
from `F.interpolate` (whole tied regions, not a few ulps), which moved sweeps/iseg_lambda.yaml's mIoU by up to
1.0; iSeg labels with the release's exact path (`methods.iseg.release_upsample`). What the module does:

Exact labels of bilinearly upsampled, min-max normalised class maps, computed at full size only where the
decision can change (near class boundaries and the background threshold).

The final step of iSeg (released code's order, `methods.iseg.release_upsample`) upsamples every class map of
every configuration to the label size (bilinear, align_corners=False), min-max normalises it there, and takes
the first-maximum class with a background rule. At 512 px that is ~10 ms of exact per-pixel work per
configuration. Here:

- **The upsampling is written out** (`AxisGrid` + `bilinear_at`): PyTorch's sampling grid (source coordinate
  (d + 0.5) in/out - 0.5, clamped at 0; the two neighbouring source cells), combined as
  (s00 w0 + s01 w1) h0 + (s10 w0 + s11 w1) h1 with one rounding per product and sum. Every output pixel is
  computed by the same element-wise operations whether the whole map or a handful of pixels is evaluated, so
  the sparse path is bit-identical to the full one (`full_labels`) by construction. Against
  `F.interpolate` (whose CPU kernel orders and fuses the arithmetic its own way, and differs again on CUDA)
  values differ by a few float32 ulps; labels differ only where two scores tie to within that (measured on
  the embedded default: 278 of 18.9M pixels, 3 shapes images x 24 iSeg configurations).
- **Blocks.** The output pixels whose two source rows and two source columns are the same form a rectangle
  (a "square", 8 x 8 pixels for 64 -> 512). A bilinear value is a convex combination of its square's four
  source values, so it lies in [min, max] of them (widened by a rounding bound, `ROUNDING`); min-max
  normalisation and clamping are monotone, so each class's final score over the square lies in known bounds.
  When one class's lower bound beats every other class's upper bound (strictly: ties go to the exact path)
  and the background rule gives the same answer for the whole bound interval, the whole square gets that
  label without evaluating it. Only the other squares are evaluated pixel by pixel, exactly as the full path.
- **Min and max at full size** (the normalisation needs them exactly): the square with the highest upper
  bound is evaluated to get a lower bound on the maximum; only squares whose upper bound reaches it can hold
  the maximum, and only those are evaluated (likewise for the minimum).

`BlockLabels` keeps a configuration's labels in that form (one label per square, -1 where evaluated per
pixel, plus those pixels); `bench.metrics.ImageScorer` histograms it by counting (square label x
ground-truth counts per square), without the full label map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from methods.base import Prediction

# Relative bound on the rounding of one bilinear value against the exact convex combination: four products
# and three sums in float32 (each 2^-24 relative) stay below 1e-6 of the largest source magnitude.
ROUNDING = 1e-6
# Margin in score units around the power rule's threshold t* ((1 - t)^p = t), covering pow's rounding.
POWER_MARGIN = 1e-4
NORM_EPS = 1e-6  # the release's + 1e-6 in the final min-max (util/cam.py cam_to_label)


class AxisGrid:
    """Bilinear sampling of one axis, n_in -> n_out (align_corners=False), and its runs of output positions
    that share both source cells ("groups"), with each group's weights padded to the longest run."""

    def __init__(self, n_in: int, n_out: int):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
        self.i0 = src.long().clamp(max=n_in - 1)
        self.i1 = torch.where(self.i0 < n_in - 1, self.i0 + 1, self.i0)  # fixed by i0: one pair per group
        self.w1 = src - self.i0
        self.w0 = 1 - self.w1
        change = torch.ones(n_out, dtype=torch.bool)
        change[1:] = self.i0[1:] != self.i0[:-1]
        self.start = torch.nonzero(change).flatten()
        self.length = torch.diff(self.start, append=torch.tensor([n_out]))
        self.group = torch.cumsum(change.long(), 0) - 1  # output position -> its group
        self.src0, self.src1 = self.i0[self.start], self.i1[self.start]
        self.n_in, self.n_out, self.groups = n_in, n_out, len(self.start)
        offset = torch.arange(int(self.length.max()))
        self.valid = offset[None, :] < self.length[:, None]  # (groups, longest run)
        self.position = torch.where(self.valid, self.start[:, None] + offset, 0)
        self.pw0 = torch.where(self.valid, self.w0[self.position], 0)
        self.pw1 = torch.where(self.valid, self.w1[self.position], 0)


@lru_cache(maxsize=32)
def grids(h: int, w: int, out_h: int, out_w: int) -> tuple[AxisGrid, AxisGrid]:
    return AxisGrid(h, out_h), AxisGrid(w, out_w)


def combine(s00, s01, s10, s11, b0, b1, a0, a1) -> torch.Tensor:
    """The one bilinear formula of every path: (s00 b0 + s01 b1) a0 + (s10 b0 + s11 b1) a1 (module docstring);
    b are column weights, a row weights, broadcast against the corner values."""
    return (s00 * b0 + s01 * b1) * a0 + (s10 * b0 + s11 * b1) * a1


def upsample(maps: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """(M, h, w) -> (M, H, W), every pixel by `combine` (the reference the block path equals)."""
    rows, cols = grids(*maps.shape[-2:], *out_size)
    r0, r1 = maps.index_select(-2, rows.i0), maps.index_select(-2, rows.i1)
    return combine(r0.index_select(-1, cols.i0), r0.index_select(-1, cols.i1), r1.index_select(-1, cols.i0),
                   r1.index_select(-1, cols.i1), cols.w0, cols.w1, rows.w0[:, None], rows.w1[:, None])


def square_values(maps: torch.Tensor, rows: AxisGrid, cols: AxisGrid, lead, gi: torch.Tensor,
                  gj: torch.Tensor) -> torch.Tensor:
    """Upsampled values over whole squares (gi, gj) (T squares): (..., T, R, C) padded to the longest runs
    (padding is not a pixel: mask with rows.valid[gi] and cols.valid[gj]). `lead` indexes the maps' leading
    dims: an index tensor per square, or a slice (kept in front)."""
    def corner(r, c):
        return maps[(*lead, r[gi], c[gj])][..., None, None]  # lead's slices stay in front of the T dim

    return combine(corner(rows.src0, cols.src0), corner(rows.src0, cols.src1), corner(rows.src1, cols.src0),
                   corner(rows.src1, cols.src1), cols.pw0[gj][:, None, :], cols.pw1[gj][:, None, :],
                   rows.pw0[gi][:, :, None], rows.pw1[gi][:, :, None])


def normalise(values: torch.Tensor, low: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Final scores: (v - min) / (max - min + 1e-6), clamped to [0, 1] (release order; monotone in v)."""
    return ((values - low) / den).clamp(0, 1)


def first_max(scores: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum over `dim` and the first index reaching it (torch.max's documented tie rule); one or two
    entries as element-wise comparisons, which are much faster than a reduction over a leading dim."""
    lead = scores.movedim(dim, 0)
    if len(lead) > 2:
        return lead.max(0)
    best, arg = lead[0], torch.zeros(lead.shape[1:], dtype=torch.long)
    if len(lead) == 2:
        better = lead[1] > best
        best = torch.where(better, lead[1], best)
        arg = better.long()
    return best, arg


@lru_cache(maxsize=64)
def power_threshold(p: float) -> float:
    """t* with (1 - t)^p = t on [0, 1] (the power rule's background boundary: background iff best < t*)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 - mid) ** p > mid else (lo, mid)
    return lo


def apply_rule(labels: torch.Tensor, best: torch.Tensor, rule: tuple[str, float, float]) -> torch.Tensor:
    """The background rule of `methods.maps.labels_from_scores_many`, element-wise."""
    background, bg_power, bg_threshold = rule
    if background == "power":
        return torch.where((1 - best) ** bg_power > best, 0, labels)
    if background == "threshold":
        return torch.where(best < bg_threshold, 0, labels)
    raise ValueError(f"unknown background rule {background!r}")


@dataclass
class BlockLabels:
    """One configuration's label map: `squares` (row groups, column groups) long, a label per square or -1;
    the -1 squares, flat indices `mixed` (T,), labelled pixel by pixel in `blocks` (T, R, C), padded to the
    longest runs (padding: rows.valid / cols.valid false)."""

    squares: torch.Tensor
    mixed: torch.Tensor
    blocks: torch.Tensor
    rows: AxisGrid
    cols: AxisGrid

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.n_out, self.cols.n_out

    def mixed_pixels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, R, C) valid mask, y and x of the mixed squares' padded blocks."""
        gi, gj = self.mixed // self.cols.groups, self.mixed % self.cols.groups
        valid = self.rows.valid[gi][:, :, None] & self.cols.valid[gj][:, None, :]
        return valid, self.rows.position[gi][:, :, None], self.cols.position[gj][:, None, :]

    def dense(self) -> torch.Tensor:
        out = self.squares[self.rows.group][:, self.cols.group].clone()
        valid, y, x = self.mixed_pixels()
        out[y.expand_as(valid)[valid], x.expand_as(valid)[valid]] = self.blocks[valid]
        return out

    def square_ids(self) -> torch.Tensor:
        """(H, W) the square of every output pixel."""
        return self.rows.group[:, None] * self.cols.groups + self.cols.group[None, :]


class BlockPrediction(Prediction):
    """A Prediction whose full-size scores and labels are built only when read (figures, tests); scoring
    reads `blocks`."""

    def __init__(self, blocks: BlockLabels, scores_fn):
        self.blocks, self._scores_fn, self._scores, self._labels = blocks, scores_fn, None, None

    @property
    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self._scores_fn()
        return self._scores

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = self.blocks.dense()
        return self._labels


def _square_corners(maps: torch.Tensor, rows: AxisGrid, cols: AxisGrid) -> torch.Tensor:
    """(4, ..., Gr * Gc): each square's four source values."""
    r0, r1 = maps[..., rows.src0, :], maps[..., rows.src1, :]
    corners = torch.stack([r0[..., cols.src0], r0[..., cols.src1], r1[..., cols.src0], r1[..., cols.src1]])
    return corners.flatten(-2)


def _square_bounds(corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of the upsampled values over each square: the convex combination lies within
    its corners, widened by the rounding bound."""
    lo, hi = corners.amin(0), corners.amax(0)
    slack = ROUNDING * torch.maximum(lo.abs(), hi.abs()) + 1e-30
    return lo - slack, hi + slack


def _extreme(maps: torch.Tensor, rows: AxisGrid, cols: AxisGrid, bound: torch.Tensor, largest: bool) -> torch.Tensor:
    """Exact max (largest) or min of the upsampled maps (M, h, w), evaluating only squares that can hold it:
    the square with the best bound gives a reachable value, then every square whose bound reaches that."""
    m = len(maps)
    sign = 1 if largest else -1
    flat = (sign * bound).flatten(1)  # (M, S): bounds on +-value
    floor = _reduce(maps, rows, cols, torch.arange(m), flat.argmax(1), sign)
    cand_m, cand_s = torch.nonzero(flat >= floor[:, None], as_tuple=True)
    return sign * _reduce(maps, rows, cols, cand_m, cand_s, sign)


def _reduce(maps, rows, cols, m_idx, s_idx, sign) -> torch.Tensor:
    """(M,) max of +-values over the given (map, square) pairs (-inf for maps without one)."""
    gi, gj = s_idx // cols.groups, s_idx % cols.groups
    values = sign * square_values(maps, rows, cols, (m_idx,), gi, gj)
    valid = rows.valid[gi][:, :, None] & cols.valid[gj][:, None, :]
    per_square = torch.where(valid, values, -math.inf).flatten(1).amax(1)
    return torch.full((len(maps),), -math.inf).scatter_reduce(0, m_idx, per_square, "amax")


def block_labels(mid: torch.Tensor, out_size: tuple[int, int], class_ids: list[int],
                 rules: list[tuple[str, float, float]]) -> tuple[list[BlockLabels], torch.Tensor, torch.Tensor]:
    """Labels of N configurations' class maps mid (N, K, h, w) upsampled to out_size, min-max normalised
    there, first-maximum class, background rule per configuration. Returns the labels and the exact (N, K, 1, 1)
    minimum and denominator of the normalisation (for `full_scores`)."""
    n, k, h, w = mid.shape
    rows, cols = grids(h, w, *out_size)
    flat = mid.reshape(n * k, h, w)
    corners = _square_corners(flat, rows, cols)  # (4, N K, S)
    lo, hi = _square_bounds(corners)
    low = _extreme(flat, rows, cols, lo.view(-1, rows.groups, cols.groups), largest=False)[:, None]
    high = _extreme(flat, rows, cols, hi.view(-1, rows.groups, cols.groups), largest=True)[:, None]
    den = (high - low) + NORM_EPS  # = amax(v - min) + 1e-6: rounding is monotone
    # Scores at the corners, g = (u - min) / den: a pixel's score is the same convex combination of its
    # square's g as its value is of u, so a difference of two classes' scores is a convex combination of the
    # corners' differences. `tol` bounds the float error of a computed score against that (value rounding,
    # scaled by 1 / den, plus the subtraction, division and g's own rounding).
    g = ((corners - low) / den).view(4, n, k, -1)
    scale = torch.maximum(flat.abs().flatten(1).amax(1, keepdim=True), torch.ones(1))
    tol = (4 * ROUNDING * scale / den + 1e-6).view(n, k, 1)
    ids = torch.tensor(class_ids, dtype=torch.long)
    _, winner = first_max(g.mean(0), 1)  # (N, S) the candidate class of each square
    g_win = g.gather(2, winner[None, :, None].expand(4, n, 1, -1))  # (4, N, 1, S)
    tol_win = tol.expand(n, k, winner.shape[1]).gather(1, winner[:, None])  # (N, 1, S)
    lead = ((g_win - g).amin(0) - tol - tol_win).scatter(1, winner[:, None], math.inf)  # (N, K, S)
    clear = lead.amin(1) > 0  # the candidate strictly above every other class at every pixel of the square
    winner_lo = (g_win.amin(0) - tol_win).squeeze(1)  # bounds on the winner's score (the background rule's best)
    top_hi = (g.amax(0) + tol).amax(1)  # bound on every class's score
    # per configuration: its background rule's sure-foreground / sure-background squares
    power = torch.tensor([r[0] == "power" for r in rules])
    if not all(r[0] in ("power", "threshold") for r in rules):
        raise ValueError(f"unknown background rule in {sorted({r[0] for r in rules})}")
    bg_threshold = torch.tensor([float(r[2]) for r in rules])
    t = torch.tensor([power_threshold(r[1]) if r[0] == "power" else 0.0 for r in rules])[:, None]
    fg = clear & torch.where(power[:, None], winner_lo > t + POWER_MARGIN, winner_lo >= bg_threshold[:, None])
    bg = torch.where(power[:, None], top_hi < t - POWER_MARGIN, top_hi < bg_threshold[:, None])
    squares = torch.where(fg, ids[winner], torch.where(bg, 0, -1))  # (N, S)
    # every configuration's undecided squares at once, pixel by pixel, exactly as the full path; where one
    # class is the clear winner only the background rule is undecided, and best is that class's own score
    sure = torch.where(clear, winner, -1)[..., None].expand(-1, -1, 1)
    cfg, mixed = torch.nonzero(squares < 0, as_tuple=True)  # sorted by configuration
    gi, gj = mixed // cols.groups, mixed % cols.groups
    known = sure[cfg, mixed, 0]  # the clear winner, or -1
    one, many = torch.nonzero(known >= 0).flatten(), torch.nonzero(known < 0).flatten()
    low2, den2 = low.view(n, k), den.view(n, k)
    best = torch.empty(len(cfg), rows.valid.shape[1], cols.valid.shape[1])
    arg = torch.empty(best.shape, dtype=torch.long)
    if len(one):
        c1, k1 = cfg[one], known[one]
        values = square_values(mid, rows, cols, (c1, k1), gi[one], gj[one])  # (T1, R, C)
        best[one] = normalise(values, low2[c1, k1][:, None, None], den2[c1, k1][:, None, None])
        arg[one] = k1[:, None, None]
    if len(many):
        c2 = cfg[many]
        values = square_values(mid.transpose(0, 1), rows, cols, (slice(None), c2), gi[many], gj[many])  # (K, T2, R, C)
        best[many], arg[many] = first_max(normalise(values, low2.T[:, c2, None, None], den2.T[:, c2, None, None]), 0)
    labels = ids[arg]
    rule_of = torch.tensor([sorted(set(rules)).index(r) for r in rules])[cfg]
    for r, rule in enumerate(sorted(set(rules))):  # the rule's own scalar arithmetic, as the full path
        pick = torch.nonzero(rule_of == r).flatten()
        if len(pick):
            labels[pick] = apply_rule(labels[pick], best[pick], rule)
    per_cfg = torch.bincount(cfg, minlength=n).tolist()
    out = [BlockLabels(sq.view(rows.groups, cols.groups), mx, lab, rows, cols)
           for sq, mx, lab in zip(squares, mixed.split(per_cfg), labels.split(per_cfg))]
    return out, low.view(n, k, 1, 1), den.view(n, k, 1, 1)


def full_scores(mid: torch.Tensor, out_size: tuple[int, int], low: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """(K, H, W) final scores of one configuration's maps mid (K, h, w), given its exact (K, 1, 1) minimum and
    denominator; every pixel by the formula the sparse path uses."""
    return normalise(upsample(mid, out_size), low, den)


def full_labels(mid: torch.Tensor, out_size: tuple[int, int], class_ids: list[int],
                rules: list[tuple[str, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: every pixel of every map upsampled, min-max over the full map, first maximum, background
    rule. mid (N, K, h, w) -> scores (N, K, H, W), labels (N, H, W)."""
    n, k = mid.shape[:2]
    up = upsample(mid.reshape(n * k, *mid.shape[2:]), out_size).view(n, k, *out_size)
    low = up.amin(dim=(2, 3), keepdim=True)
    shifted = up - low
    scores = (shifted / (shifted.amax(dim=(2, 3), keepdim=True) + NORM_EPS)).clamp(0, 1)
    best, arg = first_max(scores, 1)
    ids = torch.tensor(class_ids, dtype=torch.long)
    labels = torch.stack([apply_rule(ids[arg[c]], best[c], rule) for c, rule in enumerate(rules)])
    return scores, labels
