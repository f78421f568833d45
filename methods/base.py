"""The `Method` interface every segmentation method implements, and its registry.

A method is pure post-processing of a trace: it declares its parameters (which of them change the UNet pass),
what to record (`trace_request`), how to build the prompt for an image (`prompt`), and turns a `Trace` plus
class names into per-class score maps and a label map (`predict`). Methods that are trained first (FreeGen,
DEDOS) also implement `fit`, which the engine calls once before evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bench.errors import BenchError
from bench.forward import ForwardSetting
from bench.models import SCHEDULER_CHOICES
from bench.registry import Registry, unknown_name_message
from bench.trace import Trace, TraceRequest

METHODS: Registry = Registry("method", "method")


def register_method(name: str):
    """Class decorator: `@register_method("iseg")` (timm's `@register_model`)."""

    def add(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return add


@dataclass(frozen=True)
class Param:
    default: Any
    help: str = ""
    forward: bool = False  # True: changes the UNet pass (prompt, timestep, Cat-Cross ...)
    choices: tuple | None = None
    type: type | None = None  # defaults to type(default)
    nullable: bool = False

    def coerce(self, name: str, value: Any) -> Any:
        if value is None and (self.nullable or self.default is None):
            return None
        kind = self.type or type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false"):
                        raise ValueError(value)
                    value = value.lower() == "true"
                value = bool(value)
            elif kind is float and isinstance(value, bool) or kind is int and isinstance(value, bool):
                raise ValueError(value)
            elif kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise BenchError(f"parameter {name}={value!r} must be of type {kind.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise BenchError(f"parameter {name}={value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


# Parameters every method has: they describe the forward pass. A method overrides defaults by redeclaring.
COMMON_PARAMS: dict[str, Param] = {
    "mode": Param("inversion", "trace mode: inversion (real images) or generation (images from prompts)",
                  forward=True, choices=("inversion", "generation")),
    "timestep": Param(100, "inversion: noise level t of the single UNet pass", forward=True),
    "steps": Param(50, "generation: denoising steps", forward=True),
    "scheduler": Param("auto", "generation: the model folder's own scheduler (auto, what the papers ran) or a "
                       "named diffusers scheduler", forward=True, choices=SCHEDULER_CHOICES),
    "guidance": Param(7.5, "generation: classifier-free guidance scale", forward=True),
    "classes": Param("gt", "which classes to segment per image: gt (image-level labels, the WSSS protocol) "
                     "or all (every dataset class)", forward=True, choices=("gt", "all")),
}


@dataclass
class ClassQuery:
    """The classes to segment in one image: dataset ids (never 0 = background) and their names."""

    ids: list[int]
    names: list[str]


@dataclass
class Prediction:
    scores: torch.Tensor  # (K, h, w) per-class score maps in [0, 1], K = len(query.ids)
    labels: torch.Tensor  # (H, W) long dataset class ids, 0 = background


class Method:
    name: ClassVar[str] = "base"
    params: ClassVar[dict[str, Param]] = {}
    needs_fit: ClassVar[bool] = False

    def __init__(self, backbone=None):
        self.backbone = backbone

    # -- parameters ----------------------------------------------------------------------------------------
    @classmethod
    def all_params(cls) -> dict[str, Param]:
        return {**COMMON_PARAMS, **cls.params}

    @classmethod
    def resolve(cls, given: dict) -> dict:
        """Defaults overlaid with `given`; unknown names and bad values are BenchErrors."""
        spec = cls.all_params()
        for key in given:
            if key not in spec:
                raise BenchError(unknown_name_message(f"parameter of method {cls.name}", key, sorted(spec),
                                                      "params/sweep"))
        return {k: p.coerce(k, given.get(k, p.default)) for k, p in spec.items()}

    @classmethod
    def forward_keys(cls) -> list[str]:
        return sorted(k for k, p in cls.all_params().items() if p.forward)

    def forward_setting(self, cfg: dict, seed: int) -> ForwardSetting:
        return ForwardSetting(mode=cfg["mode"], timestep=cfg["timestep"], seed=seed, steps=cfg["steps"],
                              guidance=cfg["guidance"], scheduler=cfg.get("scheduler", "auto"))

    # -- what to run -----------------------------------------------------------------------------------------
    def trace_request(self, cfg: dict) -> TraceRequest:
        raise NotImplementedError

    def prompt(self, query: ClassQuery, caption: str | None, cfg: dict) -> str:
        raise NotImplementedError

    def key_weights(self, token_ids: list[int], query: ClassQuery, cfg: dict) -> torch.Tensor | None:
        """Per-token key weights for the UNet pass (Cat-Cross), or None for unmodified attention."""
        return None

    def fit(self, dataset, cfg: dict) -> None:
        """Trained methods learn their parameters here; training-free methods need nothing."""

    # -- post-processing ---------------------------------------------------------------------------------------
    def predict(self, trace: Trace, query: ClassQuery, cfg: dict, out_size: tuple[int, int]) -> Prediction:
        raise NotImplementedError

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[dict],
                     out_size: tuple[int, int]) -> list[Prediction]:
        """Every configuration of a forward group on one trace; override to share work between them."""
        return [self.predict(trace, query, cfg, out_size) for cfg in cfgs]
