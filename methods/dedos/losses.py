"""DEDOS's segmentation loss (Eq. 15): Hungarian-matched mask classification as in Mask2Former.

L_seg = l_cls CE + l_mask L_mask + l_dice L_dice. `seg_loss=paper` (Sec. 3.6): binary cross-entropy masks and
equal weights (1, 1, 1); `seg_loss=release`: sigmoid focal masks weighted 20 (the released code), CE and dice 1.
Unmatched queries are classified as no-object, whose CE weight is 0.1 (Mask2Former's eos_coef). Pixels outside
`valid` (ignore label, unseen classes under the open-vocabulary protocol) count in no mask term.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NO_OBJECT_WEIGHT = 0.1
WEIGHTS = {"paper": {"cls": 1.0, "mask": 1.0, "dice": 1.0, "mask_kind": "bce"},
           "release": {"cls": 1.0, "mask": 20.0, "dice": 1.0, "mask_kind": "focal"}}


def _focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    return ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))


def _mask_term(logits, targets, kind):
    return _focal(logits, targets) if kind == "focal" else \
        F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def _dice(logits, targets, valid):
    p = logits.sigmoid() * valid
    num = 2 * (p * targets).sum(-1)
    return 1 - (num + 1) / (p.sum(-1) + (targets * valid).sum(-1) + 1)


@torch.no_grad()
def match(class_logits, mask_logits, classes, masks, valid, w) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of one image's n queries to its T targets (scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment  # here: the registry imports every method for every run

    prob = class_logits.softmax(-1)[:, classes]  # (n, T)
    m = mask_logits.flatten(1)  # (n, P)
    t, v = masks.flatten(1), valid.flatten()[None]
    pos = (_mask_term(m, torch.ones_like(m), w["mask_kind"]) * v) @ t.T
    neg = (_mask_term(m, torch.zeros_like(m), w["mask_kind"]) * v) @ (1 - t).T
    cost_mask = (pos + neg) / v.sum().clamp_min(1)
    p = m.sigmoid() * v
    cost_dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1, keepdim=True) + (t * v).sum(-1)[None] + 1)
    cost = -w["cls"] * prob + w["mask"] * cost_mask + w["dice"] * cost_dice
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return rows, cols


def seg_loss(class_logits, mask_logits, targets: list[dict], kind: str = "paper") -> torch.Tensor:
    """Eq. 15 over a batch. class_logits (B, n, K+1); mask_logits (B, n, h, w); targets[b] = {"classes": (T,)
    long indices into the K classes, "masks": (T, h, w) float, "valid": (h, w) float}."""
    w = WEIGHTS[kind]
    b, n, k1 = class_logits.shape
    cls_targets = torch.full((b, n), k1 - 1, dtype=torch.long, device=class_logits.device)
    mask_terms, dice_terms, count = [], [], 0
    for i, tgt in enumerate(targets):
        if len(tgt["classes"]) == 0:
            continue
        rows, cols = match(class_logits[i], mask_logits[i], tgt["classes"], tgt["masks"], tgt["valid"], w)
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        cls_targets[i, rows] = tgt["classes"][cols]
        pred = mask_logits[i, rows].flatten(1)
        true = tgt["masks"][cols].flatten(1)
        valid = tgt["valid"].flatten()[None]
        mask_terms.append((_mask_term(pred, true, w["mask_kind"]) * valid).sum(-1) / valid.sum().clamp_min(1))
        dice_terms.append(_dice(pred, true, valid))
        count += len(rows)
    weight = torch.ones(k1, device=class_logits.device)
    weight[-1] = NO_OBJECT_WEIGHT
    loss = w["cls"] * F.cross_entropy(class_logits.flatten(0, 1), cls_targets.flatten(), weight=weight)
    if count:
        loss = loss + w["mask"] * torch.cat(mask_terms).sum() / count + w["dice"] * torch.cat(dice_terms).sum() / count
    return loss
