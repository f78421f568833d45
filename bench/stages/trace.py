"""The trace stage: every image traced once per forward setting on a Ray Data actor pool; each forward
group's configurations scored on that trace; per-image histograms sharded to `<work>/shards/` as batches
finish (a resumed run re-traces only the images no shard holds).

Workers write nothing: the histograms and the qualitative maps of the first `report.qualitative` images travel
back to the driver in the result batches (columns `qualitative_name`, `qualitative_data`: an .npz record on
the first row of each (image, forward setting), b"" elsewhere), and the driver writes them into the run's
storage (a bench.storage Location: local folder or object store). A worker's node needs no access to it."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from tqdm import tqdm

from bench.config import SweepConfig
from bench.data import build_dataset
from bench.evaluate import evaluate_batch, group_request
from bench.faults import TraceFault, maybe_exit, trace_fault
from bench.models import load_backbone
from bench.plan import ForwardGroup
from bench.storage import Location, scratch_dir
from methods import METHODS

QUALITATIVE_COLUMNS = ("qualitative_name", "qualitative_data")

log = logging.getLogger(__name__)


class SweepWorker:
    """Ray Data actor: holds the backbone, the method and its finished fits; traces each image once per
    forward group."""

    def __init__(self, cfg: SweepConfig, groups: list[ForwardGroup], fits: dict[str, bytes],
                 qualitative: bool = False, own_process: bool = True, fault: TraceFault | None = None):
        if own_process:  # an actor's process: one thread per CPU actor, warnings only
            if not torch.cuda.is_available():
                torch.set_num_threads(1)
            logging.getLogger().setLevel(logging.WARNING)
        self.dataset = build_dataset(cfg.data)
        self.method = METHODS.get(cfg.method)(load_backbone(cfg.model.as_dict()))
        for key, blob in fits.items():
            self.method.load_fit(key, load_safetensors(blob))
        self.groups = groups
        self.resolution = int(cfg.model.resolution or 0)
        self.protocol = cfg.metric.protocol
        self.qualitative = qualitative
        self.qualitative_images = int(cfg.report.qualitative)
        self.requests = [group_request(self.method, g) for g in groups]
        self.fault = fault  # tests only (bench.faults)

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["index"]]
        maybe_exit(self.fault, indices)
        samples = [self.dataset[i] for i in indices]
        rows = {"index": [], "group": [], "trial": [], "hist": [], "passes": [], "ties": [],
                "qualitative_name": [], "qualitative_data": []}
        for g, (group, req) in enumerate(zip(self.groups, self.requests)):
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
                "trial": np.array(rows["trial"]), "hist": np.stack(rows["hist"]),
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


def trace_and_score(cfg: SweepConfig, groups: list[ForwardGroup], num_images: int, shards: Location | Path,
                    fits: dict[str, bytes], qualitative_dir: Location | Path | None) -> None:
    """Stream the images that no shard holds yet through the actor pool; shard results into the run's storage
    and write the qualitative records the workers send back."""
    shards = Location.of(shards)
    qualitative_dir = Location.of(qualitative_dir) if qualitative_dir is not None else None
    done = set()
    names = shards.names("shard-*.npz")
    for name in names:
        with np.load(io.BytesIO((shards / name).read_bytes()), allow_pickle=False) as shard:
            done.update(int(i) for i in shard["index"])
    todo = [i for i in range(num_images) if i not in done]
    if done:
        log.info("resuming: %d of %d images already scored", len(done), num_images)
    if not todo:
        return
    fault_dir = shards.parent.local if shards.is_local else scratch_dir("fault", shards.uri)
    kwargs = {"cfg": cfg, "groups": groups, "fits": fits, "qualitative": qualitative_dir is not None,
              "fault": trace_fault(fault_dir)}
    batches = _local_batches(todo, kwargs) if cfg.ray.execution == "driver" else _ray_batches(todo, kwargs)
    absorb(batches, shards, qualitative_dir, done, len(names), num_images, f"{cfg.name} images")


def absorb(batches, shards: Location, qualitative_dir: Location | None, done: set, next_shard: int,
           num_images: int, label: str) -> None:
    """The driver's share of the trace stage, per result batch: drop images already sharded, write the
    qualitative records, write the batch as one shard, advance the bar (what bench.perf_driver measures)."""
    seen = np.zeros(num_images, dtype=bool)  # a mask, not a set: the check per batch costs the batch, not the run
    seen[np.fromiter(done, dtype=np.int64, count=len(done))] = True
    with tqdm(total=num_images, initial=len(done), desc=label, unit="img", dynamic_ncols=True) as bar:
        for batch in batches:
            # a batch re-executed after a worker died (or a lost node's block rebuilt) may repeat images that
            # are already sharded: each image is written once
            fresh = ~seen[batch["index"]]
            if not fresh.any():
                continue
            batch = {k: v[fresh] for k, v in batch.items()}
            seen[batch["index"]] = True
            names_sent = batch.pop("qualitative_name", np.array([], dtype=str))
            data_sent = batch.pop("qualitative_data", np.array([], dtype=object))
            if qualitative_dir is not None:
                for name, data in zip(names_sent, data_sent):
                    if name:
                        (qualitative_dir / str(name)).write_bytes(bytes(data))
            batch["trial"] = batch["trial"].astype(str)  # object arrays would need pickle
            buffer = io.BytesIO()
            np.savez(buffer, **batch)
            (shards / f"shard-{next_shard:05d}.npz").write_bytes(buffer.getvalue())  # whole or not at all
            next_shard += 1
            bar.update(len(np.unique(batch["index"])))


def _ray_batches(todo: list[int], kwargs: dict):
    """Result batches of the Ray Data actor pool (ray.num_actors actors, one GPU each where there are GPUs)."""
    import ray  # here: a run traced in the driver never imports it

    cfg = kwargs["cfg"]
    use_gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=max(1, len(todo)))
    retries = int(cfg.ray.max_retries)
    with warnings.catch_warnings():
        # A dead actor (crash, OOM kill, lost node) is restarted and its batch retried `ray.max_retries` times,
        # then the run fails (finished shards are kept); Ray only offers these through ray_remote_args.
        warnings.simplefilter("ignore")
        ds = ds.map_batches(SweepWorker, fn_constructor_kwargs=kwargs, batch_size=int(cfg.ray.batch_size),
                            compute=ray.data.ActorPoolStrategy(size=int(cfg.ray.num_actors)),
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                            max_restarts=retries, max_task_retries=retries)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _local_batches(todo: list[int], kwargs: dict):
    """ray.execution=driver: the same worker in this process (small local runs, debuggers): no Ray, no actor
    start-up, the model loaded once here."""
    worker = SweepWorker(**{**kwargs, "fault": None}, own_process=False)  # never exit the driver
    size = int(kwargs["cfg"].ray.batch_size)
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
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
