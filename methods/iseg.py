"""iSeg (Sun et al., "iSeg: An Iterative Refinement-based Framework for Training-free Segmentation").

Inversion at t = 100 with the prompt "A photograph of [CLS A] and [CLS B] and other objects and background";
Cat-Cross (Eq. 8-9) weights the class tokens' keys by gamma inside the UNet; the initial cross-attention map
fuses the decoder's 16x16 and 32x32 layers (Table 6a); the self-attention map is the last decoder layer's
(Table 6b); Ent-Self (Eq. 5-7) lowers its entropy; Algorithm 1 refines the class maps N times (Eq. 4) with a
normalisation before every product and after the last.

The math works on plain tensors: `from methods.iseg import ent_self, refine, entropy`.
"""

from __future__ import annotations

import torch

from bench.trace import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.postprocess import labels_from_scores, minmax, resize_maps, token_indices

CROSS_LEVELS = {  # decoder cross-attention layers by resolution at 512 px (SD block layout)
    "16": ["up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
           "up_blocks.1.attentions.2.transformer_blocks.0.attn2"],
    "32": ["up_blocks.2.attentions.0.transformer_blocks.0.attn2", "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
           "up_blocks.2.attentions.2.transformer_blocks.0.attn2"],
}
CROSS_LEVELS["both"] = CROSS_LEVELS["16"] + CROSS_LEVELS["32"]
SELF_LAYERS = {  # Table 6(b): #-1 is the last decoder layer
    -1: "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
    -2: "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    -3: "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
}
LOG_EPS = 1e-12  # log(A) of entries that underflowed to exactly 0


def entropy(attn: torch.Tensor) -> torch.Tensor:
    """Self-attention entropy E = -sum_ij A_ij log A_ij (iSeg Eq. 5); 0 log 0 = 0."""
    return -(attn * torch.log(attn.clamp_min(LOG_EPS))).sum()


def ent_self(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """Entropy-reduced self-attention, one gradient step against Eq. 6: A + lambda (1 + log A) (iSeg Eq. 7)."""
    if lam == 0:
        return attn
    return attn + lam * (1 + torch.log(attn.clamp_min(LOG_EPS)))


def normalize(maps: torch.Tensor) -> torch.Tensor:
    """Normalisation of Algorithm 1 (lines 13, 18) on (HW, K) maps: shift each class map to a minimum of 0
    and scale it to unit sum. The paper does not spell it out; this is the released code's choice."""
    shifted = maps - maps.min(0, keepdim=True).values
    return shifted / shifted.sum(0, keepdim=True).clamp_min(1e-12)


def refine(attn_ent: torch.Tensor, cross: torch.Tensor, iterations: int) -> torch.Tensor:
    """Algorithm 1 lines 12-18 / Eq. 4: C^n = A_ent C^(n-1), normalised before each product and at the end.
    attn_ent: (HW, HW) row-query self-attention; cross: (HW, K)."""
    maps = cross
    for _ in range(iterations):
        maps = attn_ent @ normalize(maps)
    return normalize(maps)


def refine_sweep(attn: torch.Tensor, log_attn: torch.Tensor | None, cross: torch.Tensor, lams: list[float],
                 iterations: list[int]) -> list[torch.Tensor]:
    """`refine(ent_self(A, lam_j), C, N_j)` for many configurations in one pass over A.

    By Eq. 7, ent_self(A, lam) C = A C + lam (1^T C + log(A) C), so every configuration shares the products
    with A and log A: each iteration reads the two HW x HW matrices once, whatever the number of configs.
    """
    k = cross.shape[1]
    maps = cross.repeat(1, len(lams))  # (HW, K * configs)
    lam_cols = torch.tensor(lams, dtype=cross.dtype).repeat_interleave(k)
    for n in range(max(iterations, default=0)):
        active = torch.tensor([n < it for it in iterations]).repeat_interleave(k)
        normed = normalize(maps)
        step = attn @ normed
        if log_attn is not None and bool((lam_cols != 0).any()):
            step = step + lam_cols * (normed.sum(0, keepdim=True) + log_attn @ normed)
        maps = torch.where(active, step, maps)
    return list(normalize(maps).split(k, dim=1))


@register_method("iseg")
class ISeg(Method):
    params = {
        "timestep": Param(100, "noise level t of the inversion pass (Table 6c)", forward=True),
        "gamma": Param(1.6, "Cat-Cross weight of the class tokens' keys (Eq. 8-9, Table 5c); 1 = off",
                       forward=True),
        "template": Param("A photograph of {classes} and other objects and background",
                          "prompt; {classes} becomes the class names joined by ' and '", forward=True),
        "iterations": Param(10, "N, refinement iterations (Eq. 4, Table 5a)"),
        "lambda": Param(0.01, "Ent-Self updating factor (Eq. 7, Table 5b); 0 = naive iteration"),
        "cross_levels": Param("both", "decoder cross-attention levels fused (Table 6a)", choices=("16", "32", "both")),
        "self_layer": Param(-1, "decoder self-attention layer, -1 = last (Table 6b)", choices=(-1, -2, -3)),
        "background": Param("power", "background rule: power ((1 - max)^p competes) or threshold",
                            choices=("power", "threshold")),
        "bg_power": Param(2.0, "exponent p of the background score (1 - max)^p (released code: 2)"),
        "bg_threshold": Param(0.45, "background where max class score < this (background=threshold)"),
    }

    def trace_request(self, cfg: dict) -> TraceRequest:
        return request(cross=CROSS_LEVELS[cfg["cross_levels"]], self_attn=[SELF_LAYERS[cfg["self_layer"]]])

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return cfg["template"].format(classes=" and ".join(query.names))

    def key_weights(self, token_ids: list[int], query: ClassQuery, cfg: dict) -> torch.Tensor | None:
        if cfg["gamma"] == 1:
            return None
        weights = torch.ones(len(token_ids))
        for name in query.names:  # Eq. 8: W[j] = gamma for tokens of the given categories
            weights[token_indices(self.backbone.tokenizer, token_ids, name)] = cfg["gamma"]
        return weights

    def class_maps(self, trace: Trace, query: ClassQuery, cfg: dict, size: tuple[int, int]) -> torch.Tensor:
        """Initial cross-attention A_ca^0 (K, h, w): per class the mean of its tokens, per layer upsampled
        (bilinear) to the self-attention size, then averaged over the chosen decoder layers and heads."""
        fused = []
        for layer in CROSS_LEVELS[cfg["cross_levels"]]:
            probs = trace.cross[layer].float().mean(dim=(0, 1))  # (h, w, T): mean over steps and heads
            per_class = torch.stack([probs[..., token_indices(self.backbone.tokenizer, trace.token_ids, n)]
                                     .mean(-1) for n in query.names])
            fused.append(resize_maps(per_class, size))
        return torch.stack(fused).mean(0)

    def predict(self, trace: Trace, query: ClassQuery, cfg: dict, out_size: tuple[int, int]) -> Prediction:
        return self.predict_many(trace, query, [cfg], out_size)[0]

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[dict],
                     out_size: tuple[int, int]) -> list[Prediction]:
        """All configurations of one trace, sharing the self-attention products (see refine_sweep)."""
        results: list[Prediction | None] = [None] * len(cfgs)
        if not query.ids:
            empty = Prediction(torch.zeros(0, 1, 1), torch.zeros(out_size, dtype=torch.long))
            return [empty for _ in cfgs]
        groups: dict[tuple, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            groups.setdefault((cfg["self_layer"], cfg["cross_levels"]), []).append(i)
        for (self_layer, _), members in groups.items():
            attn = trace.self_attn[SELF_LAYERS[self_layer]].float().mean(dim=(0, 1))  # (HW, HW)
            size = trace.spatial_size(SELF_LAYERS[self_layer])
            cross = self.class_maps(trace, query, cfgs[members[0]], size).flatten(1).T  # (HW, K)
            lams = [cfgs[i]["lambda"] for i in members]
            log_attn = torch.log(attn.clamp_min(LOG_EPS)) if any(lams) else None
            refined = refine_sweep(attn, log_attn, cross, lams, [cfgs[i]["iterations"] for i in members])
            for i, maps in zip(members, refined):
                scores = minmax(maps.T.reshape(-1, *size))
                labels = labels_from_scores(scores, query.ids, out_size, cfgs[i]["background"],
                                            cfgs[i]["bg_power"], cfgs[i]["bg_threshold"])
                results[i] = Prediction(scores, labels)
        return results
