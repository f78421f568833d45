"""iSeg (Sun et al., "iSeg: An Iterative Refinement-based Framework for Training-free Segmentation").

Inversion at t = 100 with the prompt "A photograph of [CLS A] and [CLS B] and other objects and background"
plus background categories; Cat-Cross (Eq. 8-9) weights the class tokens' keys by gamma inside the UNet; the
initial cross-attention map fuses the decoder's 16x16 and 32x32 layers (Table 6a); the self-attention map is
the last decoder layer's (Table 6b); Ent-Self (Eq. 5-7) lowers its entropy; Algorithm 1 refines the class maps
N times (Eq. 4) with a normalisation before every product and after the last.

Ent-Self scale (`ent_scale`, the paper variant). Eq. 7 is one gradient step A + lambda (1 + log A) against the
entropy of Eq. 5, and the paper's analysis of it reads: "The entropy-reduced operation makes the value of
A_sa^ij near to one becomes larger, and makes the value of A_sa^ij near to zero becomes smaller" (Sec. 3,
"Analysis on effectiveness"). That presumes attention on a scale where values near one exist; raw
row-stochastic 64x64 attention has entries ~2e-4, where the step is ~ -0.07 for every entry, every entry goes
negative and the class maps converge to one map (`ent_scale=literal`, kept only to show that). By default
(`row_max`) each query's attention distribution (a row: the pmf of Eq. 5) is divided by its maximum, so its
strongest response is exactly one and its ranking of keys is unchanged; Eq. 7 is applied there (exact zeros
stay zero: their entropy gradient is unbounded and they carry no mass), negative results are clamped to zero
(the weak, irrelevant responses the step suppresses) and each row is renormalised to sum to one, so A_ent is
again a non-negative row-stochastic attention and Eq. 4 mixes class maps convexly. lambda = 0 gives back A.
`col_max` divides each key column by its maximum instead, which is what the released code does.

Paper vs released code (`variant`, and the options listed in methods/README.md with their defaults): the
code variant reproduces linsun449/iseg.code (Ent-Self in log10 units on the column-max scale, its layers,
heads, token choice, normalisation order and KL clustering); both variants share the release's final
resize order (`resize`). The math works on plain tensors: `from methods.iseg import ent_self, refine`.

Cat-Cross (`gamma_on`). Eq. 8-9 weight the class tokens' keys, W . K, in every cross-attention layer (`keys`,
the default). The release multiplies the class tokens' text embeddings by gamma before the UNet instead
(`embeddings`; linsun449/iseg.code, the prompt embedding scaled before the UNet call), which on SD's bias-free
key and value projections scales their keys as Eq. 9 does and their values too (UNet backbones only: a joint
transformer's text stream runs through every block). It changes the pass (a forward
parameter), so it is not tied to `variant` (which only post-processes one pass): the release's Cat-Cross is
`variant=code gamma_on=embeddings`.

Classes absent from the prompt (generation mode, where the dataset's prompt is used) get OVAM attribution
maps from stored queries with a padded "A photograph of a <name>" prompt (see methods.attribution).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from bench.errors import BenchError
from bench.models.layers import layer_map
from bench.capture import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.attribution import AttributionSource, token_indices
from methods.labels import tie_of
from methods.maps import labels_from_scores_many, minmax, resize_maps
from methods.tiled_labels import TiledLabels, TiledPrediction, tileable

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
# `cross_heads=voc_release`: the release's VOC configuration (att_mean=False) averages these (layer, head)
# pairs, indexed into the concatenation of every CODE_CROSS layer's heads of a resolution in forward order
# (SD2.1-base: 5 layers x 20 heads at 16x16, 3 layers x 10 heads at 32x32). linsun449/iseg.code
# wsss/iSeg.py, iSeg.__init__ (self.index).
RELEASE_VOC_HEADS = {
    "32": (22, 5, 21, 13, 8, 27, 28, 6, 25),
    "16": (76, 1, 43, 17, 81, 6, 44, 27, 2, 8, 22, 20, 60, 78, 12, 83, 94, 47, 88, 96, 3, 33, 46, 52, 77, 93, 51,
           58, 0, 13, 14, 19, 34, 41, 59, 87, 16, 24, 28, 30, 32),
}
# Ent-Self and the refinement chain run in float64 and are rounded to the trace's dtype once, at the end. After
# many steps the class maps agree to float32's precision over whole regions on some models (the chain is a power
# iteration), and a float32 chain labels those regions by the matrix kernel's rounding, which the memory layout,
# the batch and the BLAS build choose: two float32 summation orders moved the embedded main job's mIoU by up to
# 1.7 points. In float64 the rounded maps are the same whichever kernel computes them.
CHAIN_DTYPE = torch.float64
# Background categories appended to the prompt ("add the background categories, similar to CLIP-ES", iSeg
# Sec. 4.1). The release's VOC list continues with "river, sea, railway, ..." on separate lines that Python
# parses as discarded string statements, so only these nine reach the prompt (wsss/iSeg.py, prepare_data_name).
RELEASE_BACKGROUND = "ground, land, grass, tree, building, wall, sky, lake, water"
# Multi-token VOC names for which the release keeps one word's token only (data/voc/voc_name20.py).
RELEASE_CLASS_WORD = {"potted plant": "plant", "tv monitor": "monitor"}


# -- Ent-Self (Eq. 5-7) ---------------------------------------------------------------------------------------
def entropy(attn: torch.Tensor) -> torch.Tensor:
    """Self-attention entropy E = -sum_ij A_ij log A_ij (iSeg Eq. 5), with 0 log 0 = 0."""
    return -torch.special.xlogy(attn, attn).sum()


def _entropy_step(a: torch.Tensor, lam: float) -> torch.Tensor:
    """a + lam (1 + log a) where a > 0 (iSeg Eq. 7, the negative gradient of Eq. 6); exact zeros stay zero."""
    positive = a > 0
    return torch.where(positive, a + lam * (1 + torch.log(torch.where(positive, a, 1.0))), a)


def ent_self(attn: torch.Tensor, lam: float, scale: str = "row_max") -> torch.Tensor:
    """Entropy-reduced self-attention (iSeg Eq. 7) of a row-query attention (HW, HW); see the module
    docstring for the scale. row_max / col_max: divide each row / column by its maximum, Eq. 7, clamp at 0,
    renormalise rows to sum 1. literal: Eq. 7 on the raw probabilities, nothing else (collapses, see above)."""
    return ent_self_many(attn, [lam], scale)[0]


def ent_self_many(attn: torch.Tensor, lams: list[float], scale: str = "row_max") -> torch.Tensor:
    """`ent_self` for several lambdas of one attention -> (L, HW, HW): the rescaled attention and its logarithm
    are computed once (each matrix is the single-lambda one, bit for bit: the same operations)."""
    if scale == "literal":
        return torch.stack([attn if lam == 0 else _entropy_step(attn, lam) for lam in lams])
    if scale not in ("row_max", "col_max"):
        raise BenchError(f"ent_scale={scale!r} is not one of row_max, col_max, literal")
    peak = attn.amax(1 if scale == "row_max" else 0, keepdim=True)
    a = attn / torch.where(peak > 0, peak, 1.0)
    positive = a > 0
    # _entropy_step's gain, zero where a == 0 so that a + lam * gain keeps exact zeros without a torch.where per
    # lambda (the same value bit for bit: a + lam * 0 == a there, a + lam * (1 + log a) elsewhere)
    if any(lams):  # every lambda at once: (L, 1, 1) x (HW, HW), the same products as one lambda at a time
        gain = torch.where(positive, 1 + torch.log(torch.where(positive, a, 1.0)), 0.0)
        lam = torch.tensor(lams, dtype=a.dtype, device=a.device)[:, None, None]
        stepped = (a + lam * gain).clamp_min_(0)
        for i in (i for i, value in enumerate(lams) if not value):
            stepped[i] = a  # lambda = 0: the rescaled attention itself, as Eq. 7 with lambda = 0 (no clamp)
    else:
        stepped = a.expand(len(lams), -1, -1).clone()
    total = stepped.sum(2, keepdim=True)
    return stepped.div_(torch.where(total > 0, total, 1.0))


def ent_self_code(attn: torch.Tensor, lam: float) -> torch.Tensor:
    """Released code's Ent-Self: each column divided by its maximum, A + lambda log10(e A) where A > 0, clamp
    at 0, rows renormalised. Since log10(e A) = (1 + ln A) / ln 10 this is Eq. 7 on the column-max scale with
    lambda / ln 10 (the release's lambda is in log10 units)."""
    return ent_self(attn, *ent_self_args(lam, "code"))


def ent_self_args(lam: float, scale: str) -> tuple[float, str]:
    """(lambda, scale) for ent_self of a configuration's lambda and ent_scale, "code" for the release's."""
    return (lam / math.log(10), "col_max") if scale == "code" else (lam, scale)


# -- iterative refinement (Eq. 4, Algorithm 1) --------------------------------------------------------------
def normalize(maps: torch.Tensor) -> torch.Tensor:
    """Normalisation of Algorithm 1 (lines 13, 18) on (..., HW, K) maps: shift each class map to a minimum of 0
    and scale it to unit sum. The paper does not spell it out; this is the released code's choice."""
    return _normalize_class_rows(maps.mT.contiguous()).mT


def _normalize_class_rows(maps_t: torch.Tensor) -> torch.Tensor:
    """`normalize` on maps stored class-major, (..., K, HW), the layout the refinement chain keeps."""
    shifted = maps_t - maps_t.amin(-1, keepdim=True)
    total = shifted.sum(-1, keepdim=True)
    return shifted / torch.where(total > 0, total, 1.0)


def refine(attn_ent: torch.Tensor, cross: torch.Tensor, iterations: int) -> torch.Tensor:
    """Algorithm 1 lines 12-18 / Eq. 4: C^n = A_ent C^(n-1), normalised before each product and at the end.
    attn_ent: (HW, HW) row-query self-attention; cross: (HW, K)."""
    return refine_steps(attn_ent, cross, [iterations])[iterations]


def refine_steps(attn_ent: torch.Tensor, cross: torch.Tensor, iterations: list[int]) -> dict[int, torch.Tensor]:
    """`refine` for several N at once: one chain of products, each requested N read off on the way.

    attn_ent may hold a batch (B, HW, HW), one chain each from the same cross (HW, K) -> {N: (B, HW, K)} (a lambda
    sweep's chains: one batched product per step). The chain runs transposed, C^T <- C^T A_ent^T with the maps
    class-major (K, HW): a (HW, HW) x (HW, K) product with a row-major right side took ~5x longer on the CPU
    (float32: 86 vs 17 us at HW = 256, K = 2). Each batch member's product is the unbatched one, bit for bit, so a
    configuration scores the same alone and inside a sweep (tests/test_iseg_math.py)."""
    batched = attn_ent.dim() == 3
    wanted, last, out = set(iterations), max(iterations, default=0), {}
    # class-major and contiguous whatever cross's layout: reductions round by layout too
    maps_t = cross.T.contiguous()[None].expand(len(attn_ent) if batched else 1, -1, -1)
    attn_t = (attn_ent if batched else attn_ent[None]).mT
    for n in range(last + 1):
        normalized = _normalize_class_rows(maps_t)
        if n in wanted:
            out[n] = normalized.mT if batched else normalized[0].T
        if n < last:
            maps_t = normalized @ attn_t
    return out


# -- the released code's initial cross-attention (wsss/iSeg.py process_cross_att) ---------------------------
def release_cross(levels: dict[str, torch.Tensor], size: tuple[int, int],
                  heads: dict[str, tuple[int, ...]] | None = None) -> torch.Tensor:
    """levels[res]: (L*H, h, w, T) every (layer, head) map of one resolution, concatenated in forward order.
    Per resolution: mean over the (layer, head) maps (or the `heads` subset), each token map divided by its
    spatial sum, bilinear to `size`; weighted sum 0.7 (16x16) + 0.3 (32x32). Returns (T, *size)."""
    fused = 0
    for res, maps in levels.items():
        if heads is not None:
            if max(heads[res]) >= maps.shape[0]:
                raise BenchError(f"cross_heads=voc_release indexes {max(heads[res]) + 1} layer-heads at {res}x{res} "
                                 f"(SD2.1-base); this UNet has {maps.shape[0]}: use cross_heads=all")
            maps = maps[list(heads[res])]
        mean = maps.mean(0).permute(2, 0, 1)  # (T, h, w)
        total = mean.sum(dim=(1, 2), keepdim=True)
        fused = fused + CODE_CROSS[res][0] * resize_maps(mean / torch.where(total > 0, total, 1.0), size)
    return fused


def kl_cluster_means(vectors: torch.Tensor, grid_shape: tuple[int, int], clusters: int = 32,
                     iterations: int = 20) -> torch.Tensor:
    """The release's KL k-means (wsss/featurecluster.py DFC_KL + its use in process_cross_att): per-pixel token
    vectors (HW, T) as they are (not normalised), exact zeros set to 1e-6; initial centres on a regular grid of
    pixels (step = side // sqrt(clusters): 6 x 6 for 32 on 64 x 64); `iterations` rounds of assigning each pixel
    to the centre at the smallest symmetric KL 0.5 (KL(c||p) + KL(p||c)) and replacing the centres by their
    members' means (emptied clusters disappear). Returns every pixel's cluster mean of the original vectors.

    The distance is computed as the release does (util/attn.py kl_dis): in fp16, both sides + 1e-5. Fused token
    maps are ~1e-4 per pixel, in fp16's subnormal range, so its rounding decides many assignments; float32 or
    float64 distances give other clusters (measured: a minority of pixels keep the same cluster), hence the
    release's arithmetic is kept."""
    h, w = grid_shape
    root = clusters ** 0.5
    rows = torch.arange(0, h, h // root).long()
    cols = torch.arange(0, w, w // root).long()
    x = torch.where(vectors == 0, 1e-6, vectors).float()
    centres = x[(rows[:, None] * w + cols[None, :]).flatten()]
    pixels = x.half() + 1e-5
    assign = None
    for _ in range(iterations):
        c = centres.half()[:, None] + 1e-5  # (k, 1, T)
        quotient = c.log() - pixels.log()[None]  # (k, HW, T)
        dist = (c * quotient).sum(-1) * 0.5 - (pixels[None] * quotient).sum(-1) * 0.5
        assign = dist.argmin(0)
        centres = torch.stack([x[assign == k].mean(0) for k in assign.unique()])
    onehot = torch.nn.functional.one_hot(assign, int(assign.max()) + 1).to(vectors.dtype)  # (HW, k)
    sums = onehot.T @ vectors
    counts = onehot.sum(0)[:, None]
    return (sums / torch.where(counts > 0, counts, 1.0))[assign]


def release_upsample(maps: torch.Tensor, mid_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """The release's final maps (wsss/iSeg.py get_att_map, util/cam.py cam_to_label): bilinear to the image
    size fed to the UNet (test_mask_size, 512), min-max, bilinear to the label size, min-max again (+1e-6)."""
    return release_final(minmax(resize_maps(maps, mid_size), eps=1e-12), out_size)


def release_final(mid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """release_upsample's second half: the min-maxed maps at the UNet's image size to the label size."""
    flat = resize_maps(mid, out_size).flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / (flat.amax(1, keepdim=True) + 1e-6)).view(-1, *out_size)


def class_token_positions(tokenizer, token_ids: list[int], name: str, mode: str) -> list[int]:
    """Prompt positions of a class name's tokens: every sub-token (all) or, for the names in
    RELEASE_CLASS_WORD, that word's tokens only (release)."""
    hits = token_indices(tokenizer, token_ids, name)
    word = RELEASE_CLASS_WORD.get(name) if mode == "release" else None
    if not word or not hits:
        return hits
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    offset = next((i for i in range(len(name_ids) - len(word_ids) + 1) if name_ids[i:i + len(word_ids)] == word_ids), 0)
    starts = hits[::len(name_ids)]
    return [s + offset + j for s in starts for j in range(len(word_ids))]


@register_method("iseg")
class ISeg(Method):
    params = {
        "timestep": Param(100, "noise level t of the inversion pass (Table 6c)", kind="forward", low=0),
        "gamma": Param(1.6, "Cat-Cross weight of the class tokens' keys (Eq. 8-9, Table 5c); 1 = off",
                       kind="forward", positive=True),
        "gamma_on": Param("keys", "what Cat-Cross's gamma scales: keys (Eq. 8-9, each cross-attention layer's "
                          "keys of the class tokens) or embeddings (the release: the class tokens' text "
                          "embeddings before the UNet, so their keys and values)", kind="forward",
                          choices=("keys", "embeddings")),
        "template": Param("A photograph of {classes} and other objects and background",
                          "prompt; {classes} becomes the class names joined by ' and '", kind="forward",
                          fields=("classes",), required_fields=("classes",),
                          examples=("{classes} and background", "a photograph of {classes}")),
        "background_words": Param(RELEASE_BACKGROUND, "background categories appended to the prompt after ', ' "
                                  "(Sec. 4.1, 'similar to CLIP-ES'; default: the release's VOC list); '' = none",
                                  kind="forward", examples=("", "sky, ground")),
        "iterations": Param(10, "N, refinement iterations (Eq. 4, Table 5a)", low=0),
        "lambda": Param(0.01, "Ent-Self updating factor (Eq. 7, Table 5b); 0 = naive iteration", low=0),
        "ent_scale": Param("row_max", "paper variant: scale Eq. 7 is applied on (row_max: each query's "
                           "attention / its maximum; col_max: each key column / its maximum, as the release; "
                           "literal: raw probabilities, collapses the class maps)",
                           choices=("row_max", "col_max", "literal")),
        "cross_levels": Param("both", "decoder cross-attention levels fused (Table 6a)", choices=("16", "32", "both")),
        "self_layer": Param(-1, "decoder self-attention layer, -1 = last (Table 6b)", choices=(-1, -2, -3)),
        "background": Param("power", "background rule: power ((1 - max)^p competes) or threshold",
                            choices=("power", "threshold")),
        "bg_power": Param(2.0, "exponent p of the background score (1 - max)^p (released code: 2)", positive=True),
        "bg_threshold": Param(0.45, "background where max class score < this (background=threshold)", low=0, high=1),
        "variant": Param("paper", "paper (Eq. 7, Tables 6a/6b) or code (released code's Ent-Self, layers, "
                         "heads, token choice, normalisation and clustering; see methods/README.md)",
                         choices=("paper", "code")),
        "kmeans": Param(None, "code variant: the release's KL k-means of the fused token vectors, number of "
                        "clusters asked for (release: 32, a 6 x 6 grid); 0 = off; default: 32", type=int,
                        nullable=True, low=0),
        "cross_heads": Param("all", "code variant: heads averaged per resolution: all (release's att_mean=True) "
                             "or voc_release (its hand-picked VOC subset, SD2.1-base only)",
                             choices=("all", "voc_release")),
        "class_tokens": Param("auto", "tokens of a multi-token class name: all (their mean), release (the "
                              "release's VOC choice: 'plant', 'monitor'), auto (paper: all, code: release)",
                              choices=("auto", "all", "release")),
        "resize": Param("code", "final maps: code (to the traced image size, min-max, to the label size, "
                        "min-max; the release) or direct (min-max at the attention size, one resize)",
                        choices=("code", "direct")),
        "modules": Param("custom", "Table 4 rows, overriding iterations/lambda/gamma: baseline (one refinement, "
                         "no Ent-Self, no Cat-Cross), naive (N iterations without Ent-Self, Fig. 1f), ent_self "
                         "(+ Ent-Self), full (+ Ent-Self + Cat-Cross); custom = the parameters as given",
                         kind="forward", choices=("custom", "baseline", "naive", "ent_self", "full")),
    }

    @staticmethod
    def effective(cfg: dict) -> dict:
        """cfg with the `modules` row applied (Table 4): N, lambda and gamma of that row, the rest as given."""
        rows = {"custom": {}, "baseline": {"iterations": 1, "lambda": 0.0, "gamma": 1.0},
                "naive": {"lambda": 0.0, "gamma": 1.0}, "ent_self": {"gamma": 1.0}, "full": {}}
        row = rows[cfg.get("modules", "custom")]
        return {**cfg, **row} if row else cfg  # custom: the configuration itself (no per-configuration copy)

    @staticmethod
    def is_code(cfg: dict) -> bool:
        return cfg.get("variant", "paper") == "code"

    def cross_layers(self, cfg: dict) -> list[str]:
        # resolved once per (variant, levels): predict_many asks for every configuration of every image
        key = (id(self.backbone), self.is_code(cfg), None if self.is_code(cfg) else cfg["cross_levels"])
        cache = self.__dict__.setdefault("_cross_layers", {})
        if key not in cache:
            layers = layer_map(self.backbone)
            cache[key] = tuple(n for _, blocks in self.code_cross(layers) for n in blocks) if key[1] else \
                tuple(n for res in CROSS_LEVELS[key[2]] for n in layers.sd_resolution("cross", res, ("up",)))
        return list(cache[key])

    @staticmethod
    def code_cross(layers) -> list[tuple[float, list[str]]]:
        """The released code's (fusion weight, layers) per resolution (CODE_CROSS order), resolved on this UNet."""
        out = []
        for weight, rank, down, up in CODE_CROSS.values():
            names = layers.ranked("cross", ("down",), (rank,), down) + layers.ranked("cross", ("up",), (rank,), up)
            out.append((weight, names))
        return out

    def self_layer(self, cfg: dict) -> str:
        return layer_map(self.backbone).decoder_self(CODE_SELF_INDEX if self.is_code(cfg) else cfg["self_layer"])

    def trace_request(self, cfg: dict) -> TraceRequest:
        cross = self.cross_layers(cfg)
        # generation uses the dataset's prompt, which may lack a class: keep queries for attribution keys
        queries = cross if cfg.get("mode") == "generation" else ()
        code = self.is_code(cfg)
        return request(cross=cross, self_attn=[self.self_layer(cfg)], queries=queries, per_head=code,
                       self_per_head=code, sum_self_steps=True)

    def self_attention(self, trace: Trace, cfg: dict) -> torch.Tensor:
        """(HW, HW) self-attention: mean over steps and heads (code variant: heads 1 and 2, those that exist)."""
        attn = trace.step_mean("self_attn", self.self_layer(cfg)).float()  # (H, HW, HW)
        if self.is_code(cfg) and attn.shape[0] > 1:
            heads = [h for h in CODE_HEADS if h < attn.shape[0]] or list(range(attn.shape[0]))
            attn = attn[heads]
        return attn.mean(0)

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        text = cfg["template"].format(classes=" and ".join(query.names))
        words = cfg.get("background_words") or ""
        return f"{text}, {words}" if words.strip() else text

    def key_weights(self, token_ids: list[int], query: ClassQuery, cfg: dict) -> torch.Tensor | None:
        cfg = self.effective(cfg)
        if cfg["gamma"] == 1:
            return None
        weights = torch.ones(len(token_ids))
        # Eq. 8: W[j] = gamma for every token of the given categories. `class_tokens` only chooses which maps are
        # read afterwards: it is not a forward parameter, so it cannot move the weights of the shared UNet pass
        for name in query.names:
            weights[class_token_positions(self.backbone.tokenizer, token_ids, name, "all")] = cfg["gamma"]
        return weights

    def token_weights_on(self, cfg: dict) -> str:
        return cfg.get("gamma_on", "keys")

    @classmethod
    def token_mode(cls, cfg: dict) -> str:
        mode = cfg.get("class_tokens", "auto")
        return ("release" if cls.is_code(cfg) else "all") if mode == "auto" else mode

    def class_maps(self, trace: Trace, query: ClassQuery, cfg: dict, size: tuple[int, int]) -> torch.Tensor:
        """Initial cross-attention A_ca^0 (K, h, w). Paper: per class the mean of its tokens, per layer upsampled
        (bilinear) to the self-attention size, averaged over the chosen decoder layers and heads. Code: the
        release's fusion (`release_cross`), optional clustering, then per class the mean of its tokens."""
        source = AttributionSource(self.backbone, pad=True)
        mode = self.token_mode(cfg)
        if not self.is_code(cfg):
            fused = []
            for layer in self.cross_layers(cfg):
                # (n_tokens, S, H, h, w) per class -> mean over tokens, steps and heads
                maps = torch.stack([self._tokens(source, trace, layer, n, mode).float().mean(dim=(0, 1, 2))
                                    for n in query.names])
                fused.append(resize_maps(maps, size))
            return torch.stack(fused).mean(0)
        positions, absent = {}, []
        for name in query.names:
            idx = class_token_positions(self.backbone.tokenizer, trace.token_ids, name, mode)
            positions[name] = idx or [len(trace.token_ids) + len(absent)]  # absent: an extra re-keyed column
            absent += [] if idx else [name]
        levels = {}
        for res, (_, layers) in zip(CODE_CROSS, self.code_cross(layer_map(self.backbone))):
            per_layer = []
            for layer in layers:
                cols = [trace.step_mean("cross", layer).float()]  # (H, h, w, T)
                cols += [source.class_maps(trace, layer, n).float().mean(0)[..., None] for n in absent]
                per_layer.append(torch.cat(cols, -1))
            levels[res] = torch.cat(per_layer)  # (L*H, h, w, T')
        heads = RELEASE_VOC_HEADS if cfg.get("cross_heads") == "voc_release" else None
        fused = release_cross(levels, size, heads)  # (T', h, w)
        clusters = 32 if cfg.get("kmeans") is None else int(cfg["kmeans"])
        if clusters > 0:
            fused = kl_cluster_means(fused.flatten(1).T, size, clusters).T.reshape(fused.shape)
        return torch.stack([fused[positions[n]].mean(0) for n in query.names])

    def _tokens(self, source: AttributionSource, trace: Trace, layer: str, name: str, mode: str) -> torch.Tensor:
        """(n_tokens, S, H, h, w) maps of a class's selected tokens on one layer."""
        idx = class_token_positions(self.backbone.tokenizer, trace.token_ids, name, mode)
        if idx and layer in trace.cross:
            return trace.cross[layer][..., idx].movedim(-1, 0)
        return source.class_maps(trace, layer, name)[None]

    def traced_image_size(self, trace: Trace) -> tuple[int, int]:
        """The image size the UNet saw (the release's test_mask_size): latent size x the VAE's factor."""
        vae = getattr(self.backbone, "vae", None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        return trace.latent_size[0] * factor, trace.latent_size[1] * factor

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[dict],
                     out_size: tuple[int, int]) -> list[Prediction]:
        """All configurations of one trace: the maps and A_ent are shared by the configurations that agree on
        them, and one chain of products serves every N."""
        cfgs = [self.effective(cfg) for cfg in cfgs]
        for cfg in cfgs:
            if not self.is_code(cfg) and cfg.get("kmeans"):
                raise BenchError("kmeans clusters the released code's fused token vectors: use it with variant=code")
        results: list[Prediction | None] = [None] * len(cfgs)
        groups: dict[tuple, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            code = self.is_code(cfg)
            key = (code, self.self_layer(cfg), tuple(self.cross_layers(cfg)), self.token_mode(cfg),
                   cfg.get("kmeans") if code else None, cfg.get("cross_heads") if code else None)
            groups.setdefault(key, []).append(i)
        for (code, *_), members in groups.items():
            first = cfgs[members[0]]
            attn = self.self_attention(trace, first)  # (HW, HW)
            size = trace.spatial_size(self.self_layer(first))
            cross = self.class_maps(trace, query, first, size).flatten(1).T  # (HW, K)
            by_ent: dict[tuple, list[int]] = {}
            for i in members:
                lam = cfgs[i]["lambda"]
                by_ent.setdefault((lam, "code" if code else cfgs[i].get("ent_scale", "row_max")), []).append(i)
            maps: dict[int, torch.Tensor] = {}
            ents = list(by_ent.items())
            by_scale: dict[str, list[tuple[int, float]]] = {}  # ent_self's scale -> (position, its lambda)
            for b, (key, _) in enumerate(ents):
                lam, scale = ent_self_args(*key)
                by_scale.setdefault(scale, []).append((b, lam))
            # Ent-Self and the chain in float64, rounded once at the end (CHAIN_DTYPE)
            work = CHAIN_DTYPE if attn.device.type != "mps" else attn.dtype
            attn_work = attn.to(work)
            attn_ents = torch.empty(len(ents), *attn.shape, dtype=work, device=attn.device)
            for scale, members_of_scale in by_scale.items():
                positions, lams = zip(*members_of_scale)
                attn_ents[list(positions)] = ent_self_many(attn_work, list(lams), scale)
            # one chain of products per A_ent (batched over them), every requested N read off it
            refined = refine_steps(attn_ents, cross.to(work), [cfgs[i]["iterations"] for i in members])
            for b, (_, same) in enumerate(ents):
                maps.update({i: refined[cfgs[i]["iterations"]][b].T.reshape(-1, *size).to(cross.dtype)
                             for i in same})
            by_resize: dict[str, list[int]] = {}
            for i in members:
                by_resize.setdefault(cfgs[i].get("resize", "code"), []).append(i)
            for resize, same in by_resize.items():
                for i, pred in zip(same, self._predictions(torch.stack([maps[i] for i in same]), resize, trace,
                                                           query, [cfgs[i] for i in same], out_size)):
                    results[i] = pred
        return results

    def _predictions(self, maps: torch.Tensor, resize: str, trace, query, cfgs, out_size) -> list[Prediction]:
        """Final maps and labels of N configurations (N, K, h, w). The release's resize to a label size that is a
        power-of-two multiple of the traced size is labelled by tiles (methods.tiled_labels): F.interpolate's own
        values on the tiles near a decision, bit for bit the labels of the full upsample, which is the path of
        every other case. (A re-derived bilinear formula instead of F.interpolate's values labelled up to 1.8%
        of a real image's pixels differently, whole tied regions, and moved iseg_lambda's mIoU by up to 1.0.)"""
        ties = [tie_of(c) for c in cfgs]
        if len(set(ties)) > 1:  # one tie rule per call: configurations grouped by theirs
            out: list = [None] * len(cfgs)
            for tie in dict.fromkeys(ties):
                idx = [i for i, t in enumerate(ties) if t == tie]
                preds = self._predictions(maps[idx], resize, trace, query, [cfgs[i] for i in idx], out_size)
                for i, pred in zip(idx, preds):
                    out[i] = pred
            return out
        n, k = maps.shape[:2]
        flat = maps.reshape(n * k, *maps.shape[2:])
        rules = [(c["background"], c["bg_power"], c["bg_threshold"]) for c in cfgs]
        mid_size = self.traced_image_size(trace)
        if (resize == "code" and mid_size[0] == mid_size[1] and tileable(mid_size[0], out_size) and query.ids
                and flat.device.type == "cpu"):
            # the same labels bit for bit, upsampling only the tiles near a decision (methods.tiled_labels; its
            # equality with F.interpolate's full upsample is established for the CPU kernel only)
            mid = minmax(resize_maps(flat, mid_size), eps=1e-12)
            if not torch.isnan(mid).any() and all(r[1] >= 0 for r in rules):
                tiled = TiledLabels(mid.reshape(n, k, *mid_size), query.ids, out_size, rules, ties[0])
                return [TiledPrediction(tiled, j, partial(release_final, mid[j * k:(j + 1) * k], out_size))
                        for j in range(n)]
        if resize == "code":
            scores = release_upsample(flat, self.traced_image_size(trace), out_size)
        else:
            scores = minmax(flat)
        scores = scores.reshape(n, k, *scores.shape[1:])
        labels = labels_from_scores_many(scores, query.ids, out_size, rules, ties)
        return [Prediction(scores[j], labels[j]) for j in range(n)]
