"""Map helpers shared by methods: resizing, normalisation, label assignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.labels import TIE_TOL, choose


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(..., h, w) -> (..., H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False if mode != "nearest" else None)
    return out.reshape(*lead, *size)


def minmax(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-map min-max scaling of (K, ...) to [0, 1]."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def labels_from_scores(scores: torch.Tensor, class_ids: list[int], out_size: tuple[int, int],
                       background: str = "power", bg_power: float = 2.0, bg_threshold: float = 0.45,
                       tie: tuple[str, float] = ("lowest", TIE_TOL)) -> torch.Tensor:
    """Per-class scores in [0, 1] (K, h, w) -> dataset label map (H, W), 0 = background.

    background="power": background score (1 - max_k s_k)^p competes in the argmax (iSeg code, p = 2);
    background="threshold": background wherever max_k s_k < bg_threshold (iSeg code for COCO, 0.45).
    tie: (tie_rule, tie_tol) among the classes (methods.labels).
    """
    return labels_from_scores_many(scores[None], class_ids, out_size, [(background, bg_power, bg_threshold)],
                                   [tie])[0]


def labels_from_scores_many(scores: torch.Tensor, class_ids: list[int], out_size: tuple[int, int],
                            rules: list[tuple[str, float, float]],
                            ties: list[tuple[str, float]] | None = None) -> torch.Tensor:
    """`labels_from_scores` of N configurations at once: scores (N, K, h, w), one (background, bg_power,
    bg_threshold) rule and one (tie_rule, tie_tol) per configuration (default: methods.labels' defaults)
    -> (N, H, W). Resized in one call; configurations sharing a tie rule reduced over classes in one call."""
    if not class_ids:
        return torch.zeros(len(scores), *out_size, dtype=torch.long, device=scores.device)
    up = resize_maps(scores, out_size).clamp(0, 1)
    ties = [tuple(t) for t in ties] if ties is not None else [("lowest", TIE_TOL)] * len(scores)
    if len(ties) != len(scores):
        raise ValueError(f"{len(ties)} tie rules for {len(scores)} configurations")
    best = torch.empty(up.shape[:1] + up.shape[2:], dtype=up.dtype, device=up.device)
    labels = torch.empty(best.shape, dtype=torch.long, device=up.device)
    for tie in dict.fromkeys(ties):
        rows = [n for n, t in enumerate(ties) if t == tie]
        if tie[0] == "argmax":  # the released behaviour: the first maximum as computed
            b, arg = first_max(up[rows])
            lab = torch.tensor(class_ids, dtype=torch.long, device=arg.device)[arg]
        else:
            b, lab = choose(up[rows], class_ids, *tie)
        best[rows], labels[rows] = b, lab
    for n, (background, bg_power, bg_threshold) in enumerate(rules):
        if background == "power":
            labels[n][(1 - best[n]) ** bg_power > best[n]] = 0
        elif background == "threshold":
            labels[n][best[n] < bg_threshold] = 0
        else:
            raise ValueError(f"unknown background rule {background!r}")
    return labels


def first_max(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`maps.max(1)` of (N, K, H, W): the maximum over classes and the first class reaching it. For one or two
    classes as element-wise comparisons, which are several times faster than a reduction over a middle dim."""
    if maps.shape[1] > 2 or torch.isnan(maps).any():
        return maps.max(1)
    best = maps[:, 0]
    arg = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    if maps.shape[1] == 2:
        better = maps[:, 1] > best
        best = torch.where(better, maps[:, 1], best)
        arg.masked_fill_(better, 1)
    return best, arg


def maxnorm(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-map division by the maximum (DAAM as applied by the OVAM paper: map / max > tau)."""
    flat = maps.flatten(1)
    return (flat / flat.max(1, keepdim=True).values.clamp_min(eps)).view_as(maps)


def labels_from_threshold(scores: torch.Tensor, class_ids: list[int], out_size: tuple[int, int],
                          tau: float, strict: bool = True, tie: tuple[str, float] = ("lowest", TIE_TOL)
                          ) -> torch.Tensor:
    """Per-class normalised maps (K, h, w) -> label map: class k where its map passes tau (DAAM: > tau; OVAM
    Eq. 9: >= tau), the strongest class where several do (tie: (tie_rule, tie_tol), methods.labels),
    background elsewhere."""
    if not class_ids:
        return torch.zeros(out_size, dtype=torch.long, device=scores.device)
    up = resize_maps(scores, out_size)
    best, labels = choose(up, class_ids, *tie, dim=0)
    labels[(best <= tau) if strict else (best < tau)] = 0
    return labels


# Two class scores closer than this (scores lie in [0, 1]) give a label that the tie rule decided (methods.labels;
# under tie_rule=argmax, float32 rounding): iSeg's chain at N = 10 on the embedded model converges every class
# map to one map (the test test_default_keeps_the_class_maps_apart measures it). The `tied` column counts them.
TIE = TIE_TOL
# Ties are counted on at most TIE_GRID x TIE_GRID cells per map (a strided grid): score maps are upsampled
# attention (64 x 64 at most on SD), so the grid keeps what tells the classes apart at a bounded cost.
TIE_GRID = 64


def tie_grid(maps: torch.Tensor) -> torch.Tensor:
    """The strided view of (..., h, w) maps on which ties are counted (at most TIE_GRID cells per side)."""
    step_h, step_w = (max(1, -(-size // TIE_GRID)) for size in maps.shape[-2:])
    return maps[..., ::step_h, ::step_w]


def tie_counts(scores: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) class scores of N predictions -> (N, 2) int64 [tied, counted] cells: counted are the cells
    where some class scores above TIE (cells where every class scores ~0 are left to the background rule), tied
    those of them whose two best classes lie within TIE. Images with fewer than two classes count nothing."""
    n, k = scores.shape[:2]
    if k < 2:
        return torch.zeros(n, 2, dtype=torch.long)
    grid = tie_grid(scores.detach()).float()
    # the two best classes by element-wise max/min over K (few classes: cheaper than a top-k over dim 1)
    best, second = grid[:, 0], torch.full_like(grid[:, 0], -torch.inf)
    for c in range(1, k):
        second = torch.maximum(second, torch.minimum(best, grid[:, c]))
        best = torch.maximum(best, grid[:, c])
    counted = (best > TIE).flatten(1)
    tied = counted & (best - second <= TIE).flatten(1)
    return torch.stack([tied.sum(1), counted.sum(1)], 1).cpu()

