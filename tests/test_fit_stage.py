"""The fit stage end to end with the trained toy method (methods/linear_probe.py, sweeps/linear_probe.yaml) on
tiny random components: one fit for a 6-value post-processing sweep, on 2 Ray Train workers; its artefacts in
the run; reused by `fit.from=` in a `compare` sweep. Slow set: a failed attempt restarted from its last
checkpoint, and a real SIGKILL of the command mid-fit, resumed by the next invocation without refitting the
finished fit and ending bit-identical to undisturbed fits (resumption of the fit function itself is in the
fast method tester)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bench.data import build_dataset
from bench.fitting import LocalFitContext
from bench.models import load_backbone
from bench.run import main
from bench.stages.fit import FAULT_ENV
from methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PROBE = {"train_images": 4, "epochs": 20}  # two checkpoints (every 10 steps)
SMALL = ["data.limit=2", "data.size=32", "report.bootstrap=20"]
LOCAL = "ray.num_actors=0"  # trace in the test process (the probe run below uses the actor pool)


def probe_overrides(model: Path) -> list[str]:
    return [*SMALL, f"model.path={model}", *(f"params.{k}={v}" for k, v in PROBE.items())]


def local_fit(model: Path, values: dict) -> dict[str, torch.Tensor]:
    """The same fit, undisturbed, in this process (bench.fitting.LocalFitContext)."""
    backbone = load_backbone({"path": str(model), "device": "cpu"})
    cls = METHODS.get("linear_probe")
    method = cls(backbone)
    setting = method.train_setting(cls.resolve(values))
    dataset = build_dataset({"name": "shapes", "size": 32, "split": "train"})
    return method.fit(LocalFitContext(setting, dataset, backbone))


def run_probe(out: Path, model: Path, *extra: str) -> Path:
    assert main([str(ROOT / "sweeps/linear_probe.yaml"), *probe_overrides(model), "train.num_workers=2", *extra,
                 f"output_dir={out}"]) == 0
    return out


def check_probe_run(out: Path, model: Path, resumed_from: int | None) -> None:
    """One fit for six thresholds on two workers, its artefacts in the run and its loss curve in the report;
    the weights those of one process (DDP averages the workers' gradients of the split global batch)."""
    run = json.loads((out / "run.json").read_text())
    assert run["fits"] == 1 and run["fits_trained"] == 1 and run["fits_reused"] == 0
    frame = pd.read_parquet(out / "results.parquet")
    assert sorted(frame["threshold"]) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert frame["fit"].nunique() == 1 and (frame["unet_passes"] == 2).all()
    fit_dir = out / "fit" / frame["fit"].iloc[0]
    assert sorted(p.name for p in fit_dir.iterdir()) == ["done", "loss.csv", "train_config.json",
                                                        "weights.safetensors"]
    config = json.loads((fit_dir / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["resumed_from"] == resumed_from and config["steps"] == 20
    assert config["data"]["split"] == "train" and config["setting"]["values"]["epochs"] == 20
    curve = pd.read_csv(fit_dir / "loss.csv", keep_default_na=False)
    assert curve["step"].tolist() == list(range(1, 21))  # a resumed fit continues its curve
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    report = (out / "report.md").read_text()
    origin = f"resumed at step {resumed_from}" if resumed_from else "fitted"
    assert "## Fits" in report and origin in report and (out / "fit_loss.png").is_file()
    weights = load_file(fit_dir / "weights.safetensors")
    alone = local_fit(model, PROBE)
    for name in ("weight", "bias"):
        torch.testing.assert_close(weights[name], alone[name], atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, tiny_model, ray_session):
    """sweeps/linear_probe.yaml fitted on 2 Ray Train workers; the Ray Data actor that traces the evaluation
    images receives the fit."""
    return run_probe(tmp_path_factory.mktemp("probe") / "run", tiny_model)


def test_one_fit_for_six_thresholds_on_two_workers(probe_run, tiny_model):
    check_probe_run(probe_run, tiny_model, resumed_from=None)


@pytest.mark.slow
def test_a_failed_attempt_restarts_from_its_last_checkpoint(tmp_path, tiny_model, ray_session):
    """The fit's first attempt fails after its first checkpoint (fault injection); Ray Train restarts the
    workers from that checkpoint (train.max_failures=1) and the run completes."""
    os.environ[FAULT_ENV] = "fit:1:1:raise"
    try:
        out = run_probe(tmp_path / "run", tiny_model, "train.max_failures=1", LOCAL)
    finally:
        del os.environ[FAULT_ENV]
    check_probe_run(out, tiny_model, resumed_from=10)


def test_fit_from_lends_the_fit_to_a_compare_sweep(probe_run, tiny_model, tmp_path, capsys):
    """The trained method appears in `method=compare` when listed, and `fit.from=<run>` evaluates it without
    training."""
    sweep = tmp_path / "compare.yaml"
    sweep.write_text("method: compare\nsweep: {method: [daam, linear_probe]}\n"
                     + "params: {" + ", ".join(f"linear_probe__{k}: {v}" for k, v in PROBE.items()) + "}\n")
    base = [str(sweep), *SMALL, LOCAL, f"model.path={tiny_model}"]
    out = tmp_path / "run"
    assert main([*base, f"fit.from={probe_run}", f"output_dir={out}"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fits"] == 1 and run["fits_trained"] == 0 and run["fits_reused"] == 1
    frame = pd.read_parquet(out / "results.parquet").set_index("method")
    (fitted,) = (probe_run / "fit").iterdir()
    assert frame.loc["linear_probe", "fit"] == fitted.name and frame.loc["daam", "fit"] == ""
    assert frame["unet_passes"].tolist() == [2, 2]  # one pass per image serves both methods
    copied = out / "fit" / fitted.name
    assert (copied / "weights.safetensors").read_bytes() == (fitted / "weights.safetensors").read_bytes()
    assert json.loads((copied / "train_config.json").read_text())["copied_from"] == str(fitted.resolve())
    # a setting the source never fitted is refused before anything runs
    capsys.readouterr()
    code = main([*base, "params.linear_probe__epochs=21", f"fit.from={probe_run}", f"output_dir={tmp_path / 'x'}"])
    assert code == 2 and "has no finished fit" in capsys.readouterr().err
    assert not (tmp_path / "x.partial").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_run_resumes_without_refitting_finished_settings(tmp_path, tiny_model):
    """Two train settings; the command is SIGKILLed after the second fit's first checkpoint. The same command
    reuses the first fit as it is and resumes the second from its checkpoint; both equal undisturbed fits."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.run", str(ROOT / "sweeps/linear_probe.yaml"), *probe_overrides(tiny_model), LOCAL,
           *TWO_FITS, "train.max_concurrent=1", f"output_dir={out}"]  # one after the other, as Tune trials
    ray_tmp = tempfile.mkdtemp(prefix="rk-")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    killed = subprocess.Popen(cmd, env={**env, FAULT_ENV: "fit:2:1:kill"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = killed.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # whatever of the killed run's Ray outlived its driver
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    fits = out.with_name("run.partial") / "fit"
    finished = [d for d in fits.iterdir() if (d / "done").is_file()]
    assert len(finished) == 1 and len(list(fits.iterdir())) == 2
    before = (finished[0] / "train_config.json").read_text()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["fits"] == 2 and run["fits_trained"] == 1 and run["fits_reused"] == 1
    assert (out / "fit" / finished[0].name / "train_config.json").read_text() == before  # not refitted
    for fit_dir in (out / "fit").iterdir():
        config = json.loads((fit_dir / "train_config.json").read_text())
        if fit_dir.name != finished[0].name:
            assert config["resumed_from"] == 10
            # the killed invocation's training up to the checkpoint counts in the resumed fit's seconds
            assert 0 < config["seconds_before_resume"] < config["fit_seconds"]
        weights = load_file(fit_dir / "weights.safetensors")
        alone = local_fit(tiny_model, {**PROBE, "lr": config["setting"]["values"]["lr"]})
        assert all(torch.equal(weights[k], alone[k]) for k in ("weight", "bias"))  # bit for bit


TWO_FITS = ["sweep.lr.grid=[0.05,0.1]", "sweep.threshold.grid=[0.4,0.6]"]  # two train settings


def fit_configs(out: Path) -> list[dict]:
    return [json.loads((d / "train_config.json").read_text()) for d in sorted((out / "fit").iterdir())]


@pytest.mark.slow  # a Ray Train fit inside (20-40 s on 2 cores): beyond the fast suite's per-test share
def test_two_train_settings_fit_at_once_as_tune_trials_and_equal_fits_alone(tmp_path, tiny_model, ray_session,
                                                                            capsys):
    """Two train settings are two Ray Tune trials, each one Ray Train run, running at the same time where the
    cluster holds both (train.max_concurrent=auto: a CPU each); each fit is bit for bit the fit alone in this
    process, and Tune's experiment state does not outlive the run."""
    import ray

    out = tmp_path / "run"
    assert main([str(ROOT / "sweeps/linear_probe.yaml"), *probe_overrides(tiny_model), LOCAL, *TWO_FITS,
                 f"output_dir={out}"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fits"] == 2 and run["fits_trained"] == 2
    configs = fit_configs(out)
    for config in configs:
        weights = load_file(out / "fit" / config["hash"] / "weights.safetensors")
        alone = local_fit(tiny_model, {**PROBE, "lr": config["setting"]["values"]["lr"]})
        assert all(torch.equal(weights[k], alone[k]) for k in ("weight", "bias"))
    err = capsys.readouterr().err
    if ray.cluster_resources().get("CPU", 0) >= 2:
        # each fit started before the other finished
        first, second = sorted(configs, key=lambda c: c["started"])
        assert second["started"] < first["finished"]
        assert "2 fits (2 at once)" in err
    assert not (out / "work").exists() and not list(out.rglob("experiment_state*"))


@pytest.mark.slow
def test_a_failed_fit_among_concurrent_ones_keeps_the_others_and_refits_only_itself(tmp_path, tiny_model,
                                                                                    ray_session, capsys):
    """The first of two concurrent fits fails after its first checkpoint (no retries): the other one finishes
    and is kept, the run fails with the fit's own error on one line, and the same command fits only the
    failed setting."""
    out = tmp_path / "run"
    args = [str(ROOT / "sweeps/linear_probe.yaml"), *probe_overrides(tiny_model), LOCAL, *TWO_FITS,
            f"output_dir={out}"]
    os.environ[FAULT_ENV] = "fit:1:1:raise"
    try:
        assert main(args) != 0
    finally:
        del os.environ[FAULT_ENV]
    err = capsys.readouterr().err
    assert "injected failure after checkpoint 1" in err and "resume with" in err
    fits = out.with_name("run.partial") / "fit"
    finished = [d.name for d in fits.iterdir() if (d / "done").is_file()]
    assert len(finished) == 1
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["fits_trained"] == 1 and run["fits_reused"] == 1


def test_a_fit_fails_with_its_workers_own_exception():
    """Ray Train reports a failed worker group as WorkerGroupError ("Training failed due to worker errors:");
    the run's one-line error names the lowest rank's own exception instead."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from bench.run import root_cause

    own = ValueError("labels out of range")
    failed = WorkerGroupError("rank 1 and 0 failed", {1: KeyError("x"), 0: own})
    assert root_cause(failed) is own
    # a Tune trial's failure: the trial's RayTaskError around the fit's WorkerGroupError
    assert root_cause(RayTaskError("_fit_trial", "traceback", failed)) is own
    other = RuntimeError("controller died")
    assert root_cause(other) is other


def test_fit_concurrency_and_worker_resources(monkeypatch):
    """train.max_concurrent=auto fits as many settings at once as the cluster holds at num_workers workers per
    fit (CPUs, or GPUs at gpus_per_worker each); a number caps it; never more than the fits to run."""
    import ray

    from bench.config import compose
    from bench.stages.fit import fit_concurrency, scaling_config

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    sweep = ROOT / "sweeps/linear_probe.yaml"
    assert fit_concurrency(compose(sweep, []), 46) == 16
    assert fit_concurrency(compose(sweep, ["train.num_workers=4"]), 46) == 4
    assert fit_concurrency(compose(sweep, ["train.use_gpu=true"]), 46) == 1
    packed = compose(sweep, ["train.use_gpu=true", "train.gpus_per_worker=0.125"])
    assert fit_concurrency(packed, 46) == 8 and fit_concurrency(packed, 3) == 3
    assert fit_concurrency(compose(sweep, ["train.max_concurrent=3"]), 46) == 3
    assert scaling_config(packed).resources_per_worker == {"CPU": 1, "GPU": 0.125}
    assert scaling_config(compose(sweep, [])).resources_per_worker in (None, {"CPU": 1})


@pytest.mark.parametrize("override, message", [
    ("train.max_concurrent=0", "train.max_concurrent=0 must be auto or a number of fits >= 1"),
    ("train.max_concurrent=many", "train.max_concurrent='many' must be auto"),
    ("train.gpus_per_worker=1.5", "must be a share of one GPU in (0, 1] or a whole number"),
    ("train.gpus_per_worker=0.5", "without train.use_gpu=true"),
])
def test_bad_train_resources_are_one_line_errors(override, message):
    from bench.config import compose
    from bench.errors import BenchError

    with pytest.raises(BenchError, match=re.escape(message)):
        compose(ROOT / "sweeps/linear_probe.yaml", [override])


def test_a_resumed_fit_counts_the_seconds_its_checkpoint_kept(tmp_path):
    """The newest (highest-step) readable checkpoint's training seconds are what a resumed fit adds to its
    wall time; a checkpoint cut off while being written, or none at all, adds nothing."""
    from bench.stages.fit import checkpointed_seconds

    assert checkpointed_seconds(tmp_path / "absent") == 0.0
    for name, meta in (("checkpoint_a", {"step": 10, "seconds": 4.0}), ("checkpoint_b", {"step": 20, "seconds": 9.5}),
                       ("checkpoint_c", None)):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        if meta is not None:
            (folder / "meta.json").write_text(json.dumps({**meta, "state": {}, "curve": []}))
    (tmp_path / "train" / "checkpoint_d").mkdir()
    (tmp_path / "train" / "checkpoint_d" / "meta.json").write_text('{"step": 3')  # torn write
    assert checkpointed_seconds(tmp_path) == 9.5


def test_train_source_defaults_and_enters_the_fit_hash(tmp_path):
    """`train.data` replaces the evaluated dataset as the fit's training data: its split defaults to
    train.split and its limit to every image; it is in the fit hash and the run's config."""
    from bench.config import compose, train_data_config
    from bench.plan import make_plan

    sweep = ROOT / "sweeps/linear_probe.yaml"
    own = compose(sweep, [])
    other = compose(sweep, ["train.data={name: shapes, size: 64, seed: 3}"])
    assert train_data_config(own) == {**own.data, "split": "train", "limit": None}
    assert train_data_config(other) == {"name": "shapes", "size": 64, "seed": 3, "split": "train", "limit": None}
    assert other.as_dict()["train"]["data"] == {"name": "shapes", "size": 64, "seed": 3}
    split = compose(sweep, ["train.data={name: shapes, split: test, limit: 5}"])
    assert train_data_config(split) == {"name": "shapes", "split": "test", "limit": 5}
    hashes = {make_plan(c).fits[0].hash for c in (own, other, split)}
    assert len(hashes) == 3


def test_fit_workers_get_absolute_training_data_paths(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory: a relative `train.data.root` reaches them
    resolved on the driver, while the fit hash keeps what the sweep says."""
    from bench.config import compose, train_data_config
    from bench.stages.fit import worker_data_config

    monkeypatch.chdir(tmp_path)
    cfg = compose(ROOT / "sweeps/linear_probe.yaml", ["train.data={name: voc2012, root: synthetic/x}"])
    assert worker_data_config(cfg)["root"] == str(tmp_path / "synthetic" / "x")
    assert train_data_config(cfg)["root"] == "synthetic/x"
    assert worker_data_config(compose(ROOT / "sweeps/linear_probe.yaml", [])) == train_data_config(
        compose(ROOT / "sweeps/linear_probe.yaml", []))


def test_the_fit_bar_shows_what_a_fit_prepares_before_its_first_step(capsys):
    """A fit's preparation (FreeGen traces its training images for minutes before the first epoch) reaches the
    driver's bar through the progress board; the first step clears it."""
    import time

    from bench.stages.fit import FitBoard, _with_progress

    board = FitBoard()  # the actor's class, used in this process

    def fit():
        board.put("abc", {"step": 0, "total": 2, "loss": None, "status": "EGD training images 8/200"})
        time.sleep(1.2)
        return "done"

    assert _with_progress(fit, ["abc"], "fit abc", board.get) == "done"
    assert "EGD training images 8/200" in capsys.readouterr().err


def test_the_bar_of_several_fits_counts_finished_ones_whole(capsys):
    """Fits at once: the bar sums their steps; a finished fit counts every step of it even if its last progress
    report was behind (a late report never undoes it), and the postfix says how many are done."""
    import time

    from bench.stages.fit import FitBoard, _with_progress

    board = FitBoard()

    def fit():
        board.put("a", {"step": 9, "total": 10, "loss": 0.5, "status": None})
        board.put("b", {"step": 3, "total": 10, "loss": 0.7, "status": None})
        time.sleep(0.8)
        board.put("a", {"step": 10, "total": 10, "loss": None, "status": None, "done": True})
        board.put("a", {"step": 9, "total": 10, "loss": 0.5, "status": None})  # late
        time.sleep(0.8)
        return "ok"

    assert _with_progress(fit, ["a", "b"], "2 fits (2 at once)", board.get) == "ok"
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "13/20" in last and "done=1/2" in last and "running=1" in last, last


def test_a_fit_cache_is_read_back_by_a_resumed_attempt_and_rebuilt_when_cut_off(tmp_path):
    """RayFitContext.cached: built once, kept in fit_dir/cache under a complete file, read back (tensors and plain
    values) by the next attempt; a file cut off while written is rebuilt, not trusted."""
    import torch

    from bench.stages.fit import CACHE, RayFitContext

    class OneWorker:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    def context():
        ctx = object.__new__(RayFitContext)  # the file logic only: no Ray Train session
        ctx.fit_dir, ctx.train_ctx = tmp_path, OneWorker()
        ctx._step, ctx._loss, ctx._status, ctx._last_progress = 0, None, None, 0.0
        return ctx

    builds = []

    def build():
        builds.append(1)
        return {"samples": [{"features": [torch.arange(6.0).view(2, 3)], "label": torch.ones(2, dtype=torch.long)}],
                "dropped": 3}

    first = context().cached("egd_samples", build)
    again = context().cached("egd_samples", build)
    assert len(builds) == 1 and again["dropped"] == 3
    assert torch.equal(again["samples"][0]["features"][0], first["samples"][0]["features"][0])
    (path,) = (tmp_path / CACHE).glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:20])  # cut off
    assert context().cached("egd_samples", build)["dropped"] == 3 and len(builds) == 2


def test_a_workers_status_reaches_the_progress_board_until_its_next_step(tmp_path):
    """RayFitContext.status: rank 0 sends the status beside step and loss at once; the next step clears it."""
    from types import SimpleNamespace

    from bench.stages.fit import FitBoard, RayFitContext

    board = FitBoard()
    handle = SimpleNamespace(put=SimpleNamespace(remote=board.put))  # an actor handle's shape, in this process

    class OneWorker:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    ctx = object.__new__(RayFitContext)  # the progress logic only: no Ray Train session
    ctx.fit_dir, ctx.train_ctx, ctx.total_steps, ctx.board, ctx.key = tmp_path, OneWorker(), 4, handle, "k"
    ctx._step, ctx._loss, ctx._status, ctx._last_progress = 0, None, None, 0.0
    ctx.curve = []
    ctx.status("EGD training images 4/8")
    state = board.get()["k"]
    assert state["status"] == "EGD training images 4/8" and state["step"] == 0
    ctx._last_progress = 0.0  # past the rate limit
    ctx.log(1, 0.5)
    state = board.get()["k"]
    assert state["status"] is None and state["step"] == 1 and state["loss"] == 0.5
