"""Sweep files: Hydra composition of `SWEEP.yaml` + `key=value` overrides into a typed, validated `SweepConfig`.

A sweep file names only registered methods, datasets and models; every key is checked, and the swept and
fixed parameters are checked against the method's declared parameters (types, choices, bounds, template
fields). Nothing here imports by path. A key given twice and any resolver interpolation (`${oc.env:...}`:
values from outside the file) are errors; `${other.key}` references resolve. A validated config is read-only
(frozen sections, read-only mappings and lists: bench.frozen): it is the user's input, which the run records
as given; what the run decides on top of it (the method's default sweep, `auto` values, the output directory)
is its `Resolved` record (bench.resolved). A variant is derived with `dataclasses.replace`.

    name: iseg_lambda                 # run directory prefix
    method: iseg                      # registered method
    model: {name: embedded}           # or path: <diffusers folder> / id: <hub id in the local cache>
    models: [embedded, /models/sdxl]  # every configuration on each backbone (bench.backbones); default: `model:`
    data: {name: shapes, limit: 8}
    params: {iterations: 10}          # fixed method parameters (defaults: the paper's)
    sweep:                            # swept method parameters
      lambda: {grid: [0, 0.01]}       # grid | choice | uniform [lo, hi] | loguniform [lo, hi] | randint [lo, hi]
    num_samples: 1                    # random-search draws of the non-grid parameters
    seeds: [0]                        # noise / generation seeds (each one is a forward setting)
    metric: {protocol: mmseg}         # mmseg | iseg
    paper: {table: "iSeg Table 5(b)", param: lambda, metric: mIoU, values: {0: 69.1, ...}}
    ray: {num_actors: auto, batch_size: 1, max_retries: 3}   # tracing actors (auto: one per GPU, or CPU cores - 1;
                                      # 0: in this process), images per batch, restarts of a dead actor
    ray: {execution: auto}            # auto | actors | driver: trace on an actor pool or in this process (auto:
                                      # this process where a pool could only hold one actor)
    train: {num_workers: 1, use_gpu: false, split: train, max_failures: 0}   # trained methods: Ray Train
    train: {max_concurrent: auto, gpus_per_worker: 1}   # fits at once (auto: as many as the cluster's CPUs, or
                                      # GPUs, hold), a fraction of a GPU per worker to pack small fits on one GPU
                                      # train.data: {name: voc2012, root: synthetic/x}: fit on another dataset
                                      # than the evaluated one (synthetic -> real; COCO-Stuff -> others)
    fit: {from: null}                 # trained methods: reuse the fits of another run (or one fit directory)
    search: {algo: optuna, num_samples: 16}   # adaptive search of post-processing parameters (bench.search)
    tracking: {name: mlflow, uri: null}   # also log the finished run to MLflow (`tracking=mlflow`; bench.track)
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.data import dataset_options
from bench.errors import BenchError
from bench.frozen import FrozenDict, freeze, thaw
from bench.limits import check_override, check_side, check_yaml_shape, count_configurations, read_sweep_text
from bench.metrics import PROTOCOLS
from bench.models import validate_model_config
from bench.registry import unknown_name_message
from methods import METHODS

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a run name is one path component, no escape
# `${oc.env:HOME}`, `${oc.decode:...}`, any `${resolver:...}`: values from outside the sweep file (environment
# secrets would be copied into config.yaml and reports). References to other keys (`${data.size}`) stay.
RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _refuse_resolvers(value, where: str) -> None:
    """No environment (or any resolver) interpolation anywhere in a sweep file or override."""
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_resolvers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _refuse_resolvers(item, f"{where}[{k}]")
    elif isinstance(value, str) and RESOLVER.search(value):
        raise BenchError(f"{where}={value!r} uses a resolver interpolation (${{oc.env:...}} and the like are not "
                         f"allowed in sweep files); write the value itself")


class Section:
    """A typed config section: `from_dict` checks names (did you mean) and value types."""

    KEY_NAMES: dict[str, str] = {}  # YAML key -> attribute name where they differ (`from` is a keyword)

    @classmethod
    def yaml_keys(cls) -> list[str]:
        inverse = {v: k for k, v in cls.KEY_NAMES.items()}
        return [inverse.get(f.name, f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, raw, section: str):
        if not isinstance(raw, dict):
            raise BenchError(f"{section} must be a mapping (e.g. {section}: {{{cls.yaml_keys()[0]}: ...}})")
        known = cls.yaml_keys()
        values = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in known:
                raise BenchError(unknown_name_message(f"{section} key", key, sorted(known), section))
            attr = cls.KEY_NAMES.get(key, key)
            values[attr] = _check_type(f"{section}.{key}", value, types[attr])
        return cls(**values)

    def as_dict(self) -> dict:
        inverse = {v: k for k, v in self.KEY_NAMES.items()}
        return {inverse.get(f.name, f.name): thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _check_type(name: str, value, annotation: str):
    """Check `value` against a simple annotation ("int", "str | None", "bool", "float"); ints pass as floats."""
    allowed = [a.strip() for a in str(annotation).split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise BenchError(f"{name} must not be empty")
    for kind in allowed:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "dict" and isinstance(value, dict):
            return freeze(value)
    raise BenchError(f"{name}={value!r} must be {' or '.join(a for a in allowed if a != 'None')}")


@dataclass(frozen=True)
class ModelConfig(Section):
    name: str = "embedded"
    path: str | None = None
    id: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    random: bool = False
    resolution: int = 0
    # transformer backbones (SD3/Flux; bench.models.layers.TransformerLayerMap, docs/backbones.md): which blocks
    # the attention roles read, Flux's block scope, and how joint attention's blocks are normalised
    depth: str | int = "all"  # transformer blocks by rank: all, first, last, middle (third), or ranks "0,5,-1"
    flux_blocks: str = "double"  # Flux: which blocks ranks count: double (19), single (38) or all (57)
    joint_rows: str = "renormalised"  # joint attention's blocks: renormalised rows (row-stochastic) or raw
    TRANSFORMER_DEFAULTS = {"depth": "all", "flux_blocks": "double", "joint_rows": "renormalised"}

    def as_dict(self) -> dict:
        """The transformer options only where set (so a UNet model's config, and its hash, are what they were)."""
        return {k: v for k, v in super().as_dict().items()
                if k not in self.TRANSFORMER_DEFAULTS or str(v) != self.TRANSFORMER_DEFAULTS[k]}


@dataclass(frozen=True)
class MetricConfig(Section):
    protocol: str = "mmseg"
    main: str = "mIoU"


@dataclass(frozen=True)
class RayConfig(Section):
    address: str | None = None
    num_actors: int | str = "auto"  # auto: one per GPU, or one per CPU core but one (bench.env.auto_num_actors)
    # where images are traced: `actors` (a Ray Data actor pool), `driver` (this process, no Ray unless fits need
    # it), `auto` (the driver wherever a pool could hold only one actor: bench.env.resolve_execution)
    execution: str = "auto"
    batch_size: int = 1
    object_store_mb: int = 256
    quiet: bool = True
    # a dead tracing actor is restarted and its batch retried this many times (worker crash, node loss);
    # finished batches are kept, a re-executed batch is written once (shards are per image, idempotent)
    max_retries: int = 3


@dataclass(frozen=True)
class ReportConfig(Section):
    bootstrap: int = 200
    qualitative: int = 4
    # open-vocabulary protocol: dataset classes joined by + reported apart as unseen (results: mIoU_seen,
    # mIoU_unseen and their intervals; every other class, background included, is seen)
    unseen: str = ""


@dataclass(frozen=True)
class TrainConfig(Section):
    """How trained methods fit (bench.stages.fit): Ray Train workers, GPUs, and the split they learn from."""

    num_workers: int = 1
    use_gpu: bool = False
    split: str = "train"
    max_failures: int = 0  # worker-group restarts from the last checkpoint before a fit fails (preemption)
    # train settings fitted at once, each a Ray Tune trial running one Ray Train run (bench.stages.fit):
    # auto = as many as the cluster's CPUs (or GPUs, with use_gpu) hold at num_workers workers per fit
    max_concurrent: int | str = "auto"
    gpus_per_worker: float = 1.0  # with use_gpu: 0.25 packs four one-worker fits on one GPU
    # the dataset fits learn from, when it is not the evaluated one: a `data:` mapping (name, root, split,
    # limit, ...); its split defaults to `split`, its limit to all images (bench.config.train_data_config)
    data: dict | None = None


@dataclass(frozen=True)
class FitConfig(Section):
    KEY_NAMES = {"from": "source"}
    source: str | None = None  # `fit.from`: a run directory or one fit directory whose fits are reused


@dataclass(frozen=True)
class SearchConfig(Section):
    """Adaptive search over the sweep's post-processing parameters (bench.search); off without `algo`."""

    algo: str | None = None  # optuna | hyperopt | random
    num_samples: int = 16  # configurations sampled
    grace_images: int = 2  # successive halving: images every configuration scores before it can be stopped
    reduction_factor: int = 3  # successive halving: the best 1 / reduction_factor go on at each rung
    cache_mb: int = 2048  # trace cache bound (<run>/work/trace_cache)


@dataclass(frozen=True)
class TrackingConfig(Section):
    """Where a finished run is logged besides its run directory (bench.track); off without `name`."""

    name: str | None = None  # mlflow (`tracking=mlflow`): every configuration an MLflow run
    # the MLflow tracking URI: a server (http://host:5000) for runs on several machines; default: a local store
    # beside the runs (<runs folder>/mlflow.db, artefacts in <runs folder>/mlartifacts)
    uri: str | None = None
    experiment: str | None = None  # the MLflow experiment; default: the sweep's name


# backbone / dataset / protocol: the paper's setup (a report shows the paper's numbers only for a run with that
# setup); tolerance: |ours - paper| in metric points that counts as reproducing it (bench.reporting.paper)
PAPER_KEYS = ("table", "param", "metric", "values", "note", "backbone", "dataset", "protocol", "tolerance")


@dataclass(frozen=True)
class SweepConfig:
    name: str
    method: str
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    # the backbone as the sweep's outermost axis (bench.backbones): entries embedded | diffusers folder | cached
    # hub id, each replacing model.name / path / id; empty: the one backbone of `model:`
    models: list = field(default_factory=list)
    data: dict = field(default_factory=lambda: {"name": "shapes", "limit": None})
    params: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    num_samples: int = 1
    search_seed: int = 0
    seeds: list = field(default_factory=lambda: [0])
    metric: MetricConfig = field(default_factory=MetricConfig)
    paper: dict = field(default_factory=dict)
    ray: RayConfig = field(default_factory=RayConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # log the finished run to an experiment tracker (`tracking=mlflow`)
    output_dir: str | None = None
    overrides: list = field(default_factory=list)
    sweep_file: str | None = None

    SECTIONS = {"model": ModelConfig, "metric": MetricConfig, "ray": RayConfig, "report": ReportConfig,
                "train": TrainConfig, "fit": FitConfig, "search": SearchConfig, "tracking": TrackingConfig}

    FROZEN = ("data", "params", "sweep", "seeds", "paper", "overrides", "models")  # containers made read-only

    def __post_init__(self):
        for name in self.FROZEN:  # the one place a field is set after construction: before anyone sees it
            object.__setattr__(self, name, freeze(getattr(self, name)))

    @cached_property
    def swept(self) -> FrozenDict:
        """Every swept parameter's space: the user's `sweep`, then the method's default sweep for the parameters
        the input neither sweeps nor fixes (`Resolved.sweep`, recorded apart from the input)."""
        return FrozenDict({**self.sweep, **default_sweep(self)})

    def as_dict(self) -> dict:
        """Plain data (config.yaml): sections as mappings, in declaration order; `models` only where given (so a
        one-backbone config, and its hash, are what they were before the backbone axis)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "models" and not value:
                continue
            out[f.name] = value.as_dict() if isinstance(value, Section) else thaw(value)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "SweepConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in known:
                raise BenchError(unknown_name_message("sweep key", key, sorted(k for k in known
                                                                              if k not in ("overrides", "sweep_file")),
                                                      "the sweep file"))
        values = dict(raw)
        for name, section in cls.SECTIONS.items():
            if name in values:
                values[name] = section.from_dict(values[name] if values[name] is not None else {}, name)
        for name in ("data", "params", "sweep", "paper"):
            if name in values and values[name] is None:
                values[name] = {}
        if values.get("models") is None:
            values["models"] = []
        return cls(**values)


def defaults() -> dict:
    return {k: v for k, v in SweepConfig(name=None, method=None).as_dict().items()
            if k not in ("overrides", "sweep_file")}


# Sections a bare `<section>=<name>` switches (`data=voc2012`, `model=embedded`): the name replaces the file's
# whole section, so the options the file gives the old dataset or model are dropped, and `data.<key>=` overrides
# then apply to the new one (`tracking=mlflow` likewise names the tracking backend). (Before, Hydra merged the later `data.<key>=` overrides over the bare string and
# the name silently fell back to the default dataset.)
SWITCHED_SECTIONS = ("data", "model", "tracking")


def hydra_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """The user's key=value overrides as Hydra overrides. "++" adds or replaces, so overrides may name keys the
    file leaves to the defaults (validation rejects keys that exist nowhere); `data=<name>` / `model=<name>`
    become a switch of the whole section (SWITCHED_SECTIONS), applied before every other override."""
    switches, rest = [], []
    for item in overrides:
        key, value = item.split("=", 1)
        if key.lstrip("+~") == "models" and value.strip() and value.strip()[0] not in "[{" and value.strip() != "null":
            # models=embedded,/models/sdxl: a comma list (Hydra would read it as a multirun sweep), each entry quoted
            # so that paths and hub ids pass its grammar
            entries = ",".join("'" + e.strip().replace("\\", "\\\\").replace("'", "\\'") + "'"
                               for e in value.split(",") if e.strip())
            rest.append(f"++models=[{entries}]")
        elif key in SWITCHED_SECTIONS and value.strip() and value.strip()[0] not in "{[" and value.strip() != "null":
            switches += ([f"~{key}"] if key in raw else []) + [f"++{key}.name={value.strip()}"]
        else:
            rest.append(item if item.startswith(("+", "~")) else "++" + item)
    return switches + rest


def compose(path: str | Path, overrides: list[str]) -> SweepConfig:
    """Compose the sweep file with Hydra (no output folder, no chdir), overlay on the defaults, validate; the
    file and the overrides within bench.limits first."""
    try:
        return _compose(Path(path), overrides)
    except RecursionError:  # a nesting that slipped past the limits: one line, not thousands
        raise BenchError(f"{path} or its overrides nest too deeply to parse; flatten them") from None


def _compose(path: Path, overrides: list[str]) -> SweepConfig:
    if path.suffix not in (".yaml", ".yml"):
        raise BenchError(f"{path} is not a .yaml sweep file; see sweeps/ for examples")
    if not path.is_file():
        raise BenchError(f"sweep file {path} not found; see sweeps/ for examples")
    text = read_sweep_text(path)
    check_yaml_shape(text, f"sweep file {path}")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BenchError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}; fix the file") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path} must hold a mapping of sweep keys (name, method, data, sweep, ...)")
    _refuse_resolvers(raw, "")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise BenchError(f"override {item!r} is not key=value (e.g. data.limit=8)")
        check_override(item)
        key, value = item.split("=", 1)
        _refuse_resolvers(value, key.lstrip("+~"))
    forced = hydra_overrides(raw, overrides)
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base=None):
            composed = hydra_compose(config_name=path.stem, overrides=forced)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise BenchError(f"cannot apply overrides {overrides}: {first}") from None
    try:
        merged = OmegaConf.merge(OmegaConf.create(defaults()), composed)
    except OmegaConfBaseException as err:
        raise BenchError(f"{path}: {str(err).strip().splitlines()[0]}") from None
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0]
        raise BenchError(f"{path}: {first}; fix the interpolation (only ${{other.key}} references resolve)") from None
    data["name"] = data["name"] or path.stem
    data["overrides"] = list(overrides)
    data["sweep_file"] = str(path)
    cfg = SweepConfig.from_dict(data)
    validate(cfg)
    return cfg


def validate(cfg: SweepConfig) -> None:
    if not isinstance(cfg.name, str) or not NAME_PATTERN.match(cfg.name):
        raise BenchError(f"name={cfg.name!r} must be one folder name (letters, digits, '.', '_', '-'; at most 100, "
                         f"not starting with '.'); use output_dir= to choose where the run goes")
    if not cfg.method:
        raise BenchError(f"the sweep file names no method; add method: <one of {', '.join(METHODS.names())}>")
    method = METHODS.get(cfg.method)
    if not isinstance(cfg.data, dict) or not cfg.data.get("name"):
        raise BenchError("data.name is missing; e.g. data: {name: shapes}")
    dataset_options(cfg.data)
    if cfg.train.data is not None:
        check_train_source(cfg)
    validate_model_config(cfg.model.as_dict())
    if cfg.models:
        from bench.backbones import check_models

        check_models(cfg)
    if cfg.metric.protocol not in PROTOCOLS:
        raise BenchError(f"metric.protocol={cfg.metric.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if not isinstance(cfg.params, dict) or not isinstance(cfg.sweep, dict):
        raise BenchError("params and sweep must be mappings of method parameters")
    if not isinstance(cfg.paper, dict):
        raise BenchError("paper must be a mapping (table, param, metric, values, note)")
    for key in cfg.paper:
        if key not in PAPER_KEYS:
            raise BenchError(unknown_name_message("paper key", key, sorted(PAPER_KEYS), "paper"))
    tol = cfg.paper.get("tolerance")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 100):
        raise BenchError(f"paper.tolerance={tol!r} must be a number of metric points >= 0 (e.g. paper.tolerance=1.0)")
    spec = method.all_params()
    for name, space in cfg.sweep.items():
        if name not in spec:
            raise BenchError(unknown_name_message(f"parameter of method {cfg.method}", name, sorted(spec),
                                                  "sweep"))
        kind, values = space_kind(name, space)
        for value in values:  # grid and choice values, and both ends of a range, within the declared bounds
            spec[name].coerce(name, value)
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise BenchError(f"sweep.{name}.{kind}={values} needs low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise BenchError(f"sweep.{name}.loguniform={values} needs low > 0")
    method.resolve(cfg.params)
    check_seeds(cfg.seeds, cfg.search_seed)
    if not isinstance(cfg.num_samples, int) or isinstance(cfg.num_samples, bool) or cfg.num_samples < 1:
        raise BenchError("num_samples must be an integer >= 1")
    count_configurations([len(space_kind(n, v)[1]) for n, v in cfg.swept.items() if space_kind(n, v)[0] == "grid"],
                         cfg.num_samples if any(space_kind(n, v)[0] != "grid" for n, v in cfg.swept.items()) else 1,
                         len(cfg.seeds))
    for name, options in (("data", cfg.data), ("train.data", cfg.train.data or {})):
        check_side(f"{name}.size", options.get("size"))
    check_side("model.resolution", cfg.model.resolution)
    if isinstance(cfg.ray.num_actors, str) and cfg.ray.num_actors != "auto":
        raise BenchError(f"ray.num_actors={cfg.ray.num_actors!r} must be a number of actors or auto")
    actors = 1 if cfg.ray.num_actors == "auto" else cfg.ray.num_actors
    check_execution(cfg.ray)
    check_train_resources(cfg.train)
    for name, value, low in (("ray.num_actors", actors, 0), ("ray.batch_size", cfg.ray.batch_size, 1),
                             ("ray.object_store_mb", cfg.ray.object_store_mb, 64),
                             ("ray.max_retries", cfg.ray.max_retries, 0),
                             ("train.num_workers", cfg.train.num_workers, 1),
                             ("train.max_failures", cfg.train.max_failures, 0),
                             ("model.resolution", cfg.model.resolution, 0),
                             ("report.bootstrap", cfg.report.bootstrap, 0),
                             ("report.qualitative", cfg.report.qualitative, 0)):
        if value < low:
            raise BenchError(f"{name}={value} must be >= {low}")
    if cfg.search.algo is not None:
        check_searchable(cfg)
    check_tracking(cfg.tracking)
    paper = cfg.paper
    if paper and paper.get("param") and paper["param"] not in cfg.swept:
        raise BenchError(f"paper.param={paper['param']!r} is not a swept parameter ({', '.join(cfg.swept)})")


def default_sweep(cfg: SweepConfig) -> dict:
    """The method's default sweep (compare: every training-free method) for the parameters the input neither
    sweeps nor fixes: what the run adds to the user's sweep (`Resolved.sweep`)."""
    return {name: space for name, space in METHODS.get(cfg.method).default_sweep().items()
            if name not in cfg.sweep and name not in cfg.params}


SEED_LIMIT = 2**32  # numpy's and torch's generators take seeds below this


def check_seeds(seeds, search_seed) -> None:
    """Seeds are distinct integers in [0, 2**32) (a repeated seed would count one forward setting twice: a
    spread of 0 and a confidence interval over copies); `true` is no integer."""
    def integer(s) -> bool:
        return isinstance(s, int) and not isinstance(s, bool)

    if not isinstance(seeds, list) or not seeds or not all(integer(s) for s in seeds):
        raise BenchError(f"seeds={seeds!r} must be a non-empty list of integers")
    if not integer(search_seed):
        raise BenchError(f"search_seed={search_seed!r} must be an integer")
    for name, value in [*(("seeds", s) for s in seeds), ("search_seed", search_seed)]:
        if not 0 <= value < SEED_LIMIT:
            raise BenchError(f"{name}: {value} must be an integer >= 0 and < 2**32 (seeds={seeds!r}, "
                             f"search_seed={search_seed!r})")
    repeated = sorted(s for s, n in Counter(seeds).items() if n > 1)
    if repeated:
        raise BenchError(f"seeds={seeds!r} repeats {', '.join(map(str, repeated))}; each seed is one forward "
                         f"setting, list each once")


EXECUTION_MODES = ("auto", "actors", "driver")


def check_train_resources(train: TrainConfig) -> None:
    """`train.max_concurrent` is auto or a count >= 1; `train.gpus_per_worker` is a share of one GPU (0, 1] or
    a whole number of GPUs, and only means something with `train.use_gpu=true`."""
    concurrent = train.max_concurrent
    if isinstance(concurrent, bool) or not (concurrent == "auto" or (isinstance(concurrent, int) and concurrent >= 1)):
        raise BenchError(f"train.max_concurrent={concurrent!r} must be auto or a number of fits >= 1")
    gpus = train.gpus_per_worker
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus <= 0 or (gpus > 1 and gpus != int(gpus)):
        raise BenchError(f"train.gpus_per_worker={gpus!r} must be a share of one GPU in (0, 1] or a whole number "
                         "of GPUs")
    if gpus != 1 and not train.use_gpu:
        raise BenchError(f"train.gpus_per_worker={gpus} without train.use_gpu=true: fits train on CPUs; add "
                         "train.use_gpu=true or drop train.gpus_per_worker")


def check_execution(ray_cfg: RayConfig) -> None:
    """`ray.execution` is one of EXECUTION_MODES and agrees with `ray.num_actors` (0 means this process)."""
    mode = ray_cfg.execution
    if mode not in EXECUTION_MODES:
        close = difflib.get_close_matches(str(mode), EXECUTION_MODES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BenchError(f"ray.execution={mode!r} must be one of {', '.join(EXECUTION_MODES)}{hint}")
    if mode == "actors" and ray_cfg.num_actors == 0:
        raise BenchError("ray.execution=actors with ray.num_actors=0: give ray.num_actors=auto or a number >= 1, "
                         "or ray.execution=driver to trace in this process")
    if mode == "driver" and ray_cfg.num_actors not in ("auto", 0):
        raise BenchError(f"ray.execution=driver traces in this process, so ray.num_actors={ray_cfg.num_actors} "
                         "has no actors to size: drop it, or use ray.execution=actors")


def space_kind(name: str, space) -> tuple[str, list]:
    """A sweep entry -> (kind, values). A bare list is a grid."""
    if isinstance(space, list):
        space = {"grid": space}
    if not isinstance(space, dict) or len(space) != 1 or next(iter(space)) not in SPACE_KINDS:
        raise BenchError(f"sweep.{name} must be one of {{{', '.join(k + ': ...' for k in SPACE_KINDS)}}}")
    kind, values = next(iter(space.items()))
    if not isinstance(values, list) or not values:
        raise BenchError(f"sweep.{name}.{kind} needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
        raise BenchError(f"sweep.{name}.{kind} needs [low, high]")
    return kind, values


def train_data_config(cfg: SweepConfig) -> dict:
    """The dataset a fit learns from: `train.data` when given (its split defaulting to `train.split`, its limit
    to all images), else the evaluated dataset's options with the training split and all images. It is part of
    every fit's hash (bench.plan.fit_hash) and of the run's config."""
    if cfg.train.data is not None:
        # keys set to null are dropped: overrides merge into the file's mapping, so switching datasets on the
        # command line unsets the old one's options (train.data.name=shapes train.data.root=null)
        given = {k: v for k, v in cfg.train.data.items() if v is not None}
        return {"limit": None, **given, "split": given.get("split") or cfg.train.split}
    return {**cfg.data, "split": cfg.train.split, "limit": None}


def check_train_source(cfg: SweepConfig) -> None:
    """`train.data` names a registered dataset with a training split and valid options (before Ray starts;
    whether its files exist is checked by preflight)."""
    source = train_data_config(cfg)
    if not source.get("name"):
        raise BenchError("train.data.name is missing; e.g. train: {data: {name: voc2012, root: synthetic/x}}")
    if "split" not in dataset_options({"name": source["name"]}):
        raise BenchError(f"train.data={source['name']} has no splits to train on; fit on a dataset with a training "
                         f"split (shapes, voc2012, a synthetic VOC folder, ...)")
    try:
        dataset_options(train_data_config(cfg))
    except BenchError as err:
        raise BenchError(f"train.data: {err}") from None


SEARCH_ALGOS = ("optuna", "hyperopt", "random")  # bench.search's Ray Tune search algorithms


def check_searchable(cfg: SweepConfig) -> None:
    """Before Ray starts: the algorithm exists and every searched parameter is a post-processing one
    (bench.search runs it)."""
    algo = cfg.search.algo
    if algo not in SEARCH_ALGOS:
        raise BenchError(f"search.algo={algo!r} is not one of {', '.join(SEARCH_ALGOS)}")
    if algo in ("optuna", "hyperopt"):
        try:
            __import__(algo)
        except ImportError:
            raise BenchError(f"search.algo={algo} needs the {algo} package; pip install {algo}") from None
    params = METHODS.get(cfg.method).all_params()
    for name in cfg.swept:
        if params[name].kind != "post":
            raise BenchError(f"search covers post-processing parameters only; {name} is a {params[name].kind} "
                             f"parameter: fix it in params or run the grid without search")
    if len(cfg.seeds) != 1:
        raise BenchError("search runs on one forward setting; give one seed (seeds: [0])")
    if cfg.search.num_samples < 1 or cfg.search.grace_images < 1 or cfg.search.reduction_factor < 2:
        raise BenchError("search needs num_samples >= 1, grace_images >= 1 and reduction_factor >= 2")


TRACKERS = ("mlflow",)  # bench.track


def check_tracking(tracking: TrackingConfig) -> None:
    """`tracking=mlflow` names a known backend whose client is installed; `tracking.uri` / `.experiment` need it."""
    if tracking.name is None:
        if tracking.uri is not None or tracking.experiment is not None:
            raise BenchError("tracking.uri / tracking.experiment without a backend: add tracking=mlflow")
        return
    if tracking.name not in TRACKERS:
        close = difflib.get_close_matches(str(tracking.name), TRACKERS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BenchError(f"tracking={tracking.name!r} is not one of {', '.join(TRACKERS)}{hint}")
    from bench.track import require_mlflow

    require_mlflow()
