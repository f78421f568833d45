"""The `Method` interface every segmentation method implements, its typed parameters, and its registry.

A method declares its parameters, each of one kind:
  train    changes what is fitted (a trained method's fit runs once per distinct train setting)
  forward  changes the UNet pass (prompt, timestep, Cat-Cross ...): one pass per image and forward setting
  post     post-processing of a trace (thresholds, N, lambda, layer choice among captured layers ...)
It says what to record (`trace_request`), how to build the prompt for an image (`prompt`), and turns a
`Trace` plus class names into per-class score maps and a label map (`predict`). Trained methods also say
which train setting a configuration needs (`train_setting`) and learn it in `fit(ctx)`, which the engine runs
once per train setting on Ray Train (bench.stages.fit) and tests run in-process (bench.fitting).

`Method` is an abstract base class: what a method must implement is abstract, and every optional hook the
engine calls (default sweep, composite methods, fits, synthesis, tester sizes, and on `Prediction` the decision
scores and how it is scored) is declared here with its default. The engine calls these and probes nothing else.

Resolved parameters are a frozen dataclass per method (`Method.resolve`), read as `cfg["lambda"]` or
`cfg.iterations`; names that are Python keywords or mapping methods (`keys`) get a trailing underscore as
attributes.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import json
import keyword
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from bench.errors import BenchError
from bench.forward import ForwardSetting
from bench.metrics import CountedLabels
from bench.models import SCHEDULER_CHOICES
from bench.registry import Registry, unknown_name_message
from bench.capture import Trace, TraceRequest
from methods.labels import TIE_RULES, TIE_TOL


def _discover() -> None:
    import methods  # the package discovers every method module (methods/__init__.py)

    methods.discover()


METHODS: Registry = Registry("method", "method", loader=_discover)
KINDS = ("train", "forward", "post")


def register_method(name: str):
    """Class decorator: `@register_method("iseg")` (timm's `@register_model`). Only `Method` subclasses."""

    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) decorates {cls!r}, which is not a subclass of "
                            f"methods.base.Method; derive it from Method")
        if inspect.isabstract(cls):
            raise TypeError(f"@register_method({name!r}): {cls.__name__} leaves abstract "
                            f"{', '.join(sorted(cls.__abstractmethods__))}; implement them (methods.base.Method)")
        cls.name = name
        return METHODS.register(name)(cls)

    return add


@dataclass(frozen=True)
class Param:
    """One parameter: its default, help, and kind (train | forward | post; default post), which decides whether a
    change refits, retraces or only re-predicts. One `kind` field, not a `forward` flag beside it: three kinds
    need one name each, and a second spelling of the same fact could disagree with the first."""

    default: Any
    help: str = ""
    choices: tuple | None = None
    type: type | None = None  # defaults to type(default)
    nullable: bool = False
    kind: str = "post"  # train | forward | post
    # Declared ranges, checked wherever a value is resolved (sweep files, overrides, search spaces):
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    positive: bool = False  # strictly > 0 (scales, counts of steps)
    fields: tuple[str, ...] | None = None  # a str.format template: the only {fields} it may name
    required_fields: tuple[str, ...] = ()  # ... and those it must name (iSeg reads class maps off the prompt)
    # Valid values besides the default of a free-form parameter (a string without `choices`): what the contract
    # tests vary it to, so that its kind is checked like every other parameter's.
    examples: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Param kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def value_type(self) -> type:
        return self.type or type(self.default)

    def coerce(self, name: str, value: Any) -> Any:
        if value is None and (self.nullable or self.default is None):
            return None
        kind = self.value_type
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
        self.check_range(name, value)
        return value

    def check_range(self, name: str, value: Any) -> None:
        """The declared bounds (`low`, `high`, `positive`) and template fields; BenchError naming the fix."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise BenchError(f"parameter {name}={value!r} must be a finite number")
            if self.positive and value <= 0:
                raise BenchError(f"parameter {name}={value!r} must be > 0")
            if self.low is not None and value < self.low:
                raise BenchError(f"parameter {name}={value!r} must be >= {self.low}{self._range_hint()}")
            if self.high is not None and value > self.high:
                raise BenchError(f"parameter {name}={value!r} must be <= {self.high}{self._range_hint()}")
        if self.fields is not None and isinstance(value, str):
            allowed = ", ".join("{" + f + "}" for f in self.fields)
            try:
                parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
            except ValueError as err:
                raise BenchError(f"parameter {name}={value!r} is not a valid template ({err}); use {allowed} and "
                                 f"write literal braces as {{{{ }}}}") from None
            for field_name, spec, conversion in parsed:  # plain {field} only: {classes:>9999999999} would format
                if spec or conversion or not field_name.isidentifier():  # gigabytes, {classes.x} read attributes
                    shown = field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                    raise BenchError(f"parameter {name}={value!r} has {{{shown}}}; templates take plain fields only "
                                     f"({allowed})")
            named = [f for f, _, _ in parsed]
            for field_name in named:
                if field_name.split(".")[0].split("[")[0] not in self.fields:
                    raise BenchError(f"parameter {name}={value!r} names {{{field_name}}}, which is not one of "
                                     f"{allowed}; fix the template")
            for field_name in self.required_fields:
                if field_name not in named:
                    raise BenchError(f"parameter {name}={value!r} must contain {{{field_name}}} (the method reads "
                                     f"its maps off those tokens of the prompt); fix the template")

    def _range_hint(self) -> str:
        return f" (range [{self.low}, {self.high}])" if self.low is not None and self.high is not None else ""


# Parameters every method has: they describe the forward pass. A method overrides defaults by redeclaring.
COMMON_PARAMS: dict[str, Param] = {
    "mode": Param("inversion", "trace mode: inversion (real images) or generation (images from prompts)",
                  kind="forward", choices=("inversion", "generation")),
    "timestep": Param(100, "inversion: noise level t of the single UNet pass (below the model's training "
                      "timesteps, 1000 on SD)", kind="forward", low=0),
    "steps": Param(50, "generation: denoising steps", kind="forward", low=1),
    "scheduler": Param("auto", "generation: the model folder's own scheduler (auto, what the papers ran) or a "
                       "named diffusers scheduler", kind="forward", choices=SCHEDULER_CHOICES),
    "guidance": Param(7.5, "generation: classifier-free guidance scale", kind="forward", low=0),
    "classes": Param("gt", "which classes to segment per image: gt (image-level labels, the WSSS protocol) "
                     "or all (every dataset class)", kind="forward", choices=("gt", "all")),
    # how labels are chosen where class scores tie (methods.labels: one rule for every method)
    "tie_rule": Param("lowest", "where the two best class scores lie within tie_tol: lowest (the lower class id), "
                      "background (id 0), or argmax (the released code's first maximum as computed: float "
                      "rounding decides)", choices=TIE_RULES),
    "tie_tol": Param(TIE_TOL, "absolute tolerance on the [0, 1] class scores within which classes tie "
                     "(methods.labels: chosen to absorb the kernels' rounding)", low=0, high=1),
}

# The trained heads (DEDOS, SegFormer, FreeGen) label by the argmax of their outputs, as their papers do: the tie
# tolerance was measured on attention maps, not on probabilities, so another rule is refused rather than ignored.
ARGMAX_TIE = Param("argmax", "trained head: labels are the argmax of its outputs (the papers'); the only rule "
                   "(tie_tol is measured on attention maps)", choices=("argmax",))


# -- typed parameters ----------------------------------------------------------------------------------------------
def attribute_name(key: str) -> str:
    """The dataclass field of a parameter: its name, with a trailing underscore where that is a Python keyword
    (`lambda`) or a mapping method (`keys`, `values`, `get`, ...)."""
    return key + "_" if keyword.iskeyword(key) or hasattr(ParamsBase, key) else key


class ParamsBase(Mapping):
    """Base of every method's resolved-parameter dataclass: a read-only mapping of parameter name -> value
    (so `cfg["lambda"]`, `{**cfg}` and `cfg.get` work) with typed attributes."""

    _method: ClassVar[str] = ""
    _keys: ClassVar[tuple[str, ...]] = ()

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return getattr(self, attribute_name(key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def as_dict(self) -> dict:
        return {k: self[k] for k in self._keys}

    def replace(self, **changes) -> "ParamsBase":
        """A copy with some values changed (re-validated by the method)."""
        return METHODS.get(self._method).resolve({**self.as_dict(), **changes})

    def __reduce__(self):  # rebuilt through the registry, so the generated class need not be importable
        return _rebuild_params, (self._method, self.as_dict())

    def __repr__(self) -> str:
        return f"{self._method}.Params({', '.join(f'{k}={v!r}' for k, v in self.items())})"


def _rebuild_params(method: str, values: dict) -> ParamsBase:
    return METHODS.get(method).resolve(values)


# -- trained methods ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSetting:
    """What one fit learns: the fitter (which code trains), its version, and the values it reads.

    Configurations with equal settings share one fit. `key` identifies the setting within a run; the fit
    directory's hash adds what the whole run fixes (model, training data), see bench.plan."""

    fitter: str
    version: str
    values: tuple[tuple[str, Any], ...]
    # Identities of the weights the fit learns against besides the backbone (name -> bench.models.identity
    # digest, e.g. the CLIP of DEDOS): part of the fit directory's hash, so other weights never share a fit.
    weights: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        text = json.dumps([self.fitter, self.version, self.values], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        out = {"fitter": self.fitter, "version": self.version, "values": dict(self.values)}
        return {**out, "weights": dict(self.weights)} if self.weights else out


@dataclass
class ClassQuery:
    """The classes to segment in one image: dataset ids (never 0 = background) and their names."""

    ids: list[int]
    names: list[str]


@dataclass
class Prediction:
    scores: torch.Tensor  # (K, h, w) per-class score maps in [0, 1], K = len(query.ids)
    labels: torch.Tensor  # (H, W) long dataset class ids, 0 = background

    @classmethod
    def empty(cls, out_size: tuple[int, int]) -> "Prediction":
        """The prediction for an image with no class to segment: background everywhere, no score map. The
        engine answers such images itself; methods never see an empty query."""
        return cls(torch.zeros(0, 1, 1), torch.zeros(out_size, dtype=torch.long))

    @property
    def decision_scores(self) -> torch.Tensor:
        """The (K, h, w) class scores the labels were decided from, at the resolution where they exist without
        upsampling: the engine counts ties on them (methods.maps.tie_counts). Default: `scores`."""
        return self.scores

    def scored_as(self) -> np.ndarray | CountedLabels:
        """What the engine's scorer counts (bench.metrics.ImageScorer.histograms): the label map (default), or
        a `CountedLabels` where this prediction's labels are counted together with other configurations'."""
        return self.labels.cpu().numpy()


def _overrides_a_predict(cls: type) -> bool:
    """Whether a class other than Method in `cls`'s MRO (mixins included) defines predict or predict_many."""
    return any("predict" in c.__dict__ or "predict_many" in c.__dict__ for c in cls.__mro__ if c is not Method)


class _MethodMeta(abc.ABCMeta):
    """ABCMeta that also counts `predict` as abstract until a class overrides `predict` or `predict_many` (either
    is enough: each default calls the other), so such a class cannot be instantiated or registered."""

    def __new__(mcls, name, bases, namespace, **kwargs):
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        if "Method" not in globals() or not _overrides_a_predict(cls):  # Method itself: defaults only
            cls.__abstractmethods__ = frozenset({*cls.__abstractmethods__, "predict"})
        return cls


class Method(metaclass=_MethodMeta):
    """A segmentation method: what it records of the UNet pass, its prompt, and its predictions; for trained
    methods, its fit. Subclasses implement `trace_request`, `prompt` and one of `predict` / `predict_many`
    (registration refuses a class that leaves any abstract); every other hook below has a default that a
    training-free method on the UNet's attention keeps."""

    name: ClassVar[str] = "base"  # set by @register_method
    version: ClassVar[str] = "1"  # bump when a change alters what the method outputs for the same inputs
    params: ClassVar[dict[str, Param]] = {}
    # Parameters of other kinds (usually forward) that `fit` reads: part of the train setting.
    fit_reads: ClassVar[tuple[str, ...]] = ()
    # False: predict reads only the traced image (trained methods that never use the UNet at inference, DEDOS);
    # evaluation then skips the UNet pass (bench.evaluate.trace_samples).
    traces_at_eval: ClassVar[bool] = True
    # True: predictions are the training dataset's class ids (a closed-set segmenter), so preflight requires the
    # training and evaluated datasets to have the same classes.
    fits_class_ids: ClassVar[bool] = False
    # Small train parameters under which the registry-wide contract tests fit this method in seconds (a few steps
    # of a long fit); every configuration those tests fit starts from them. Never read by a run.
    tester_params: ClassVar[dict[str, Any]] = {}
    # The backbone families the method runs on (bench.models.families: "sd", "sdxl", "sd3", "flux"); None: every
    # family. A method that reads one family's internals names it, and why, so preflight refuses the others.
    families: ClassVar[tuple[str, ...] | None] = None
    families_why: ClassVar[str] = ""

    def __init__(self, backbone=None):
        self.backbone = backbone
        self.fitted: dict[str, dict[str, torch.Tensor]] = {}  # TrainSetting.key -> artefact tensors

    # -- parameters ----------------------------------------------------------------------------------------
    @classmethod
    def all_params(cls) -> dict[str, Param]:
        return {**COMMON_PARAMS, **cls.params}

    @classmethod
    def params_type(cls) -> type[ParamsBase]:
        """The frozen dataclass of this method's parameters (built once per parameter set)."""
        spec = cls.all_params()
        cached = cls.__dict__.get("_params_type")
        if cached is not None and cached._keys == tuple(spec):
            return cached
        fields = [(attribute_name(k), p.value_type if not p.nullable else p.value_type | None)
                  for k, p in spec.items()]
        made = dataclasses.make_dataclass(f"{cls.__name__}Params", fields, bases=(ParamsBase,), frozen=True,
                                          eq=True, namespace={"_method": cls.name, "_keys": tuple(spec)})
        made.__module__ = cls.__module__
        cls._params_type = made
        return made

    @classmethod
    def resolve(cls, given: Mapping) -> ParamsBase:
        """Defaults overlaid with `given`, coerced and checked; unknown names and bad values are BenchErrors."""
        spec = cls.all_params()
        for key in given:
            if key not in spec:
                raise BenchError(unknown_name_message(f"parameter of method {cls.name}", key, sorted(spec),
                                                      "params/sweep"))
        values = {attribute_name(k): p.coerce(k, given.get(k, p.default)) for k, p in spec.items()}
        return cls.params_type()(**values)

    @classmethod
    def keys_of(cls, kind: str) -> list[str]:
        return sorted(k for k, p in cls.all_params().items() if p.kind == kind)

    @classmethod
    def forward_keys(cls) -> list[str]:
        return cls.keys_of("forward")

    @classmethod
    def train_keys(cls) -> list[str]:
        """Everything a fit may read: train parameters and `fit_reads`."""
        return sorted({*cls.keys_of("train"), *cls.fit_reads})

    def forward_setting(self, cfg: Mapping, seed: int) -> ForwardSetting:
        return ForwardSetting(mode=cfg["mode"], timestep=cfg["timestep"], seed=seed, steps=cfg["steps"],
                              guidance=cfg["guidance"], scheduler=cfg.get("scheduler", "auto"))

    @classmethod
    def default_sweep(cls) -> dict[str, dict]:
        """Sweep entries (parameter -> space, as in a sweep file) that a configuration gets unless it sets that
        parameter itself (compare: every training-free method). Default: none."""
        return {}

    @classmethod
    def component_methods(cls) -> tuple[str, ...]:
        """The registered methods this one runs (a composite such as compare), whose versions a run records
        beside its own. Default: none."""
        return ()

    # -- what to run -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def trace_request(self, cfg: Mapping) -> TraceRequest:
        """What to record of the UNet pass under `cfg` (layers, steps, branch); empty for methods that read the
        image alone. The engine unions the requests of a forward group and traces once."""

    @abc.abstractmethod
    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        """The prompt of the UNet pass for an image whose classes are `query` (its caption where it has one)."""

    def key_weights(self, token_ids: list[int], query: ClassQuery, cfg: Mapping) -> torch.Tensor | None:
        """Per-token key weights for the UNet pass (Cat-Cross), or None for unmodified attention."""
        return None

    def token_weights_on(self, cfg: Mapping) -> str:
        """What `key_weights` scale in the UNet pass: "keys" (each cross-attention layer's keys of those tokens)
        or "embeddings" (the tokens' text embeddings before the UNet, and so their keys and values)."""
        return "keys"

    # -- training (trained methods) ------------------------------------------------------------------------------
    @classmethod
    def is_trained(cls) -> bool:
        """Whether the method's default configuration needs a fit (training-free methods: no; methods with an
        optional fit, such as OVAM's tokens=auto, count as training-free)."""
        return cls().train_setting(cls.resolve({})) is not None

    def train_setting(self, cfg: Mapping) -> TrainSetting | None:
        """The fit this configuration needs, or None. Default: one fit per value of `train_keys()`."""
        if not self.keys_of("train"):
            return None
        return TrainSetting(self.name, self.version, tuple((k, cfg[k]) for k in self.train_keys()))

    def can_fit(self, setting: TrainSetting) -> bool:
        return setting.fitter == self.name

    def uses_fit(self, cfg: Mapping) -> bool:
        """Whether predictions under `cfg` read the fit of `train_setting(cfg)`, where it has one (FreeGen's
        rectify=false ignores it: a synthesis then skips the fit). Default: yes."""
        return True

    def fit(self, ctx) -> dict[str, torch.Tensor]:
        """Learn `ctx.setting` on `ctx.dataset` (the training split; never the evaluation data) and return the
        artefact as named tensors (saved as safetensors). `ctx` is a bench.fitting.FitContext: rank and world
        size, `prepare(model)` (DDP), `checkpoint`/`restore`, `log(step, loss)`, `shard(items)`."""
        raise NotImplementedError(f"method {self.name} declares train parameters but does not implement fit")

    def load_fit(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Make a finished fit's artefact available to `predict` (see `artefact`)."""
        self.fitted[key] = tensors

    def artefact(self, cfg: Mapping) -> dict[str, torch.Tensor]:
        setting = self.train_setting(cfg)
        if setting is None:
            raise ValueError(f"method {self.name}: this configuration needs no fit")
        if setting.key not in self.fitted:
            raise RuntimeError(f"method {self.name}: the fit {setting.key} was not loaded; the engine loads "
                               f"fits before predicting (Method.load_fit)")
        return self.fitted[setting.key]

    # -- post-processing ---------------------------------------------------------------------------------------
    # `query.ids` is never empty here: the engine answers an image with no class to segment with
    # `Prediction.empty` itself (bench.evaluate.predict_image).
    def predict(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]) -> Prediction:
        """One configuration. A method that shares work across configurations overrides only `predict_many`,
        and this is its first entry; otherwise override this."""
        return self.predict_many(trace, query, [cfg], out_size)[0]

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[Mapping],
                     out_size: tuple[int, int]) -> list[Prediction]:
        """Every configuration of a forward group on one trace; override to share work between them. Equal to
        `[predict(c) for c in cfgs]` up to float rounding (labels differ only where rounding tips a near-tie;
        tests/test_method_contract.py states the tolerance)."""
        return [self.predict(trace, query, cfg, out_size) for cfg in cfgs]

    # -- dataset synthesis (methods that annotate generated images) ----------------------------------------------
    @classmethod
    def synthesises(cls) -> bool:
        """Whether the method annotates generated images for a synthetic dataset (bench.synthesize): it
        overrides `synthetic_mask`."""
        return cls.synthetic_mask is not Method.synthetic_mask

    def synthetic_mask(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]
                       ) -> SyntheticMask:
        """The pseudo-label of one generated image and its uncertainty (FreeGen's TFF)."""
        raise NotImplementedError(f"method {self.name} does not synthesise datasets")


@dataclass
class SyntheticMask:
    """One synthetic sample's annotation: the pseudo-label (IGNORE_INDEX in the uncertain band), its
    uncertainty score (FreeGen's Temporal Fluctuation Factor; lower is steadier), and the normalised class maps
    it came from."""

    label: np.ndarray  # (H, W) uint8
    tff: float
    scores: torch.Tensor  # (K, H, W) in [0, 1]

