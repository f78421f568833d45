"""The trace stage: every image traced once per forward setting on a Ray Data actor pool; each forward
group's configurations scored on that trace; per-image histograms sharded to `<work>/shards/` as batches
finish (a resumed run re-traces only the images no shard holds)."""

from __future__ import annotations

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
from methods import METHODS

log = logging.getLogger(__name__)


class SweepWorker:
    """Ray Data actor: holds the backbone, the method and its finished fits; traces each image once per
    forward group."""

    def __init__(self, cfg: SweepConfig, groups: list[ForwardGroup], fits: dict[str, bytes],
                 qualitative_dir: str | None = None, own_process: bool = True, fault: TraceFault | None = None):
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
        self.qualitative_dir = Path(qualitative_dir) if qualitative_dir else None
        self.qualitative_images = int(cfg.report.qualitative)
        self.requests = [group_request(self.method, g) for g in groups]
        self.fault = fault  # tests only (bench.faults)

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["index"]]
        maybe_exit(self.fault, indices)
        samples = [self.dataset[i] for i in indices]
        rows = {"index": [], "group": [], "trial": [], "hist": [], "passes": [], "ties": []}
        for g, (group, req) in enumerate(zip(self.groups, self.requests)):
            keep = self._qualitative_saver(indices, g, group)
            hists, passes = evaluate_batch(self.method, self.dataset, samples, group, req, self.resolution, keep,
                                          self.protocol, rows["ties"])
            per_image = passes // len(samples)
            for k, hist in enumerate(hists):
                rows["index"].append(indices[k // len(group.trials)])
                rows["group"].append(g)
                rows["trial"].append(group.trials[k % len(group.trials)].trial_id)
                rows["hist"].append(hist)
                rows["passes"].append(per_image if k % len(group.trials) == 0 else 0)
        return {"index": np.array(rows["index"], dtype=np.int64), "group": np.array(rows["group"], dtype=np.int64),
                "trial": np.array(rows["trial"]), "hist": np.stack(rows["hist"]),
                "passes": np.array(rows["passes"], dtype=np.int64),
                "ties": np.array(rows["ties"], dtype=np.int64).reshape(-1, 2)}

    def _qualitative_saver(self, indices: list[int], g: int, group: ForwardGroup):
        """Keeps the maps of the first `report.qualitative` images for the report's qualitative figure."""
        if self.qualitative_dir is None or min(indices) >= self.qualitative_images:
            return None
        if not self.qualitative_dir.parent.is_dir():  # the driver removed the run: never re-create it
            return None
        # imported only where a figure is kept: the reporting package (pandas, scipy) is not an actor's concern
        from bench.reporting.qualitative import save_qualitative

        def keep(k, sample, query, prompt, predictions):
            if indices[k] < self.qualitative_images:
                save_qualitative(self.qualitative_dir, sample, self.dataset.classes,
                                 [t.trial_id for t in group.trials], predictions, query.ids, group.seed,
                                 group=g, prompt=prompt)

        return keep


def trace_and_score(cfg: SweepConfig, groups: list[ForwardGroup], num_images: int, shards: Path,
                    fits: dict[str, bytes], qualitative_dir: Path | None) -> None:
    """Stream the images that no shard holds yet through the actor pool; shard results to disk."""
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
    if qualitative_dir is not None:
        qualitative_dir.mkdir(exist_ok=True)  # here, so that workers only ever write into existing folders
    kwargs = {"cfg": cfg, "groups": groups, "fits": fits,
              "qualitative_dir": str(qualitative_dir.resolve()) if qualitative_dir else None,
              "fault": trace_fault(shards.parent)}
    batches = _local_batches(todo, kwargs) if cfg.ray.execution == "driver" else _ray_batches(todo, kwargs)
    next_shard = len(list(shards.glob("shard-*.npz")))
    with tqdm(total=num_images, initial=len(done), desc=f"{cfg.name} images", unit="img",
              dynamic_ncols=True) as bar:
        for batch in batches:
            # a batch re-executed after a worker died (or a lost node's block rebuilt) may repeat images that
            # are already sharded: each image is written once
            fresh = ~np.isin(batch["index"], np.fromiter(done, dtype=np.int64, count=len(done)))
            if not fresh.any():
                continue
            batch = {k: v[fresh] for k, v in batch.items()}
            done.update(int(i) for i in batch["index"])
            tmp = shards / f".shard-{next_shard:05d}.npz"
            batch["trial"] = batch["trial"].astype(str)  # object arrays would need pickle
            with open(tmp, "wb") as fh:
                np.savez(fh, **batch)
            tmp.rename(shards / f"shard-{next_shard:05d}.npz")
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


def load_shards(shards: Path) -> dict[str, np.ndarray]:
    parts = []
    for path in sorted(shards.glob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as shard:
            part = {k: shard[k] for k in shard.files}
        if "ties" not in part:  # written before tie counts existed (a run resumed across versions): none counted
            part["ties"] = np.zeros((len(part["index"]), 2), dtype=np.int64)
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
