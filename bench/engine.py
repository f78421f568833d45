"""The sweep engine: plan -> fit -> trace -> predict -> score, into result rows and run statistics.

    plan     configurations grouped backbone > train setting > forward setting > post    bench.plan
    fit      one Ray Train run per train setting -> <run>/fit/<hash>/                    bench.stages.fit
    trace    one UNet pass per (image, forward setting), on Ray Data actors or in this    bench.stages.trace
    predict  process (ray.execution); every configuration of the setting predicted on that trace and histogrammed
    score    metrics per (configuration, seed) from the histograms, in this process      bench.stages.score

Work directory layout (`<run>.partial/`, renamed to `<run>/` when complete; kept on interruption so that the
same command with the same `output_dir=` resumes):
    fit/<hash>/               finished fits (kept in the run) and unfinished ones' Ray Train checkpoints
    work/shards/              per-image histograms of every (configuration, seed), written as batches finish
                              (a sweep over models: work/shards/<backbone label>/, fitted and traced one
                              backbone after the other, each loaded once per tracing actor)
    qualitative/              maps of the first images for the report's qualitative figure (computed by
                              the tracing workers, sent back with their histograms, written here)
`work/` is removed when the run completes (bench.run). The folder is a bench.storage Location: a local path or
an object store; workers write nothing themselves (fits write through the same Location, see bench.stages.fit).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from bench.config import SweepConfig
from bench.data import build_dataset
from bench.models import model_provenance, scheduler_name
from bench.plan import Plan, make_plan
from bench.results import RunStats
from bench.rundir import WORK
from bench.sparse_histograms import CLASSES, COUNTS
from bench.stages.score import group_index, load_scores, score
from bench.stages.trace import settle_pool, trace_and_score
from bench.storage import Location, scratch_dir
from methods import METHODS

log = logging.getLogger(__name__)
# run statistics of a sweep without train settings (bench.stages.fit.FitStats().as_dict(), without importing it)
NO_FITS = {"fits": 0, "fits_trained": 0, "fits_reused": 0, "fit_seconds": 0.0}


def run_engine(cfg: SweepConfig, run_dir: Path | Location, plan: Plan | None = None) -> tuple[list[dict], RunStats]:
    """Run every stage; returns result rows (one per configuration and seed) and run statistics. `plan` is the
    preflight's (its dataset included); without one the plan and the dataset are built here."""
    run_dir = Location.of(run_dir)
    plan = plan or make_plan(cfg)
    fitting = bool(plan.fits) or cfg.fit.source is not None
    if fitting:  # the fit stage imports Ray and Ray Train: only where there is something to fit
        from bench.stages.fit import check_fit_sources

        check_fit_sources(cfg, plan)
    dataset = plan.dataset if plan.dataset is not None else build_dataset(cfg.data)
    log.info("%d configurations x %d seeds in %d forward settings and %d train settings over %d images",
             len(plan.trials), len(cfg.seeds), len(plan.groups), len(plan.fits), len(dataset))
    cfg = settle_pool(cfg, len(dataset), fits=bool(plan.fits))  # ray.execution / num_actors settled
    if cfg.search.algo is not None:  # adaptive search of post-processing parameters: the trace stage fills its
        # trace cache, then configurations are scored on the cached traces in this process (milliseconds each)
        from bench.search import run_search

        fits, _, fit_summary = _fit_stage(cfg, plan, run_dir) if fitting else ({}, {}, dict(NO_FITS))
        # its trace cache is hot scratch: node-local beside a local run, in a node-local folder for a stored one
        cache = run_dir.local / WORK if run_dir.is_local else scratch_dir("search", run_dir.uri)
        rows, found = run_search(cfg, dataset, fits, run_dir / WORK / "shards", cache)
        return rows, run_stats(cfg, plan, dataset, fit_summary, num_trials=len(rows), **found)
    fit_dirs: dict[str, dict[str, str]] = {}  # backbone label ("" for one backbone) -> setting key -> fit dir
    fit_summary = dict(NO_FITS)
    trace_seconds, parts = 0.0, []
    for label, sub_cfg, sub_plan in backbone_parts(cfg, plan):  # the backbone is the outermost group
        fits = {}
        if fitting:
            fits, fit_dirs[label], summary = _fit_stage(sub_cfg, sub_plan, run_dir)
            fit_summary = {k: fit_summary[k] + summary[k] for k in fit_summary}
        shards = run_dir / WORK / "shards" / label if label else run_dir / WORK / "shards"
        if label:
            log.info("backbone %s: %d forward settings", label, len(sub_plan.groups))
        start = time.time()
        trace_and_score(sub_cfg, sub_plan.groups, len(dataset), shards, fits, run_dir / "qualitative",
                        first_group=plan.first_group(label) if label else 0)
        trace_seconds += time.time() - start
        parts.append(shards)
    fit_summary["fit_seconds"] = round(fit_summary["fit_seconds"], 3)
    scores = load_scores(*parts)  # group indices are the plan's
    by_id = {t.trial_id: t for t in plan.trials}
    group_of = group_index(plan.groups)
    metric_keys = _metric_keys(dataset.classes)
    rows = []
    for trial_id, seed, metrics in score(plan.trials, plan.groups, cfg.seeds, scores, dataset.classes,
                                         cfg.metric.protocol):
        g = group_of[(trial_id, seed)]
        trial = by_id[trial_id]
        passes = int(scores["passes"][scores["group"] == g].sum())
        rows.append({"trial": trial_id, "seed": seed, **trial.swept,
                     **{k: v for k, v in metrics.items() if k in metric_keys},
                     "unet_passes": passes, "forward_setting": plan.groups[g].key,
                     "fit": fit_dirs[trial.swept.get("model", "")].get(trial.train.key, "") if trial.train else ""})
    rows.sort(key=lambda r: (r["trial"], r["seed"]))
    per_image = {"trial": scores["trial"], CLASSES: scores[CLASSES], COUNTS: scores[COUNTS],
                 "num_classes": len(dataset.classes),
                 "seed_of_group": np.array([plan.groups[g].seed for g in scores["group"]], dtype=np.int64)}
    return rows, run_stats(cfg, plan, dataset, fit_summary, num_trials=len(plan.trials),
                           num_forward_settings=len(plan.groups), unet_passes=int(scores["passes"].sum()),
                           trace_seconds=trace_seconds, per_image=per_image)


def run_stats(cfg: SweepConfig, plan: Plan, dataset, fit_summary: dict, *, num_trials: int,
              num_forward_settings: int, unet_passes: int, trace_seconds: float, per_image: dict,
              search: dict | None = None) -> RunStats:
    """The run's statistics, for every path (the trace stage and the adaptive search): `cfg` with its trace pool
    settled (bench.stages.trace.settle_pool), what the stages measured, the fit stage's summary."""
    schedulers = {f"{label}: {k}" if label else k: v for label, sub_cfg, sub_plan in backbone_parts(cfg, plan)
                  for k, v in _schedulers(sub_cfg, sub_plan.trials).items()}
    return RunStats(method_versions=method_versions(cfg.method), num_images=len(dataset),
                    num_actors=int(cfg.ray.num_actors), execution=cfg.ray.execution, num_trials=num_trials,
                    num_forward_settings=num_forward_settings, **fit_summary, unet_passes=unet_passes,
                    trace_seconds=round(trace_seconds, 3),
                    images_per_second=round(len(dataset) * num_forward_settings / max(trace_seconds, 1e-9), 4),
                    dataset=dataset.describe(), scheduler=schedulers, **backbone_provenance(cfg, plan),
                    search=search, per_image=per_image)


def backbone_parts(cfg: SweepConfig, plan: Plan):
    """(label, config, plan) per backbone, outermost: one part labelled "" where the sweep has one backbone."""
    if not plan.backbones:
        yield "", cfg, plan
        return
    for label, planned in plan.backbones:  # the run's config (as settled) with that backbone's model section
        yield label, dataclasses.replace(cfg, model=planned.model, models=[]), plan.for_backbone(label)


def backbone_provenance(cfg: SweepConfig, plan: Plan) -> dict:
    """run.json's `backbone` (family, random weights: bench.models.model_provenance) for one backbone; for a sweep
    over models `backbones`, the same per label with the entry as given, in plan order."""
    if not plan.backbones:
        return {"backbone": model_provenance(cfg.model.as_dict())}
    entries = dict(zip((label for label, _ in plan.backbones), cfg.models))
    return {"backbones": {label: {"entry": entries[label], **model_provenance(sub.model.as_dict())}
                          for label, sub in plan.backbones}}


def _fit_stage(cfg: SweepConfig, plan: Plan, run_dir: Location) -> tuple[dict, dict, dict]:
    """Every train setting of `plan` fitted (or reused) into `<run>/fit/`: (setting key -> artefact bytes,
    setting key -> fit directory name, run statistics)."""
    from bench.stages.fit import load_fits, run_fits

    fit_stats, finished = run_fits(cfg, plan, run_dir)
    return load_fits(finished), fit_stats.dirs, fit_stats.as_dict()


def method_versions(method: str) -> dict[str, str]:
    """The version of the method and, for `compare`, of every compared method (run.json)."""
    cls = METHODS.get(method)
    out = {method: cls.version}
    for name in cls.component_methods():
        out[name] = METHODS.get(name).version
    return out


def _schedulers(cfg: SweepConfig, trials) -> dict:
    """Provenance of the noise schedule: the scheduler class of each requested generation `scheduler=` value,
    and how inversion noises."""
    modes = {t.params.get("mode") for t in trials}
    requested = {t.params.get("scheduler", "auto") for t in trials if t.params.get("mode") == "generation"}
    out = {f"generation scheduler={req}": scheduler_name(cfg.model.as_dict(), req) for req in sorted(requested)}
    if "inversion" in modes:
        from bench.models.families import FLOW_FAMILIES, family_of

        out["inversion"] = "q(x_t|x_0): DDIMScheduler.add_noise over the model's alphas_cumprod" \
            if family_of(cfg.model.as_dict()) not in FLOW_FAMILIES else \
            "x_t = (1 - sigma) x0 + sigma eps, sigma: the folder's FlowMatchEulerDiscreteScheduler at t / 1000, shifted"
    return out


def _metric_keys(class_names: list[str]) -> set[str]:
    return {"mIoU", "aAcc", "mAcc", "tied", *(f"IoU/{c}" for c in class_names), *(f"Acc/{c}" for c in class_names)}
