"""Attn2Mask (Yoshihashi et al., "Attention as Annotation: Generating Images and Pseudo-masks for Weakly
Supervised Semantic Segmentation with Diffusion", 2023), as re-implemented by the OVAM paper (no public code).

The class token's cross-attention from ONE denoising step (OVAM's re-implementation: heatmap[50] of a 100-step
schedule, i.e. `step` = 0.5 -> 0-based index 50; inversion has a single step), aggregated over the attn2 layers
and heads as DAAM does (bicubic to the latent size, clamp at 0, mean), min-max normalised to the class map h_c.
The background score is 1 - max_c h_c - beta (beta = 0.2), and every pixel takes the argmax of
[background, h_1 .. h_K]. A dense CRF (methods.crf, OVAM code's parameters) optionally refines the labels.
`keys=unpadded` and `branch=uncond` reproduce the rest of OVAM's re-implementation script (see
methods/README.md).

Classes absent from the prompt and optimised tokens go through OVAM's attribution keys (OVAM Tables 1-2).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.forward import ForwardSetting
from bench.capture import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.crf import CRF_PARAMS, CRFParams, crf_labels
from methods.attribution import BLOCK_CHOICES, AttributionSource, aggregate_daam, aggregate_sum, attn_layers
from methods.labels import TIE_TOL, choose, tie_of
from methods.maps import minmax, resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt
from methods.tokens import AutoTokens


def step_index(fraction: float, num_steps: int) -> int:
    """0-based index of the step at `fraction` of a schedule of num_steps: 0.5 of 100 -> 50, the index OVAM's
    re-implementation reads (experiments/attn2mask/generate_voc_sim_attn2mask.py, heatmap[timestep_heatmap=50])."""
    return min(max(int(round(fraction * num_steps)), 0), num_steps - 1)


def background_argmax(scores: torch.Tensor, class_ids: list[int], out_size: tuple[int, int],
                      beta: float, tie: tuple[str, float] = ("lowest", TIE_TOL)) -> torch.Tensor:
    """Attn2Mask labels: argmax over [1 - max_c h_c - beta, h_1, ..., h_K] at out_size (ties: methods.labels;
    background, id 0, is the lowest id)."""
    up = resize_maps(scores, out_size).clamp(0, 1)
    bg = 1 - up.max(0).values - beta
    return choose(torch.cat([bg[None], up]), [0, *class_ids], *tie, dim=0)[1]


@register_method("attn2mask")
class Attn2Mask(AutoTokens, Method):
    params = {
        **PROMPT_PARAMS,
        "steps": Param(100, "generation: DDIM denoising steps (OVAM's re-implementation: 100)", kind="forward",
                       low=1),
        "step": Param(0.5, "which denoising step, as a fraction of the schedule (0.5 = step 50 of 100)", low=0, high=1),
        "blocks": Param("all", "attn2 blocks aggregated: all (every level but the mid "
                        "block) or SD resolution names such as 64+16", choices=BLOCK_CHOICES),
        "beta": Param(0.2, "background offset: background score = 1 - h - beta", low=-1, high=1),
        "keys": Param("recorded", "recorded: the UNet's own cross-attention (softmax over the padded prompt, DAAM "
                      "aggregation); unpadded: the prompt re-keyed without padding and aggregated as OVAM does "
                      "(sum of bilinear maps), as OVAM's re-implementation script", choices=("recorded", "unpadded")),
        "branch": Param("cond", "generation: queries of the conditional branch or the unconditional one (OVAM's "
                        "script stores the latter; with keys=unpadded)", kind="forward", choices=("cond", "uncond")),
        "crf": Param(False, "refine the labels with a dense CRF"),
        **CRF_PARAMS,
    }

    def forward_setting(self, cfg: dict, seed: int) -> ForwardSetting:
        return replace(super().forward_setting(cfg, seed), branch=cfg["branch"])

    def trace_request(self, cfg: dict) -> TraceRequest:
        layers = attn_layers(cfg["blocks"], backbone=self.backbone)
        rekeyed = cfg["open_vocab"] or cfg["tokens"] or cfg["keys"] == "unpadded"
        return request(cross=layers, queries=layers if rekeyed else (), per_head=True)

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return build_prompt(query, caption, cfg)

    def class_maps(self, trace: Trace, query: ClassQuery, cfg: dict) -> torch.Tensor:
        """Min-max class maps h (K, h, w) at the latent size from the chosen step."""
        tokens = self.tokens_for(cfg)
        layers = attn_layers(cfg["blocks"], backbone=self.backbone)
        num_steps = next(iter(trace.queries.values() or trace.cross.values())).shape[0]
        s = step_index(cfg["step"], num_steps)
        if cfg["keys"] == "unpadded":  # OVAM's script: ca_extractor(prompt), its default aggregation
            source = AttributionSource(self.backbone, "{prompt}", pad=False, tokens=tokens, recorded=False)
            maps = source.layer_maps(trace, layers, query.names, steps=slice(s, s + 1))
            return minmax(aggregate_sum(maps, trace.latent_size))
        source = AttributionSource(self.backbone, cfg["attribution"], pad=True, tokens=tokens)
        maps = source.layer_maps(trace, layers, query.names, steps=slice(s, s + 1))
        return minmax(aggregate_daam(maps, trace.latent_size))

    def predict(self, trace: Trace, query: ClassQuery, cfg: dict, out_size: tuple[int, int]) -> Prediction:
        scores = self.class_maps(trace, query, cfg)
        labels = background_argmax(scores, query.ids, out_size, cfg["beta"], tie_of(cfg))
        if cfg["crf"]:
            if trace.image is None:
                raise ValueError("crf=true needs the image (trace.image)")
            labels = crf_labels(trace.image, labels, query.ids, CRFParams.from_cfg(cfg))
        return Prediction(scores, labels)
