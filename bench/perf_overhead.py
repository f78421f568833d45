"""`python -m bench.perf --parts overhead`: the fixed cost of a small local run beyond Ray's own start.

The run measured is `python -m bench.run sweeps/iseg_lambda.yaml data.limit=16` (6 configurations, one forward
setting, 16 images), once per `ray.num_actors` variant per round, the variants alternating within a round.
Each run is a fresh process; its phases come from what the run leaves (nothing in the engine is timed for this):
  startup     process start -> the run's claim (imports, configuration, preflight): run.json invocation start
  engine      claim -> end of scoring, less tracing (dataset, ray.init, scoring): wall_seconds - trace_seconds
  trace       actors started, model loaded in each, 16 images traced and scored: trace_seconds
  report      run.json, results and the report (plots, bootstrap): report.html's mtime - engine end
  shutdown    report written -> process gone (Ray shutdown, interpreter exit)
Beside them, in the same rounds: Ray's own start and stop in a bare process (`ray_own`), and the per-image work
itself in this process (`work`: the 16 traced passes, labels and histograms of the 6 configurations, model
already loaded). Fixed overhead = total - ray_own - work. Medians over rounds; the machine may be shared, so
the load average is recorded with every run.
"""

from __future__ import annotations

import json
import logging
import os
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


def one_run(actors: str, out: Path) -> dict:
    """Phases of one `bench.run` process (module docstring)."""
    cmd = [sys.executable, "-m", "bench.run", SWEEP, f"data.limit={LIMIT}", f"ray.num_actors={actors}",
           f"output_dir={out}"]
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    run = json.loads((out / "run.json").read_text())
    inv = run["invocation_log"][-1]
    engine_end = inv["started"] + inv["wall_seconds"]
    report_done = (out / "report.html").stat().st_mtime
    return {"actors": actors, "num_actors": run["num_actors"], "load": round(load, 1),
            "total": end - start, "startup": inv["started"] - start,
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


def measure_overhead(repeats: int, variants: tuple[str, ...] = ("auto", "2")) -> dict:
    runs, own, work = [], [], []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for actors in order:
                runs.append(one_run(actors, Path(tmp) / f"r{r}-{actors}"))
                log.info("round %d, ray.num_actors=%s: %.1f s (load %.1f)", r, actors, runs[-1]["total"],
                         runs[-1]["load"])
            own.append(ray_own())
            work.append(work_seconds())
    ray_s, work_s = statistics.median(own), statistics.median(work)
    summary = {}
    for actors in variants:
        mine = [x for x in runs if x["actors"] == actors]
        med = {k: round(statistics.median(x[k] for x in mine), 2)
               for k in ("total", "startup", "engine", "trace", "report", "shutdown", "load")}
        med["num_actors"] = mine[0]["num_actors"]
        med["fixed_overhead"] = round(med["total"] - ray_s - work_s, 2)
        summary[actors] = med
    return {"sweep": f"{SWEEP} data.limit={LIMIT}", "repeats": repeats, "ray_own_seconds": round(ray_s, 2),
            "work_seconds": round(work_s, 2), "cpu_count": os.cpu_count(), "target_seconds": TARGET_SECONDS,
            "variants": summary, "runs": [{k: round(v, 2) if isinstance(v, float) else v for k, v in x.items()}
                                          for x in runs]}


def render_overhead(o: dict) -> list[str]:
    intro = (f"Medians of {o['repeats']} rounds, `ray.num_actors` variants alternating; {o['cpu_count']} CPU cores, "
             f"shared with other work (load average at each start in the table). Ray's own start + stop "
             f"{o['ray_own_seconds']:.1f} s; the per-image work itself {o['work_seconds']:.1f} s.")
    header = ("| ray.num_actors | actors | load | total s | startup | engine (ray.init, scoring) | trace (actors, "
              "model, images) | report | shutdown | fixed overhead |")
    lines = [f"## Fixed overhead of `python -m bench.run {o['sweep']}`", "", intro, "", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for actors, m in o["variants"].items():
        lines.append(f"| {actors} | {m['num_actors']} | {m['load']} | {m['total']} | {m['startup']} | {m['engine']} | "
                     f"{m['trace']} | {m['report']} | {m['shutdown']} | {m['fixed_overhead']} |")
    if len({m["num_actors"] for m in o["variants"].values()}) == 1:
        actors = next(iter(o["variants"].values()))["num_actors"]
        lines += ["", (f"Every variant ran {actors} actor(s): `auto` leaves one core to the driver on CPU "
                       "(bench.env.auto_num_actors), so on this machine it is `1`.")]
    high = max(m["load"] for m in o["variants"].values())
    if high > 2 * o["cpu_count"]:
        lines += ["", (f"The load average reached {high:.0f} on {o['cpu_count']} cores: every phase is inflated by "
                       "other work, so these figures bound the overhead from above and do not test the target.")]
    best = min(o["variants"].values(), key=lambda m: m["fixed_overhead"])
    verdict = "reached" if best["fixed_overhead"] <= o["target_seconds"] else "not reached"
    lines += ["", (f"Fixed overhead = total - Ray's own start - the work; target <= {o['target_seconds']:.0f} s: "
                   f"{verdict} (best {best['fixed_overhead']:.1f} s).")]
    return lines
