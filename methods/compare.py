"""`compare`: several methods on the SAME traces, as one sweep (OVAM Table 1 / Table 2 protocol).

The sweep format has one method per file; instead of extending it, this meta-method takes the method as a
swept, non-forward parameter, so every compared method reads the same UNet pass of every image:

    method: compare
    sweep: {method: [daam, attn2mask, ovam, iseg]}
    params: {ovam__tau: 0.4, daam__norm: max}     # <method>__<parameter>: that method's post-processing

The trace is the union of the compared methods' trace requests; the prompt is the dataset's generation
prompt (generation mode) or the caption / template (inversion, as DAAM's `prompt`). Forward parameters stay
common (mode, timestep, steps, guidance, classes, tokens), so per-method forward choices are fixed: iSeg runs
without Cat-Cross (gamma = 1: its keys would change the pass), OVAM reads the conditional branch, Attn2Mask
takes step 0.5 of the common schedule.
"""

from __future__ import annotations

from bench.trace import TraceRequest
from methods.base import METHODS, ClassQuery, Method, Param, register_method
from methods.daam import PROMPT_PARAMS, build_prompt
from methods.postprocess import AutoTokens

COMPARED = ("daam", "attn2mask", "ovam", "iseg", "whole_image", "centre_blob")
FIXED = {"iseg": {"gamma": 1.0}}  # forward choices the shared trace imposes


def _sub_params() -> dict[str, Param]:
    out = {}
    for name in COMPARED:
        for key, p in METHODS.get(name).params.items():
            if not p.forward and key not in ("tokens",):
                out[f"{name}__{key}"] = Param(p.default, f"{name}: {p.help}", choices=p.choices, type=p.type,
                                              nullable=p.nullable)
    return out


@register_method("compare")
class Compare(AutoTokens, Method):
    params = {
        "method": Param("ovam", "the compared method (swept; shares the trace)", choices=COMPARED),
        **{k: PROMPT_PARAMS[k] for k in ("prompt", "template")},
        "tokens": Param(None, "optimised tokens for DAAM, Attn2Mask and OVAM (OVAM Table 2): a file or auto",
                        type=str, nullable=True, forward=False),
        **_sub_params(),
    }

    def __init__(self, backbone=None):
        super().__init__(backbone)
        self.methods = {name: METHODS.get(name)(backbone) for name in COMPARED}

    def sub_config(self, name: str, cfg: dict) -> dict:
        given = {k.split("__", 1)[1]: v for k, v in cfg.items() if k.startswith(f"{name}__")}
        common = {k: cfg[k] for k in ("mode", "timestep", "steps", "guidance", "scheduler", "classes")}
        cls = METHODS.get(name)
        extra = {k: cfg[k] for k in ("prompt", "template") if k in cls.params}
        if "tokens" in cls.params:
            extra["tokens"] = cfg["tokens"]
        return cls.resolve({**given, **common, **extra, **FIXED.get(name, {})})

    def fit(self, dataset, cfg: dict) -> None:
        super().fit(dataset, cfg)
        for method in self.methods.values():
            if isinstance(method, AutoTokens):
                method.auto_tokens_path = self.auto_tokens_path

    def trace_request(self, cfg: dict) -> TraceRequest:
        req = None
        for name in COMPARED:  # every method's needs, whichever is selected: one trace for all
            sub = self.methods[name].trace_request(self.sub_config(name, cfg))
            req = sub if req is None else req.union(sub)
        return req

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        return build_prompt(query, caption, cfg)

    def predict(self, trace, query, cfg, out_size):
        return self.predict_many(trace, query, [cfg], out_size)[0]

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
