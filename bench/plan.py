"""The plan of a sweep: configurations grouped backbone > train setting > forward setting > post-processing.

- A sweep over `models:` (bench.backbones) repeats every configuration on each backbone, the backbone outermost:
  its trials, fits and forward groups are contiguous in the plan and carry its label (`Trial.swept["model"]`,
  `FitUnit.model`, `ForwardGroup.model`), so the engine fits and traces one backbone after the other.

- A `Trial` is one configuration: the method's resolved parameters, the swept subset and the train setting it
  needs (None for training-free configurations).
- A `FitUnit` is one train setting: fitted once (bench.stages.fit) for every trial that needs it, stored in
  `<run>/fit/<hash>/`. The hash covers the setting and what the run fixes for it (model, training data), so
  another run with the same hash can lend its fit (`fit.from=`).
- A `ForwardGroup` is one UNet pass per image: the trials that share forward parameters and seed. Fits do not
  change the pass, so trials of different train settings may share a group.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from bench.config import SweepConfig, space_kind, train_data_config
from methods import METHODS
from methods.base import Method, ParamsBase, TrainSetting

FIT_HASH_VERSION = 2  # bump when what the hash covers changes (2: the weights' identities)


@dataclass
class Trial:
    """One configuration of the sweep: the method's full parameters, the swept subset, the fit it needs."""

    trial_id: str
    params: ParamsBase
    swept: dict
    train: TrainSetting | None = None


@dataclass
class FitUnit:
    setting: TrainSetting
    hash: str  # the fit directory's name
    trial_ids: list[str] = field(default_factory=list)
    model: str = ""  # the backbone's label in a sweep over models (its config is in the hash)


@dataclass
class ForwardGroup:
    seed: int
    forward: tuple  # ((name, value), ...) of the method's forward parameters
    trials: list[Trial] = field(default_factory=list)
    model: str = ""  # the backbone's label in a sweep over models: another backbone is another pass

    @property
    def key(self) -> str:
        head = f"model={self.model}," if self.model else ""
        return head + f"seed={self.seed}," + ",".join(f"{k}={v}" for k, v in self.forward)


@dataclass
class Plan:
    trials: list[Trial]
    fits: list[FitUnit]
    groups: list[ForwardGroup]
    # what the checks found worth knowing but not wrong (prompts the tokenizer cuts, ...): recorded in run.json
    # and said once in the report, not on the console
    notes: list[str] = field(default_factory=list)
    inputs: dict | None = None  # fingerprints of the model and data (bench.fingerprint), set by preflight
    opened: list[str] = field(default_factory=list)  # the dataset files preflight read (absolute), for node probes
    # the evaluated dataset preflight built and checked, handed to the engine (not rebuilt); stays on the driver
    dataset: object | None = field(default=None, repr=False, compare=False)
    # a sweep over models: (label, the sweep's config on that backbone) in plan order; empty for one backbone
    backbones: list[tuple[str, SweepConfig]] = field(default_factory=list)
    # a sweep over models: each backbone's model fingerprint (bench.fingerprint), for the per-node probes
    model_inputs: dict = field(default_factory=dict)

    def for_backbone(self, label: str) -> "Plan":
        """The part of the plan that runs on one backbone (its trials, fits and forward groups)."""
        trials = [t for t in self.trials if t.swept.get("model") == label]
        return Plan(trials, [u for u in self.fits if u.model == label], [g for g in self.groups if g.model == label],
                    inputs=self.inputs, opened=self.opened, dataset=self.dataset)

    def first_group(self, label: str) -> int:
        """The index of the backbone's first forward group (its groups are contiguous: the backbone is outermost)."""
        return next(i for i, g in enumerate(self.groups) if g.model == label)


# -- search space ------------------------------------------------------------------------------------------------
def sampler(kind: str, values: list):
    """Ray Tune's sampler of a non-grid sweep entry (imported when a sweep has one: ray.tune takes a second)."""
    from ray import tune

    return {"choice": lambda v: tune.choice(v), "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}[kind](values)


def expand_trials(cfg: SweepConfig) -> list[Trial]:
    """Grid parameters form a cartesian product; random ones (choice/uniform/...) are drawn `num_samples`
    times per grid point with Ray Tune's samplers and a fixed `search_seed`, so a resumed run sees the same."""
    method_cls = METHODS.get(cfg.method)
    method = method_cls()
    grid, random = {}, {}
    for name, space in cfg.swept.items():
        kind, values = space_kind(name, space)
        if kind == "grid":
            grid[name] = values
        else:
            random[name] = sampler(kind, values)
    rng = np.random.default_rng(cfg.search_seed)
    trials: list[Trial] = []
    samples = int(cfg.num_samples) if random else 1
    for point in itertools.product(*grid.values()):
        for _ in range(samples):
            swept = dict(zip(grid, point))
            swept.update({k: _plain(d.sample(random_state=rng)) for k, d in random.items()})
            params = method_cls.resolve({**cfg.params, **swept})
            trials.append(Trial(f"t{len(trials):04d}", params, {k: params[k] for k in swept},
                                method.train_setting(params)))
    return trials


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# -- grouping ------------------------------------------------------------------------------------------------------
def group_trials(method_cls: type[Method], trials: list[Trial], seeds: list[int]) -> list[ForwardGroup]:
    groups: dict[tuple, ForwardGroup] = {}
    keys = method_cls.forward_keys()
    for seed in seeds:
        for trial in trials:
            forward = tuple((k, trial.params[k]) for k in keys)
            groups.setdefault((seed, forward), ForwardGroup(seed, forward)).trials.append(trial)
    return list(groups.values())


def fit_hash(setting: TrainSetting, cfg: SweepConfig) -> str:
    """The fit directory's name: the setting (with the identities of the weights it reads) plus what the run
    fixes for it (the model config and its weights' identity, training data). Not
    covered: workers, devices, retries and concurrency (`train.num_workers`, `train.use_gpu`,
    `train.gpus_per_worker`, `train.max_failures`, `train.max_concurrent`), which change how a fit runs, not
    what it learns (the global batch is split across workers)."""
    from bench.models.identity import model_identity

    model = {k: v for k, v in cfg.model.as_dict().items() if k != "device"}
    text = json.dumps({"v": FIT_HASH_VERSION, "setting": setting.as_dict(), "model": model,
                       "model_weights": model_identity(model), "data": train_data_config(cfg)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def group_fits(trials: list[Trial], cfg: SweepConfig) -> list[FitUnit]:
    units: dict[TrainSetting, FitUnit] = {}
    for trial in trials:
        if trial.train is not None:
            unit = units.setdefault(trial.train, FitUnit(trial.train, fit_hash(trial.train, cfg)))
            unit.trial_ids.append(trial.trial_id)
    return list(units.values())


def make_plan(cfg: SweepConfig) -> Plan:
    trials = expand_trials(cfg)
    if not cfg.models:
        return Plan(trials, group_fits(trials, cfg), group_trials(METHODS.get(cfg.method), trials, cfg.seeds))
    return backbone_plan(cfg, trials)


def backbone_plan(cfg: SweepConfig, base: list[Trial]) -> Plan:
    """A sweep over models: the same configurations (the same random draws) on every backbone, numbered on
    across backbones; each backbone's fits hashed with its own model config."""
    from bench.backbones import backbone_configs

    plan = Plan([], [], [])
    for item, sub in backbone_configs(cfg):
        trials = [Trial(f"t{len(plan.trials) + k:04d}", t.params, {"model": item.label, **t.swept}, t.train)
                  for k, t in enumerate(base)]
        fits = group_fits(trials, sub)
        groups = group_trials(METHODS.get(cfg.method), trials, cfg.seeds)
        for unit in fits:
            unit.model = item.label
        for group in groups:
            group.model = item.label
        plan.trials += trials
        plan.fits += fits
        plan.groups += groups
        plan.backbones.append((item.label, sub))
    return plan
