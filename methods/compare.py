"""`compare`: several methods on the SAME traces, as one sweep (OVAM Table 1 / Table 2 protocol).

The sweep format has one method per file; instead of extending it, this meta-method takes the method as a
swept parameter, so every compared method reads the same UNet pass of every image. Without `method` in the
sweep (or params) it compares every registered training-free method; a sweep may list any registered
method, trained ones included (they are fitted once on the fit stage):

    method: compare
    sweep: {method: [daam, attn2mask, ovam, iseg, linear_probe]}   # optional
    params: {ovam__tau: 0.4, daam__norm: max}     # <method>__<parameter>: that method's own parameters

The trace is the union of the compared methods' trace requests (one forward group); the prompt is the
dataset's generation prompt (generation mode) or the caption / template (inversion, as DAAM's `prompt`).
Forward parameters stay common (mode, timestep, steps, scheduler, guidance, classes, prompt, template), so per-method
forward choices are fixed: iSeg runs without Cat-Cross (gamma = 1: its keys would change the pass), OVAM
reads the conditional branch, Attn2Mask takes step 0.5 of the common schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from bench.capture import TraceRequest
from methods.base import METHODS, ClassQuery, Method, Param, TrainSetting, register_method
from methods.prompts import PROMPT_PARAMS, build_prompt

FIXED = {"iseg": {"gamma": 1.0}}  # forward choices the shared trace imposes
COMMON = ("mode", "timestep", "steps", "guidance", "scheduler", "classes")


def comparable() -> list[str]:
    return [n for n in METHODS.names() if n != "compare"]


@register_method("compare")
class Compare(Method):
    version = "2"

    @classmethod
    def all_params(cls) -> dict[str, Param]:
        """Built from the registry when asked, so every registered method can be compared."""
        names = comparable()
        own = {
            "method": Param("ovam" if "ovam" in names else names[0], "the compared method (swept; shares the trace); selects its fit for "
                            "trained methods", choices=tuple(names), kind="train"),
            **{k: PROMPT_PARAMS[k] for k in ("prompt", "template")},
            "tokens": Param(None, "optimised tokens for the methods that take them (DAAM, Attn2Mask, OVAM; "
                            "OVAM Table 2): a file or auto", type=str, nullable=True, kind="train",
                            examples=("auto",)),
        }
        for name in names:
            for key, p in METHODS.get(name).params.items():
                if p.kind != "forward" and key != "tokens":
                    own[f"{name}__{key}"] = dataclasses.replace(p, help=f"{name}: {p.help}")  # bounds kept
        return {**super().all_params(), **own}

    @classmethod
    def train_keys(cls) -> list[str]:
        """What any compared method's fit may read, by compare's names."""
        keys = {"method", *COMMON, "prompt", "template", "tokens"}
        for name in comparable():
            keys |= {f"{name}__{k}" for k in METHODS.get(name).train_keys()}
        return sorted(keys)

    @classmethod
    def default_sweep(cls) -> dict:
        return {"method": {"grid": [n for n in comparable() if not METHODS.get(n).is_trained()]}}

    @classmethod
    def component_methods(cls) -> tuple[str, ...]:
        return tuple(comparable())

    @classmethod
    def is_trained(cls) -> bool:
        return False

    def __init__(self, backbone=None):
        super().__init__(backbone)
        self.methods = {name: METHODS.get(name)(backbone) for name in self.component_methods()}

    def sub_config(self, name: str, cfg: Mapping):
        given = {k.split("__", 1)[1]: v for k, v in cfg.items() if k.startswith(f"{name}__")}
        common = {k: cfg[k] for k in COMMON}
        cls = METHODS.get(name)
        extra = {k: cfg[k] for k in ("prompt", "template", "tokens") if k in cls.params}
        return cls.resolve({**given, **common, **extra, **FIXED.get(name, {})})

    # -- fits: those of the compared method ------------------------------------------------------------------
    def train_setting(self, cfg: Mapping) -> TrainSetting | None:
        name = cfg["method"]
        return self.methods[name].train_setting(self.sub_config(name, cfg))

    def can_fit(self, setting: TrainSetting) -> bool:
        return any(m.can_fit(setting) for m in self.methods.values())

    def fit(self, ctx):
        method = next(m for m in self.methods.values() if m.can_fit(ctx.setting))
        return method.fit(ctx)

    def load_fit(self, key, tensors) -> None:
        super().load_fit(key, tensors)
        for method in self.methods.values():
            method.load_fit(key, tensors)

    # -- tracing and prediction ------------------------------------------------------------------------------
    def trace_request(self, cfg: Mapping) -> TraceRequest:
        # the engine unions the requests of a forward group, i.e. of every compared method
        name = cfg["method"]
        return self.methods[name].trace_request(self.sub_config(name, cfg))

    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        return build_prompt(query, caption, cfg)

    def predict_many(self, trace, query, cfgs, out_size):
        results = [None] * len(cfgs)
        by_method: dict[str, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            by_method.setdefault(cfg["method"], []).append(i)
        for name, members in by_method.items():
            subs = [self.sub_config(name, cfgs[i]) for i in members]
            for i, pred in zip(members, self.methods[name].predict_many(trace, query, subs, out_size)):
                results[i] = pred
        return results
