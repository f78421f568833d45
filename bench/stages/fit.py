"""The fit stage: one Ray Train run (TorchTrainer, DDP) per train setting, artefacts in `<run>/fit/<hash>/`;
several settings run as Ray Tune trials, `train.max_concurrent` at once (train_concurrently).

Everything a fit keeps goes through the run's storage (a bench.storage Location: a local folder, a shared
mount or an object store): Ray Train's checkpoints (`RunConfig(storage_path=..., storage_filesystem=...)`),
the workers' caches and the finished artefacts, so a fit works on any node that reaches that storage.
Progress reaches the driver's bar through a Ray actor (FitBoard), not through files.

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
import io
import json
import logging
import os
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
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save, save_file
from tqdm import tqdm

from bench.config import SweepConfig, train_data_config
from bench.data import build_dataset
from bench.errors import BenchError
from bench.fitting import FitContext, InjectedFault, LossPoint, pack_state, unpack_state
from bench.models import load_backbone
from bench.plan import FitUnit, Plan
from bench.rundir import WORK
from bench.storage import Location, is_uri
from methods import METHODS

log = logging.getLogger(__name__)

ARTEFACT, CONFIG, LOSS, DONE = "weights.safetensors", "train_config.json", "loss.csv", "done"
CACHE = "cache"  # fit_dir/cache: what a fit built before its first step (RayFitContext.cached), until it finishes
FAULT_ENV = "BENCH_FAULT"  # fault injection for tests of resumption, see parse_fault
STALL_SECONDS = 600


# -- fault injection ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """`BENCH_FAULT=fit:<n>:<k>:<raise|kill|stall>`: in the n-th fit this process trains, right after the k-th
    checkpoint of an attempt that started from scratch, raise in the workers (a failed attempt: the fit fails,
    or restarts from that checkpoint with train.max_failures > 0), SIGKILL the driver (a killed run), or stall
    the workers (STALL_SECONDS) so that a test can take their node down at that point."""

    fit: int
    checkpoint: int
    action: str
    driver_pid: int = 0


def parse_fault(text: str | None) -> Fault | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 4 or parts[0] != "fit" or parts[3] not in ("raise", "kill", "stall"):
        raise BenchError(f"{FAULT_ENV}={text!r} is not fit:<n>:<checkpoint>:<raise|kill|stall>; unset it")
    return Fault(int(parts[1]), int(parts[2]), parts[3], os.getpid())


# -- inside a Ray Train worker --------------------------------------------------------------------------------------
class RayFitContext(FitContext):
    """A fit on Ray Train: DDP through `prepare`, collectives through torch.distributed, checkpoints and the
    final artefact reported with `ray.train.report` into the fit directory."""

    def __init__(self, setting, dataset, backbone, resolution, fit_dir: Location, fault: Fault | None,
                 board=None, key: str = ""):
        import ray.train  # imported where used: it costs seconds, and most runs never fit

        super().__init__(setting, dataset, backbone, resolution)
        self.train_ctx = ray.train.get_context()
        self.fit_dir = fit_dir
        self.board, self.key = board, key  # FitBoard actor (None: no bar) and this fit's key on it
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
        """Kept as fit_dir/cache/<name>.<rank>of<world>.safetensors in the run's storage (each file whole;
        removed with the Ray storage when the fit is done)."""
        path = Location.of(self.fit_dir) / CACHE / f"{name}.{self.rank}of{self.world_size}.safetensors"
        if path.is_file():
            try:
                data = path.read_bytes()
                meta = _safetensors_metadata(data)["state"]
                tensors = load_safetensors(data)
                log.info("fit cache %s read back (%s)", name, path.name)
                return unpack_state(tensors, meta)
            except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:  # cut off while written
                log.warning("fit cache %s unreadable (%s); building it again", path, err)
        value = build()
        tensors, meta = pack_state(value)
        path.write_bytes(save(tensors, metadata={"state": meta}))
        return unpack_state(tensors, meta)  # as a resumed fit will read it

    def status(self, text):
        super().status(text)
        self._status = text
        self._progress(self._step, self._loss, force=True)

    def _progress(self, step: int, loss: float | None, force: bool = False) -> None:
        """Rank 0 sends its progress to the driver's bar through the FitBoard actor (at most 2 per s)."""
        if step != self._step:
            self._status = None  # a step ends whatever preparation the status described
        self._step, self._loss = step, loss
        now = time.time()
        if self.rank != 0 or (not force and now - self._last_progress < 0.5):
            return
        self._last_progress = now
        if self.board is not None:
            self.board.put.remote(self.key, {"step": step, "total": self.total_steps, "loss": loss,
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
            if self.fault.action == "stall":
                time.sleep(STALL_SECONDS)  # the test kills this worker's node meanwhile
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
                        config["fit_dir"], config["fault"], config.get("board"), config.get("key", ""))
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


def fit_source(cfg: SweepConfig, unit: FitUnit) -> Location:
    """Where `fit.from=` keeps the finished fit of `unit` (a run directory or one fit directory; a path or a
    URI)."""
    source = Location.of(cfg.fit.source)
    if (source / DONE).is_file():
        recorded = (source / CONFIG).read_json().get("hash")
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
    source = Location.of(cfg.fit.source)
    if not source.is_dir():
        raise BenchError(f"fit.from={source} does not exist; pass a run directory or one of its fit/<hash>/ "
                         f"directories")
    if not plan.fits:
        raise BenchError(f"fit.from={source} is given, but no configuration of this sweep needs a fit; drop it")
    for unit in plan.fits:
        fit_source(cfg, unit)


def run_fits(cfg: SweepConfig, plan: Plan, work: Location | Path) -> tuple[FitStats, dict[str, Location]]:
    """Fit every train setting of the plan that `work/fit/` does not hold finished; returns statistics and
    TrainSetting.key -> finished fit directory. Two or more settings to fit run as Ray Tune trials, up to
    `train.max_concurrent` at once (fit_concurrency), each one Ray Train run; a single one runs directly."""
    work = Location.of(work)
    stats = FitStats(fits=len(plan.fits))
    done: dict[str, Location] = {}
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
    if pending:
        board = FitBoard.start()
        try:
            if len(pending) == 1:
                train_one(cfg, *pending[0], faults[0], board=board)
            else:
                train_concurrently(cfg, pending, faults, work / WORK / "tune", board)
        finally:
            FitBoard.stop(board)
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


def _fit_trial(config: dict, cfg: SweepConfig, pending: list, faults: list, data: dict, board=None) -> None:
    """A Ray Tune trial (function trainable): one fit, written to its fit directory (in the run's storage) by
    the trial itself, wherever it runs."""
    from ray import tune

    unit, fit_dir = pending[config["fit"]]
    train_one(cfg, unit, fit_dir, faults[config["fit"]], progress=False, data=data, board=board)
    tune.report({"fitted": 1})


def train_concurrently(cfg: SweepConfig, pending: list[tuple[FitUnit, Location]], faults: list, storage: Location,
                       board=None) -> None:
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
    storage_path, storage_fs = storage.ray_storage()
    trainable = tune.with_resources(tune.with_parameters(_fit_trial, cfg=cfg, pending=pending, faults=faults,
                                                         data=worker_data_config(cfg), board=board),
                                    {"CPU": 0, "memory": 1})  # Tune refuses an empty request; 1 byte is none
    tuner = tune.Tuner(trainable, param_space={"fit": tune.grid_search(list(range(len(pending))))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=at_once, reuse_actors=False),
                       run_config=tune.RunConfig(name="fits", storage_path=storage_path,
                                                 storage_filesystem=storage_fs, verbose=0,
                                                 failure_config=tune.FailureConfig(
                                                     max_failures=cfg.train.max_failures)))
    grid = _with_progress(tuner.fit, [unit.hash for unit, _ in pending], f"{len(pending)} fits ({at_once} at once)",
                          FitBoard.poller(board))
    errors = [r.error for r in grid if r.error is not None]
    storage.rmtree()
    if errors:
        raise errors[0]


def copy_fit(source: Location, fit_dir: Location) -> None:
    """A finished fit copied into this run (`fit.from=`): its files, then `done` last."""
    fit_dir.rmtree()
    for name in (ARTEFACT, LOSS):
        (fit_dir / name).write_bytes((source / name).read_bytes())
    config = (source / CONFIG).read_json()
    config["copied_from"] = source.uri
    (fit_dir / CONFIG).write_json(config)
    (fit_dir / DONE).write_text(config.get("hash", fit_dir.name) + "\n")


PATH_OPTIONS = ("root", "captions", "image_list")  # dataset options that name files


def worker_data_config(cfg: SweepConfig) -> dict:
    """The training data's options with relative paths made absolute on the driver: Ray Train workers run in
    their own working directory, where `synthetic/x` means nothing."""
    data = train_data_config(cfg)
    return {k: str(Path(v).expanduser().resolve()) if k in PATH_OPTIONS and isinstance(v, str) and v
            and not is_uri(v) else v
            for k, v in data.items()}


def train_one(cfg: SweepConfig, unit: FitUnit, fit_dir: Location, fault: Fault | None, progress: bool = True,
              data: dict | None = None, board=None) -> None:
    """One Ray Train run for `unit` into `fit_dir` (resumed from its checkpoints there); `progress`: show the
    fit's bar here (off in a Tune trial, whose driver shows every running fit's); `data`: the workers' training
    data options (worker_data_config, computed where relative paths mean what the user meant)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fit_dir = Location.of(fit_dir)
    storage = fit_dir / "ray"
    resuming = any("checkpoint_" in rel for rel in storage.files())
    earlier = checkpointed_seconds(storage) if resuming else 0.0  # an earlier invocation's training, kept
    storage_path, storage_fs = storage.ray_storage()
    log.info("%s fit %s (%s %s) on %d worker(s)", "resuming" if resuming else "starting", unit.hash,
             unit.setting.fitter, dict(unit.setting.values), cfg.train.num_workers)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "setting": unit.setting, "fit_dir": fit_dir, "fault": fault,
                           "data": data or worker_data_config(cfg), "board": board, "key": unit.hash},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    started = time.time()
    result = _with_progress(trainer.fit, [unit.hash], f"fit {unit.hash[:8]}", FitBoard.poller(board)) \
        if progress else trainer.fit()
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
    storage.rmtree()
    (fit_dir / CACHE).rmtree()
    if board is not None:
        steps = int(final.get("steps") or 0)
        board.put.remote(unit.hash, {"step": steps, "total": steps, "loss": None, "status": None, "done": True})


def checkpointed_seconds(storage: Location | Path) -> float:
    """Training seconds kept by the newest checkpoint in a fit's Ray Train storage (the one a resumed fit
    restarts from: the highest step), so a resumed fit's `fit_seconds` counts the earlier invocation's work
    up to that checkpoint. 0 where none is readable (a checkpoint cut off while being written)."""
    storage = Location.of(storage)
    best = (-1, 0.0)
    for rel in storage.files():
        parts = rel.split("/")
        if len(parts) < 2 or parts[-1] != "meta.json" or not parts[-2].startswith("checkpoint_"):
            continue
        try:
            data = (storage / rel).read_json()
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


class FitBoard:
    """A Ray actor holding each running fit's progress (rank 0 puts, the driver's bar polls): progress reaches
    the driver through Ray, wherever the fit's workers run."""

    def __init__(self):
        self.states: dict[str, dict] = {}

    def put(self, key: str, state: dict) -> None:
        if not self.states.get(key, {}).get("done"):  # a late write never undoes a finished fit
            self.states[key] = state

    def get(self) -> dict[str, dict]:
        return dict(self.states)

    @staticmethod
    def start():
        import ray

        return ray.remote(num_cpus=0)(FitBoard).remote()

    @staticmethod
    def stop(board) -> None:
        import ray

        if board is not None:
            ray.kill(board)

    @staticmethod
    def poller(board):
        """A function returning the board's states (what _with_progress polls); {} without a board."""
        if board is None:
            return dict
        import ray

        return lambda: ray.get(board.get.remote(), timeout=10)


def _with_progress(fit, keys: list[str], label: str, poll):
    """fit() with a tqdm bar fed by `poll()` ({fit key: progress state}, the FitBoard's states): steps (summed
    over the fits), the loss of a single fit (of several: how many are finished and running) and what a fit
    prepares before its first step. fit's exception is raised here."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=_catch(fit)), daemon=True)
    thread.start()
    seen: dict[str, dict] = {}
    with tqdm(desc=label, unit="step", dynamic_ncols=True, total=None) as bar:
        while thread.is_alive():
            thread.join(0.5)
            try:
                states = poll()
            except Exception:  # noqa: BLE001 (a bar is not worth failing a fit for)
                continue
            changed = False
            for key in keys:
                state = states.get(key)
                if state is not None:
                    changed |= seen.get(key) != state
                    seen[key] = state
            if not changed:
                continue
            current = list(seen.values())
            totals = [s.get("total") for s in current]
            if len(current) == len(keys) and all(totals):
                bar.total = sum(totals)
            bar.n = sum(s.get("step") or 0 for s in current)
            postfix = {}
            if len(keys) == 1 and current[0].get("loss") is not None:
                postfix["loss"] = f"{current[0]['loss']:.4g}"
            elif len(keys) > 1:
                finished = sum(1 for s in current if s.get("done"))
                postfix["done"] = f"{finished}/{len(keys)}"
                postfix["running"] = len(current) - finished
            doing = [s["status"] for s in current if s.get("status")]
            if doing:
                postfix["doing"] = doing[0]
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
    outcome = box["result"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _catch(fn):
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001  (re-raised on the driver's main thread)
        return err


def write_fit(fit_dir: Location, unit: FitUnit, cfg: SweepConfig, tensors: dict, curve: list[LossPoint],
              info: dict) -> None:
    """The fit directory's files in the run's storage, each written whole; `done` last."""
    fit_dir = Location.of(fit_dir)
    meta = {"fitter": unit.setting.fitter, "version": unit.setting.version, "hash": unit.hash,
            "key": unit.setting.key}
    (fit_dir / ARTEFACT).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                          metadata=meta))
    config = {**meta, "setting": unit.setting.as_dict(), "method": cfg.method, "model": cfg.model.as_dict(),
              "data": train_data_config(cfg), "train": cfg.train.as_dict(), **info,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "ray": version("ray")}}
    (fit_dir / CONFIG).write_json(config)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["series", "step", "loss"])
    writer.writerows([p.series, p.step, f"{p.loss:.8g}"] for p in curve)
    (fit_dir / LOSS).write_text(text.getvalue())
    (fit_dir / DONE).write_text(unit.hash + "\n")


def load_fits(done: dict[str, Location]) -> dict[str, bytes]:
    """TrainSetting.key -> the artefact's safetensors bytes (what evaluation actors receive)."""
    return {key: (Location.of(folder) / ARTEFACT).read_bytes() for key, folder in done.items()}


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's bytes (its JSON header); ValueError where it is cut off."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError("cut off in its header")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
