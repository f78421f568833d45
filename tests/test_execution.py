"""`ray.execution`: where images are traced (a Ray Data actor pool or the driver), what `auto` picks, its
bad-input errors, and (slow) identical results from both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import bench.env
from bench.config import compose
from bench.env import resolve_execution
from bench.errors import BenchError
from bench.run import main

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "iseg_lambda.yaml"
SMALL = ["data.limit=3", "data.size=32", "report.bootstrap=20", "report.qualitative=1"]


@pytest.mark.parametrize("slots, images, address, actors, expected", [
    (1, 16, None, "auto", "driver"),      # two CPU cores (or one GPU): a pool of one actor cannot win
    (0, 16, None, "auto", "driver"),      # one core
    (3, 16, None, "auto", "actors"),      # four cores: three actors
    (3, 1, None, "auto", "driver"),       # one image: one actor at most
    (3, 16, "auto", "auto", "actors"),    # a cluster: its resources are not this machine's
    (1, 16, None, 1, "actors"),           # a number of actors asks for the pool
    (3, 16, None, 0, "driver"),           # ray.num_actors=0: this process
])
def test_auto_picks_the_driver_only_where_a_pool_holds_one_actor(monkeypatch, slots, images, address, actors,
                                                                  expected):
    monkeypatch.setattr(bench.env, "local_slots", lambda use_gpu: slots)
    assert resolve_execution("auto", actors, address, images, use_gpu=False) == expected
    for mode in ("actors", "driver"):  # given, it is kept
        assert resolve_execution(mode, "auto", address, images, use_gpu=False) == mode


@pytest.mark.parametrize("overrides, message", [
    (["ray.execution=drivr"], "ray.execution='drivr' must be one of auto, actors, driver (did you mean driver?)"),
    (["ray.execution=actors", "ray.num_actors=0"], "ray.execution=actors with ray.num_actors=0"),
    (["ray.execution=driver", "ray.num_actors=2"], "ray.execution=driver traces in this process"),
])
def test_contradicting_execution_settings_are_one_error(overrides, message):
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        compose(str(SWEEP), overrides)


def test_a_driver_run_starts_no_ray_and_says_so(tmp_path, tiny_model, capsys):
    import ray

    was_running = ray.is_initialized()
    out = tmp_path / "run"
    assert main([str(SWEEP), *SMALL, f"model.path={tiny_model}", "ray.execution=driver", f"output_dir={out}"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["execution"] == "driver" and run["num_actors"] == 0
    assert ray.is_initialized() == was_running


@pytest.mark.slow  # starts Ray and one tracing actor (~1 min on 2 shared cores)
def test_driver_and_actor_pool_give_identical_results(tmp_path, tiny_model, capsys, ray_session):
    frames = {}
    for mode in ("driver", "actors"):
        out = tmp_path / mode
        args = [str(SWEEP), *SMALL, f"model.path={tiny_model}", f"ray.execution={mode}", f"output_dir={out}"]
        if mode == "actors":
            args.append("ray.num_actors=1")
        assert main(args) == 0, capsys.readouterr().err[-3000:]
        assert json.loads((out / "run.json").read_text())["execution"] == mode
        frames[mode] = pd.read_parquet(out / "results.parquet").sort_values(["trial", "seed"]).reset_index(drop=True)
    metrics = [c for c in frames["driver"].columns
               if c in ("mIoU", "aAcc", "mAcc", "unet_passes") or c.startswith(("IoU/", "Acc/"))]
    assert len(metrics) > 4
    pd.testing.assert_frame_equal(frames["driver"][["trial", "seed", *metrics]],
                                  frames["actors"][["trial", "seed", *metrics]], check_exact=True)


def test_a_sweep_without_fits_reports_the_fit_stage_statistics_of_an_empty_plan():
    from bench.engine import NO_FITS
    from bench.stages.fit import FitStats

    assert NO_FITS == FitStats().as_dict()


def test_every_process_keeps_freed_memory_for_reuse(ray_session):
    """bench.env.ALLOCATOR_ENV reaches this process (mallopt, glibc) and Ray's workers (their environment, read
    by glibc at start): without it some processes page-faulted their way through iSeg's K = 24 path ~5 ms slower
    per image."""
    import os
    import platform

    import ray

    from bench.env import ALLOCATOR_ENV, tune_allocator

    mine = {k: os.environ.get(k) for k in ALLOCATOR_ENV}  # the defaults, or what the user set
    assert None not in mine.values()
    if platform.libc_ver()[0] == "glibc":
        assert tune_allocator()

    @ray.remote
    def worker_environment():
        return {k: os.environ.get(k) for k in ALLOCATOR_ENV}

    assert ray.get(worker_environment.remote()) == mine
