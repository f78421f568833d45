"""Adaptive search over a sweep's post-processing parameters (`search: {algo: optuna|hyperopt|random,
num_samples: N}`), on a trace cache, with ASHA over image rungs.

    trace cache   every image traced once for the sweep's forward setting, stored as safetensors in
                  `<run>/work/trace_cache/` (bounded by `search.cache_mb`: beyond it, traces are recomputed)
    search        Ray Tune: the sweep's entries become a search space (grid/choice -> choice, uniform,
                  loguniform, randint), sampled `num_samples` times by OptunaSearch, HyperOptSearch or
                  BasicVariantGenerator (random), seeded by `search_seed`
    trials        one configuration each, scored image by image on the cached traces; after every image the
                  running dataset metric is reported with `images` as the time attribute, so the ASHA
                  scheduler (grace `search.grace_images`, `search.reduction_factor`) stops a bad configuration
                  after a few images
    results       one row per searched configuration, its metrics over the images it scored
                  (`images_scored`, `search`), and run.json's `search` block (algorithm, pairs scored, best)

Only post-processing parameters are searched: a search over forward or train parameters would need a pass or
a fit per sample, which is the grid engine's job (bench.engine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.config import SweepConfig, space_kind
from bench.metrics import ImageScorer, scoring_labels, summarize
from bench.trace import Trace
from methods.base import ClassQuery

log = logging.getLogger(__name__)
CACHE = "trace_cache"
TRIALS = "search_trials"  # per-trial per-image histograms, written before each report
KINDS = ("cross", "self_attn", "queries")


# -- trace cache ------------------------------------------------------------------------------------------------------
class TraceCache:
    """Traces of one forward setting, one safetensors file per image, at most `max_bytes` on disk."""

    def __init__(self, root: Path, setting: str, max_bytes: int):
        self.dir = Path(root) / hashlib.sha256(setting.encode()).hexdigest()[:16]
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.safetensors"

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors"))

    def put(self, index: int, trace: Trace, query: ClassQuery) -> bool:
        """Store one image's trace; False (nothing written) when the cache is full."""
        tensors = {f"{kind}/{layer}": value.contiguous() for kind in KINDS
                   for layer, value in getattr(trace, kind).items()}
        if trace.image is not None:
            tensors["image"] = torch.from_numpy(np.array(trace.image))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.used_bytes() + size > self.max_bytes:
            return False
        meta = {"prompt": trace.prompt, "token_ids": trace.token_ids, "timesteps": trace.timesteps,
                "latent_size": list(trace.latent_size), "modules": sorted(trace.modules),
                "query_ids": query.ids, "query_names": query.names}
        tmp = self.dir / f".{index:06d}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={"trace": json.dumps(meta)})
        tmp.replace(self.path(index))
        return True

    def get(self, index: int, unet) -> tuple[Trace, ClassQuery] | None:
        """The stored trace (attention modules re-attached from `unet`, for re-keying) or None."""
        path = self.path(index)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["trace"])
        tensors = load_file(str(path))
        trace = Trace(meta["prompt"], meta["token_ids"], meta["timesteps"], tuple(meta["latent_size"]))
        for key, value in tensors.items():
            kind, _, layer = key.partition("/")
            if kind in KINDS:
                getattr(trace, kind)[layer] = value
        trace.image = tensors["image"].numpy() if "image" in tensors else None
        trace.modules = {name: unet.get_submodule(name) for name in meta["modules"]}
        return trace, ClassQuery(meta["query_ids"], meta["query_names"])


# -- search space -----------------------------------------------------------------------------------------------------
def search_space(cfg: SweepConfig) -> dict:
    """The sweep's entries as a Ray Tune search space (a grid is a set of choices to search among)."""
    from ray import tune

    makers = {"grid": tune.choice, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
              "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {name: makers[kind](values) for name, (kind, values) in
            ((n, space_kind(n, s)) for n, s in cfg.sweep.items())}


def searcher(algo: str, seed: int):
    if algo == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        import optuna

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    if algo == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


# -- one trial: a configuration scored image by image ------------------------------------------------------------------
_WORKER: dict = {}  # per trial process (actors are reused): the method and dataset of the run


def _worker_state(setup: dict):
    key = setup["run"]
    if _WORKER.get("run") != key:
        from bench.data import build_dataset
        from bench.models import load_backbone
        from methods import METHODS

        torch.set_num_threads(1)
        cfg = SweepConfig.from_dict(setup["config"])
        backbone = load_backbone(cfg.model.as_dict())
        _WORKER.clear()
        _WORKER.update(run=key, cfg=cfg, method=METHODS.get(cfg.method)(backbone), dataset=build_dataset(cfg.data),
                       cache=TraceCache(Path(setup["cache"]), setup["setting"], setup["max_bytes"]))
    return _WORKER


def cached_trace(state: dict, index: int, params, seed: int):
    """The trace of image `index` from the cache, or traced now (and stored while the cache has room)."""
    from bench.evaluate import trace_samples

    cache, method = state["cache"], state["method"]
    hit = cache.get(index, method.backbone.unet)
    if hit is not None:
        return hit
    dataset = state["dataset"]
    batch = trace_samples(method, dataset, [dataset[index]], params, seed, method.trace_request(params),
                          int(state["cfg"].model.resolution or 0))
    cache.put(index, batch.traces[0], batch.queries[0])
    return batch.traces[0], batch.queries[0]


def score_configuration(config: dict, setup: dict) -> None:
    """Tune's function trainable: the configuration's running metric after every image (time attr `images`)."""
    from ray import tune

    state = _worker_state(setup)
    cfg, method, dataset = state["cfg"], state["method"], state["dataset"]
    params = method.resolve({**cfg.params, **config})
    seed = cfg.seeds[0]
    hists = []
    out = Path(setup["trials"]) / f"{tune.get_context().get_trial_id()}.npy"
    for index in range(len(dataset)):
        trace, query = cached_trace(state, index, params, seed)
        label = dataset[index].label
        pred = method.predict(trace, query, params, tuple(label.shape))
        hists.append(ImageScorer(label, len(dataset.classes)).histograms([scoring_labels(pred)])[0])
        with open(out.with_name(f".{out.name}"), "wb") as fh:  # complete before the report that may stop us
            np.save(fh, np.stack(hists))
        out.with_name(f".{out.name}").replace(out)
        metrics = summarize(np.sum(hists, 0), dataset.classes, cfg.metric.protocol)
        tune.report({"mIoU": _finite(metrics["mIoU"]), "images": index + 1})


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0


# -- the search stage ------------------------------------------------------------------------------------------------
def fill_cache(cfg: SweepConfig, cache: TraceCache, num_images: int) -> int:
    """Trace every image once for the sweep's forward setting into the cache (before any trial runs)."""
    from tqdm import tqdm

    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from bench.models import load_backbone
    from methods import METHODS

    method = METHODS.get(cfg.method)(load_backbone(cfg.model.as_dict()))
    params = method.resolve(cfg.params | {k: v for k, v in _first_point(cfg).items()})
    dataset = build_dataset(cfg.data)
    passes = 0
    for index in tqdm(range(num_images), desc=f"{cfg.name} trace cache", unit="img", dynamic_ncols=True):
        if cache.path(index).is_file():
            continue
        batch = trace_samples(method, dataset, [dataset[index]], params, cfg.seeds[0], method.trace_request(params),
                              int(cfg.model.resolution or 0))
        passes += batch.image_passes
        if not cache.put(index, batch.traces[0], batch.queries[0]):
            log.warning("trace cache full (search.cache_mb=%d): later images are traced by the trials",
                        cfg.search.cache_mb)
            break
    return passes


def _first_point(cfg: SweepConfig) -> dict:
    """Any point of the space: post-processing parameters do not change the traced forward setting."""
    out = {}
    for name, space in cfg.sweep.items():
        kind, values = space_kind(name, space)
        out[name] = values[0]
    return out


def run_search(cfg: SweepConfig, run_dir: Path, num_images: int) -> tuple[list[dict], dict]:
    """The search stage: trace cache, Tune with the search algorithm and ASHA; rows and run statistics."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from methods import METHODS

    search = cfg.search
    method_cls = METHODS.get(cfg.method)
    params0 = method_cls.resolve({**cfg.params, **_first_point(cfg)})
    setting = f"seed={cfg.seeds[0]}," + ",".join(f"{k}={params0[k]}" for k in method_cls.forward_keys())
    work = (run_dir / "work").resolve()
    cache = TraceCache(work / CACHE, setting, int(search.cache_mb) * 1024 * 1024)
    passes = fill_cache(cfg, cache, num_images)
    trials_dir = work / TRIALS
    trials_dir.mkdir(parents=True, exist_ok=True)
    setup = {"run": str(work), "config": {k: v for k, v in cfg.as_dict().items() if k not in ("overrides",
                                                                                               "sweep_file")},
             "cache": str(work / CACHE), "setting": setting, "max_bytes": cache.max_bytes,
             "trials": str(trials_dir)}
    scheduler = ASHAScheduler(time_attr="images", max_t=num_images, grace_period=min(search.grace_images, num_images),
                              reduction_factor=search.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(score_configuration, setup=setup), {"cpu": search.trial_cpus}),
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="mIoU", mode="max", search_alg=searcher(search.algo, cfg.search_seed),
                                    scheduler=scheduler, num_samples=search.num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="search", storage_path=str(work / "tune"), verbose=0))
    grid = tuner.fit()
    rows, per_image = [], {"trial": [], "hist": [], "seed_of_group": []}
    classes = _classes(cfg)
    for i, result in enumerate(sorted(grid, key=lambda r: r.path)):
        if result.error:
            raise RuntimeError(f"search trial failed: {result.error}")
        hists = _trial_hists(trials_dir, result)
        if hists is None:
            continue
        metrics = summarize(hists.sum(0), classes, cfg.metric.protocol)
        swept = {k: _plain(result.config[k]) for k in cfg.sweep}
        rows.append({"trial": f"s{i:04d}", "seed": cfg.seeds[0], **swept,
                     **{k: v for k, v in metrics.items() if k in ("mIoU", "aAcc", "mAcc") or "/" in k},
                     "images_scored": len(hists), "search": search.algo, "unet_passes": 0,
                     "forward_setting": setting, "fit": ""})
        per_image["trial"] += [f"s{i:04d}"] * len(hists)
        per_image["hist"] += list(hists)
        per_image["seed_of_group"] += [cfg.seeds[0]] * len(hists)
    if rows:
        rows[0]["unet_passes"] = passes
    pairs = sum(r["images_scored"] for r in rows)
    best = max(rows, key=lambda r: (r["images_scored"], _finite(r["mIoU"])), default=None)
    stats = {"search": {"algo": search.algo, "num_samples": search.num_samples, "scheduler": "ASHA",
                        "time_attr": "images", "grace_images": search.grace_images,
                        "reduction_factor": search.reduction_factor, "pairs_scored": pairs,
                        "best": {k: best[k] for k in (*cfg.sweep, "mIoU", "images_scored")} if best else None},
             "unet_passes": passes, "num_images": num_images, "num_trials": len(rows),
             "per_image": {k: np.array(v) for k, v in per_image.items()}}
    return rows, stats


def _trial_hists(trials_dir: Path, result) -> np.ndarray | None:
    trial_id = result.metrics.get("trial_id") if result.metrics else None
    path = trials_dir / f"{trial_id}.npy"
    return np.load(path, allow_pickle=False) if trial_id and path.is_file() else None


def _classes(cfg: SweepConfig) -> list[str]:
    from bench.data import build_dataset

    return build_dataset(cfg.data).classes


def _plain(value):
    return value.item() if hasattr(value, "item") else value
