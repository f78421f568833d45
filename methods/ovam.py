"""OVAM (Marcos-Manchon et al., "Open-Vocabulary Attention Maps with Token Optimization for Semantic
Segmentation in Diffusion Models", CVPR 2024).

During the UNet pass(es) the pixel queries Q_{i,t} of the attn2 layers are stored (Eq. 1). For ANY attribution
prompt X' (encoded with SoT/EoT and no padding) the attribution keys K'_i = l_K^(i)(X') (Eq. 4) give
A(Q_{i,t}, K'_i) = softmax(Q K'^T / sqrt d) over the L' tokens of X' only (Eq. 3), and the map of token k is

    D_{X,k}(X') = sum_{i,t,h} resize_bilinear(A_{h,k}(Q_{i,t}, K'_i))                          (Eq. 5)

With X' = X (padded, `pad=True`) this is exactly the cross-attention the UNet computed (Sec. 3.2), i.e. what
DAAM aggregates. Binarisation (Sec. 3.4): the 64x64 self-attention, summed over blocks, heads and timesteps, is
reduced to the attention each pixel RECEIVES (sum over the query axis; summing over the key axis gives the
constant the released extractor computes, since softmax rows sum to 1), min-max scaled to [alpha, 1]:

    A_alpha = norm_[alpha,1](sum_{i,h,t} A^self_{t,i,h})                                        (Eq. 8)
    mask_k = 1[A_alpha . D_k >= tau max(A_alpha . D_k)]                                          (Eq. 9)

then a dense CRF (methods.crf). tau/alpha default to the paper's 0.4/0.85 for class-name tokens and 0.8/0.95
for optimised tokens (`tokens=`, see bench.optimize_tokens). Where several classes pass, the pixel takes the
class with the highest A_alpha . D_k / M_k.

Where the released code differs (binarisation `binarise`, query `branch`, thresholds, token-optimisation loss)
both forms are options; methods/README.md lists them with their defaults.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.forward import ForwardSetting
from bench.capture import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.crf import CRF_PARAMS, CRFParams, crf_labels
from bench.models.layers import layer_map
from methods.attribution import BLOCK_CHOICES, AttributionSource, aggregate_sum, attn_layers
from methods.labels import tie_of
from methods.maps import labels_from_threshold, maxnorm, minmax, resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt
from methods.tokens import AutoTokens

PAPER_THRESHOLDS = {False: (0.4, 0.85), True: (0.8, 0.95)}  # optimised tokens? -> (tau, alpha)


def select_steps(num_steps: int, mode: str, n: int) -> list[int]:
    """Denoising steps (0-based indices) used in Eq. 5; n is the 1-based step number (1 = the noisiest).
    all | single (step n) | upto (steps 1..n) | from (steps n..S) -- OVAM Fig. 6."""
    n = min(max(n, 1), num_steps)
    return {"all": list(range(num_steps)), "single": [n - 1], "upto": list(range(n)),
            "from": list(range(n - 1, num_steps))}[mode]


def received_attention(self_attn: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Self-attention maps (S, H, hw, hw) of the highest-resolution blocks, summed over blocks, steps and heads
    and reduced to the attention each pixel receives, at `size` (h, w)."""
    received = None
    for attn in self_attn:
        r = attn.float().sum(dim=(0, 1)).sum(0)  # (hw,) sum over steps, heads, then over queries
        side = int(round(r.numel() ** 0.5))
        r = resize_maps(r.view(1, side, -1), size)[0]
        received = r if received is None else received + r
    return received


def alpha_scale(received: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 8's norm_[alpha, 1]: min-max scaled to [alpha, 1]."""
    return alpha + (1 - alpha) * minmax(received[None])[0]


def self_attention_map(self_attn: list[torch.Tensor], size: tuple[int, int], alpha: float) -> torch.Tensor:
    """Eq. 8: A_alpha at `size`."""
    return alpha_scale(received_attention(self_attn, size), alpha)


def binarise(heat: torch.Tensor, a_alpha: torch.Tensor | None, form: str = "paper") -> torch.Tensor:
    """The quantity compared with tau (K, h, w). paper (Eq. 9): (A_alpha . D_k) / max(A_alpha . D_k);
    code (released evaluation): (D_k / max D_k) . A_alpha."""
    if form == "code":
        scores = maxnorm(heat.clamp_min(0))
        return scores if a_alpha is None else scores * a_alpha
    fused = heat if a_alpha is None else heat * a_alpha
    return maxnorm(fused.clamp_min(0))


@register_method("ovam")
class OVAM(AutoTokens, Method):
    params = {
        **{k: PROMPT_PARAMS[k] for k in ("prompt", "template", "tokens")},
        "attribution": Param("A photograph of a {name}", "attribution prompt X' per class ({name}: class name, "
                             "{prompt}: the generation prompt); the map is that of the class name's tokens",
                             fields=("name", "prompt"), examples=("a {name}", "{prompt}, a {name}")),
        "pad": Param(False, "pad X' to the model length (softmax over 77 tokens like DAAM); paper: no padding"),
        "blocks": Param("all", "attn2 blocks in Eq. 5 (Table 5): all (the paper's 64+32+16 "
                        "on SD) or SD resolution names such as 64+16", choices=BLOCK_CHOICES),
        "branch": Param("cond", "generation: queries of the conditional (paper, as DAAM) or unconditional "
                        "(released code) branch", kind="forward", choices=("cond", "uncond")),
        "t_select": Param("all", "timesteps in Eq. 5 (Fig. 6): all, single (step t_step), upto (1..t_step), "
                          "from (t_step..S)", choices=("all", "single", "upto", "from")),
        "t_step": Param(1, "1-based denoising step for t_select (1 = the noisiest)", low=1),
        "refine": Param(True, "self-attention refinement (Eq. 8)"),
        "alpha": Param(None, "lower bound of the self-attention map (Eq. 8); default: paper 0.85, optimised "
                       "tokens 0.95", type=float, nullable=True, low=0, high=1),
        "tau": Param(None, "threshold relative to the maximum (Eq. 9); default: paper 0.4, optimised tokens 0.8",
                     type=float, nullable=True, low=0, high=1),
        "binarise": Param("paper", "paper: Eq. 9, (A_alpha D)/max(A_alpha D) >= tau at the latent size; code: the "
                          "released evaluation, (D/max D) A_alpha > tau at the image size",
                          choices=("paper", "code")),
        "crf": Param(True, "dense CRF on the binarised masks (Sec. 3.4)"),
        **CRF_PARAMS,
    }

    def forward_setting(self, cfg: dict, seed: int) -> ForwardSetting:
        return replace(super().forward_setting(cfg, seed), branch=cfg["branch"])

    def trace_request(self, cfg: dict) -> TraceRequest:
        self_layers = layer_map(self.backbone).finest("self") if cfg["refine"] else ()
        # queries are stored per head whatever per_head says; Eq. 8 sums self-attention over heads and steps,
        # so it is averaged over heads and summed over steps at capture (64x64 maps are large)
        return request(queries=attn_layers(cfg["blocks"], backbone=self.backbone), self_attn=self_layers,
                       sum_self_steps=True)

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return build_prompt(query, caption, cfg)

    def thresholds(self, cfg: dict) -> tuple[float, float]:
        tau, alpha = PAPER_THRESHOLDS[bool(cfg["tokens"])]
        return (tau if cfg["tau"] is None else cfg["tau"]), (alpha if cfg["alpha"] is None else cfg["alpha"])

    def heatmaps(self, trace: Trace, query: ClassQuery, cfg: dict) -> torch.Tensor:
        """D_{X,k}(X') of Eq. 5 per class (K, h, w) at the latent size."""
        tokens = self.tokens_for(cfg)
        source = AttributionSource(self.backbone, cfg["attribution"], pad=cfg["pad"], tokens=tokens,
                                   recorded=False)
        layers = attn_layers(cfg["blocks"], backbone=self.backbone)
        steps = select_steps(trace.queries[layers[0]].shape[0], cfg["t_select"], cfg["t_step"])
        with torch.no_grad():
            maps = source.layer_maps(trace, layers, query.names, steps=steps)
        return aggregate_sum(maps, trace.latent_size)

    def predict_many(self, trace, query, cfgs, out_size):
        heat_cache: dict[tuple, torch.Tensor] = {}
        received: dict[tuple, torch.Tensor] = {}
        out = []
        for cfg in cfgs:
            key = (cfg["tokens"], cfg["attribution"], cfg["pad"], cfg["blocks"], cfg["t_select"], cfg["t_step"])
            if key not in heat_cache:
                heat_cache[key] = self.heatmaps(trace, query, cfg)
            tau, alpha = self.thresholds(cfg)
            code = cfg.get("binarise", "paper") == "code"
            size = out_size if code else trace.latent_size  # the release binarises at the image size
            if code and (key, size) not in heat_cache:  # resized once per heat map
                heat_cache[(key, size)] = resize_maps(heat_cache[key], size)
            heat = heat_cache[(key, size)] if code else heat_cache[key]
            a_alpha = None
            if cfg["refine"]:
                if size not in received:
                    maps = [trace.self_attn[n] for n in layer_map(self.backbone).finest("self")]
                    received[size] = resize_maps(received_attention(maps, trace.latent_size)[None], size)[0]
                a_alpha = alpha_scale(received[size], alpha)
            scores = binarise(heat, a_alpha, "code" if code else "paper")
            labels = labels_from_threshold(scores, query.ids, out_size, tau, strict=code, tie=tie_of(cfg))
            if cfg["crf"]:
                if trace.image is None:
                    raise ValueError("crf=true needs the image (trace.image)")
                labels = crf_labels(trace.image, labels, query.ids, CRFParams.from_cfg(cfg))
            out.append(Prediction(scores, labels))
        return out
