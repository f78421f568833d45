"""The trace stage: every image traced once per forward setting on a Ray Data actor pool (or in this process,
`ray.execution=driver`); each forward group's configurations scored on that trace; per-image histograms sharded
to `<work>/shards/` as batches finish (a resumed run re-traces only the images no shard holds). The same stage
(`trace_images`: pool, shards, resume, storage) runs synthesis (bench.stages.synthesis) and the adaptive
search's trace cache (bench.search) with their own workers.

Workers write nothing: the histograms (by their nonzero class columns, bench.sparse_histograms) and the
qualitative maps of the first `report.qualitative` images travel
back to the driver in the result batches (columns `qualitative_name`, `qualitative_data`: an .npz record on
the first row of each (image, forward setting), b"" elsewhere), and the driver writes them into the run's
storage (a bench.storage Location: local folder or object store). A worker's node needs no access to it."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from tqdm import tqdm

from bench.config import SweepConfig
from bench.data import build_dataset
from bench.env import auto_num_actors, init_ray, settle_execution
from bench.evaluate import evaluate_batch, group_request
from bench.faults import TraceFault, maybe_exit, trace_fault
from bench.models import load_backbone
from bench.plan import ForwardGroup
from bench.sparse_histograms import CLASSES, COUNTS, encode, stack_rows, widen
from bench.storage import Location, scratch_dir
from methods import METHODS

QUALITATIVE_COLUMNS = ("qualitative_name", "qualitative_data")
# The driver gathers result batches into one shard until it holds SHARD_IMAGES images or a batch arrives
# SHARD_SECONDS after the last shard: a shard per batch costs more than the batch at ray.batch_size=1 on a cluster,
# and a driver killed outright loses only the images that arrived within SHARD_SECONDS of its last shard (traced
# again on resume); an error or Ctrl-C loses none.
SHARD_IMAGES = 1024
SHARD_SECONDS = 1.0

log = logging.getLogger(__name__)


def load_worker(cfg: SweepConfig, fits: dict[str, bytes] | None, own_process: bool):
    """What every tracing worker (sweep, search, synthesis; a Ray Data actor or an object in the driver) holds:
    the dataset, and the method on the loaded backbone with its finished fits."""
    if own_process:  # an actor's process: one thread per CPU actor, warnings only
        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        logging.getLogger().setLevel(logging.WARNING)
    dataset = build_dataset(cfg.data)
    method = METHODS.get(cfg.method)(load_backbone(cfg.model.as_dict()))
    for key, blob in (fits or {}).items():
        method.load_fit(key, load_safetensors(blob))
    return dataset, method


class SweepWorker:
    """Ray Data actor: holds the backbone, the method and its finished fits; traces each image once per
    forward group."""

    def __init__(self, cfg: SweepConfig, groups: list[ForwardGroup], fits: dict[str, bytes],
                 qualitative: bool = False, own_process: bool = True, fault: TraceFault | None = None,
                 first_group: int = 0):
        self.dataset, self.method = load_worker(cfg, fits, own_process)
        self.groups = groups
        # the plan's index of groups[0]: a sweep over models traces one backbone's groups per pass, and shards
        # and qualitative records name groups by their index in the whole plan
        self.first_group = first_group
        self.resolution = int(cfg.model.resolution or 0)
        self.protocol = cfg.metric.protocol
        self.qualitative = qualitative
        self.qualitative_images = int(cfg.report.qualitative)
        self.requests = [group_request(self.method, g) for g in groups]
        self.fault = fault if own_process else None  # tests only (bench.faults); never exits the driver

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["index"]]
        maybe_exit(self.fault, indices)
        samples = [self.dataset[i] for i in indices]
        rows = {"index": [], "group": [], "trial": [], "hist": [], "passes": [], "ties": [],
                "qualitative_name": [], "qualitative_data": []}
        for g, (group, req) in enumerate(zip(self.groups, self.requests), start=self.first_group):
            kept: dict[int, tuple[str, bytes]] = {}
            keep = self._qualitative_keeper(indices, g, group, kept)
            hists, passes = evaluate_batch(self.method, self.dataset, samples, group, req, self.resolution, keep,
                                          self.protocol, rows["ties"])
            per_image = passes // len(samples)
            for k, hist in enumerate(hists):
                first = k % len(group.trials) == 0
                name, data = kept.get(k // len(group.trials), ("", b"")) if first else ("", b"")
                rows["index"].append(indices[k // len(group.trials)])
                rows["group"].append(g)
                rows["trial"].append(group.trials[k % len(group.trials)].trial_id)
                rows["hist"].append(hist)
                rows["passes"].append(per_image if first else 0)
                rows["qualitative_name"].append(name)
                rows["qualitative_data"].append(data)
        payload = np.empty(len(rows["qualitative_data"]), dtype=object)
        payload[:] = rows["qualitative_data"]
        return {"index": np.array(rows["index"], dtype=np.int64), "group": np.array(rows["group"], dtype=np.int64),
                "trial": np.array(rows["trial"]), **encode(np.stack(rows["hist"])),
                "passes": np.array(rows["passes"], dtype=np.int64),
                "ties": np.array(rows["ties"], dtype=np.int64).reshape(-1, 2),
                "qualitative_name": np.array(rows["qualitative_name"], dtype=str), "qualitative_data": payload}

    def _qualitative_keeper(self, indices: list[int], g: int, group: ForwardGroup, kept: dict):
        """Keeps the maps of the first `report.qualitative` images for the report's qualitative figure, as
        (file name, .npz bytes) by the image's position in the batch; the driver writes them."""
        if not self.qualitative or min(indices) >= self.qualitative_images:
            return None
        # imported only where a figure is kept: the reporting package (pandas, scipy) is not an actor's concern
        from bench.reporting.qualitative import qualitative_arrays, qualitative_bytes

        def keep(k, sample, query, prompt, predictions):
            if indices[k] < self.qualitative_images:
                name, arrays = qualitative_arrays(sample, self.dataset.classes, [t.trial_id for t in group.trials],
                                                  predictions, query.ids, group.seed, group=g, prompt=prompt)
                kept[k] = (name, qualitative_bytes(arrays))

        return keep


def settle_pool(cfg: SweepConfig, num_images: int, fits: bool = False) -> SweepConfig:
    """Where the images are traced (`ray.execution`, auto resolved) and by how many actors; Ray is started where
    an actor pool or fits need it. Returns the config the stages run on: `cfg` with both settled, a derived copy
    (the input stays as given; the run records the decision in its Resolved record)."""
    use_gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    execution, num_actors = settle_execution(cfg.ray, num_images, use_gpu)
    if execution == "actors" or fits:  # tracing in this process without fits needs no Ray
        init_ray(cfg.ray.address, cfg.ray.object_store_mb, cfg.ray.quiet)
    if num_actors == "auto":
        num_actors = auto_num_actors(num_images, use_gpu)
    log.info("ray.execution=%s: %s", execution, "tracing in this process" if execution == "driver"
             else f"{num_actors} tracing actors")
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, execution=execution, num_actors=num_actors))


def sharded(shards: Location | Path) -> tuple[set[int], int]:
    """The images the shards hold and the number of shards (the next shard's index): what a resume skips."""
    shards = Location.of(shards)
    done: set[int] = set()
    names = shards.names("shard-*.npz")
    for name in names:
        with np.load(io.BytesIO((shards / name).read_bytes()), allow_pickle=False) as shard:
            done.update(int(i) for i in shard["index"])
    return done, len(names)


def trace_images(cfg: SweepConfig, worker: type, kwargs: dict, num_images: int, shards: Location | Path,
                 label: str, qualitative_dir: Location | Path | None = None, keep=None, local=None,
                 done_word: str = "scored") -> None:
    """The trace stage for any worker (sweeps: SweepWorker; synthesis and search bring theirs): the images no
    shard holds yet go through `worker` on the Ray Data actor pool (ray.execution=actors) or in this process
    (driver: `local`, or `worker(**kwargs, own_process=False)`); each result batch is absorbed by the driver
    into the run's storage. `keep(batch)`, where given, writes the columns the driver keeps elsewhere (and
    pops them) before the batch becomes a shard."""
    shards = Location.of(shards)
    qualitative_dir = Location.of(qualitative_dir) if qualitative_dir is not None else None
    done, next_shard = sharded(shards)
    todo = [i for i in range(num_images) if i not in done]
    if done:
        log.info("resuming: %d of %d images already %s", len(done), num_images, done_word)
    if not todo:
        return
    if cfg.ray.execution == "driver":
        batches = _local_batches(local if local is not None else worker(**kwargs, own_process=False), todo,
                                 int(cfg.ray.batch_size))
    else:
        batches = _ray_batches(cfg, worker, kwargs, todo)
    absorb(batches, shards, qualitative_dir, done, next_shard, num_images, label, keep)


def trace_and_score(cfg: SweepConfig, groups: list[ForwardGroup], num_images: int, shards: Location | Path,
                    fits: dict[str, bytes], qualitative_dir: Location | Path | None, first_group: int = 0) -> None:
    """A sweep's trace stage: every configuration of each forward group scored on its trace, per-image
    histograms sharded into the run's storage, the qualitative records the workers send back written. `groups`
    are one backbone's (cfg.model's), the plan's groups from index `first_group` on."""
    shards = Location.of(shards)
    fault_dir = shards.parent.local if shards.is_local else scratch_dir("fault", shards.uri)
    kwargs = {"cfg": cfg, "groups": groups, "fits": fits, "qualitative": qualitative_dir is not None,
              "fault": trace_fault(fault_dir), "first_group": first_group}
    trace_images(cfg, SweepWorker, kwargs, num_images, shards, f"{cfg.name} images", qualitative_dir)


def absorb(batches, shards: Location, qualitative_dir: Location | None, done: set, next_shard: int,
           num_images: int, label: str, keep=None) -> None:
    """The driver's share of the trace stage, per result batch: drop images already sharded, write the
    qualitative records and what `keep` writes, gather the batch into the next shard, advance the bar; a shard
    is written (last: a shard means its images' files are complete) every SHARD_IMAGES images or SHARD_SECONDS,
    at the end and when the stage stops on an error or Ctrl-C (what bench.perf_driver measures)."""
    seen = np.zeros(num_images, dtype=bool)  # a mask, not a set: the check per batch costs the batch, not the run
    seen[np.fromiter(done, dtype=np.int64, count=len(done))] = True
    pending: list[dict] = []
    held = 0  # images in `pending`
    written = -np.inf  # when the last shard was written: the first batch is a shard at once

    def flush() -> None:
        nonlocal next_shard, held, written
        if not pending:
            return
        parts = widen(pending) if CLASSES in pending[0] else list(pending)
        pending.clear()
        held = 0
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        (shards / f"shard-{next_shard:05d}.npz").write_bytes(buffer.getvalue())  # whole or not at all
        next_shard += 1
        written = time.monotonic()

    with tqdm(total=num_images, initial=len(done), desc=label, unit="img", dynamic_ncols=True) as bar:
        try:
            for batch in batches:
                # a batch re-executed after a worker died (or a lost node's block rebuilt) may repeat images that
                # are already sharded: each image is written once
                fresh = ~seen[batch["index"]]
                if not fresh.all():
                    if not fresh.any():
                        continue
                    batch = {k: v[fresh] for k, v in batch.items()}
                seen[batch["index"]] = True
                names_sent = batch.pop("qualitative_name", None)
                data_sent = batch.pop("qualitative_data", None)
                if qualitative_dir is not None and names_sent is not None:
                    for k in np.flatnonzero(names_sent.astype(str) != ""):
                        (qualitative_dir / str(names_sent[k])).write_bytes(bytes(data_sent[k]))
                if keep is not None:
                    keep(batch)
                for key, column in batch.items():
                    if column.dtype == object:  # Ray Data hands strings back as object arrays (they need pickle),
                        # and rows of different widths as arrays of arrays
                        batch[key] = stack_rows(column, -1 if key == CLASSES else 0) if key in (CLASSES, COUNTS) \
                            else column.astype(str)
                pending.append(batch)
                images = len(np.unique(batch["index"]))
                held += images
                if held >= SHARD_IMAGES or time.monotonic() - written >= SHARD_SECONDS:
                    flush()
                bar.update(images)
        finally:  # the images gathered so far are complete: kept when the stage stops early
            flush()


def _ray_batches(cfg: SweepConfig, worker: type, kwargs: dict, todo: list[int]):
    """Result batches of the Ray Data actor pool (ray.num_actors actors, one GPU each where there are GPUs)."""
    import ray  # here: a run traced in the driver never imports it

    use_gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=max(1, len(todo)))
    retries = int(cfg.ray.max_retries)
    with warnings.catch_warnings():
        # A dead actor (crash, OOM kill, lost node) is restarted and its batch retried `ray.max_retries` times,
        # then the run fails (finished shards are kept); Ray only offers these through ray_remote_args.
        warnings.simplefilter("ignore")
        ds = ds.map_batches(PoolWorker, fn_constructor_args=(worker, kwargs), batch_size=int(cfg.ray.batch_size),
                            compute=ray.data.ActorPoolStrategy(size=int(cfg.ray.num_actors)),
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                            max_restarts=retries, max_task_retries=retries)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


class PoolWorker:
    """The Ray Data actor around a trace worker: builds `worker(**kwargs)` and hands it each batch. What the
    worker raises comes back to the driver as itself (RayTaskError.cause; bench.run.root_cause), where a
    map call raised it: an exception of the actor's constructor reaches the driver only as text inside
    ActorDiedError (Ray 2.60), so one raised while building the worker (a model that fails to load on this
    node) is raised by the first batch instead."""

    def __init__(self, worker: type, kwargs: dict):
        self.worker, self.failed = None, None
        try:
            self.worker = worker(**kwargs)
        except Exception as err:  # noqa: BLE001 (raised again, unchanged, by the first batch)
            self.failed = err

    def __call__(self, batch: dict) -> dict:
        if self.failed is not None:
            raise self.failed
        return self.worker(batch)


def _local_batches(worker, todo: list[int], size: int):
    """ray.execution=driver: the worker in this process (small local runs, debuggers): no Ray, no actor
    start-up, the model loaded once here."""
    for start in range(0, len(todo), size):
        yield worker({"index": np.array(todo[start:start + size], dtype=np.int64)})


def load_shards(shards: Location | Path) -> dict[str, np.ndarray]:
    shards = Location.of(shards)
    parts = []
    for name in shards.names("shard-*.npz"):
        with np.load(io.BytesIO((shards / name).read_bytes()), allow_pickle=False) as shard:
            part = {k: shard[k] for k in shard.files}
        if "ties" not in part:  # written before tie counts existed (a run resumed across versions): none counted
            part["ties"] = np.zeros((len(part["index"]), 2), dtype=np.int64)
        parts.append(part)
    if any(CLASSES in p for p in parts):  # dense shards of a run resumed across versions are encoded alike
        parts = widen([{**{k: v for k, v in p.items() if k != "hist"}, **encode(p["hist"])} if "hist" in p else p
                       for p in parts])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
