"""Sweep files: Hydra composition of `SWEEP.yaml` + `key=value` overrides, then strict validation.

A sweep file names only registered methods, datasets and models; every key is checked, and the swept and
fixed parameters are checked against the method's declared parameters. Nothing here imports by path.

    name: iseg_lambda                 # run directory prefix
    method: iseg                      # registered method
    model: {name: embedded}           # or path: <diffusers folder> / id: <hub id in the local cache>
    data: {name: shapes, limit: 8}
    params: {iterations: 10}          # fixed method parameters (defaults: the paper's)
    sweep:                            # swept method parameters
      lambda: {grid: [0, 0.01]}       # grid | choice | uniform [lo, hi] | loguniform [lo, hi] | randint [lo, hi]
    num_samples: 1                    # random-search draws of the non-grid parameters
    seeds: [0]                        # noise / generation seeds (each one is a forward setting)
    metric: {protocol: mmseg}         # mmseg | iseg
    paper: {table: "iSeg Table 5(b)", param: lambda, metric: mIoU, values: {0: 69.1, ...}}
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from bench.data import dataset_options
from bench.errors import BenchError
from bench.metrics import PROTOCOLS
from bench.registry import unknown_name_message

DEFAULTS: dict = {
    "name": None,
    "description": "",
    "method": None,
    "model": {"name": "embedded", "path": None, "id": None, "device": "auto", "dtype": "auto", "random": False,
              "resolution": 0},
    "data": {"name": "shapes", "limit": None},
    "params": {},
    "sweep": {},
    "num_samples": 1,
    "search_seed": 0,
    "seeds": [0],
    "metric": {"protocol": "mmseg", "main": "mIoU"},
    "paper": {},
    "ray": {"address": None, "num_actors": 1, "batch_size": 1, "object_store_mb": 256, "quiet": True},
    "report": {"bootstrap": 200, "qualitative": 4},
    "output_dir": None,
}
SECTION_KEYS = {"model": set(DEFAULTS["model"]), "metric": set(DEFAULTS["metric"]), "ray": set(DEFAULTS["ray"]),
                "report": set(DEFAULTS["report"]),
                "paper": {"table": None, "param": None, "metric": None, "values": None, "note": None}.keys()}
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def compose(path: str | Path, overrides: list[str]) -> dict:
    """Compose the sweep file with Hydra (no output folder, no chdir), overlay on DEFAULTS, validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise BenchError(f"{path} is not a .yaml sweep file; see sweeps/ for examples")
    if not path.is_file():
        raise BenchError(f"sweep file {path} not found; see sweeps/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BenchError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}; fix the file") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path} must hold a mapping of sweep keys (name, method, data, sweep, ...)")
    for item in overrides:
        if "=" not in item:
            raise BenchError(f"override {item!r} is not key=value (e.g. data.limit=8)")
    # "++" adds or replaces, so overrides may name keys the file leaves to the defaults; validation below
    # rejects keys that exist nowhere.
    forced = [o if o.startswith("+") or o.startswith("~") else "++" + o for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base=None):
            composed = hydra_compose(config_name=path.stem, overrides=forced)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise BenchError(f"cannot apply overrides {overrides}: {first}") from None
    merged = OmegaConf.merge(OmegaConf.create(copy.deepcopy(DEFAULTS)), composed)
    cfg = OmegaConf.to_container(merged, resolve=True)
    cfg["name"] = cfg["name"] or path.stem
    cfg["overrides"] = list(overrides)
    cfg["sweep_file"] = str(path)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    from bench.models import validate_model_config
    from methods import METHODS

    known = set(DEFAULTS) | {"overrides", "sweep_file"}
    for key in cfg:
        if key not in known:
            raise BenchError(unknown_name_message("sweep key", key, sorted(known), "the sweep file"))
    for section, keys in SECTION_KEYS.items():
        if not isinstance(cfg[section], dict):
            raise BenchError(f"{section} must be a mapping")
        for key in cfg[section]:
            if key not in keys:
                raise BenchError(unknown_name_message(f"{section} key", key, sorted(keys), section))
    if not cfg["method"]:
        raise BenchError(f"the sweep file names no method; add method: <one of {', '.join(METHODS.names())}>")
    method = METHODS.get(cfg["method"])
    if not isinstance(cfg["data"], dict) or not cfg["data"].get("name"):
        raise BenchError("data.name is missing; e.g. data: {name: shapes}")
    dataset_options(cfg["data"])
    validate_model_config(cfg["model"])
    if cfg["metric"]["protocol"] not in PROTOCOLS:
        raise BenchError(f"metric.protocol={cfg['metric']['protocol']!r} is not one of {', '.join(PROTOCOLS)}")
    if not isinstance(cfg["params"], dict) or not isinstance(cfg["sweep"], dict):
        raise BenchError("params and sweep must be mappings of method parameters")
    spec = method.all_params()
    for name, space in cfg["sweep"].items():
        if name not in spec:
            raise BenchError(unknown_name_message(f"parameter of method {cfg['method']}", name, sorted(spec),
                                                  "sweep"))
        kind, values = space_kind(name, space)
        for value in values if kind in ("grid", "choice") else []:
            spec[name].coerce(name, value)
    method.resolve(cfg["params"])
    seeds = cfg["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchError(f"seeds={seeds!r} must be a non-empty list of integers")
    if int(cfg["num_samples"]) < 1:
        raise BenchError("num_samples must be >= 1")
    paper = cfg["paper"]
    if paper and paper.get("param") and paper["param"] not in cfg["sweep"]:
        raise BenchError(f"paper.param={paper['param']!r} is not a swept parameter ({', '.join(cfg['sweep'])})")


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
