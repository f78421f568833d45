"""The fit stage: one Ray Train run (TorchTrainer, DDP) per train setting, artefacts in `<run>/fit/<hash>/`;
several settings run as Ray Tune trials, `train.max_concurrent` at once (train_concurrently).

    fit/<hash>/weights.safetensors   the artefact (named tensors the method's predict reads)
              train_config.json      the resolved setting, model, training data, workers, steps, timings
              loss.csv               series, step, loss (plotted in the report)
              ray/                   Ray Train's checkpoints while fitting (removed once done)
              done                   written last: a fit directory without it is unfinished

A finished fit (`done`) is never refitted: a resumed run, or `fit.from=<run or fit dir>`, reuses it. An
unfinished one resumes from its last Ray Train checkpoint (same storage folder and run name), so a killed
run loses at most the steps since that checkpoint. Workers never see the evaluation split: they build the
training split themselves (bench.config.train_data_config).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bench.config import SweepConfig, train_data_config
from bench.data import build_dataset
from bench.errors import BenchError
from bench.fitting import FitContext, InjectedFault, LossPoint, pack_state, unpack_state
from bench.models import load_backbone
from bench.plan import FitUnit, Plan
from bench.rundir import WORK
from methods import METHODS

log = logging.getLogger(__name__)

ARTEFACT, CONFIG, LOSS, DONE = "weights.safetensors", "train_config.json", "loss.csv", "done"
CACHE = "cache"  # fit_dir/cache: what a fit built before its first step (RayFitContext.cached), until it finishes
FAULT_ENV = "BENCH_FAULT"  # fault injection for tests of resumption, see parse_fault


# -- fault injection ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """`BENCH_FAULT=fit:<n>:<k>:<raise|kill>`: in the n-th fit this process trains, right after the k-th
    checkpoint of an attempt that started from scratch, raise in the workers (a failed attempt: the fit fails,
    or restarts from that checkpoint with train.max_failures > 0) or SIGKILL the driver (a killed run)."""

    fit: int
    checkpoint: int
    action: str
    driver_pid: int = 0


def parse_fault(text: str | None) -> Fault | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 4 or parts[0] != "fit" or parts[3] not in ("raise", "kill"):
        raise BenchError(f"{FAULT_ENV}={text!r} is not fit:<n>:<checkpoint>:<raise|kill>; unset it")
    return Fault(int(parts[1]), int(parts[2]), parts[3], os.getpid())


# -- inside a Ray Train worker --------------------------------------------------------------------------------------
class RayFitContext(FitContext):
    """A fit on Ray Train: DDP through `prepare`, collectives through torch.distributed, checkpoints and the
    final artefact reported with `ray.train.report` into the fit directory."""

    def __init__(self, setting, dataset, backbone, resolution, fit_dir: Path, fault: Fault | None):
        import ray.train  # imported where used: it costs seconds, and most runs never fit

        super().__init__(setting, dataset, backbone, resolution)
        self.train_ctx = ray.train.get_context()
        self.fit_dir = fit_dir
        self.fault = fault
        self.checkpoints = 0
        self._last_progress = 0.0
        self._step = 0
        self._loss: float | None = None
        self._status: str | None = None
        self.resumed_from: int | None = None
        self._started = time.time()
        self._kept_seconds = 0.0  # training time of earlier attempts that the restored checkpoint keeps

    @property
    def rank(self) -> int:
        return self.train_ctx.get_world_rank()

    @property
    def world_size(self) -> int:
        return self.train_ctx.get_world_size()

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_sum(self, value):
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def gather(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def log(self, step, loss, series=""):
        super().log(step, loss, series)
        if not series:
            self._progress(step, loss)

    def cached(self, name, build):
        """Kept as fit_dir/cache/<name>.<rank>of<world>.safetensors (written under a temporary name, renamed
        when complete; removed with the Ray storage when the fit is done)."""
        path = self.fit_dir / CACHE / f"{name}.{self.rank}of{self.world_size}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as fh:
                    meta = fh.metadata()["state"]
                    tensors = {key: fh.get_tensor(key) for key in fh.keys()}
                log.info("fit cache %s read back (%s)", name, path.name)
                return unpack_state(tensors, meta)
            except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:  # cut off while written
                log.warning("fit cache %s unreadable (%s); building it again", path, err)
        value = build()
        tensors, meta = pack_state(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}")
        save_file(tensors, str(tmp), metadata={"state": meta})
        tmp.rename(path)
        return unpack_state(tensors, meta)  # as a resumed fit will read it

    def status(self, text):
        super().status(text)
        self._status = text
        self._progress(self._step, self._loss, force=True)

    def _progress(self, step: int, loss: float | None, force: bool = False) -> None:
        """Rank 0 leaves its progress in the fit directory for the driver's bar (polled, at most 2 per s)."""
        if step != self._step:
            self._status = None  # a step ends whatever preparation the status described
        self._step, self._loss = step, loss
        now = time.time()
        if self.rank != 0 or (not force and now - self._last_progress < 0.5):
            return
        self._last_progress = now
        _write_json(self.fit_dir / "progress.json", {"step": step, "total": self.total_steps, "loss": loss,
                                                     "status": self._status})

    def checkpoint(self, step, state):
        import ray.train

        metrics = {"step": step, "loss": self.curve[-1].loss if self.curve else None}
        if self.rank == 0:
            tensors, meta = pack_state(state)
            with tempfile.TemporaryDirectory() as tmp:
                save_file(tensors, os.path.join(tmp, "state.safetensors"))
                _write_json(Path(tmp) / "meta.json", {"step": step, "state": meta,
                                                     "curve": [asdict(p) for p in self.curve],
                                                     "seconds": self._kept_seconds + time.time() - self._started})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        self.checkpoints += 1
        self._progress(step, metrics["loss"], force=True)
        if self.fault and self.checkpoints == self.fault.checkpoint and self.resumed_from is None:
            if self.fault.action == "kill" and self.rank == 0:
                os.kill(self.fault.driver_pid, signal.SIGKILL)
                time.sleep(60)  # the driver's death takes this worker down
            raise InjectedFault(f"injected failure after checkpoint {self.checkpoints} (step {step})")

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            meta = json.loads((Path(folder) / "meta.json").read_text())
            tensors = load_file(os.path.join(folder, "state.safetensors"))
        self.curve = [LossPoint(**p) for p in meta["curve"]]
        self.resumed_from = meta["step"]
        self._kept_seconds = float(meta.get("seconds", 0.0))
        return meta["step"], unpack_state(tensors, meta["state"])

    def finish(self, tensors: dict[str, torch.Tensor]) -> None:
        """Report the artefact and the loss curve as the last checkpoint."""
        import ray.train

        info = {"world_size": self.world_size, "resumed_from": self.resumed_from,
                "steps": self._step}
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          os.path.join(tmp, ARTEFACT))
                _write_json(Path(tmp) / "final.json", {"curve": [asdict(p) for p in self.curve], **info})
                ray.train.report({"final": True}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"final": True})


def train_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: build the backbone, the training split and the method; fit."""
    import ray.train.torch

    cfg: SweepConfig = config["cfg"]
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.WARNING)
    model_cfg = cfg.model.as_dict()
    model_cfg["device"] = str(ray.train.torch.get_device()) if cfg.train.use_gpu else "cpu"
    backbone = load_backbone(model_cfg)
    dataset = build_dataset(config["data"])
    method = METHODS.get(cfg.method)(backbone)
    ctx = RayFitContext(config["setting"], dataset, backbone, int(cfg.model.resolution or 0),
                        Path(config["fit_dir"]), config["fault"])
    ctx.finish(method.fit(ctx))


# -- on the driver ----------------------------------------------------------------------------------------------------
@dataclass
class FitStats:
    fits: int = 0  # train settings of the plan
    trained: int = 0  # fitted (or finished after a resume) by this invocation
    reused: int = 0  # finished before (resumed run) or lent by fit.from
    seconds: float = 0.0
    dirs: dict[str, str] = field(default_factory=dict)  # TrainSetting.key -> fit directory name

    def as_dict(self) -> dict:
        return {"fits": self.fits, "fits_trained": self.trained, "fits_reused": self.reused,
                "fit_seconds": round(self.seconds, 3)}


def fit_source(cfg: SweepConfig, unit: FitUnit) -> Path:
    """Where `fit.from=` keeps the finished fit of `unit` (a run directory or one fit directory)."""
    source = Path(cfg.fit.source)
    if (source / DONE).is_file():
        recorded = json.loads((source / CONFIG).read_text()).get("hash")
        if recorded != unit.hash:
            raise BenchError(f"fit.from={source} holds fit {recorded}, but this sweep needs {unit.hash} "
                             f"({unit.setting.fitter} {dict(unit.setting.values)}); pass the run directory or "
                             f"the matching fit directory")
        return source
    found = source / "fit" / unit.hash
    if not (found / DONE).is_file():
        raise BenchError(f"fit.from={source} has no finished fit {unit.hash} ({unit.setting.fitter} "
                         f"{dict(unit.setting.values)}); fit it with a run without fit.from, or pass another run")
    return found


def check_fit_sources(cfg: SweepConfig, plan: Plan) -> None:
    """Driver-side checks of `fit.from` before anything runs."""
    if cfg.fit.source is None:
        return
    source = Path(cfg.fit.source)
    if not source.is_dir():
        raise BenchError(f"fit.from={source} does not exist; pass a run directory or one of its fit/<hash>/ "
                         f"directories")
    if not plan.fits:
        raise BenchError(f"fit.from={source} is given, but no configuration of this sweep needs a fit; drop it")
    for unit in plan.fits:
        fit_source(cfg, unit)


def run_fits(cfg: SweepConfig, plan: Plan, work: Path) -> tuple[FitStats, dict[str, Path]]:
    """Fit every train setting of the plan that `work/fit/` does not hold finished; returns statistics and
    TrainSetting.key -> finished fit directory. Two or more settings to fit run as Ray Tune trials, up to
    `train.max_concurrent` at once (fit_concurrency), each one Ray Train run; a single one runs directly."""
    stats = FitStats(fits=len(plan.fits))
    done: dict[str, Path] = {}
    fault = parse_fault(os.environ.get(FAULT_ENV))
    start = time.time()
    pending: list[tuple[FitUnit, Path]] = []
    for unit in plan.fits:
        fit_dir = work / "fit" / unit.hash
        stats.dirs[unit.setting.key] = unit.hash
        if (fit_dir / DONE).is_file():
            log.info("fit %s (%s) is finished; reused", unit.hash, unit.setting.fitter)
            stats.reused += 1
        elif cfg.fit.source is not None:
            copy_fit(fit_source(cfg, unit), fit_dir)
            stats.reused += 1
        else:
            pending.append((unit, fit_dir))
        done[unit.setting.key] = fit_dir
    # the fault goes to the n-th fit this invocation trains (in the plan's order)
    faults = [fault if fault and fault.fit == i + 1 else None for i in range(len(pending))]
    if len(pending) == 1:
        train_one(cfg, *pending[0], faults[0])
    elif pending:
        train_concurrently(cfg, pending, faults, work / WORK / "tune")
    stats.trained = len(pending)
    stats.seconds = time.time() - start
    return stats, done


def fit_concurrency(cfg: SweepConfig, pending: int) -> int:
    """How many fits run at once (Ray started): `train.max_concurrent`, or with auto as many as the cluster
    holds at `train.num_workers` workers per fit (GPUs at `train.gpus_per_worker` each with use_gpu, else one
    CPU each); never more than there are fits, never fewer than one."""
    import ray

    if cfg.train.max_concurrent != "auto":
        return max(1, min(int(cfg.train.max_concurrent), pending))
    resources = ray.cluster_resources()
    if cfg.train.use_gpu:
        slots = int(resources.get("GPU", 0) // (cfg.train.num_workers * cfg.train.gpus_per_worker))
    else:
        slots = int(resources.get("CPU", 1) // cfg.train.num_workers)
    return max(1, min(slots, pending))


def _fit_trial(config: dict, cfg: SweepConfig, pending: list, faults: list, data: dict) -> None:
    """A Ray Tune trial (function trainable): one fit, written to its fit directory by the trial itself."""
    from ray import tune

    unit, fit_dir = pending[config["fit"]]
    train_one(cfg, unit, fit_dir, faults[config["fit"]], progress=False, data=data)
    tune.report({"fitted": 1})


def train_concurrently(cfg: SweepConfig, pending: list[tuple[FitUnit, Path]], faults: list, storage: Path) -> None:
    """Every pending fit as one Ray Tune trial, up to fit_concurrency at once. A trial needs no CPU of its own
    (it waits on its Ray Train run, whose workers hold the resources); Tune keeps the experiment's state in
    `storage` and retries a trial whose process died (`train.max_failures`), which resumes its fit from the
    fit directory's checkpoints. A failed fit fails the run once the others have finished: finished fits are
    kept, and the same command fits only what is missing."""
    from ray import tune

    at_once = fit_concurrency(cfg, len(pending))
    log.info("fitting %d train settings, %d at once", len(pending), at_once)
    if cfg.ray.quiet:  # a failed trial's traceback goes to the run's error.log, its message to the one-line error
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    # paths resolved here: a trial's process may have another working directory
    pending = [(unit, fit_dir.resolve()) for unit, fit_dir in pending]
    trainable = tune.with_resources(tune.with_parameters(_fit_trial, cfg=cfg, pending=pending, faults=faults,
                                                         data=worker_data_config(cfg)),
                                    {"CPU": 0, "memory": 1})  # Tune refuses an empty request; 1 byte is none
    tuner = tune.Tuner(trainable, param_space={"fit": tune.grid_search(list(range(len(pending))))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=at_once, reuse_actors=False),
                       run_config=tune.RunConfig(name="fits", storage_path=str(storage.resolve()), verbose=0,
                                                 failure_config=tune.FailureConfig(
                                                     max_failures=cfg.train.max_failures)))
    grid = _with_progress(tuner.fit, [fit_dir for _, fit_dir in pending],
                          f"{len(pending)} fits ({at_once} at once)")
    errors = [r.error for r in grid if r.error is not None]
    shutil.rmtree(storage, ignore_errors=True)
    if errors:
        raise errors[0]


def copy_fit(source: Path, fit_dir: Path) -> None:
    tmp = fit_dir.with_name(fit_dir.name + ".copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (ARTEFACT, CONFIG, LOSS):
        shutil.copy2(source / name, tmp / name)
    config = json.loads((tmp / CONFIG).read_text())
    config["copied_from"] = str(source.resolve())
    _write_json(tmp / CONFIG, config)
    (tmp / DONE).write_text(config.get("hash", fit_dir.name) + "\n")
    shutil.rmtree(fit_dir, ignore_errors=True)
    tmp.rename(fit_dir)


PATH_OPTIONS = ("root", "captions", "image_list")  # dataset options that name files


def worker_data_config(cfg: SweepConfig) -> dict:
    """The training data's options with relative paths made absolute on the driver: Ray Train workers run in
    their own working directory, where `synthetic/x` means nothing."""
    data = train_data_config(cfg)
    return {k: str(Path(v).expanduser().resolve()) if k in PATH_OPTIONS and isinstance(v, str) and v else v
            for k, v in data.items()}


def train_one(cfg: SweepConfig, unit: FitUnit, fit_dir: Path, fault: Fault | None, progress: bool = True,
              data: dict | None = None) -> None:
    """One Ray Train run for `unit` into `fit_dir` (resumed from its checkpoints there); `progress`: show the
    fit's bar here (off in a Tune trial, whose driver shows every running fit's); `data`: the workers' training
    data options (worker_data_config, computed where relative paths mean what the user meant)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fit_dir.mkdir(parents=True, exist_ok=True)
    storage = (fit_dir / "ray").resolve()
    resuming = storage.is_dir() and any(storage.rglob("checkpoint_*"))
    earlier = checkpointed_seconds(storage) if resuming else 0.0  # an earlier invocation's training, kept
    log.info("%s fit %s (%s %s) on %d worker(s)", "resuming" if resuming else "starting", unit.hash,
             unit.setting.fitter, dict(unit.setting.values), cfg.train.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "setting": unit.setting, "fit_dir": str(fit_dir.resolve()), "fault": fault,
                           "data": data or worker_data_config(cfg)},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name="train", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    started = time.time()
    result = _with_progress(trainer.fit, [fit_dir], f"fit {unit.hash[:8]}") if progress else trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        final = json.loads((Path(folder) / "final.json").read_text())
        tensors = load_file(os.path.join(folder, ARTEFACT))
    timing = {"fit_seconds": round(time.time() - started + earlier, 3),
              "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds")}
    if resuming:
        timing["seconds_before_resume"] = round(earlier, 3)
    write_fit(fit_dir, unit, cfg, tensors, [LossPoint(**p) for p in final["curve"]],
              {**{k: v for k, v in final.items() if k != "curve"}, **timing})
    shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(fit_dir / CACHE, ignore_errors=True)
    (fit_dir / "progress.json").unlink(missing_ok=True)


def checkpointed_seconds(storage: Path) -> float:
    """Training seconds kept by the newest checkpoint in a fit's Ray Train storage (the one a resumed fit
    restarts from: the highest step), so a resumed fit's `fit_seconds` counts the earlier invocation's work
    up to that checkpoint. 0 where none is readable (a checkpoint cut off while being written)."""
    best = (-1, 0.0)
    for meta in storage.rglob("checkpoint_*/meta.json"):
        try:
            data = json.loads(meta.read_text())
            best = max(best, (int(data["step"]), float(data.get("seconds", 0.0))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return best[1]


def scaling_config(cfg: SweepConfig):
    """Ray Train's ScalingConfig of one fit: `train.num_workers` workers, each a CPU and, with use_gpu,
    `train.gpus_per_worker` GPUs (a fraction packs several small fits on one GPU)."""
    from ray.train import ScalingConfig

    resources = {"CPU": 1, "GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else None
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                         resources_per_worker=resources)


def _with_progress(fit, fit_dirs: list[Path], label: str):
    """fit() with a tqdm bar fed by the rank-0 workers' progress files of `fit_dirs`: steps (summed over the
    fits), the loss of a single fit (of several: how many are finished and running) and what a fit prepares
    before its first step. fit's exception is raised here."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_catch(fit)), daemon=True)
    thread.start()
    seen: dict[Path, dict] = {}
    with tqdm(desc=label, unit="step", dynamic_ncols=True, total=None) as bar:
        while thread.is_alive():
            thread.join(0.5)
            changed = False
            for fit_dir in fit_dirs:
                state = _fit_progress(fit_dir, seen.get(fit_dir))
                if state is not None:
                    changed |= seen.get(fit_dir) != state
                    seen[fit_dir] = state
            if not changed:
                continue
            states = list(seen.values())
            totals = [s.get("total") for s in states]
            if len(states) == len(fit_dirs) and all(totals):
                bar.total = sum(totals)
            bar.n = sum(s.get("step") or 0 for s in states)
            postfix = {}
            if len(fit_dirs) == 1 and states[0].get("loss") is not None:
                postfix["loss"] = f"{states[0]['loss']:.4g}"
            elif len(fit_dirs) > 1:
                finished = sum(1 for s in states if s.get("done"))
                postfix["done"] = f"{finished}/{len(fit_dirs)}"
                postfix["running"] = len(states) - finished
            doing = [s["status"] for s in states if s.get("status")]
            if doing:
                postfix["doing"] = doing[0]
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
    outcome = box["result"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _fit_progress(fit_dir: Path, last: dict | None) -> dict | None:
    """A fit's progress for the bar: its progress file while it trains; once finished (the file is removed,
    its last write may be up to 0.5 s old) every step of it, from train_config.json; None before either."""
    if (fit_dir / DONE).is_file():
        if last and last.get("done"):
            return last
        try:
            steps = json.loads((fit_dir / CONFIG).read_text()).get("steps") or (last or {}).get("total") or 0
        except (OSError, ValueError):
            steps = (last or {}).get("total") or 0
        return {"step": steps, "total": steps, "loss": None, "status": None, "done": True}
    try:
        return json.loads((fit_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def _catch(fn):
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001  (re-raised on the driver's main thread)
        return err


def write_fit(fit_dir: Path, unit: FitUnit, cfg: SweepConfig, tensors: dict, curve: list[LossPoint],
              info: dict) -> None:
    """The fit directory's files, each written under a temporary name and renamed; `done` last."""
    meta = {"fitter": unit.setting.fitter, "version": unit.setting.version, "hash": unit.hash,
            "key": unit.setting.key}
    tmp = fit_dir / f".{ARTEFACT}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.rename(fit_dir / ARTEFACT)
    config = {**meta, "setting": unit.setting.as_dict(), "method": cfg.method, "model": cfg.model.as_dict(),
              "data": train_data_config(cfg), "train": cfg.train.as_dict(), **info,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "ray": version("ray")}}
    _write_json(fit_dir / CONFIG, config)
    with open(fit_dir / f".{LOSS}", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["series", "step", "loss"])
        writer.writerows([p.series, p.step, f"{p.loss:.8g}"] for p in curve)
    (fit_dir / f".{LOSS}").rename(fit_dir / LOSS)
    (fit_dir / DONE).write_text(unit.hash + "\n")


def load_fits(done: dict[str, Path]) -> dict[str, bytes]:
    """TrainSetting.key -> the artefact's safetensors bytes (what evaluation actors receive)."""
    return {key: (folder / ARTEFACT).read_bytes() for key, folder in done.items()}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
