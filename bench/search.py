"""Adaptive search over a sweep's post-processing parameters (`search: {algo: optuna|hyperopt|random,
num_samples: N}`), on a trace cache, by synchronous successive halving over image rungs.

    trace cache   every image traced once for the sweep's forward setting, stored as safetensors in
                  `<run>/work/trace_cache/` (bounded by `search.cache_mb`: beyond it, traces are recomputed)
    search        the sweep's entries become a Ray Tune search space (grid/choice -> choice, uniform,
                  loguniform, randint); `num_samples` configurations come from Tune's OptunaSearch or
                  HyperOptSearch (Searcher API: suggest, then on_trial_complete with each result) or are
                  sampled from the space (random), seeded by `search_seed`
    halving       all configurations score the first `search.grace_images` images; at each rung only the best
                  1 / `search.reduction_factor` go on to reduction_factor times as many images, until one
                  configuration is left and scores every image (`run_search`)
    results       one row per searched configuration, its metrics over the images it scored
                  (`images_scored`, `search`), and run.json's `search` block (algorithm, rungs, pairs scored,
                  best)

Only post-processing parameters are searched: a search over forward or train parameters would need a pass or
a fit per sample, which is the grid engine's job (bench.engine). Scoring a configuration on a cached trace
takes milliseconds, so it is not a Tune trial (Tune's trials are the units that cost something).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.config import SweepConfig, space_kind
from bench.metrics import ImageScorer, summarize, tied_percent
from bench.trace import Trace
from methods.base import ClassQuery

log = logging.getLogger(__name__)
CACHE = "trace_cache"
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
    """Tune's Searcher for `algo` (optuna: TPE; hyperopt: TPE), seeded."""
    if algo == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        import optuna

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


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


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0


# -- the search stage ------------------------------------------------------------------------------------------------
def fill_cache(cfg: SweepConfig, cache: TraceCache, num_images: int) -> tuple[int, dict]:
    """Trace every image once for the sweep's forward setting into the cache (before anything is scored);
    returns the UNet passes and the loaded method, dataset and cache."""
    from tqdm import tqdm

    from bench.data import build_dataset
    from bench.evaluate import trace_samples
    from bench.models import load_backbone
    from methods import METHODS

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
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
    return passes, {"cfg": cfg, "method": method, "dataset": dataset, "cache": cache}


def _first_point(cfg: SweepConfig) -> dict:
    """Any point of the space: post-processing parameters do not change the traced forward setting."""
    out = {}
    for name, space in cfg.sweep.items():
        kind, values = space_kind(name, space)
        out[name] = values[0]
    return out


def sample_configs(cfg: SweepConfig, count: int) -> tuple[list[dict], object]:
    """`count` configurations from the search algorithm (Tune's Searcher API: optuna, hyperopt) or sampled
    from the space (random); returns them and the searcher, to be told the results."""
    space = search_space(cfg)
    if cfg.search.algo == "random":
        rng = np.random.default_rng(cfg.search_seed)
        return [{k: _plain(dom.sample(random_state=rng)) for k, dom in space.items()} for _ in range(count)], None
    algo = searcher(cfg.search.algo, cfg.search_seed)
    algo.set_search_properties("mIoU", "max", space)
    return [{k: _plain(v) for k, v in algo.suggest(f"s{i:04d}").items()} for i in range(count)], algo


def rungs(num_images: int, grace: int, factor: int) -> list[int]:
    """Image counts at which configurations are compared: grace, grace x factor, ... then every image."""
    out = [min(grace, num_images)]
    while out[-1] < num_images:
        out.append(min(out[-1] * factor, num_images))
    return out


def run_search(cfg: SweepConfig, run_dir: Path, num_images: int) -> tuple[list[dict], dict]:
    """The search stage: trace cache, then synchronous successive halving (Jamieson & Talwalkar 2016, the
    bracket Hyperband and ASHA are built from) over image rungs. Every sampled configuration is scored on the
    first `grace_images` images; at each rung all configurations still running have scored the same images
    and only the best 1 / reduction_factor (at least one) go on to reduction_factor times as many images,
    until one is left, which is scored on every image. Rungs are synchronous, so a configuration goes on only
    by beating the others on the same images (ASHA's asynchronous promotion lets the first arrivals through).
    Scoring is milliseconds per image on a cached trace, so it runs here: each image's trace is read once per
    rung and every configuration still running is predicted on it at once (`predict_many`)."""
    from bench.evaluate import predict_image, prediction_ties
    from methods import METHODS

    search = cfg.search
    method_cls = METHODS.get(cfg.method)
    params0 = method_cls.resolve({**cfg.params, **_first_point(cfg)})
    setting = f"seed={cfg.seeds[0]}," + ",".join(f"{k}={params0[k]}" for k in method_cls.forward_keys())
    cache = TraceCache((run_dir / "work").resolve() / CACHE, setting, int(search.cache_mb) * 1024 * 1024)
    started = time.time()
    passes, state = fill_cache(cfg, cache, num_images)
    trace_seconds = time.time() - started
    method, dataset = state["method"], state["dataset"]
    configs, algo = sample_configs(cfg, search.num_samples)
    params = [method.resolve({**cfg.params, **c}) for c in configs]
    hists: list[list[np.ndarray]] = [[] for _ in configs]
    ties = np.zeros((len(configs), 2), dtype=np.int64)
    running, done, mIoU = list(range(len(configs))), 0, [0.0] * len(configs)
    classes = dataset.classes
    for rung in rungs(num_images, search.grace_images, search.reduction_factor):
        for index in range(done, rung):
            trace, query = cached_trace(state, index, params0, cfg.seeds[0])
            label = dataset[index].label
            preds = predict_image(method, trace, query, [params[i] for i in running], tuple(label.shape))
            scorer = ImageScorer(label, len(classes), dataset[index].ignore_index,
                                 first_class=0 if getattr(dataset, "has_background", True) else 1)
            maps = [p.scored_as() for p in preds]
            for i, h in zip(running, scorer.histograms(maps, hungarian=cfg.metric.protocol == "hungarian")):
                hists[i].append(h)
            ties[running] += prediction_ties(preds)
        done = rung
        for i in running:
            mIoU[i] = _finite(summarize(np.sum(hists[i], 0), classes, cfg.metric.protocol)["mIoU"])
        log.info("rung of %d images: %d configurations, best mIoU %.1f", rung, len(running),
                 max(mIoU[i] for i in running))
        if rung < num_images:  # the best 1 / factor on the same images go on (a stable sort: ties by order)
            keep = max(1, len(running) // search.reduction_factor)
            running = sorted(running, key=lambda i: -mIoU[i])[:keep]
    if algo is not None:
        for i in range(len(configs)):
            algo.on_trial_complete(f"s{i:04d}", {"mIoU": mIoU[i], "images": len(hists[i])})
    rows, per_image = [], {"trial": [], "hist": [], "seed_of_group": []}
    for i, config in enumerate(configs):
        metrics = summarize(np.sum(hists[i], 0), classes, cfg.metric.protocol)
        rows.append({"trial": f"s{i:04d}", "seed": cfg.seeds[0], **{k: config[k] for k in cfg.sweep},
                     **{k: v for k, v in metrics.items() if k in ("mIoU", "aAcc", "mAcc") or "/" in k},
                     "tied": tied_percent(ties[i]),
                     "images_scored": len(hists[i]), "search": search.algo, "unet_passes": 0,
                     "forward_setting": setting, "fit": ""})
        per_image["trial"] += [f"s{i:04d}"] * len(hists[i])
        per_image["hist"] += hists[i]
        per_image["seed_of_group"] += [cfg.seeds[0]] * len(hists[i])
    if rows:
        rows[0]["unet_passes"] = passes
    pairs = sum(r["images_scored"] for r in rows)
    best = max(rows, key=lambda r: (r["images_scored"], _finite(r["mIoU"])), default=None)
    stats = {"search": {"algo": search.algo, "num_samples": search.num_samples,
                        "scheduler": "synchronous successive halving", "time_attr": "images",
                        "grace_images": search.grace_images, "reduction_factor": search.reduction_factor,
                        "rungs": rungs(num_images, search.grace_images, search.reduction_factor),
                        "pairs_scored": pairs,
                        "best": {k: best[k] for k in (*cfg.sweep, "mIoU", "images_scored")} if best else None},
             "unet_passes": passes, "num_images": num_images, "num_trials": len(rows),
             "trace_seconds": round(trace_seconds, 3), "num_forward_settings": 1,
             "per_image": {k: np.array(v) for k, v in per_image.items()}}
    return rows, stats


def _classes(cfg: SweepConfig) -> list[str]:
    from bench.data import build_dataset

    return build_dataset(cfg.data).classes


def _plain(value):
    return value.item() if hasattr(value, "item") else value
