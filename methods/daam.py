"""DAAM (Tang et al., "What the DAAM: Interpreting Stable Diffusion Using Cross Attention", ACL 2023).

Heat map of word w (DAAM Sec. 3): the cross-attention probabilities of every attn2 layer at 64, 32 and 16 (the
8x8 mid block is dropped), conditional branch, summed over timesteps per (layer, head); each map upsampled
(bicubic) to the latent size and clamped at 0, then averaged over layers and heads:

    D_w = 1/(|L| |H|) sum_{l,h} max(0, up_bicubic(sum_t A_{t,l,h}[:, :, w]))

A word spelled by several sub-tokens (or occurring several times) takes the mean of those tokens' maps, each
already clamped (castorini/daam GlobalHeatMap.compute_word_heat_map over compute_global_heat_map). The map is
then brought to the image size (bicubic) and min-max normalised, as the release's WordHeatMap.expand_as does,
or divided by its maximum as in the OVAM paper's baseline (`norm`), and binarised at tau (0.4 in the OVAM
paper). The softmax is the UNet's own, over all 77 prompt tokens (padding included). Every option and its
reference is in methods/README.md.

Classes absent from the prompt use OVAM's attribution keys with a padded attribution prompt (the OVAM paper's
adaptation, identical maps when the word is in the prompt); optimised tokens (`tokens=`) plug in the same way
(OVAM Table 2).
"""

from __future__ import annotations

import torch

from bench.capture import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.attribution import BLOCK_CHOICES, AttributionSource, aggregate_daam, attn_layers
from methods.labels import tie_of
from methods.maps import labels_from_threshold, maxnorm, resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt
from methods.tokens import AutoTokens


@register_method("daam")
class DAAM(AutoTokens, Method):
    params = {
        **PROMPT_PARAMS,
        "blocks": Param("all", "attn2 blocks aggregated: all (every level but the 8x8 mid, "
                        "DAAM Sec. 3) or SD resolution names such as 64+16", choices=BLOCK_CHOICES),
        "norm": Param("minmax", "heat-map normalisation: minmax (DAAM) or max (map / max, OVAM's baseline)",
                      choices=("minmax", "max")),
        "tau": Param(0.4, "binarisation threshold on the normalised map (mask = map > tau)", low=0, high=1),
        "resize": Param("code", "code: bicubic to the image size, then normalise (the release's expand_as); "
                        "direct: normalise at the latent size, bilinear to the image size",
                        choices=("code", "direct")),
    }

    def trace_request(self, cfg: dict) -> TraceRequest:
        layers = attn_layers(cfg["blocks"], backbone=self.backbone)
        rekeyed = cfg["open_vocab"] or cfg["tokens"]
        return request(cross=layers, queries=layers if rekeyed else (), per_head=True, sum_steps=not rekeyed)

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return build_prompt(query, caption, cfg)

    def source(self, cfg: dict) -> AttributionSource:
        tokens = self.tokens_for(cfg)
        return AttributionSource(self.backbone, cfg["attribution"], pad=True, tokens=tokens)

    def heatmaps(self, trace: Trace, query: ClassQuery, cfg: dict) -> torch.Tensor:
        """Un-normalised DAAM maps (K, h, w) at the latent size: per class, the mean of its tokens' maps, each
        aggregated and clamped on its own (`aggregate_daam`)."""
        source, layers = self.source(cfg), attn_layers(cfg["blocks"], backbone=self.backbone)
        out = []
        for name in query.names:
            per_layer = [source.token_maps(trace, layer, name) for layer in layers]  # (n_tokens, S, H, h, w)
            out.append(aggregate_daam(per_layer, trace.latent_size).mean(0))
        return torch.stack(out)

    def predict_many(self, trace, query, cfgs, out_size):
        cache: dict[tuple, torch.Tensor] = {}
        normalised: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for cfg in cfgs:  # the heat maps depend only on blocks, tokens and attribution: share them
            key = (cfg["blocks"], cfg["tokens"], cfg["attribution"])
            if key not in cache:
                cache[key] = self.heatmaps(trace, query, cfg)
            # resized and normalised once per (maps, resize, norm); only tau differs between the rest
            norm_key = (key, cfg.get("resize", "code"), cfg["norm"])
            if norm_key not in normalised:
                raw = cache[key]
                if norm_key[1] == "code":
                    raw = resize_maps(raw, out_size, mode="bicubic")
                scores = expand_norm(raw) if cfg["norm"] == "minmax" else maxnorm(raw.clamp_min(0))
                normalised[norm_key] = scores, resize_maps(scores, out_size)
            scores, upsampled = normalised[norm_key]
            out.append(Prediction(scores, labels_from_threshold(upsampled, query.ids, out_size, cfg["tau"],
                                                                      tie=tie_of(cfg))))
        return out


def expand_norm(maps: torch.Tensor) -> torch.Tensor:
    """DAAM's min-max of a heat map (K, h, w): (x - min) / (max - min + 1e-8) (WordHeatMap.expand_as)."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-8)).view_as(maps)
