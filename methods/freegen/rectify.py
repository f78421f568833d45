"""FreeGen's Stage-1 mathematics on plain tensors (Wang et al., AAAI 2025, "FreeGen"; no public code).

Attention Self-Rectification (ASR):
  Eq. 1  A_{s,t,h} = W_h (.) softmax(Q_h K_h^T / sqrt(d_h)),   W in R^{H x N}; the adaptive self-attention
         weight map aggregates the heads, A_{s,t} = sum_h A_{s,t,h}. W_h weights the rows (query positions) of
         head h. W = 1/H reduces it to the head mean (the initialisation, and "ASR off").
  Eq. 2  A_{c,t,h} = softmax(Q_h (Upsilon_h K^y_h)^T / sqrt(d_h)): a learnable linear map Upsilon on the
         class-entity keys (identity initialisation = the UNet's own cross-attention).
  Eq. 3  A_{*,t} = A_{s,t} . A_{c,t}: self-attention propagates each class's cross-attention over the regions
         that attend to each other.
Temporal Fluctuation Factor:
  Eq. 4  TFF = 1/(K H W) sum_i sum_{h,w} |M_{i,h,w} - mean_i M_{i,h,w}| over masks at K uniformly spaced
         denoising steps; high TFF = the mask changes over time = unreliable; such samples are filtered.
Pseudo-masks (what the paper leaves open, filled in from Dataset Diffusion's released code, the "ASR off"
baseline FreeGen compares against): per-class maps min-max normalised, the strongest class where its score is
>= fg_threshold (0.6), ignore (255) between ignore_threshold (0.5) and fg_threshold, background below.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.data.base import IGNORE_INDEX


def head_mean_weights(heads: int, positions: int) -> torch.Tensor:
    """W of Eq. 1 initialised so that the adaptive map is the mean over heads: (H, N) filled with 1/H."""
    return torch.full((heads, positions), 1.0 / heads)


def adaptive_self_attention(self_probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 summed over heads: self_probs (..., H, N, N) (rows are queries), weights (H, N) or None
    (the head mean) -> (..., N, N)."""
    if weights is None:
        return self_probs.float().mean(-3)
    return (weights.to(self_probs.device).float()[..., :, :, None] * self_probs.float()).sum(-3)


def rectified_attention(adaptive_self: torch.Tensor, cross: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Eq. 3: A_* = A_s . A_c. adaptive_self (..., N, N), cross (..., N, K) -> (..., N, K).
    power > 1 raises A_s to a matrix power first (Dataset Diffusion's SA^tau, tau = 4; FreeGen: 1)."""
    a_s = adaptive_self.float()
    if power > 1:
        a_s = torch.linalg.matrix_power(a_s, power)
    return a_s @ cross.float()


def rekeyed_cross(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                  upsilon: torch.Tensor | None = None, key_index: list[int] | None = None) -> torch.Tensor:
    """Eq. 2 for one layer and step: queries (H, N, d), keys (H, T, d) of the whole prompt, upsilon (H, d, d)
    applied to the keys at `key_index` (the class-entity tokens; all when None); softmax over all T tokens
    as in the UNet. Returns (H, N, T)."""
    k = keys.float()
    if upsilon is not None:
        idx = list(range(k.shape[1])) if key_index is None else key_index
        k = k.clone()
        k[:, idx] = torch.einsum("hde,hte->htd", upsilon.float(), k[:, idx])
    return (torch.einsum("hnd,htd->hnt", queries.float(), k) * scale).softmax(-1)


def normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-class min-max to [0, 1] of (K, ...) maps."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def pseudo_label(scores: torch.Tensor, class_ids: list[int], fg_threshold: float = 0.6,
                 ignore_threshold: float = 0.5) -> np.ndarray:
    """Normalised class maps (K, H, W) at image size -> uint8 label map: strongest class where its score is
    >= fg_threshold, IGNORE_INDEX where it is in [ignore_threshold, fg_threshold), 0 below."""
    if not class_ids:
        return np.zeros(tuple(scores.shape[-2:]), np.uint8)
    best, arg = scores.max(0)
    labels = torch.tensor(class_ids, dtype=torch.long, device=arg.device)[arg]
    labels[best < fg_threshold] = IGNORE_INDEX
    labels[best < ignore_threshold] = 0
    return labels.cpu().numpy().astype(np.uint8)


def uniform_steps(num_steps: int, k: int) -> list[int]:
    """K uniformly spaced indices over the recorded denoising steps, the last step included (Eq. 4's S)."""
    if k < 1:
        raise ValueError("K must be >= 1")
    if k == 1:
        return [num_steps - 1]
    return sorted({int(round(x)) for x in np.linspace(0, num_steps - 1, k)})


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., H, W) class ids (IGNORE_INDEX allowed: a zero vector) -> (..., C, H, W) float."""
    valid = labels != IGNORE_INDEX
    out = torch.nn.functional.one_hot(torch.where(valid, labels, 0).long(), num_classes).movedim(-1, -3).float()
    return out * valid.unsqueeze(-3).float()


def temporal_fluctuation(masks: torch.Tensor) -> float:
    """Eq. 4: masks (K, C, H, W) (one-hot class masks, or soft maps) at K steps -> mean over steps, channels
    and pixels of |M_i - mean_i M_i|. Zero when every step gives the same mask."""
    masks = masks.float()
    return float((masks - masks.mean(0, keepdim=True)).abs().mean())


def strongest_far_points(score: torch.Tensor, n: int = 3, min_score: float = 0.6) -> list[tuple[int, int]]:
    """SAM point prompts from one normalised class map (h, w): "the strongest response and the farthest
    distance" (FreeGen Sec. 3, Training Strategy): the strongest pixel, then repeatedly the pixel of the
    confident region (score >= min_score) farthest from the points chosen so far. Returns (x, y) pixels."""
    h, w = score.shape
    flat = score.flatten().float().cpu()  # a few hundred pixels: the search loop is host-side
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    first = int(flat.argmax())
    candidates = flat >= min(min_score, float(flat[first]))
    chosen = [first]
    nearest = (coords - coords[first]).norm(dim=1)
    for _ in range(n - 1):
        reach = torch.where(candidates, nearest, torch.full_like(nearest, -1.0))
        nxt = int(reach.argmax())
        if reach[nxt] <= 0:  # the confident region is a single pixel
            break
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (coords - coords[nxt]).norm(dim=1))
    return [(int(coords[i, 0]), int(coords[i, 1])) for i in chosen]
