"""The sweep engine: expand the search space, trace every image once per forward setting on a Ray Data actor
pool, then let Ray Tune turn the stored histograms into one result per configuration and seed.

Work directory layout (`<run>.partial/`, renamed to `<run>/` when complete; kept on interruption so that the
same command with the same `output_dir=` resumes):
    shards/shard-XXXXX.npz   per-image histograms of every (configuration, seed), written as batches finish
    tune/                    the Ray Tune experiment (restored on resume)
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from bench.evaluate import ForwardGroup, Trial, evaluate_batch, group_request, group_trials
from bench.scoring import score_trial

log = logging.getLogger(__name__)


# -- search space ------------------------------------------------------------------------------------------------
def expand_trials(cfg: dict) -> list[Trial]:
    """Grid parameters form a cartesian product; random ones (choice/uniform/...) are drawn `num_samples`
    times per grid point with Ray Tune's samplers and a fixed `search_seed`, so a resumed run sees the same."""
    from ray import tune

    from bench.config import space_kind
    from methods import METHODS

    method = METHODS.get(cfg["method"])
    grid, random = {}, {}
    for name, space in cfg["sweep"].items():
        kind, values = space_kind(name, space)
        if kind == "grid":
            grid[name] = values
        else:
            random[name] = {"choice": lambda v: tune.choice(v), "uniform": lambda v: tune.uniform(*v),
                            "loguniform": lambda v: tune.loguniform(*v),
                            "randint": lambda v: tune.randint(v[0], v[1] + 1)}[kind](values)
    rng = np.random.default_rng(cfg["search_seed"])
    trials: list[Trial] = []
    samples = int(cfg["num_samples"]) if random else 1
    for point in itertools.product(*grid.values()):
        for _ in range(samples):
            swept = dict(zip(grid, point))
            swept.update({k: _plain(d.sample(random_state=rng)) for k, d in random.items()})
            params = method.resolve({**cfg["params"], **swept})
            trials.append(Trial(f"t{len(trials):04d}", params, {k: params[k] for k in swept}))
    return trials


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# -- Ray -----------------------------------------------------------------------------------------------------------
def init_ray(ray_cfg: dict) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, short-lived cluster: no token file
    quiet = bool(ray_cfg.get("quiet", True))
    kwargs = dict(include_dashboard=False, log_to_driver=not quiet, configure_logging=True,
                  logging_level=logging.WARNING if quiet else logging.INFO,
                  runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                            "PYTHONWARNINGS": "ignore"}})
    if ray_cfg.get("address"):
        ray.init(address=ray_cfg["address"], **kwargs)
    else:
        ray.init(object_store_memory=int(ray_cfg.get("object_store_mb", 256)) * 1024 * 1024, **kwargs)
    from ray.data import DataContext

    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


class SweepWorker:
    """Ray Data actor: holds the backbone and the method; traces each image once per forward group."""

    def __init__(self, cfg: dict, groups: list[ForwardGroup], work: str | None = None):
        import torch

        from bench.data import build_dataset
        from bench.models import load_backbone
        from methods import METHODS

        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        logging.getLogger().setLevel(logging.WARNING)
        self.dataset = build_dataset(cfg["data"])
        self.method = METHODS.get(cfg["method"])(load_backbone(cfg["model"]))
        self.method.fit(self.dataset, cfg) if self.method.needs_fit else None
        self.groups = groups
        self.resolution = int(cfg["model"].get("resolution") or 0)
        self.qualitative_dir = Path(work) / "qualitative" if work else None
        self.qualitative_images = int(cfg["report"].get("qualitative", 0))
        self.requests = [group_request(self.method, g) for g in groups]

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["index"]]
        samples = [self.dataset[i] for i in indices]
        rows = {"index": [], "group": [], "trial": [], "hist": [], "passes": []}
        for g, (group, req) in enumerate(zip(self.groups, self.requests)):
            keep = self._qualitative_saver(indices, g, group)
            hists, passes = evaluate_batch(self.method, self.dataset, samples, group, req, self.resolution, keep)
            per_image = passes // len(samples)
            for k, hist in enumerate(hists):
                rows["index"].append(indices[k // len(group.trials)])
                rows["group"].append(g)
                rows["trial"].append(group.trials[k % len(group.trials)].trial_id)
                rows["hist"].append(hist)
                rows["passes"].append(per_image if k % len(group.trials) == 0 else 0)
        return {"index": np.array(rows["index"], dtype=np.int64), "group": np.array(rows["group"], dtype=np.int64),
                "trial": np.array(rows["trial"]), "hist": np.stack(rows["hist"]),
                "passes": np.array(rows["passes"], dtype=np.int64)}


    def _qualitative_saver(self, indices: list[int], g: int, group: ForwardGroup):
        """Keeps the maps of the first `report.qualitative` images for the report's qualitative figure."""
        if self.qualitative_dir is None or min(indices) >= self.qualitative_images:
            return None

        def keep(k, sample, query, prompt, predictions):
            if indices[k] < self.qualitative_images:
                from bench.reporting import save_qualitative

                save_qualitative(self.qualitative_dir, sample, self.dataset.classes,
                                 [t.trial_id for t in group.trials], predictions, query.ids, group.seed,
                                 group=g, prompt=prompt)

        return keep


def trace_and_score(cfg: dict, groups: list[ForwardGroup], num_images: int, work: Path) -> None:
    """Phase 1: stream the images that no shard holds yet through the actor pool; shard results to disk."""
    import ray
    import torch
    from tqdm import tqdm

    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    done = set()
    for path in sorted(shards.glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as shard:
            done.update(int(i) for i in shard["index"])
    todo = [i for i in range(num_images) if i not in done]
    if done:
        log.info("resuming: %d of %d images already scored", len(done), num_images)
    if not todo:
        return
    ray_cfg = cfg["ray"]
    use_gpu = torch.cuda.is_available() and cfg["model"].get("device", "auto") != "cpu"
    ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=max(1, len(todo)))
    with warnings.catch_warnings():
        # max_restarts=0: a crashed actor fails the run (finished shards are kept) instead of silently
        # retrying; Ray only offers it through the deprecated ray_remote_args path.
        warnings.simplefilter("ignore")
        ds = ds.map_batches(SweepWorker, fn_constructor_kwargs={"cfg": cfg, "groups": groups, "work": str(work.resolve())},
                            batch_size=int(ray_cfg["batch_size"]),
                            compute=ray.data.ActorPoolStrategy(size=int(ray_cfg["num_actors"])),
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, max_restarts=0)
    next_shard = len(list(shards.glob("shard-*.npz")))
    with tqdm(total=num_images, initial=len(done), desc=f"{cfg['name']} images", unit="img",
              dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            tmp = shards / f".shard-{next_shard:05d}.npz"
            batch["trial"] = batch["trial"].astype(str)  # object arrays would need pickle
            with open(tmp, "wb") as fh:
                np.savez(fh, **batch)
            tmp.rename(shards / f"shard-{next_shard:05d}.npz")
            next_shard += 1
            bar.update(len(np.unique(batch["index"])))


def load_shards(work: Path) -> dict[str, np.ndarray]:
    parts = []
    for path in sorted((work / "shards").glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as shard:
            parts.append({k: shard[k] for k in shard.files})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- Tune ----------------------------------------------------------------------------------------------------------
def group_index(groups: list[ForwardGroup]) -> dict[tuple[str, int], int]:
    """(trial id, seed) -> index of the forward group that traced it."""
    return {(trial.trial_id, group.seed): g for g, group in enumerate(groups) for trial in group.trials}


def tune_results(cfg: dict, trials: list[Trial], groups: list[ForwardGroup], scores: dict[str, np.ndarray],
                 class_names: list[str], work: Path):
    """Phase 2: one Ray Tune trial per (configuration, seed) over the stored histograms."""
    from ray import tune

    totals = {}
    for (trial_id, seed), g in group_index(groups).items():
        rows = (scores["trial"] == trial_id) & (scores["group"] == g)
        totals[f"{trial_id}/{seed}"] = scores["hist"][rows].sum(0)
    trainable = tune.with_resources(score_trial, {"cpu": 0.1})
    trainable = tune.with_parameters(trainable, totals=totals, class_names=class_names,
                                     protocol=cfg["metric"]["protocol"])
    path = (work / "tune").resolve()  # Tune's storage needs an absolute path
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.trial_id for t in trials]),
                         "seed": tune.grid_search(list(cfg["seeds"]))},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=8, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=str(work.resolve()), verbose=0,
                                      log_to_file=False))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} Tune trials failed: {errors[0]}")
    return [(r.config["trial"], r.config["seed"], r.metrics) for r in grid]


def preflight(cfg: dict) -> None:
    """Driver-side checks of everything that can fail on bad input, before anything is written."""
    from bench.data import build_dataset
    from bench.errors import BenchError
    from methods import METHODS

    dataset = build_dataset(cfg["data"])
    METHODS.get(cfg["method"])
    modes = {t.params["mode"] for t in expand_trials(cfg)}
    if "generation" in modes and not getattr(getattr(dataset, "base", dataset), "generation_gt", None):
        raise BenchError(f"mode=generation needs ground truth for generated images, which data.name="
                         f"{cfg['data']['name']} does not provide; use mode=inversion")


def run_engine(cfg: dict, work: Path) -> tuple[list[dict], dict]:
    """Run both phases; returns result rows (one per configuration and seed) and run statistics."""
    from bench.data import build_dataset
    from methods import METHODS

    method_cls = METHODS.get(cfg["method"])
    trials = expand_trials(cfg)
    groups = group_trials(method_cls, trials, cfg["seeds"])
    dataset = build_dataset(cfg["data"])
    log.info("%d configurations x %d seeds in %d forward settings over %d images",
             len(trials), len(cfg["seeds"]), len(groups), len(dataset))
    init_ray(cfg["ray"])
    start = time.time()
    trace_and_score(cfg, groups, len(dataset), work)
    trace_seconds = time.time() - start
    scores = load_shards(work)
    by_id = {t.trial_id: t for t in trials}
    group_of = group_index(groups)
    rows = []
    for trial_id, seed, metrics in tune_results(cfg, trials, groups, scores, dataset.classes, work):
        g = group_of[(trial_id, seed)]
        passes = int(scores["passes"][scores["group"] == g].sum())
        rows.append({"trial": trial_id, "seed": seed, **by_id[trial_id].swept,
                     **{k: v for k, v in metrics.items() if k in _metric_keys(dataset.classes)},
                     "unet_passes": passes, "forward_setting": groups[g].key})
    rows.sort(key=lambda r: (r["trial"], r["seed"]))
    stats = {"num_images": len(dataset), "num_trials": len(trials), "num_forward_settings": len(groups),
             "unet_passes": int(scores["passes"].sum()), "trace_seconds": round(trace_seconds, 3),
             "images_per_second": round(len(dataset) * len(groups) / max(trace_seconds, 1e-9), 4),
             "dataset": dataset.describe(), "scheduler": _schedulers(cfg, trials),
             "per_image": {"trial": scores["trial"], "hist": scores["hist"],
                           "seed_of_group": np.array([groups[g].seed for g in scores["group"]], dtype=np.int64)}}
    return rows, stats


def _schedulers(cfg: dict, trials) -> dict:
    """Provenance of the noise schedule: the scheduler class of each requested generation `scheduler=` value,
    and how inversion noises (issue 9 item 8)."""
    from bench.models import scheduler_name

    modes = {t.params.get("mode") for t in trials}
    requested = {t.params.get("scheduler", "auto") for t in trials if t.params.get("mode") == "generation"}
    out = {f"generation scheduler={req}": scheduler_name(cfg["model"], req) for req in sorted(requested)}
    if "inversion" in modes:
        out["inversion"] = "q(x_t|x_0): DDIMScheduler.add_noise over the model's alphas_cumprod"
    return out


def _metric_keys(class_names: list[str]) -> set[str]:
    return {"mIoU", "aAcc", "mAcc", *(f"IoU/{c}" for c in class_names), *(f"Acc/{c}" for c in class_names)}
