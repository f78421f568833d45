"""The synthesis stage (FreeGen datasets): what `python -m bench.synthesize` runs inside a claimed folder.

The configuration's fit, where it needs one (FreeGen's learned ASR and EGD), comes from the fit stage
(bench.stages.fit: Ray Train, `<out>/fit/<hash>/`, reused by a resumed synthesis); the images come from the
trace stage (bench.stages.trace: the actor pool or this process, one shard per finished batch, resume): each
worker generates a batch of prompts (mode=generation, guided DDIM), annotates each image with the method's
pseudo-mask and scores it by its Temporal Fluctuation Factor, and sends image, mask and record back to the
driver, which writes them into the folder's storage (a bench.storage Location: a local folder or an object
store) before the batch's shard. The finished folder is a PASCAL VOC layout:

    JPEGImages/<id>.jpg            the generated images
    SegmentationClass/<id>.png     palette PNGs, palette index = class id, 255 = ignore
    ImageSets/Segmentation/train.txt   the kept samples (TFF <= tff_threshold, or all with tff=false)
    ImageSets/Segmentation/all.txt     every synthesised sample; filtered.txt: the dropped ones
    dataset.json                   the card: prompts, seeds, model, counts, TFF per sample, what was filtered,
                                   the fit, and the pseudo-masks' mIoU against exact ground truth where the
                                   dataset has it
    samples.png                    the first samples with their masks (filtered ones marked red)
    fit/<hash>/                    the configuration's fit (weights, train_config.json, loss.csv), if it has one
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from bench.config import SweepConfig
from bench.data import build_dataset, generation_gt
from bench.data.base import IGNORE_INDEX
from bench.errors import BenchError
from bench.metrics import image_histograms, summarize
from bench.resolved import Resolved
from bench.rundir import WORK, Claim
from bench.stages.trace import load_shards, load_worker, settle_pool, trace_images
from bench.storage import Location
from methods import METHODS

log = logging.getLogger(__name__)
CARD = "dataset.json"
JPEG_QUALITY = 95
SAMPLE_GRID = 8  # samples shown in samples.png
IMAGE_COLUMNS = ("image", "label")  # written by the driver into the folder, not into the shards


def voc_palette(num_colours: int = 256) -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved class ids), flattened for PIL's putpalette."""
    palette = []
    for index in range(num_colours):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def synthesis_params(cfg: SweepConfig):
    """The one configuration a synthesis runs, checked before anything is written."""
    method = METHODS.get(cfg.method)
    if not method.synthesises():
        synthesisers = [n for n in METHODS.names() if METHODS.get(n).synthesises()]
        raise BenchError(f"method {cfg.method} does not synthesise datasets; use method={' | '.join(synthesisers)}")
    if cfg.swept:
        raise BenchError(f"a synthesis runs one configuration; move sweep.{next(iter(cfg.swept))} to params "
                         f"(one value) or run one synthesis per value")
    if cfg.models:
        raise BenchError("a synthesis runs on one backbone; drop models= and give model.path= (or model=embedded)")
    params = method.resolve(cfg.params)
    if params["mode"] != "generation":
        raise BenchError("a synthesis generates its images: use params.mode=generation")
    return params


def drop_ignored_fit(cfg: SweepConfig, plan):
    """The plan, where its configuration ignores its fit (FreeGen's rectify=false reads no ASR) without one:
    a derived plan that fits nothing."""
    method = METHODS.get(cfg.method)()
    trial = plan.trials[0]
    if trial.train is None or method.uses_fit(trial.params):
        return plan
    alone = dataclasses.replace(trial, train=None)
    groups = [dataclasses.replace(g, trials=[alone if t is trial else t for t in g.trials]) for g in plan.groups]
    return dataclasses.replace(plan, trials=[alone, *plan.trials[1:]], groups=groups, fits=[])


class SynthesisWorker:
    """The synthesis's tracing worker (a Ray Data actor, or an object in this process): backbone, method and
    fit loaded once; generates and annotates a batch of prompts."""

    def __init__(self, cfg: SweepConfig, fits: dict[str, bytes] | None = None, own_process: bool = True):
        self.cfg = cfg
        self.dataset, self.method = load_worker(cfg, fits, own_process)
        self.params = self.method.resolve(cfg.params)
        self.request = self.method.trace_request(self.params)
        self.has_gt = generation_gt(self.dataset) == "replay"

    def __call__(self, batch: dict) -> dict:
        from bench.evaluate import trace_samples

        indices = [int(i) for i in batch["index"]]
        samples = [self.dataset[i] for i in indices]
        traced = trace_samples(self.method, self.dataset, samples, self.params, int(self.cfg.seeds[0]),
                               self.request, int(self.cfg.model.resolution or 0))
        images, labels, tffs, hists = [], [], [], []
        for sample, query, trace in zip(samples, traced.queries, traced.traces):
            image = np.asarray(trace.image, dtype=np.uint8)
            mask = self.method.synthetic_mask(trace, query, self.params, image.shape[:2])
            images.append(image)
            labels.append(mask.label)
            tffs.append(mask.tff)
            hists.append(pseudo_mask_histogram(mask.label, sample.label, len(self.dataset.classes))
                         if self.has_gt else np.zeros((8, len(self.dataset.classes))))
        return {"index": np.array(indices, dtype=np.int64), "image": np.stack(images), "label": np.stack(labels),
                "tff": np.array(tffs, dtype=np.float64), "hist": np.stack(hists),
                "ignored": np.array([float((label == IGNORE_INDEX).mean()) for label in labels]),
                "prompt": np.array([s.caption for s in samples], dtype=str),
                "seed": np.array([int(s.extra.get("seed", i)) for s, i in zip(samples, indices)], dtype=np.int64),
                "passes": np.full(len(indices), traced.image_passes // max(len(indices), 1), dtype=np.int64)}


def pseudo_mask_histogram(pseudo: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Histograms of a pseudo-mask against exact ground truth, over the pixels it does not ignore (what a
    segmenter trained on it learns from)."""
    truth = truth.copy()
    truth[pseudo == IGNORE_INDEX] = IGNORE_INDEX
    return image_histograms(pseudo, truth, num_classes)


def image_id(cfg: SweepConfig, index: int) -> str:
    return f"{cfg.name}-{index:06d}"


def write_images(folder: Location, cfg: SweepConfig, batch: dict) -> None:
    """The images and masks of one finished batch into the folder's storage (each file whole); the columns are
    popped, so that the batch's shard holds the records only."""
    palette = voc_palette()
    images, labels = (batch.pop(c) for c in IMAGE_COLUMNS)
    for k, index in enumerate(batch["index"]):
        name = image_id(cfg, int(index))
        buffer = io.BytesIO()
        Image.fromarray(images[k]).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (folder / "JPEGImages" / f"{name}.jpg").write_bytes(buffer.getvalue())
        mask = Image.fromarray(labels[k].astype(np.uint8), mode="P")
        mask.putpalette(palette)
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        (folder / "SegmentationClass" / f"{name}.png").write_bytes(buffer.getvalue())


def read_records(cfg: SweepConfig, shards: Location) -> list[dict]:
    """One record per synthesised image from the shards, by index."""
    if not shards.names("shard-*.npz"):
        return []
    data = load_shards(shards)
    records = [{"index": int(i), "id": image_id(cfg, int(i)), "prompt": str(data["prompt"][k]),
                "seed": int(data["seed"][k]), "tff": float(data["tff"][k]), "ignored": float(data["ignored"][k]),
                "hist": np.asarray(data["hist"][k]), "unet_passes": int(data["passes"][k])}
               for k, i in enumerate(data["index"])]
    return sorted(records, key=lambda r: r["index"])


def sample_grid(folder: Location, ids: list[str], card: dict | None = None, cell: int = 128) -> Location:
    """samples.png: each sample's image above its mask (VOC colours, ignore white), a red bar under filtered
    samples; `cell` pixels per tile."""
    folder = Location.of(folder)
    kept = set((card or {}).get("kept_ids", ids))
    grid = Image.new("RGB", (cell * len(ids), 2 * cell + 6), (255, 255, 255))
    for k, name in enumerate(ids):
        image = Image.open(io.BytesIO((folder / "JPEGImages" / f"{name}.jpg").read_bytes())).convert("RGB")
        mask = Image.open(io.BytesIO((folder / "SegmentationClass" / f"{name}.png").read_bytes())).convert("RGB")
        grid.paste(image.resize((cell, cell), Image.NEAREST), (k * cell, 0))
        grid.paste(mask.resize((cell, cell), Image.NEAREST), (k * cell, cell))
        if name not in kept:
            grid.paste((220, 40, 40), (k * cell, 2 * cell, (k + 1) * cell, 2 * cell + 6))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    (folder / "samples.png").write_bytes(buffer.getvalue())
    return folder / "samples.png"


def synthesize_into(cfg: SweepConfig, resolved: Resolved, plan, held: Claim) -> tuple[str, Resolved]:
    """A synthesis in its claimed folder: the fit (fit stage), the images (trace stage), then the splits, the
    card and the sample grid; returns the time it finished and the run's Resolved record, its pool settled."""
    folder = held.work
    params = METHODS.get(cfg.method).resolve(cfg.params)
    dataset = plan.dataset if plan.dataset is not None else build_dataset(cfg.data)
    cfg = settle_pool(cfg, len(dataset), fits=bool(plan.fits))  # ray.execution / num_actors settled
    fits, fit_dir = {}, None
    if plan.fits:
        from bench.stages.fit import load_fits, run_fits

        stats, finished = run_fits(cfg, plan, folder)
        fits, fit_dir = load_fits(finished), next(iter(stats.dirs.values()))
    shards = folder / WORK / "shards"
    before = len(read_records(cfg, shards))
    finished_at: list[tuple[float, int]] = []  # (time, images) per batch: steady-state throughput

    def keep(batch: dict) -> None:
        write_images(folder, cfg, batch)
        finished_at.append((time.time(), len(batch["index"])))

    started = time.time()
    trace_images(cfg, SynthesisWorker, {"cfg": cfg, "fits": fits}, len(dataset), shards, f"{cfg.name} synthesis",
                 keep=keep, done_word="synthesised")
    seconds = time.time() - started
    records = read_records(cfg, shards)
    held.finish_invocation(seconds, len(records) - before)
    card = dataset_card(cfg, params, dataset, records, seconds, len(records) - before, fit_dir)
    if len(finished_at) > 2:  # after the first batch: without start-up (Ray, model load, warm-up)
        images = sum(n for _, n in finished_at[1:])
        card["throughput"]["steady_images_per_second"] = round(images / (finished_at[-1][0] - finished_at[0][0]), 4)
    splits = folder / "ImageSets" / "Segmentation"
    kept = set(card["kept_ids"])
    (splits / "train.txt").write_text("".join(f"{r['id']}\n" for r in records if r["id"] in kept))
    (splits / "all.txt").write_text("".join(f"{r['id']}\n" for r in records))
    (splits / "filtered.txt").write_text("".join(f"{i}\n" for i in card["filtered_ids"]))
    (folder / CARD).write_bytes(json.dumps(card, indent=1).encode())
    if records:
        sample_grid(folder, [r["id"] for r in records[:SAMPLE_GRID]], card)
    return card["created"], resolved.with_pool(cfg.ray.execution, cfg.ray.num_actors)


def dataset_card(cfg: SweepConfig, params, dataset, records: list[dict], seconds: float, generated: int,
                 fit_dir: str | None = None) -> dict:
    """dataset.json: what was generated from what, how it was filtered and how good the masks are."""
    threshold = float(params["tff_threshold"])
    filtered = [r for r in records if params["tff"] and r["tff"] > threshold]
    dropped = {r["id"] for r in filtered}
    kept = [r for r in records if r["id"] not in dropped]
    classes = list(dataset.classes)
    quality = {}
    per_image = {}
    if generation_gt(dataset) == "replay":
        from scipy.stats import spearmanr

        per_image = {r["id"]: summarize(np.asarray(r["hist"]), classes)["mIoU"] for r in records}
        if len(records) > 2:
            rho = spearmanr([r["tff"] for r in records], [per_image[r["id"]] for r in records])
            quality["tff_vs_mIoU_spearman"] = {"rho": round(float(rho.statistic), 3),
                                               "p": round(float(rho.pvalue), 4),
                                               "note": "Eq. 4's premise: a high TFF marks a worse mask (rho < 0)"}
        for name, subset in (("all", records), ("kept", kept), ("filtered", filtered)):
            if subset:
                hist = np.sum([np.asarray(r["hist"]) for r in subset], axis=0)
                quality[name] = {"mIoU": round(summarize(hist, classes)["mIoU"], 2), "images": len(subset)}
        quality["note"] = ("pseudo-masks against the renderer's exact ground truth (replay), over the pixels "
                           "they do not ignore; metric protocol mmseg")
    return {
        "name": cfg.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.method, "method_version": METHODS.get(cfg.method).version, "params": params.as_dict(),
        "model": cfg.model.as_dict(), "data": cfg.data, "dataset": dataset.describe(), "seed": int(cfg.seeds[0]),
        "classes": classes, "layout": "PASCAL VOC (JPEGImages, SegmentationClass palette PNGs, 255 = ignore)",
        "fit": f"fit/{fit_dir}" if fit_dir else None,
        "counts": {"synthesised": len(records), "kept": len(kept), "filtered": len(filtered)},
        "filter": {"rule": f"TFF (FreeGen Eq. 4) > {threshold}" if params["tff"] else "none (tff=false)",
                   "tff_k": int(params["tff_k"])},
        "tff": {"mean": float(np.mean([r["tff"] for r in records])) if records else None,
                "quantiles": {q: float(np.quantile([r["tff"] for r in records], q / 100)) if records else None
                              for q in (10, 50, 90)}},
        "pseudo_mask_quality": quality,
        "ignored_pixels": float(np.mean([r["ignored"] for r in records])) if records else None,
        "throughput": {"images_generated_this_session": generated, "seconds": round(seconds, 3),
                       "images_per_second": round(generated / seconds, 4) if generated and seconds else None,
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "execution": cfg.ray.execution, "actors": cfg.ray.num_actors,
                       "batch_size": int(cfg.ray.batch_size)},
        "samples": [{k: r[k] for k in ("id", "prompt", "seed", "tff", "unet_passes")}
                    | {"kept": r["id"] not in dropped, "ignored": round(r["ignored"], 4)}
                    | ({"mIoU": round(per_image[r["id"]], 2)} if per_image else {}) for r in records],
        "kept_ids": [r["id"] for r in kept], "filtered_ids": [r["id"] for r in filtered],
        "overrides": cfg.overrides, "sweep_file": cfg.sweep_file,
    }
