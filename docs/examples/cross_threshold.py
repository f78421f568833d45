"""`cross_threshold`: each class's cross-attention, averaged over layers, heads and steps, min-max scaled and
thresholded. The worked example of docs/adding-a-method.md; save it as methods/cross_threshold.py to register it."""

from __future__ import annotations

import torch

from bench.capture import TraceRequest, request
from methods.attribution import AttributionSource, attn_layers
from methods.base import Method, Param, Prediction, register_method
from methods.maps import labels_from_scores, minmax, resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt


@register_method("cross_threshold")
class CrossThreshold(Method):
    version = "1"  # bump whenever a change alters the output for the same inputs
    params = {
        **{k: PROMPT_PARAMS[k] for k in ("prompt", "template")},  # forward: they change the UNet pass
        "threshold": Param(0.5, "background where every class score is below this", low=0, high=1),  # post
    }

    def trace_request(self, cfg) -> TraceRequest:
        layers = attn_layers("all", backbone=self.backbone)  # every cross-attention level but the mid block
        absent = cfg["classes"] == "all" or cfg["mode"] == "generation"  # class words not in the prompt
        return request(cross=layers, queries=layers if absent else ())  # re-keyed from stored queries

    def prompt(self, query, caption, cfg) -> str:
        return build_prompt(query, caption, cfg)

    def predict(self, trace, query, cfg, out_size) -> Prediction:
        layers = attn_layers("all", backbone=self.backbone)
        maps = AttributionSource(self.backbone, pad=True).layer_maps(trace, layers, query.names)  # (K,S,H,h,w)
        per_layer = [resize_maps(m.float().mean(dim=(1, 2)), trace.latent_size) for m in maps]
        scores = minmax(torch.stack(per_layer).mean(0))  # (K, h, w) in [0, 1]
        labels = labels_from_scores(scores, query.ids, out_size, background="threshold",
                                    bg_threshold=cfg["threshold"])
        return Prediction(scores, labels)
