"""Trivial baselines that use no attention, so a table shows what the attention methods add.

`whole_image`: every pixel is the image's (first) queried class. `centre_blob`: a centred disk of the chosen
radius (fraction of the shorter side) is that class, the rest background. With the WSSS protocol
(`classes=gt`) both know which class is present, as the attention methods do.
"""

from __future__ import annotations

import abc

import torch

from bench.capture import TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.prompts import PROMPT_PARAMS, build_prompt


class _Baseline(Method):
    params = {k: PROMPT_PARAMS[k] for k in ("prompt", "template")}

    def trace_request(self, cfg: dict) -> TraceRequest:
        return request()

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return build_prompt(query, caption, cfg)

    @abc.abstractmethod
    def mask(self, size: tuple[int, int], cfg: dict) -> torch.Tensor:
        """(H, W) bool: where the image's first queried class is."""

    def predict(self, trace, query: ClassQuery, cfg: dict, out_size: tuple[int, int]) -> Prediction:
        inside = self.mask(out_size, cfg)
        scores = torch.zeros(len(query.ids), *out_size)
        scores[0] = inside.float()
        return Prediction(scores, torch.where(inside, query.ids[0], 0).long())


@register_method("whole_image")
class WholeImage(_Baseline):
    def mask(self, size, cfg):
        return torch.ones(size, dtype=torch.bool)


@register_method("centre_blob")
class CentreBlob(_Baseline):
    params = {**_Baseline.params, "radius": Param(0.3, "disk radius as a fraction of the shorter image side",
                                                                low=0, high=1)}

    def mask(self, size, cfg):
        h, w = size
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (cfg["radius"] * min(h, w)) ** 2
