"""What a run decided beyond the user's input: the `Resolved` record.

A validated `SweepConfig` is the user's input and never changes. What the run decides on top of it lives here:

    sweep        the method's default sweep for the parameters the input neither sweeps nor fixes (compare:
                 every training-free method; bench.config.default_sweep)
    ray          `ray.execution` and `ray.num_actors` as the trace stage settled them (`auto` resolved:
                 bench.stages.trace.settle_pool)
    output_dir   where the run was written

config.yaml holds the input and, under `resolved:`, this record in the config's own shape (its keys are where
the config keeps them: `sweep.<name>`, `ray.execution`, `ray.num_actors`, `output_dir`); run.json repeats it.
`effective_config` lays it over the input: the configuration the run ran, which the config hash covers (so a
run hashes as it did when config.yaml held only that) and the reports read. A config.yaml without `resolved:`
(runs written before the record existed) already is the effective configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from bench.frozen import FrozenDict, freeze, thaw

if TYPE_CHECKING:  # bench.config (Hydra, the method registry) is imported where a record is built, not read
    from bench.config import SweepConfig

RESOLVED_KEY = "resolved"  # config.yaml's and run.json's key of the record


@dataclass(frozen=True)
class Resolved:
    sweep: FrozenDict = field(default_factory=FrozenDict)  # default-sweep entries added to the user's sweep
    output_dir: str | None = None
    execution: str | None = None  # driver | actors; None until the trace stage settled it
    num_actors: int | None = None  # 0 with the driver

    @classmethod
    def of(cls, cfg: SweepConfig, output_dir=None) -> "Resolved":
        """What is decided before the run starts: the default sweep and the output directory."""
        from bench.config import default_sweep

        return cls(sweep=freeze(default_sweep(cfg)), output_dir=None if output_dir is None else str(output_dir))

    def with_pool(self, execution: str, num_actors: int) -> "Resolved":
        """The record with the trace pool the trace stage settled (bench.stages.trace.settle_pool)."""
        return replace(self, execution=execution, num_actors=int(num_actors))

    def as_dict(self) -> dict:
        """The record in the config's shape (config.yaml's and run.json's `resolved:`); unsettled parts left out."""
        out: dict = {"sweep": thaw(self.sweep)}
        ray = {k: v for k, v in (("num_actors", self.num_actors), ("execution", self.execution)) if v is not None}
        if ray:
            out["ray"] = ray
        if self.output_dir is not None:
            out["output_dir"] = self.output_dir
        return out


def run_record(cfg: SweepConfig, resolved: Resolved) -> dict:
    """config.yaml's content: the user's input, and the run's decisions beside it under `resolved:`."""
    return {**cfg.as_dict(), RESOLVED_KEY: resolved.as_dict()}


def effective_config(data: dict) -> dict:
    """A config.yaml mapping as the run ran it: the input with its `resolved:` record laid over it (nested
    mappings merged key by key, the input's key order kept). Without a record it is returned as it is."""
    record = data.get(RESOLVED_KEY) if isinstance(data, dict) else None
    if not isinstance(record, dict):
        return data
    return _overlay({k: v for k, v in data.items() if k != RESOLVED_KEY}, record)


def _overlay(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
