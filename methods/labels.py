"""Which class a pixel takes: the one place where the training-free methods (iSeg, DAAM, OVAM, Attn2Mask, the
linear probe) choose among class scores. The trained heads (DEDOS, SegFormer, FreeGen) keep argmax over their
outputs, the tolerance below being measured on attention maps: their tie_rule is argmax, another is refused.

A pixel's label is the class with the highest score. Where two classes score within a tolerance of each other,
the scores cannot tell them apart, and which of them comes out highest depends on float rounding: the
summation order of the matrix kernels (thread count, SIMD width, BLAS build), which differs between machines.
iSeg's chain of N products on a small model converges its class maps towards one map, and most of its labels
are such near-ties (the `tied` column of a run). The tie rule decides them instead:

- `lowest` (default): the lowest class id among the classes within `tie_tol` of the best. It is what argmax
  already does on exact ties (the first maximum, classes in id order), so it departs from the release only where
  rounding decided; and it is defined for every protocol, with or without a background class.
- `background`: background (id 0) wherever two or more classes are within `tie_tol`: the method abstains where
  its scores do not separate the classes, and no class is credited for an arbitrary choice. Meaningful for
  background-aware protocols only (it labels a pixel 0, which a layout without background does not score).
- `argmax`: the first maximum of the scores as computed, the released code's behaviour (rounding decides).

`tie_tol` is absolute, on the scale of the scores the decision reads (min-max normalised maps in [0, 1] for every
method here): rounding of a normalised value is bounded by the map's range (its maximum rescales to 1), not by the
value itself, so a relative tolerance would leave near-zero scores exposed. Its default, TIE_TOL = 1e-2, is
measured on the main job (sweeps/iseg_lambda.yaml, embedded model, 16 images x 6 settings = 25.2 M labels at
512 x 512; docs/reproduce.md, "Deterministic labels"). Two thread counts (1 and 2), or oneDNN off against on,
move the decision scores by up to 7e-7 and 9e-7 (99th percentile 1.8e-7) and change 110,098 and 130,744 labels
under argmax. The gap between the two best classes is continuous: 80% of the cells within 1e-5, 91% within
1e-4, 97.9% within 1e-3, 99.5% within 1e-2, so every band edge has decisions near it, and how many of them the
rounding crosses falls with the density there. Labels that still differ between the kernels, per tolerance
(power background rule): 1e-5: 395; 1e-4: 16 and 19; 1e-3: 6 and 5; 3e-3: 2 and 1; 1e-2: 0 and 0. 1e-2 is the
smallest tolerance tried with no label moved by either change; scores in float32 round at ~6e-8 near 1, five
orders of magnitude below it, and a class within 1% of the best on a min-max normalised map is not one the
scores distinguish.
"""

from __future__ import annotations

import torch

TIE_RULES = ("lowest", "background", "argmax")
TIE_TOL = 1e-2


def check_rule(rule: str, tol: float) -> None:
    if rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {rule!r}: one of {', '.join(TIE_RULES)}")
    if not tol >= 0:
        raise ValueError(f"tie tolerance {tol!r} must be >= 0")


def decide(scores: torch.Tensor, rule: str = "lowest", tol: float = TIE_TOL, dim: int = 1,
           order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (..., K, ...) with the classes on `dim` -> (best, index, tied):
    best: the maximum score over classes; index: the chosen class (index into K); tied: where two or more classes
    lie within `tol` of the best (all False for rule="argmax", which returns the first maximum as computed).

    `order`: the classes' ids (K,) when index order is not id order; "lowest" picks the lowest id among the tied.
    With rule="background" the index is that of "lowest": callers label `tied` pixels background."""
    check_rule(rule, tol)
    best, first = scores.max(dim)
    if rule == "argmax" or scores.shape[dim] < 2:
        return best, first, torch.zeros_like(first, dtype=torch.bool)
    within = scores >= best.unsqueeze(dim) - tol
    tied = within.sum(dim) > 1
    if order is None:
        index = within.byte().argmax(dim)  # the first True: the lowest index among the tied (and the best alone)
    else:
        order = torch.as_tensor(order, device=scores.device)
        rank = torch.argsort(order, stable=True)  # positions in id order
        pos = within.index_select(dim, rank).byte().argmax(dim)
        index = rank[pos]
    # NaN scores: max propagates NaN, no class is within; keep argmax's choice there
    index = torch.where(torch.isnan(best), first, index)
    return best, index, tied


def choose(scores: torch.Tensor, ids, rule: str = "lowest", tol: float = TIE_TOL, dim: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with the classes on `dim` and each class's dataset id -> (best score, label id); under
    rule="background" tied pixels take 0."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=scores.device)
    best, index, tied = decide(scores, rule, tol, dim, order=None if _ascending(ids) else ids)
    labels = ids[index]
    if rule == "background":
        labels = labels.masked_fill(tied, 0)
    return best, labels


def tie_of(cfg) -> tuple[str, float]:
    """A configuration's (tie_rule, tie_tol) (methods.base.COMMON_PARAMS)."""
    return cfg["tie_rule"], float(cfg["tie_tol"])


def _ascending(ids: torch.Tensor) -> bool:
    return bool(len(ids) < 2 or (ids[1:] > ids[:-1]).all())
