"""Adaptive search over a sweep's post-processing parameters (`search: {algo: optuna|hyperopt|random,
num_samples: N}`), on a trace cache, by synchronous successive halving over image rungs.

    trace cache   every image traced once for the sweep's forward setting by the trace stage (the actor pool
                  or this process, shards and resume as for a grid sweep: bench.stages.trace); the traces
                  travel back to the driver and are stored as safetensors in node-local scratch (beside a
                  local run: `<run>/work/trace_cache/`), bounded by `search.cache_mb` (beyond it, traces are
                  recomputed); a trained method's fits come from the fit stage (bench.stages.fit)
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
from safetensors.torch import load_file, save

from bench.config import SweepConfig, space_kind
from bench.metrics import ImageScorer, summarize, tied_percent
from bench.storage import Location
from bench.capture import Trace
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
        return self.put_bytes(index, trace_record(trace, query))

    def put_bytes(self, index: int, data: bytes) -> bool:
        """Store one image's trace record (trace_record); False (nothing written) when the cache is full."""
        if self.used_bytes() + len(data) > self.max_bytes:
            return False
        tmp = self.dir / f".{index:06d}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
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


def trace_record(trace: Trace, query: ClassQuery) -> bytes:
    """One image's trace and class query as safetensors bytes (what a tracing worker sends the driver)."""
    tensors = {f"{kind}/{layer}": value.contiguous() for kind in KINDS for layer, value in getattr(trace, kind).items()}
    if trace.image is not None:
        tensors["image"] = torch.from_numpy(np.array(trace.image))
    meta = {"prompt": trace.prompt, "token_ids": trace.token_ids, "timesteps": trace.timesteps,
            "latent_size": list(trace.latent_size), "modules": sorted(trace.modules),
            "query_ids": query.ids, "query_names": query.names}
    return save(tensors, metadata={"trace": json.dumps(meta)})


class CacheWorker:
    """The search's tracing worker (a Ray Data actor, or an object in this process): backbone, method and
    fits loaded once; traces a batch of images for the sweep's one forward setting and sends each trace back
    as safetensors bytes (`trace` column) for the driver's cache."""

    def __init__(self, cfg: SweepConfig, params: dict, fits: dict[str, bytes], own_process: bool = True):
        from bench.stages.trace import load_worker

        self.cfg = cfg
        self.dataset, self.method = load_worker(cfg, fits, own_process)
        self.params = self.method.resolve(params)
        self.request = self.method.trace_request(self.params)

    def __call__(self, batch: dict) -> dict:
        from bench.evaluate import trace_samples

        indices = [int(i) for i in batch["index"]]
        traced = trace_samples(self.method, self.dataset, [self.dataset[i] for i in indices], self.params,
                               int(self.cfg.seeds[0]), self.request, int(self.cfg.model.resolution or 0))
        records = np.empty(len(indices), dtype=object)
        records[:] = [trace_record(t, q) for t, q in zip(traced.traces, traced.queries)]
        return {"index": np.array(indices, dtype=np.int64),
                "passes": np.full(len(indices), traced.image_passes // max(len(indices), 1), dtype=np.int64),
                "trace": records}


# -- search space -----------------------------------------------------------------------------------------------------
def search_space(cfg: SweepConfig) -> dict:
    """The sweep's entries as a Ray Tune search space (a grid is a set of choices to search among)."""
    from ray import tune

    makers = {"grid": tune.choice, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
              "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {name: makers[kind](values) for name, (kind, values) in
            ((n, space_kind(n, s)) for n, s in cfg.swept.items())}


def searcher(algo: str, seed: int):
    """Tune's Searcher for `algo` (optuna: TPE; hyperopt: TPE), seeded."""
    if algo == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

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
def fill_cache(cfg: SweepConfig, params: dict, fits: dict[str, bytes], cache: TraceCache, num_images: int,
               shards) -> tuple[int, CacheWorker]:
    """Trace every image once for the sweep's forward setting (the trace stage: actor pool or this process,
    shards and resume as for a grid sweep) into the cache, before anything is scored; returns the UNet passes
    (over every invocation) and a worker in this process (its method predicts, its dataset scores)."""
    from bench.stages.trace import load_shards, trace_images

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    local = CacheWorker(cfg, params, fits, own_process=False)
    full = []

    def keep(batch: dict) -> None:  # the driver stores what came back while the cache has room
        for index, data in zip(batch["index"], batch.pop("trace")):
            if not full and not cache.put_bytes(int(index), bytes(data)):
                log.warning("trace cache full (search.cache_mb=%d): later images are traced by the trials",
                            cfg.search.cache_mb)
                full.append(True)

    trace_images(cfg, CacheWorker, {"cfg": cfg, "params": params, "fits": fits}, num_images, shards,
                 f"{cfg.name} trace cache", keep=keep, local=local, done_word="cached")
    passes = int(load_shards(shards)["passes"].sum()) if Location.of(shards).names("shard-*.npz") else 0
    return passes, local


def _first_point(cfg: SweepConfig) -> dict:
    """Any point of the space: post-processing parameters do not change the traced forward setting."""
    out = {}
    for name, space in cfg.swept.items():
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


def run_search(cfg: SweepConfig, dataset, fits: dict[str, bytes], shards, cache_root: Path
               ) -> tuple[list[dict], dict]:
    """The search stage: trace cache, then synchronous successive halving (Jamieson & Talwalkar 2016, the
    bracket Hyperband and ASHA are built from) over image rungs. Every sampled configuration is scored on the
    first `grace_images` images; at each rung all configurations still running have scored the same images
    and only the best 1 / reduction_factor (at least one) go on to reduction_factor times as many images,
    until one is left, which is scored on every image. Rungs are synchronous, so a configuration goes on only
    by beating the others on the same images (ASHA's asynchronous promotion lets the first arrivals through).
    Scoring is milliseconds per image on a cached trace, so it runs here: each image's trace is read once per
    rung and every configuration still running is predicted on it at once (`predict_many`). Returns the rows
    and what the search measured (its part of the run's statistics, bench.engine.run_stats)."""
    from bench.evaluate import predict_image, prediction_ties
    from methods import METHODS

    search = cfg.search
    num_images = len(dataset)
    method_cls = METHODS.get(cfg.method)
    point = {**cfg.params, **_first_point(cfg)}
    params0 = method_cls.resolve(point)
    setting = f"seed={cfg.seeds[0]}," + ",".join(f"{k}={params0[k]}" for k in method_cls.forward_keys())
    cache = TraceCache(Path(cache_root).resolve() / CACHE, setting, int(search.cache_mb) * 1024 * 1024)
    started = time.time()
    passes, worker = fill_cache(cfg, point, fits, cache, num_images, shards)
    trace_seconds = time.time() - started
    state = {"cfg": cfg, "method": worker.method, "dataset": dataset, "cache": cache}
    method = worker.method
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
        rows.append({"trial": f"s{i:04d}", "seed": cfg.seeds[0], **{k: config[k] for k in cfg.swept},
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
    found = {"search": {"algo": search.algo, "num_samples": search.num_samples,
                        "scheduler": "synchronous successive halving", "time_attr": "images",
                        "grace_images": search.grace_images, "reduction_factor": search.reduction_factor,
                        "rungs": rungs(num_images, search.grace_images, search.reduction_factor),
                        "pairs_scored": pairs,
                        "best": {k: best[k] for k in (*cfg.swept, "mIoU", "images_scored")} if best else None},
             "unet_passes": passes, "trace_seconds": trace_seconds, "num_forward_settings": 1,
             "per_image": {k: np.array(v) for k, v in per_image.items()}}
    return rows, found


def _plain(value):
    return value.item() if hasattr(value, "item") else value
