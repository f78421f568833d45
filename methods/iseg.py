"""iSeg (Sun et al., "iSeg: An Iterative Refinement-based Framework for Training-free Segmentation").

Inversion at t = 100 with the prompt "A photograph of [CLS A] and [CLS B] and other objects and background";
Cat-Cross (Eq. 8-9) weights the class tokens' keys by gamma inside the UNet; the initial cross-attention map
fuses the decoder's 16x16 and 32x32 layers (Table 6a); the self-attention map is the last decoder layer's
(Table 6b); Ent-Self (Eq. 5-7) lowers its entropy; Algorithm 1 refines the class maps N times (Eq. 4) with a
normalisation before every product and after the last.

The math works on plain tensors: `from methods.iseg import ent_self, refine, entropy`.

Paper vs released code (`variant`, paper by default; code: linsun449/iseg.code):
  paper  Ent-Self A + lambda (1 + log A) (Eq. 7); self-attention of the last decoder layer, mean over heads;
         cross-attention of the decoder's 16x16 / 32x32 layers averaged (Table 6a).
  code   Ent-Self: A /= column max; A <- A + lambda log10(e A) where A > 0; clamp at 0; row-normalise
         (`ent_self_code`); self-attention of up_blocks.3.attentions.1, heads 1 and 2 only; cross-attention of
         down1.attn1, down2.attn0/1, up1.attn0/1/2, up2.attn0/1, each token map divided by its spatial sum,
         bilinear to the self-attention size, fused 0.7 (16x16) + 0.3 (32x32); optional KL k-means
         clustering of the per-pixel token vectors (`kmeans`, on in the code). Cat-Cross stays the key
         weighting of Eq. 9 in both (the code scales the text embeddings, keys and values alike).

Classes absent from the prompt (generation mode, where the dataset's prompt is used) get OVAM attribution
maps from stored queries with a padded "A photograph of a <name>" prompt (see methods.postprocess).
"""

from __future__ import annotations

import math

import torch

from bench.models.layers import layer_map
from bench.trace import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.postprocess import AttributionSource, labels_from_scores, minmax, resize_maps, token_indices

# Layers by role (bench.models.layers), named as the paper names them on SD at 512 px. Table 6(a): decoder
# cross-attention at "16" (rank 0: the coarsest decoder attention level, up_blocks.1 on SD) and "32" (rank 1,
# up_blocks.2). Table 6(b): #-1 is the last decoder self-attention layer (up_blocks.3.attentions.2 on SD).
CROSS_LEVELS = {"16": ("16",), "32": ("32",), "both": ("16", "32")}
# Released code's cross-attention (SD names: down_blocks.2.attentions.0/1 + up_blocks.1.attentions.0/1/2 at 16,
# down_blocks.1.attentions.1 + up_blocks.2.attentions.0/1 at 32) and fusion weights, as (weight, rank,
# down-block attention indices, up-block attention indices); its self-attention is decoder layer #-2.
CODE_CROSS = {"16": (0.7, 0, None, None), "32": (0.3, 1, (1,), (0, 1))}
CODE_SELF_INDEX = -2
CODE_HEADS = (1, 2)
LOG_EPS = 1e-12  # log(A) of entries that underflowed to exactly 0


def entropy(attn: torch.Tensor) -> torch.Tensor:
    """Self-attention entropy E = -sum_ij A_ij log A_ij (iSeg Eq. 5); 0 log 0 = 0."""
    return -(attn * torch.log(attn.clamp_min(LOG_EPS))).sum()


def ent_self(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """Entropy-reduced self-attention, one gradient step against Eq. 6: A + lambda (1 + log A) (iSeg Eq. 7)."""
    if lam == 0:
        return attn
    return attn + lam * (1 + torch.log(attn.clamp_min(LOG_EPS)))


def ent_self_code(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """Released code's Ent-Self: divide each column by its maximum, A + lambda log10(e A) where A > 0, clamp
    at 0, row-normalise (rows are queries)."""
    a = attn / attn.max(0, keepdim=True).values.clamp_min(LOG_EPS)
    if lam:
        a = torch.where(a > 0, a + lam * torch.log10(math.e * a.clamp_min(LOG_EPS)), a)
    a = a.clamp_min(0)
    return a / a.sum(1, keepdim=True).clamp_min(LOG_EPS)


def kl_kmeans(vectors: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """K-means of per-pixel token distributions (HW, T) under the KL divergence KL(p || centre); returns the
    cluster-mean vectors assigned back to every pixel (HW, T) (released code's optional smoothing)."""
    p = vectors.clamp_min(LOG_EPS)
    p = p / p.sum(1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    centres = p[torch.randperm(p.shape[0], generator=g)[:k]]
    for _ in range(iterations):
        kl = (p * p.log()).sum(1, keepdim=True) - p @ centres.log().T  # (HW, k)
        assign = kl.argmin(1)
        for j in range(centres.shape[0]):
            members = p[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return centres[assign]


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
        "variant": Param("paper", "paper (Eq. 7, Tables 6a/6b) or code (released code's Ent-Self, layers, "
                         "heads and fusion; see the module docstring)", choices=("paper", "code")),
        "kmeans": Param(0, "code variant: KL k-means clusters of the per-pixel token vectors (0 = off)"),
        "modules": Param("custom", "Table 4 rows, overriding iterations/lambda/gamma: baseline (one refinement, "
                         "no Ent-Self, no Cat-Cross), naive (N iterations without Ent-Self, Fig. 1f), ent_self "
                         "(+ Ent-Self), full (+ Ent-Self + Cat-Cross); custom = the parameters as given",
                         forward=True, choices=("custom", "baseline", "naive", "ent_self", "full")),
    }

    @staticmethod
    def effective(cfg: dict) -> dict:
        """cfg with the `modules` row applied (Table 4): N, lambda and gamma of that row, the rest as given."""
        rows = {"custom": {}, "baseline": {"iterations": 1, "lambda": 0.0, "gamma": 1.0},
                "naive": {"lambda": 0.0, "gamma": 1.0}, "ent_self": {"gamma": 1.0}, "full": {}}
        row = rows[cfg.get("modules", "custom")]
        return {**cfg, **row}

    def cross_layers(self, cfg: dict) -> list[str]:
        layers = layer_map(self.backbone)
        if cfg.get("variant", "paper") == "code":
            return [n for _, blocks in self.code_cross(layers) for n in blocks]
        return [n for res in CROSS_LEVELS[cfg["cross_levels"]] for n in layers.sd_resolution("cross", res, ("up",))]

    @staticmethod
    def code_cross(layers) -> list[tuple[float, list[str]]]:
        """The released code's (fusion weight, layers) per resolution, resolved on this UNet."""
        out = []
        for weight, rank, down, up in CODE_CROSS.values():
            names = layers.ranked("cross", ("down",), (rank,), down) + layers.ranked("cross", ("up",), (rank,), up)
            out.append((weight, names))
        return out

    def self_layer(self, cfg: dict) -> str:
        code = cfg.get("variant", "paper") == "code"
        return layer_map(self.backbone).decoder_self(CODE_SELF_INDEX if code else cfg["self_layer"])

    def trace_request(self, cfg: dict) -> TraceRequest:
        cross = self.cross_layers(cfg)
        # generation uses the dataset's prompt, which may lack a class: keep queries for attribution keys
        queries = cross if cfg.get("mode") == "generation" else ()
        code = cfg.get("variant", "paper") == "code"
        return request(cross=cross, self_attn=[self.self_layer(cfg)], queries=queries, per_head=code,
                       self_per_head=code, sum_self_steps=True)

    def self_attention(self, trace: Trace, cfg: dict) -> torch.Tensor:
        """(HW, HW) self-attention: mean over steps and heads (code variant: heads 1 and 2, those that exist)."""
        attn = trace.step_mean("self_attn", self.self_layer(cfg)).float()  # (H, HW, HW)
        if cfg.get("variant", "paper") == "code" and attn.shape[0] > 1:
            heads = [h for h in CODE_HEADS if h < attn.shape[0]] or list(range(attn.shape[0]))
            attn = attn[heads]
        return attn.mean(0)

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return cfg["template"].format(classes=" and ".join(query.names))

    def key_weights(self, token_ids: list[int], query: ClassQuery, cfg: dict) -> torch.Tensor | None:
        cfg = self.effective(cfg)
        if cfg["gamma"] == 1:
            return None
        weights = torch.ones(len(token_ids))
        for name in query.names:  # Eq. 8: W[j] = gamma for tokens of the given categories
            weights[token_indices(self.backbone.tokenizer, token_ids, name)] = cfg["gamma"]
        return weights

    def class_maps(self, trace: Trace, query: ClassQuery, cfg: dict, size: tuple[int, int]) -> torch.Tensor:
        """Initial cross-attention A_ca^0 (K, h, w): per class the mean of its tokens, per layer upsampled
        (bilinear) to the self-attention size, then averaged over the chosen decoder layers and heads."""
        source = AttributionSource(self.backbone, pad=True)
        if cfg.get("variant", "paper") == "code":
            fused = 0
            for weight, blocks in self.code_cross(layer_map(self.backbone)):
                level = []
                for block in blocks:
                    maps = source.layer_maps(trace, [block], query.names)[0]
                    maps = maps.float().mean(dim=(1, 2))  # (K, h, w)
                    maps = maps / maps.sum(dim=(1, 2), keepdim=True).clamp_min(LOG_EPS)  # per-token spatial sum
                    level.append(resize_maps(maps, size))
                fused = fused + weight * torch.stack(level).mean(0)
            if cfg.get("kmeans"):
                flat = fused.flatten(1).T  # (HW, K) per-pixel token vectors
                fused = kl_kmeans(flat, int(cfg["kmeans"])).T.reshape(fused.shape)
            return fused
        fused = []
        for layer in self.cross_layers(cfg):
            per_class = source.layer_maps(trace, [layer], query.names)[0].float().mean(dim=(1, 2))  # (K, h, w)
            fused.append(resize_maps(per_class, size))
        return torch.stack(fused).mean(0)

    def predict(self, trace: Trace, query: ClassQuery, cfg: dict, out_size: tuple[int, int]) -> Prediction:
        return self.predict_many(trace, query, [cfg], out_size)[0]

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[dict],
                     out_size: tuple[int, int]) -> list[Prediction]:
        """All configurations of one trace, sharing the self-attention products (see refine_sweep)."""
        cfgs = [self.effective(cfg) for cfg in cfgs]
        results: list[Prediction | None] = [None] * len(cfgs)
        if not query.ids:
            empty = Prediction(torch.zeros(0, 1, 1), torch.zeros(out_size, dtype=torch.long))
            return [empty for _ in cfgs]
        groups: dict[tuple, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            key = (cfg.get("variant", "paper"), cfg["self_layer"], cfg["cross_levels"], cfg.get("kmeans", 0))
            groups.setdefault(key, []).append(i)
        for (variant, *_), members in groups.items():
            first = cfgs[members[0]]
            attn = self.self_attention(trace, first)  # (HW, HW)
            size = trace.spatial_size(self.self_layer(first))
            cross = self.class_maps(trace, query, first, size).flatten(1).T  # (HW, K)
            lams = [cfgs[i]["lambda"] for i in members]
            if variant == "code":
                refined = [refine(ent_self_code(attn, cfgs[i]["lambda"]), cross, cfgs[i]["iterations"])
                           for i in members]
            else:
                log_attn = torch.log(attn.clamp_min(LOG_EPS)) if any(lams) else None
                refined = refine_sweep(attn, log_attn, cross, lams, [cfgs[i]["iterations"] for i in members])
            for i, maps in zip(members, refined):
                scores = minmax(maps.T.reshape(-1, *size))
                labels = labels_from_scores(scores, query.ids, out_size, cfgs[i]["background"],
                                            cfgs[i]["bg_power"], cfgs[i]["bg_threshold"])
                results[i] = Prediction(scores, labels)
        return results
