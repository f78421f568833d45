"""Exact labels of bilinearly upsampled, min-max rescaled score maps without upsampling every pixel
(the per-image cost of many post-processing settings).

The last step of iSeg's released post-processing (methods.iseg.release_upsample, second half; then
methods.maps.labels_from_scores_many) takes maps U (N configurations, K classes, m x m), upsamples them with
`F.interpolate` (bilinear, align_corners=False) to S x S, rescales each map by the minimum and maximum of its
upsampled pixels ((x - min) / (max - min + 1e-6)), clamps to [0, 1] and labels every pixel with the first class
reaching the maximum over classes, then applies the background rule.

With S = f * m, f a power of two, output rows [f*i + f/2, f*i + 3f/2) read source rows i and i + 1 only (the
first and last f/2 rows read row 0, row m - 1 alone): a *tile* (m + 1 per axis). The source index and weight of
every output pixel are exact binary fractions, so `F.interpolate` of a tile's 2 x 2 source crop gives the tile's
pixels with the same indices and weights; upsampled at the full map's output width (upsample_tiles), also with
the same arithmetic: the same float values, bit for bit (tests/test_tiled_labels.py compares against the full
upsample on random maps with ties, plateaus and every background rule). Every value of a tile is a convex
combination of its four source cells, so it lies within their [min, max] up to rounding (REL); the rescaling
and clamping are monotone, so a tile's bounds bound its final scores. A tile whose bounds separate one class
from every other strictly and decide the background rule with a margin has that one label. Where the intervals
overlap, a class can still win at every pixel: the rescaling is affine and every class's value is the same
convex combination of its corners, so the difference of two classes' scores is a convex combination of the
corner differences (TiledLabels._corner_winner). The remaining tiles are labelled pixel by pixel from scores
computed here (TiledLabels._certified_labels: the rescaled corners times exact bilinear weights), kept where
every pixel's decision has a margin beyond both paths' rounding; only the tiles left after that are upsampled,
from their crops, with F.interpolate's own arithmetic. Each map's exact minimum and maximum come the same way:
exact values of the tiles whose bounds, then real corner values, say can hold them.

Histograms follow the tiles (TiledLabels.joint_counts): a decided tile of one ground-truth code adds f^2 to one
cell, one unweighted count per (configuration, tile); decided tiles of several codes (or at the edge) add their
count rows; an undecided tile adds its pixels one by one. Full label maps and scores are built only when read
(qualitative figures).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.metrics import CountedLabels
from methods.base import Prediction
from methods.labels import TIE_TOL, check_rule, decide

# bound on the rounding of a bilinear value, relative to the largest magnitude of its four inputs: exact weights
# (binary fractions), two products and a sum per axis, each within float32's 2^-24 relative; 1e-6 is ~17 times
# that. And how far from its switch the background rule counts as decided (its power rounds within ~1e-7).
REL = 1e-6
RULE_MARGIN = 1e-5
# how far from the tie band's edge (methods.labels: classes within tie_tol of the best) a decision counts as
# decided: the float32 path's `best - tol` and its comparison round within ~1e-7 of scores in [0, 1]
TIE_MARGIN = 1e-6


def tileable(mid: int, out: tuple[int, int]) -> bool:
    """Square maps of an even side upsampled by an integer power-of-two factor >= 2 to a square label size."""
    if out[0] != out[1] or mid < 2 or mid % 2 or out[0] % mid:
        return False
    f = out[0] // mid
    return f >= 2 and f & (f - 1) == 0


@dataclass
class Geometry:
    """Tiles of an m x m -> S x S upsampling by f = S / m, per axis (rows and columns alike)."""

    m: int
    f: int

    def __post_init__(self):
        m, f, half = self.m, self.f, self.f // 2
        t = torch.arange(m + 1)
        self.src_a = (t - 1).clamp(0, m - 1)  # the two source rows a tile reads
        self.src_b = t.clamp(0, m - 1)
        self.crop = (t - 1).clamp(0, m - 2)  # first row of its 2-row crop
        start = f * (t - 1) + half  # row r of tile t is output row start + r (outside the map: not valid)
        steps = torch.arange(f)
        rows = start[:, None] + steps[None, :]
        self.valid = (rows >= 0) & (rows < f * m)  # (m + 1, f)
        self.rows = rows.clamp(0, f * m - 1)  # (m + 1, f) global rows of a tile, clamped where not valid
        # the same rows inside the tile's crop upsampled to 2f rows (the crop starts at source row `crop`)
        self.local_rows = (rows - f * self.crop[:, None]).clamp(0, 2 * f - 1)
        y = torch.arange(f * m)
        self.tile_of = (y + half) // f  # (S,) tile of each output row


def upsample_tiles(maps: torch.Tensor, which: torch.Tensor, geo: Geometry, ti: torch.Tensor, tj: torch.Tensor
                   ) -> torch.Tensor:
    """Exact `F.interpolate(maps, (S, S))` values of tiles: tile (ti, tj) of map `which` for each request ->
    (B, f, f) (rows and columns of an edge tile outside the map hold any value; Geometry.valid says which are
    real).

    Each tile's 2 x 2 source crop is packed into a slot of a 2 x m input (side by side; m / 2 slots): upsampled
    to 2f x S, the output has the full map's width, which keeps F.interpolate's CPU kernel on the same code path
    as for the full map (measured: smaller outputs, such as a lone crop's 2f x 2f, differ from the full
    upsample by an ulp on some pixels). A tile's pixels read only its own slot's two columns (the columns between
    slots are never read); edge tiles sit at the packed input's own edges (left: slot 0, right: the last), so
    their clamped source indices are the full map's."""
    f, m = geo.f, geo.m
    slots = m // 2
    out = torch.empty(len(which), f, f, dtype=maps.dtype)
    patches = maps.unfold(1, 2, 1).unfold(2, 2, 1)  # (B, m - 1, m - 1, 2, 2): every 2 x 2 crop, a view
    # row kind 0: top edge, 1: inside, 2: bottom edge (columns alike); the requests of each of the nine (row kind,
    # column kind) pairs, by one sort
    kind = ((ti > 0).long() + (ti == m).long()) * 3 + (tj > 0).long() + (tj == m).long()
    order = torch.argsort(kind, stable=True)
    for code, idx in enumerate(order.split(torch.bincount(kind, minlength=9).tolist())):
        rk, ck = divmod(code, 3)
        if len(idx):
            crops = patches[which[idx], geo.crop[ti[idx]], geo.crop[tj[idx]]]  # (n, 2, 2)
            if ck == 1:  # inside columns: every slot, packs of `slots` tiles
                count = -(-len(idx) // slots) * slots
                packed = torch.zeros(count, 2, 2, dtype=maps.dtype)
                packed[:len(idx)] = crops
                packed = packed.view(-1, slots, 2, 2)
            else:  # an edge column: alone in a pack, at the packed input's own edge (slot 0 or the last)
                packed = torch.zeros(len(idx), slots, 2, 2, dtype=maps.dtype)
                packed[:, 0 if ck == 0 else slots - 1] = crops
            packed = packed.permute(0, 2, 1, 3).reshape(len(packed), 1, 2, 2 * slots)
            up = F.interpolate(packed, size=(2 * f, 2 * slots * f), mode="bilinear", align_corners=False)
            up = up.view(len(packed), 2 * f, slots, 2 * f)
            rows = geo.local_rows[{0: 0, 1: 1, 2: m}[rk]]  # this kind's rows inside a crop's 2f rows
            cols = geo.local_rows[{0: 0, 1: 1, 2: m}[ck]]
            tiles = up.index_select(1, rows).index_select(3, cols)  # (packs, f, slots, f)
            if ck == 1:
                tiles = tiles.permute(0, 2, 1, 3).reshape(-1, f, f)[:len(idx)]
            else:
                tiles = tiles[:, :, 0 if ck == 0 else slots - 1]
            out[idx] = tiles
    return out


def pad_planes(maps: torch.Tensor) -> torch.Tensor:
    """Every m x m plane of maps (..., m, m) padded by one replicated cell on every side -> (planes, m + 2, m + 2)
    (tile_corners, corner_values: a TiledLabels pads its maps once for all of them)."""
    m = maps.shape[-1]
    return F.pad(maps.reshape(-1, 1, m, m), (1, 1, 1, 1), mode="replicate")[:, 0]


def tile_corners(maps: torch.Tensor, padded: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The four source cells of every tile, maps (..., m, m) -> four (..., m + 1, m + 1) views: tile t reads
    source rows (and columns) Geometry.src_a[t] = max(t - 1, 0) and src_b[t] = min(t, m - 1), which are the
    slices [0, m + 1) and [1, m + 2) of the maps padded by one replicated cell on every side (`padded`: their
    pad_planes, when already made)."""
    lead = maps.shape[:-2]
    padded = (pad_planes(maps) if padded is None else padded).view(*lead, maps.shape[-2] + 2, maps.shape[-1] + 2)
    a, b = slice(0, -1), slice(1, None)
    return [padded[..., rows, cols] for rows in (a, b) for cols in (a, b)]


def corner_values(maps: torch.Tensor, which: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor,
                  padded: torch.Tensor | None = None) -> torch.Tensor:
    """The four source cells (tile_corners' order) of tile (ti, tj) of each map maps[which]: maps (B, m, m) ->
    (T, 4); or of every class map: maps (N, K, m, m), which indexing N -> (T, K, 4). One gather from the padded
    maps (`padded`: their pad_planes, when already made; advanced indexing of the four strided views cost ~10x
    more)."""
    m = maps.shape[-1]
    lead = maps.shape[:-2]
    padded = (pad_planes(maps) if padded is None else padded).reshape(-1)
    side = m + 2
    cell = ti * side + tj  # the (0, 0) corner of tile t is padded cell (t, t): source row max(t - 1, 0)
    offsets = torch.tensor([0, 1, side, side + 1])  # c00, c01, c10, c11
    if len(lead) == 1:
        return padded.take(((which * side * side + cell)[:, None] + offsets))
    k = lead[1]
    planes = (which[:, None] * k + torch.arange(k)) * (side * side)  # (T, K)
    return padded.take((planes + cell[:, None])[:, :, None] + offsets)


def tile_bounds(maps: torch.Tensor, geo: Geometry, padded: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of every upsampled value of each tile: the min and max of its source cells, widened by the
    rounding (REL of their largest magnitude): maps (..., m, m) -> two (..., m + 1, m + 1)."""
    c00, c01, c10, c11 = tile_corners(maps, padded)
    lo = torch.minimum(torch.minimum(c00, c01), torch.minimum(c10, c11))
    hi = torch.maximum(torch.maximum(c00, c01), torch.maximum(c10, c11))
    slack = torch.maximum(lo.abs(), hi.abs()) * REL
    return lo - slack, hi + slack


def pixel_weights(f: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(4, P) bilinear weights of a tile's four source cells (tile_corners' order: c00, c01, c10, c11) at its
    pixels (r, q), r and q in `rows` (default every row of the tile: P = f * f, index r * f + q), float64.

    Output row f * (t - 1) + f / 2 + r of tile t reads source rows t - 1 and t with weight (r + 0.5) / f on row t
    (F.interpolate's align_corners=False source index, an exact binary fraction); edge tiles read one row twice,
    so any weights give their value."""
    rows = torch.arange(f, dtype=torch.float64) if rows is None else rows.double()
    lam = (rows + 0.5) / f
    wy, wx = lam[:, None], lam[None, :]
    return torch.stack([((1 - wy) * (1 - wx)), ((1 - wy) * wx), (wy * (1 - wx)), (wy * wx)]).flatten(1)


def real_values(maps: torch.Tensor, which: torch.Tensor, ti: torch.Tensor, tj: torch.Tensor,
                weights: torch.Tensor, padded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bilinear values of tiles (ti, tj) of maps[which] at the pixels of `weights` (pixel_weights), computed
    in float64 (exact up to ~1e-16 relative: the true values F.interpolate rounds), and the largest magnitude of
    each tile's source cells (its rounding scale) -> (T, P), (T, 1)."""
    corners = corner_values(maps, which, ti, tj, padded).double()  # (T, 4)
    return corners @ weights, corners.abs().amax(-1, keepdim=True)


def exact_extremes(maps: torch.Tensor, geo: Geometry, lo: torch.Tensor, hi: torch.Tensor,
                   padded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum and maximum over every upsampled pixel of each map (B, m, m), exactly: only the tiles whose
    bounds (lo, hi from tile_bounds) can hold the extreme are upsampled (every tile holds a value >= its lo, so
    the maximum is at least the largest lo and lies in a tile whose hi reaches that; the minimum alike)."""
    n = len(maps)
    lo_f, hi_f = lo.flatten(1), hi.flatten(1)
    side = geo.m + 1
    corner_weights = pixel_weights(geo.f, torch.tensor([0, geo.f - 1]))
    picked = []
    for sign, bound_near, bound_far in ((1, hi_f, lo_f), (-1, lo_f, hi_f)):
        # sign * near >= max(sign * far), without negated copies: near <= min(far) for the minimum
        reach = bound_far.amax(1, keepdim=True) if sign == 1 else bound_far.amin(1, keepdim=True)
        cand_map, cand_tile = torch.nonzero(bound_near >= reach if sign == 1 else bound_near <= reach,
                                            as_tuple=True)
        # narrowed by real values: a bilinear function's extremes over a tile's pixel grid are at its corner
        # pixels; F.interpolate's value at a pixel is within e = REL x (largest source magnitude) of the real one,
        # so the map's extreme E is within e of A, the best real corner value, and only tiles whose best real
        # corner value reaches A - 2e can hold E
        real, scale = real_values(maps, cand_map, cand_tile // side, cand_tile % side, corner_weights, padded)
        best = (sign * real).amax(1)
        e = REL * scale[:, 0]
        top = torch.full((n,), -torch.inf, dtype=best.dtype).scatter_reduce(0, cand_map, best, reduce="amax")
        e_map = torch.zeros(n, dtype=e.dtype).scatter_reduce(0, cand_map, e, reduce="amax")
        keep = best >= top[cand_map] - 2.5 * e_map[cand_map]
        picked.append((cand_map[keep], cand_tile[keep]))
    # the candidates of both extremes upsampled by one call
    values = upsample_tiles(maps, torch.cat([c for c, _ in picked]), geo, torch.cat([t // side for _, t in picked]),
                            torch.cat([t % side for _, t in picked]))
    out = []
    for sign, (cand_map, cand_tile), tiles in zip((1, -1), picked, values.split([len(c) for c, _ in picked])):
        valid = geo.valid[cand_tile // side][:, :, None] & geo.valid[cand_tile % side][:, None, :]
        fill = -torch.inf if sign == 1 else torch.inf
        per_tile = tiles.masked_fill(~valid, fill).flatten(1)
        per_tile = per_tile.amax(1) if sign == 1 else per_tile.amin(1)
        best = torch.full((n,), fill, dtype=per_tile.dtype)
        best = best.scatter_reduce(0, cand_map, per_tile, reduce="amax" if sign == 1 else "amin")
        out.append(best)
    high, low = out
    return low, high


class TiledLabels:
    """Labels of N configurations over one image's maps, by tiles (module docstring).

    maps (N, K, m, m): the min-maxed maps before the last upsampling; class_ids: the dataset id of each of the K
    maps; rules: one (background, bg_power, bg_threshold) per configuration (methods.maps.labels_from_scores_many).
    """

    def __init__(self, maps: torch.Tensor, class_ids: list[int], out_size: tuple[int, int],
                 rules: list[tuple[str, float, float]], tie: tuple[str, float] = ("lowest", TIE_TOL)):
        n, k, m, _ = maps.shape
        self.maps, self.class_ids, self.out_size, self.rules = maps, list(class_ids), tuple(out_size), rules
        check_rule(*tie)
        self.tie = (tie[0], float(tie[1]))
        # a class wins a tile outright only when it leads every other beyond the tie band (argmax: any lead)
        self.lead_needed = 0.0 if tie[0] == "argmax" else self.tie[1] + TIE_MARGIN
        self.geo = geo = Geometry(m, out_size[0] // m)
        flat = maps.reshape(n * k, m, m)
        self.padded = pad_planes(flat)  # (NK, m + 2, m + 2): every corner gather below reads it
        t_lo, t_hi = tile_bounds(flat, geo, self.padded)  # (NK, m + 1, m + 1)
        low, high = exact_extremes(flat, geo, t_lo, t_hi, self.padded)
        # release_upsample's rescaling, in its own float32 operations: (x - min) / ((max - min) + 1e-6)
        self.low = low.view(n, k, 1, 1)
        self.den = ((high - low) + 1e-6).view(n, k, 1, 1)
        s_lo = self._final(t_lo.view(n, k, m + 1, m + 1))
        s_hi = self._final(t_hi.view(n, k, m + 1, m + 1))
        # the class decided where one class's lower bound beats every other class's upper bound; the background
        # rule reads the best score b, within [max of the lower bounds, max of the upper bounds] (a tile that is
        # surely background needs no decided class: ties between low maps are common there)
        best_lo, arg = s_lo.max(1)
        best_hi = s_hi.amax(1)
        if k > 1:
            one_class = best_lo > s_hi.scatter(1, arg[:, None], -torch.inf).amax(1) + self.lead_needed
        else:
            one_class = torch.ones_like(best_lo, dtype=torch.bool)
        background = torch.zeros_like(one_class)
        foreground = torch.zeros_like(one_class)
        by_rule = _by_rule(rules)
        for (rule, power, threshold), configs in by_rule.items():  # a sweep has few rules: once per rule
            mine = slice(None) if len(by_rule) == 1 else torch.tensor(configs)
            hi, lo = best_hi[mine], best_lo[mine]
            if rule == "power":  # background iff (1 - b)^p > b: decreasing in b, decided with a margin
                background[mine] = (1 - hi) ** power > hi + RULE_MARGIN
                foreground[mine] = (1 - lo) ** power < lo - RULE_MARGIN
            elif rule == "threshold":  # background iff b < threshold: exact comparisons of the bounds
                background[mine], foreground[mine] = hi < threshold, lo >= threshold
            else:
                raise ValueError(f"unknown background rule {rule!r}")
        if k > 1:  # surely foreground, the intervals overlapping: one class may still win at every pixel
            beats, corner_arg = self._corner_winner(flat.view(n, k, m, m), s_lo, s_hi, foreground & ~one_class)
            arg = torch.where(one_class, arg, corner_arg)
            one_class = one_class | beats
        decided = background | (foreground & one_class)
        ids = torch.tensor(self.class_ids, dtype=torch.long)
        self.tile_labels = torch.where(background, 0, ids[arg])  # (N, m + 1, m + 1), valid where decided
        self.decided = decided
        # the undecided tiles, upsampled exactly and labelled as the full path labels every pixel
        self.open_n, open_tile = torch.nonzero(~decided.flatten(1), as_tuple=True)
        side = m + 1
        self.open_ti, self.open_tj = open_tile // side, open_tile % side
        # their labels as local indices (k < K: class k, K: background; a byte per pixel: ids are looked up only
        # where read, and joint_counts folds them into the histogram after counting)
        self.local_ids = torch.tensor([*self.class_ids, 0], dtype=torch.long)
        self.open_local = self._label_tiles()  # (T, f, f)
        self.padded = None  # needed only while labelling: not kept with the predictions that hold this object

    def _corner_winner(self, maps: torch.Tensor, s_lo: torch.Tensor, s_hi: torch.Tensor, todo: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the tiles `todo` (N, m + 1, m + 1), those where one class a wins at every pixel although the
        classes' intervals overlap: a tile's values are convex combinations of its four source cells (the same
        weights for every class), and the rescaling is affine, so a's final score minus b's at any pixel is a
        convex combination of that difference at the corners, up to rounding. a wins when (1) its corner
        differences to every other class exceed both maps' rounding bounds (twice, for the corners' own
        rounding), and (2) the clamp to [0, 1] cannot tie them (a's scores stay above 0 and every other's below
        1): then a is the first maximum. a is the class that wins the first corner. Returns (decided, a), both
        (N, m + 1, m + 1)."""
        k = maps.shape[1]
        tn, ti, tj = torch.nonzero(todo, as_tuple=True)
        corners = corner_values(maps, tn, ti, tj, self.padded).permute(2, 0, 1)  # (4, M, K)
        low, den = self.low[tn, :, 0, 0], self.den[tn, :, 0, 0]
        g = (corners - low) / den  # the rescaling's float32 operations, as _final
        slack = REL * (2 * corners.abs().amax(0) + low.abs()) / den  # interpolation + rescaling rounding
        best, cand = g[0, :, 0], torch.zeros(len(tn), dtype=torch.long)  # first maximum at the first corner
        for j in range(1, k):
            better = g[0, :, j] > best
            best = torch.where(better, g[0, :, j], best)
            cand.masked_fill_(better, j)
        index = cand[:, None]
        lead = (g.gather(2, index[None].expand(4, -1, -1)) - g).amin(0)  # (M, K)
        wins = lead > 2 * (slack.gather(1, index) + slack) + self.lead_needed
        wins.scatter_(1, index, True)
        lo, hi = s_lo.permute(0, 2, 3, 1)[tn, ti, tj], s_hi.permute(0, 2, 3, 1)[tn, ti, tj]
        decided = wins.all(1) & (hi.scatter(1, index, 0.0).amax(1) < 1) & (lo.gather(1, index)[:, 0] > 0)
        out, arg = torch.zeros_like(todo), torch.zeros(todo.shape, dtype=torch.long)
        out[tn, ti, tj], arg[tn, ti, tj] = decided, cand
        return out, arg

    def _final(self, values: torch.Tensor) -> torch.Tensor:
        """The final scores of values of the maps (N, K, ...): rescaled as release_upsample, clamped as
        labels_from_scores_many."""
        return ((values - self.low) / self.den).clamp(0, 1)

    def _label_tiles(self) -> torch.Tensor:
        """Local labels (T, f, f) of the undecided tiles (indices into local_ids): certified from real values
        where every pixel's decision has a margin beyond rounding (_certified_labels), F.interpolate's own values
        on the rest."""
        k, f, count = self.maps.shape[1], self.geo.f, len(self.open_n)
        if not count:
            return torch.zeros(0, f, f, dtype=_local_dtype(k))
        labels, sure = self._certified_labels() if self.tie[0] == "argmax" else self._certified_tie_labels()
        redo = torch.nonzero(~sure, as_tuple=True)[0]
        if len(redo):
            labels[redo] = self._exact_labels(self.open_n[redo], self.open_ti[redo], self.open_tj[redo])
        return labels

    def _certified_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of the undecided tiles from bilinear scores computed here, and which tiles they are certain
        for: at every valid pixel, either the background rule holds with a margin for every score the float32
        path can compute, or one class leads every other by more than twice the rounding, every other class stays
        below 1 (so the clamp cannot tie them), and the rule says foreground with a margin.

        The scores are the bilinear interpolation of the rescaled corners (c - low) / den (the weights sum to
        one, so this is the rescaled value). The float32 path's score is within REL (2 M + |low|) / den + 2^-22
        of the real one (M the largest magnitude of the tile's source cells: interpolation, subtraction and
        division rounding), and ours, in float32 too, within 10 ulps of the largest rescaled corner: the sum of
        both is one slack per tile, for every class. Both background rules are cuts on the best score b
        (rule_cuts)."""
        k = self.maps.shape[1]
        geo, f, count = self.geo, self.geo.f, len(self.open_n)
        corners = corner_values(self.maps, self.open_n, self.open_ti, self.open_tj, self.padded)  # (T, K, 4)
        low, den = self.low[self.open_n, :, 0], self.den[self.open_n, :, 0]  # (T, K, 1)
        rescaled = (corners - low) / den
        slack = (REL * (2 * corners.abs().amax(-1, keepdim=True) + low.abs()) / den
                 + 10 * 2.0 ** -24 * rescaled.abs().amax(-1, keepdim=True) + 2.0 ** -22).amax(1)  # (T, 1)
        score = rescaled @ pixel_weights(f).float()  # (T, K, P)
        best = score[:, 0]
        # class 1 beats class 0 where strictly greater (the first maximum on ties, as first_max): that comparison
        # is the local label already (a bool's bytes are 0 / 1)
        arg = (score[:, 1] > best).view(torch.uint8) if k == 2 else torch.zeros(count, f * f, dtype=_local_dtype(k))
        second = torch.full_like(best, -torch.inf)
        for j in range(1, k):  # K is small: element-wise
            s = score[:, j]
            if k > 2:
                arg.masked_fill_(s > best, j)
            # the runner-up is the larger of the old runner-up and the loser of this pairing (maximum / minimum:
            # ~30x cheaper than torch.where on the CPU; a NaN score leaves its tile uncertain, for the exact path)
            second = torch.maximum(second, torch.minimum(best, s))
            best = torch.maximum(best, s)
        cuts = rule_cuts(self.rules)[self.open_n]  # (T, 2): background below the first, foreground above the second
        background = best + slack < cuts[:, :1]
        # the clamp to [0, 1] cannot tie the leader with the runner-up: the runner-up stays below 1 and the leader
        # above the cut (>= 0); the leader itself may clamp to 1 (a map's maximum rescales to 1 - ~1e-6)
        # x > y exactly when fl(x - y) > 0 (IEEE subtraction keeps the sign and is zero only for x == y), so the
        # three conditions (leader above the cut, runner-up below 1, lead beyond twice the slack) are one
        # comparison of their smallest margin; a NaN margin fails it, as the comparisons would (and flushed
        # subnormals could only make it stricter: an uncertain tile goes to the exact path)
        # (in place: each fresh (T, P) temporary costs more than its arithmetic; -x + 1 is 1 - x exactly)
        margin = (best - slack).sub_(cuts[:, 1:].clamp(min=0))
        if k > 1:  # one class: no runner-up (its margins are +inf)
            torch.minimum(margin, (second + slack).neg_().add_(1), out=margin)
            lead = (best - second).sub_(2 * slack)  # over the runner-up (0 on a tie: never certain)
            torch.minimum(margin, lead, out=margin)
        foreground = margin > 0
        labels = arg.masked_fill_(background, k).view(count, f, f)  # local index k: background
        sure = background | foreground
        certain = sure.view(torch.uint8).amin(1) > 0  # sure.all(1), ~5x faster on the CPU
        # edge tiles: their pixels outside the map (not valid) need no decision
        m = geo.m
        edge = torch.nonzero((self.open_ti == 0) | (self.open_ti == m) | (self.open_tj == 0) | (self.open_tj == m),
                             as_tuple=True)[0]
        if len(edge):
            ti, tj = self.open_ti[edge], self.open_tj[edge]
            valid = (geo.valid[ti][:, :, None] & geo.valid[tj][:, None, :]).flatten(1)
            certain[edge] = (sure[edge] | ~valid).all(1)
        return labels, certain

    def _certified_tie_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """_certified_labels under a tie rule (methods.labels): the same scores and slack; a pixel is certain when
        the background rule holds with a margin, or it says foreground with a margin and no class's gap to the
        best lies near the tie band's edge (within twice the slack plus TIE_MARGIN of tie_tol), so that the set
        of tied classes is the float32 path's. Scores are clamped to [0, 1] as that path clamps them."""
        k = self.maps.shape[1]
        geo, f, count = self.geo, self.geo.f, len(self.open_n)
        rule, tol = self.tie
        corners = corner_values(self.maps, self.open_n, self.open_ti, self.open_tj, self.padded)  # (T, K, 4)
        low, den = self.low[self.open_n, :, 0], self.den[self.open_n, :, 0]  # (T, K, 1)
        rescaled = (corners - low) / den
        slack = (REL * (2 * corners.abs().amax(-1, keepdim=True) + low.abs()) / den
                 + 10 * 2.0 ** -24 * rescaled.abs().amax(-1, keepdim=True) + 2.0 ** -22).amax(1)  # (T, 1)
        score = (rescaled @ pixel_weights(f).float()).clamp_(0, 1)  # (T, K, P)
        best, index, tied = decide(score, rule, tol, order=self._order())
        gap = best[:, None] - score
        near = ((gap - tol).abs() <= (2 * slack + TIE_MARGIN)[:, None]).any(1)  # (T, P)
        labels = index.to(_local_dtype(k))
        if rule == "background":
            labels.masked_fill_(tied, k)
        cuts = rule_cuts(self.rules)[self.open_n]
        background = best + slack < cuts[:, :1]
        foreground = (best - slack > cuts[:, 1:].clamp(min=0)) & ~near
        labels = labels.masked_fill_(background, k).view(count, f, f)
        sure = background | foreground
        certain = sure.all(1)
        m = geo.m
        edge = torch.nonzero((self.open_ti == 0) | (self.open_ti == m) | (self.open_tj == 0) | (self.open_tj == m),
                             as_tuple=True)[0]
        if len(edge):
            ti, tj = self.open_ti[edge], self.open_tj[edge]
            valid = (geo.valid[ti][:, :, None] & geo.valid[tj][:, None, :]).flatten(1)
            certain[edge] = (sure[edge] | ~valid).all(1)
        return labels, certain

    def _order(self) -> torch.Tensor | None:
        """The classes' ids where their index order is not id order (decide's `order`)."""
        ids = torch.tensor(self.class_ids)
        return None if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()) else ids

    def _exact_labels(self, open_n: torch.Tensor, open_ti: torch.Tensor, open_tj: torch.Tensor) -> torch.Tensor:
        """Labels of tiles from F.interpolate's own values (upsample_tiles), as the full path labels every pixel."""
        from methods.maps import first_max

        n, k, m, _ = self.maps.shape
        f, count = self.geo.f, len(open_n)
        which = (open_n[:, None] * k + torch.arange(k)).flatten()  # every class map of each tile
        values = upsample_tiles(self.maps.reshape(n * k, m, m), which, self.geo, open_ti.repeat_interleave(k),
                                open_tj.repeat_interleave(k))
        values = values.view(count, k, f, f)
        scores = ((values - self.low[open_n]) / self.den[open_n]).clamp(0, 1)
        if self.tie[0] == "argmax":
            best, arg = first_max(scores)
            labels = arg.to(_local_dtype(k))
        else:  # the tie rule as methods.maps.labels_from_scores_many applies it (methods.labels.decide)
            best, arg, tied = decide(scores, *self.tie, order=self._order())
            labels = arg.to(_local_dtype(k))
            if self.tie[0] == "background":
                labels.masked_fill_(tied, k)
        by_rule = _by_rule(self.rules)
        for (rule, power, threshold), configs in by_rule.items():
            mine = torch.isin(open_n, torch.tensor(configs)) if len(by_rule) > 1 else None
            b = best if mine is None else best[mine]
            # the same operations as labels_from_scores_many (a python exponent: pow(x, 2.0) is x * x there too)
            bg = (1 - b) ** power > b if rule == "power" else b < threshold
            if mine is None:
                labels.masked_fill_(bg, k)
            else:
                labels[mine] = labels[mine].masked_fill(bg, k)
        return labels

    # -- reading ---------------------------------------------------------------------------------------------------
    def labels(self, j: int) -> torch.Tensor:
        """The full (S, S) label map of configuration j (equal to labels_from_scores_many's)."""
        geo = self.geo
        full = self.tile_labels[j][geo.tile_of[:, None], geo.tile_of[None, :]].clone()
        mine = torch.nonzero(self.open_n == j, as_tuple=True)[0]
        if len(mine):  # the undecided tiles' own pixels, all at once (edge tiles: their valid rows/columns only)
            ti, tj = self.open_ti[mine], self.open_tj[mine]
            valid = geo.valid[ti][:, :, None] & geo.valid[tj][:, None, :]  # (T, f, f)
            rows = geo.rows[ti][:, :, None].expand_as(valid)
            cols = geo.rows[tj][:, None, :].expand_as(valid)
            full[rows[valid], cols[valid]] = self.local_ids[self.open_local[mine][valid].long()]
        return full

    def joint_counts(self, codes: np.ndarray, num_classes: int) -> np.ndarray:
        """(N, C + 2, C + 1) joint counts of ground-truth codes (S, S) (bench.metrics.ImageScorer's label codes,
        0..C + 1) against each configuration's prediction (codes 0..C, C = a class id out of range)."""
        geo, c = self.geo, num_classes
        n, f, side = len(self.rules), geo.f, geo.m + 1
        # the ground truth in tiles: padded by f / 2 with an extra code (c + 2) so that tiles are f x f blocks
        codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int32))  # int32: half the memory traffic
        padded = F.pad(codes_t[None, None], (f // 2,) * 4, value=c + 2)[0, 0]
        gt = padded.view(side, f, side, f).permute(0, 2, 1, 3)  # (m + 1, m + 1, f, f), a view
        tile_index = torch.arange(side * side, dtype=torch.int32).view(side, side, 1, 1) * (c + 3)
        per_tile = torch.bincount((tile_index + gt).flatten(), minlength=side * side * (c + 3))
        per_tile = per_tile.view(side * side, c + 3)[:, :c + 2]  # ground-truth counts of each tile
        # decided tiles add their ground-truth counts to their (configuration, predicted class) row; undecided
        # ones go to an extra prediction row (c + 1), dropped. Most tiles are f x f pixels of one ground-truth code:
        # one unweighted count per (configuration, tile), times f^2. The other tiles (edges, several codes) add
        # their count rows by a small batched product, exact in float64.
        pred = self.tile_labels.flatten(1)
        pred = torch.where((pred >= 0) & (pred < c), pred, c).masked_fill_(~self.decided.flatten(1), c + 1)
        count, code = per_tile.max(1)
        whole = count == f * f
        tile_code = torch.where(whole, code, c + 2)  # c + 2: not a whole one-code tile, counted below
        key = (torch.arange(n)[:, None] * (c + 2) + pred) * (c + 3) + tile_code
        joint = torch.bincount(key.flatten(), minlength=n * (c + 2) * (c + 3)).view(n, c + 2, c + 3)
        joint = joint[:, :c + 1, :c + 2] * (f * f)
        other = torch.nonzero(~whole, as_tuple=True)[0]
        # (N, C + 1, M) one-hot of the predictions (the undecided row c + 1 matches no column); float32 products
        # are exact while every sum (at most the image's pixel count) stays below 2^24
        exact = torch.float32 if codes.size < 2 ** 24 else torch.float64
        onehot = (pred[:, None, other] == torch.arange(c + 1)[None, :, None]).to(exact)
        joint = joint + (onehot @ per_tile[other].to(exact)).round().long()
        joint = joint.transpose(1, 2)  # (N, C + 2, C + 1): ground truth by prediction
        if len(self.open_n):
            # (T, f, f), rows and columns as in open_local (index_select of the tiles made contiguous: ~10x faster
            # than advanced indexing of the strided view)
            gt_open = gt.reshape(side * side, f, f).index_select(0, self.open_ti * side + self.open_tj)
            # counted by local label (K + 1 columns), then each local column added to its class's prediction
            # column (an id out of range: column c); the padding's code c + 2 counts in a row of its own, dropped
            k1 = len(self.local_ids)
            base = (self.open_n.int() * ((c + 3) * k1))[:, None, None]
            cell = (base + gt_open * k1).add_(self.open_local)  # int32 in place (int64 + uint8 promotes slowly)
            local = torch.bincount(cell.flatten(), minlength=n * (c + 3) * k1).view(n, c + 3, k1)
            column = torch.where((self.local_ids >= 0) & (self.local_ids < c), self.local_ids, c)
            joint = joint + torch.zeros(n, c + 3, c + 1, dtype=local.dtype).index_add_(2, column, local)[:, :c + 2]
        return joint.numpy()


def _local_dtype(k: int) -> torch.dtype:
    """The dtype of local labels 0..K (K: background): a byte up to 254 classes per image."""
    return torch.uint8 if k < 255 else torch.int16


def rule_cuts(rules: list[tuple[str, float, float]]) -> torch.Tensor:
    return _rule_cuts(tuple(tuple(rule) for rule in rules))


@functools.lru_cache(maxsize=64)
def _rule_cuts(rules: tuple[tuple[str, float, float], ...]) -> torch.Tensor:
    """(N, 2) cuts of each background rule on the best score b in [0, 1]: background wherever b < the first,
    foreground wherever b > the second, with RULE_MARGIN beside the switch (the float32 path evaluates the
    rule in its own rounding). "threshold": b < t (t <= 0: never background; t > 1: always). "power":
    (1 - b)^p > b, decreasing in b: background below its root b* (bisection), foreground above."""
    cuts = []
    for rule, power, threshold in rules:
        if rule == "threshold":
            switch = threshold
            if threshold <= 0 or threshold > 1:
                cuts.append((-torch.inf, -torch.inf) if threshold <= 0 else (torch.inf, torch.inf))
                continue
        elif rule == "power":
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if (1 - mid) ** power > mid else (lo, mid)
            switch = lo
        else:
            raise ValueError(f"unknown background rule {rule!r}")
        cuts.append((switch - RULE_MARGIN, switch + RULE_MARGIN))
    return torch.tensor(cuts, dtype=torch.float32)


def _by_rule(rules: list[tuple[str, float, float]]) -> dict[tuple, list[int]]:
    """Configurations grouped by their (background, bg_power, bg_threshold) rule."""
    out: dict[tuple, list[int]] = {}
    for j, rule in enumerate(rules):
        out.setdefault(tuple(rule), []).append(j)
    return out


class TiledPrediction(Prediction):
    """One configuration's Prediction from TiledLabels: `labels` and `scores` are built when read; the engine's
    scorer counts it by tiles through `scored_as` (bench.metrics.ImageScorer.histograms), never reading `labels`."""

    def __init__(self, tiled: TiledLabels, index: int, full_scores):  # noqa: D107 (not the dataclass __init__)
        self.tiled, self.index, self._full_scores = tiled, index, full_scores
        self._labels = self._scores = None

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            self._labels = self.tiled.labels(self.index)
        return self._labels

    @property
    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self._full_scores()
        return self._scores

    @property
    def decision_scores(self) -> torch.Tensor:
        """The min-maxed maps before the last upsampling (reading `scores` would upsample every configuration)."""
        return self.tiled.maps[self.index]

    def scored_as(self) -> CountedLabels:
        """Counted by tiles, with every configuration of the same TiledLabels at once."""
        return CountedLabels(self.tiled, self.index)
