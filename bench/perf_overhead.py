"""`python -m bench.perf --parts overhead`: the fixed cost of a small local run beyond the work itself.

The run measured is `python -m bench.run sweeps/iseg_lambda.yaml data.limit=16` (6 configurations, one forward
setting, 16 images), once per variant per round, the variants alternating within a round: `ray.execution=auto`
(on a machine of <= 2 cores or one GPU: the driver, no Ray) against `ray.execution=actors` (a Ray Data actor
pool of `ray.num_actors=auto` actors). Each run is a fresh process; its phases come from what the run leaves
(nothing in the engine is timed for this):
  startup     process start -> the run's claim (imports, configuration, preflight): run.json invocation start
  engine      claim -> end of scoring, less tracing (dataset, ray.init if any, scoring): wall_seconds - trace_seconds
  trace       model loaded (in the driver or in each actor), 16 images traced and scored: trace_seconds
  report      run.json, results and the report (plots, bootstrap): report.html's mtime - engine end
  shutdown    report written -> process gone (Ray shutdown if any, exit)
Beside them, in the same rounds: Ray's own start and stop in a bare process (`ray_own`), and the per-image work
itself in this process (`work`: the 16 traced passes, labels and histograms of the 6 configurations, model
already loaded). Fixed overhead = total - work - ray_own, where ray_own is subtracted only from runs that start
Ray (the target is "beyond Ray's own start"; a run that starts no Ray gets no allowance). The machine may
be shared: medians over rounds, the load average at each start, and the CPU seconds of the bench.run process
(user + system; an actor's CPU is in other processes and not counted), which load inflates far less than wall.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SWEEP = "sweeps/iseg_lambda.yaml"
LIMIT = 16
TARGET_SECONDS = 10.0
RAY_OWN = ("import time; t = time.time(); from bench.env import init_ray; init_ray(); s = time.time(); import ray; "
           "ray.shutdown(); print(s - t, time.time() - s)")


def _env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}


VARIANTS = {"auto": ["ray.execution=auto"], "actors": ["ray.execution=actors"]}


def rounded(runs: list[dict]) -> list[dict]:
    """Per-run records for the JSON report, seconds to 10 ms."""
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in x.items()} for x in runs]


def _timed_run(overrides: list[str], out: Path) -> tuple[dict, dict]:
    """One `bench.run` process of the sweep: (its run.json, {load, start, end, cpu}); CPU seconds of the child."""
    cmd = [sys.executable, "-m", "bench.run", SWEEP, *overrides]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads((out / "run.json").read_text()), {"load": load, "start": start, "end": end, "cpu": cpu}


def one_run(variant: str, out: Path) -> dict:
    """Phases of one `bench.run` process (module docstring)."""
    run, t = _timed_run([f"data.limit={LIMIT}", *VARIANTS[variant], f"output_dir={out}"], out)
    load, start, end = t["load"], t["start"], t["end"]
    inv = run["invocation_log"][-1]
    engine_end = inv["started"] + inv["wall_seconds"]
    report_done = (out / "report.html").stat().st_mtime
    return {"variant": variant, "execution": run.get("execution", "actors"), "num_actors": run["num_actors"],
            "load": round(load, 1), "total": end - start, "cpu": t["cpu"], "startup": inv["started"] - start,
            "engine": inv["wall_seconds"] - inv["trace_seconds"], "trace": inv["trace_seconds"],
            "report": report_done - engine_end, "shutdown": end - report_done}


def ray_own() -> float:
    """Seconds of ray.init + ray.shutdown in a bare process (Ray's own start, not counted as overhead)."""
    proc = subprocess.run([sys.executable, "-c", RAY_OWN], env=_env(), capture_output=True, text=True, check=True)
    init, shutdown = (float(x) for x in proc.stdout.split()[-2:])
    return init + shutdown


def work_seconds() -> float:
    """The per-image work of the measured run in this process: 16 traced passes, every configuration's labels
    and histograms (model loaded beforehand)."""
    import torch

    from bench.config import compose
    from bench.data import build_dataset
    from bench.evaluate import evaluate_batch
    from bench.models import load_backbone
    from bench.plan import make_plan
    from methods import METHODS

    torch.set_num_threads(1)
    cfg = compose(SWEEP, [f"data.limit={LIMIT}"])
    plan = make_plan(cfg)
    dataset = build_dataset(cfg.data)
    method = METHODS.get(cfg.method)(load_backbone(cfg.model.as_dict()))
    (group,) = plan.groups
    evaluate_batch(method, dataset, [dataset[0]], group)  # warm-up
    start = time.perf_counter()
    for i in range(len(dataset)):
        evaluate_batch(method, dataset, [dataset[i]], group, protocol=cfg.metric.protocol)
    return time.perf_counter() - start


def measure_overhead(repeats: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    runs, own, work = [], [], []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for variant in order:
                runs.append(one_run(variant, Path(tmp) / f"r{r}-{variant}"))
                log.info("round %d, %s: %.1f s (load %.1f)", r, variant, runs[-1]["total"], runs[-1]["load"])
            own.append(ray_own())
            work.append(work_seconds())
    ray_s, work_s = statistics.median(own), statistics.median(work)
    summary = {}
    for variant in variants:
        mine = [x for x in runs if x["variant"] == variant]
        med = {k: round(statistics.median(x[k] for x in mine), 2)
               for k in ("total", "cpu", "startup", "engine", "trace", "report", "shutdown", "load")}
        med["num_actors"], med["execution"] = mine[0]["num_actors"], mine[0]["execution"]
        med["ray_allowance"] = ray_s if med["execution"] == "actors" else 0.0
        med["fixed_overhead"] = round(med["total"] - med["ray_allowance"] - work_s, 2)
        summary[variant] = med
    return {"sweep": f"{SWEEP} data.limit={LIMIT}", "repeats": repeats, "ray_own_seconds": round(ray_s, 2),
            "work_seconds": round(work_s, 2), "cpu_count": os.cpu_count(), "target_seconds": TARGET_SECONDS,
            "variants": summary, "runs": rounded(runs)}


def render_overhead(o: dict) -> list[str]:
    intro = (f"Medians of {o['repeats']} rounds, variants alternating; {o['cpu_count']} CPU cores, shared with other "
             f"work (load average at each start in the table). Ray's own start + stop {o['ray_own_seconds']:.1f} s "
             f"(subtracted only from runs that start Ray); the per-image work itself {o['work_seconds']:.1f} s. "
             "CPU s: user + system of the bench.run process (an actor's CPU is not in it).")
    header = ("| variant | traced in | load | total s | CPU s | startup | engine (ray.init, scoring) | trace (model, "
              "images) | report | shutdown | fixed overhead |")
    lines = [f"## Fixed overhead of `python -m bench.run {o['sweep']}`", "", intro, "", header,
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, m in o["variants"].items():
        where = "driver" if m["execution"] == "driver" else f"{m['num_actors']} actor(s)"
        lines.append(f"| {variant} | {where} | {m['load']} | {m['total']} | {m['cpu']} | {m['startup']} | "
                     f"{m['engine']} | {m['trace']} | {m['report']} | {m['shutdown']} | {m['fixed_overhead']} |")
    high = max(m["load"] for m in o["variants"].values())
    if high > 2 * o["cpu_count"]:
        lines += ["", (f"The load average reached {high:.0f} on {o['cpu_count']} cores: every phase is inflated by "
                       "other work, so these figures bound the overhead from above and do not test the target.")]
    best = min(o["variants"].values(), key=lambda m: m["fixed_overhead"])
    verdict = "reached" if best["fixed_overhead"] <= o["target_seconds"] else "not reached"
    lines += ["", (f"Fixed overhead = total - the work - Ray's own start where the run starts Ray; target <= "
                   f"{o['target_seconds']:.0f} s: {verdict} (best {best['fixed_overhead']:.1f} s).")]
    return lines


# -- end to end: K = 24 post-processing settings against K = 1 --------------------------------------------------------
SHARING_IMAGES = 128
SHARING_TARGET = 1.3
SHARING = {1: ["sweep.lambda.grid=[0.01]"], 24: ["+sweep.iterations.grid=[1,3,5,10]"]}  # 1 and 6 lambdas x 4 N


def sharing_run(k: int, out: Path, images: int) -> dict:
    """One `bench.run` process of the K-configuration sweep over `images` images: wall and CPU seconds."""
    run, t = _timed_run([f"data.limit={images}", *SHARING[k], f"output_dir={out}"], out)
    assert run["num_trials"] == k and run["unet_passes"] == images, run  # one UNet pass per image, K configurations
    return {"k": k, "load": round(t["load"], 1), "total": t["end"] - t["start"], "trace": run["trace_seconds"],
            "cpu": t["cpu"], "execution": run.get("execution", "actors")}


def measure_sharing(repeats: int, images: int = SHARING_IMAGES) -> dict:
    """End to end K = 24 against K = 1 over `images` images, the two alternating within each round."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="sharing-") as tmp:
        for r in range(repeats):
            for k in ((1, 24) if r % 2 == 0 else (24, 1)):
                runs.append(sharing_run(k, Path(tmp) / f"r{r}-k{k}", images))
                log.info("round %d, K = %d: %.1f s (load %.1f)", r, k, runs[-1]["total"], runs[-1]["load"])
    med = {k: {key: round(statistics.median(x[key] for x in runs if x["k"] == k), 2)
               for key in ("total", "trace", "cpu", "load")} for k in SHARING}
    mins = {k: min(x["total"] for x in runs if x["k"] == k) for k in SHARING}
    return {"sweep": f"{SWEEP} data.limit={images}", "images": images, "repeats": repeats,
            "target": SHARING_TARGET, "median": med,
            "ratio_total_median": round(med[24]["total"] / med[1]["total"], 3),
            "ratio_total_min": round(mins[24] / mins[1], 3),
            "ratio_cpu_median": round(med[24]["cpu"] / med[1]["cpu"], 3),
            "ratio_trace_median": round(med[24]["trace"] / med[1]["trace"], 3),
            "runs": rounded(runs)}


def render_sharing(o: dict) -> list[str]:
    lines = [f"## End to end: K = 24 against K = 1 post-processing settings, `python -m bench.run {o['sweep']}`", "",
             (f"K = 1: `{SHARING[1][0]}`; K = 24: `{SHARING[24][0]}` (6 lambdas x 4 N), one UNet pass per image "
              f"either way. Medians of {o['repeats']} rounds, the two alternating; whole processes (start-up, "
              "tracing and scoring, results, report). CPU s: user + system of the bench.run process."), "",
             "| K | load | total s | CPU s | trace s (tracing + scoring) |", "|---:|---:|---:|---:|---:|"]
    for k, m in o["median"].items():
        lines.append(f"| {k} | {m['load']} | {m['total']} | {m['cpu']} | {m['trace']} |")
    high = max(m["load"] for m in o["median"].values())
    if high > 2 * (os.cpu_count() or 1):
        lines += ["", (f"The load average reached {high:.0f} at a start: wall times are inflated by other work, and "
                       "unevenly between runs; the CPU seconds of each process are the steadier ratio.")]
    # wall time on a shared machine moves with other work; a single-threaded run's CPU seconds are what it costs
    # on an idle core: reached only if both ratios are
    verdict = "reached" if max(o["ratio_total_median"], o["ratio_cpu_median"]) <= o["target"] else "not reached"
    lines += ["", (f"K = 24 / K = 1: total {o['ratio_total_median']}x (median; {o['ratio_total_min']}x of the minima), "
                   f"CPU {o['ratio_cpu_median']}x, tracing + scoring {o['ratio_trace_median']}x. Target <= "
                   f"{o['target']}x end to end (wall and CPU): {verdict}.")]
    return lines


# -- fits at once: two train settings, one after the other against both at once ----------------------------------------
FITS_SWEEP = "sweeps/freegen_downstream.yaml"
# the real-shapes arm of FreeGen's downstream protocol: two training seeds of the tiny SegFormer (two train
# settings of equal cost), 1,000 steps each (the protocol's default), scored on 20 val images
FITS = ["name=fits_at_once", "train.data.name=shapes", "train.data.root=null", "train.data.size=64",
        "train.data.num_images=24", "sweep.train_seed.grid=[0,1]", "params.steps=1000", "data.limit=20",
        "report.bootstrap=20"]
FITS_VARIANTS = {"one_at_a_time": ["train.max_concurrent=1"], "auto": ["train.max_concurrent=auto"]}


def fits_run(variant: str, out: Path) -> dict:
    """One `bench.run` process of the two-fit sweep: wall seconds of the process and of its fit stage."""
    cmd = [sys.executable, "-m", "bench.run", FITS_SWEEP, *FITS, *FITS_VARIANTS[variant], f"output_dir={out}"]
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    total = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    run = json.loads((out / "run.json").read_text())
    assert run["fits"] == 2 and run["fits_trained"] == 2, run
    steps = [json.loads(p.read_text())["fit_seconds"] for p in sorted(out.glob("fit/*/train_config.json"))]
    return {"variant": variant, "load": round(load, 1), "total": total, "fit_stage": run["fit_seconds"],
            "each_fit": steps}


def measure_fits(repeats: int) -> dict:
    """The two-fit sweep with train.max_concurrent=1 against auto, alternating within each round."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="fits-") as tmp:
        for r in range(repeats):
            for variant in (tuple(FITS_VARIANTS) if r % 2 == 0 else tuple(FITS_VARIANTS)[::-1]):
                runs.append(fits_run(variant, Path(tmp) / f"r{r}-{variant}"))
                log.info("round %d, %s: %.1f s (fit stage %.1f s, load %.1f)", r, variant, runs[-1]["total"],
                         runs[-1]["fit_stage"], runs[-1]["load"])
    med = {v: {key: round(statistics.median(x[key] for x in runs if x["variant"] == v), 2)
               for key in ("total", "fit_stage", "load")} for v in FITS_VARIANTS}
    return {"sweep": f"{FITS_SWEEP} {' '.join(FITS)}", "repeats": repeats, "cpu_count": os.cpu_count(),
            "median": med, "ratio_fit_stage": round(med["auto"]["fit_stage"] / med["one_at_a_time"]["fit_stage"], 3),
            "ratio_total": round(med["auto"]["total"] / med["one_at_a_time"]["total"], 3),
            "runs": rounded(runs)}


def render_fits(o: dict) -> list[str]:
    lines = [f"## Two train settings: `python -m bench.run {o['sweep']}`", "",
             (f"`train.max_concurrent=1` (one fit after the other, as Tune trials) against `auto` (as many at once "
              f"as the cluster holds: {o['cpu_count']} CPUs, one worker each). Medians of {o['repeats']} rounds, the "
              "two alternating; whole processes. Fit stage: run.json's fit_seconds (both fits, start to end)."), "",
             "| train.max_concurrent | load | total s | fit stage s |", "|---|---:|---:|---:|"]
    for variant, m in o["median"].items():
        lines.append(f"| {variant} | {m['load']} | {m['total']} | {m['fit_stage']} |")
    lines += ["", (f"auto / one at a time: fit stage {o['ratio_fit_stage']}x, whole run {o['ratio_total']}x. Each "
                   "fit is bit for bit the same either way (tests/test_fit_stage.py).")]
    return lines
