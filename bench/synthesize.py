"""`python -m bench.synthesize SWEEP.yaml [key=value ...]`: synthesise an image-mask dataset (FreeGen).

The sweep names a synthesis method (`freegen`), a generation dataset for the prompts (`voc_sim`: class-name
templates; `coco_cap`: a caption list, `data.captions=`) and one configuration (`params`, no `sweep`).
Images are generated (mode=generation, guided DDIM) on a Ray Data actor pool (`ray.num_actors`, one GPU each
where there are GPUs; `ray.batch_size` prompts per UNet batch), or in this process where a local pool would hold
one actor (`ray.execution=auto|actors|driver`, as `bench.run`), each annotated by the method's pseudo-mask and
scored by its Temporal Fluctuation Factor. The result is a PASCAL VOC-layout folder that the `voc2012` loader
(and MMSegmentation's VOC dataset) read directly:

    JPEGImages/<id>.jpg            the generated images
    SegmentationClass/<id>.png     palette PNGs, palette index = class id, 255 = ignore
    ImageSets/Segmentation/train.txt   the kept samples (TFF <= tff_threshold, or all with tff=false)
    ImageSets/Segmentation/all.txt     every synthesised sample; filtered.txt: the dropped ones
    dataset.json                   the card: prompts, seeds, model, counts, TFF per sample, what was filtered,
                                   and the pseudo-masks' mIoU against exact ground truth where the dataset has it
    samples.png                    the first samples with their masks (filtered ones marked red)

A method configuration that needs a fit (FreeGen's learned ASR, `asr=learned`) is fitted first, in this
process, on the data's training split (`train.split`), and saved as `fit.safetensors` (+ `fit.json`, its
train setting and loss curve) in the dataset folder; the actors load it. A resumed synthesis reuses it.

It is written under `<out>.partial/` and renamed when complete; each finished batch is a shard, so the same
command with `output_dir=<out>` resumes an interrupted synthesis without regenerating finished images (a
changed configuration is refused). The last line on stdout is the dataset folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from bench.env import auto_num_actors, init_ray, quiet_environment, settle_execution

quiet_environment()  # before torch is imported below

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.config import SweepConfig, compose  # noqa: E402
from bench.data import build_dataset, generation_gt  # noqa: E402
from bench.data.base import IGNORE_INDEX  # noqa: E402
from bench.errors import BenchError, run_started  # noqa: E402
from bench.metrics import image_histograms, summarize  # noqa: E402
from bench.preflight import preflight  # noqa: E402
from bench.results import config_hash  # noqa: E402
from methods import METHODS  # noqa: E402

log = logging.getLogger("bench.synthesize")
SHARDS = ".shards"  # in <out>.partial/: one JSON record per finished batch (removed when complete)
STARTED = "started.json"
CARD = "dataset.json"
JPEG_QUALITY = 95
SAMPLE_GRID = 8  # samples shown in samples.png


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
    if cfg.sweep:
        raise BenchError(f"a synthesis runs one configuration; move sweep.{next(iter(cfg.sweep))} to params "
                         f"(one value) or run one synthesis per value")
    params = method.resolve(cfg.params)
    if params["mode"] != "generation":
        raise BenchError("a synthesis generates its images: use params.mode=generation")
    return params


class SynthesisWorker:
    """Ray Data actor (or an object in this process): backbone and method loaded once; generates and
    annotates a batch of prompts."""

    def __init__(self, cfg: SweepConfig, own_process: bool = True, fit: dict | None = None):
        if own_process and not torch.cuda.is_available():
            torch.set_num_threads(1)
        from bench.models import load_backbone

        self.cfg = cfg
        self.dataset = build_dataset(cfg.data)
        self.method = METHODS.get(cfg.method)(load_backbone(cfg.model.as_dict()))
        self.params = self.method.resolve(cfg.params)
        if fit is not None:
            self.method.load_fit(self.method.train_setting(self.params).key, fit)
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
                "passes": np.full(len(indices), traced.image_passes // max(len(indices), 1), dtype=np.int64)}


def pseudo_mask_histogram(pseudo: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Histograms of a pseudo-mask against exact ground truth, over the pixels it does not ignore (what a
    segmenter trained on it learns from)."""
    truth = truth.copy()
    truth[pseudo == IGNORE_INDEX] = IGNORE_INDEX
    return image_histograms(pseudo, truth, num_classes)


FIT, FIT_CARD = "fit.safetensors", "fit.json"


def fit_if_needed(cfg: SweepConfig, params, work: Path) -> dict | None:
    """The configuration's fit (None when it needs none): read from `work` when an earlier, interrupted run
    finished it, else fitted here on the training split and written (temporary name, then renamed)."""
    from safetensors.torch import load_file, save_file

    method_cls = METHODS.get(cfg.method)
    setting = method_cls().train_setting(params)
    # a method may ignore its fit in some configurations (FreeGen's rectify=false): no fit to wait for
    if setting is None or not method_cls().uses_fit(params):
        return None
    path = work / FIT
    if path.is_file():
        log.info("reusing the fit in %s", path)
        return load_file(str(path))
    from bench.config import train_data_config
    from bench.fitting import LocalFitContext
    from bench.models import load_backbone

    method = method_cls(load_backbone(cfg.model.as_dict()))
    train = build_dataset(train_data_config(cfg))
    log.info("fitting %s (%s) on %d training images", cfg.method, setting.key, len(train))
    ctx = LocalFitContext(setting, train, method.backbone, int(cfg.model.resolution or 0),
                          progress=lambda step, loss, series: log.info("fit step %d: loss %.4f", step, loss))
    started = time.time()
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.fit(ctx).items()}
    save_file(tensors, str(work / f".{FIT}"))
    (work / f".{FIT}").rename(path)
    (work / FIT_CARD).write_text(json.dumps({"setting": setting.as_dict(), "seconds": round(time.time() - started, 1),
                                             "loss": [[p.step, p.loss, p.series] for p in ctx.curve]}, indent=1, default=str))
    return tensors


def _batches(cfg: SweepConfig, todo: list[int], fit: dict | None = None):
    """Finished batches of `todo`: generated in this process (`ray.execution=driver`, which `auto` picks where
    a local pool would hold one actor, bench.env.resolve_execution: one GPU, or two CPU cores) or on a Ray Data
    actor pool. cfg.ray is resolved here, so the dataset card says what auto picked."""
    size = int(cfg.ray.batch_size)
    use_gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    if settle_execution(cfg.ray, len(todo), use_gpu) == "driver":
        worker = SynthesisWorker(cfg, own_process=False, fit=fit)
        for start in range(0, len(todo), size):
            yield worker({"index": np.array(todo[start:start + size], dtype=np.int64)})
        return
    import ray

    init_ray(cfg.ray.address, cfg.ray.object_store_mb, cfg.ray.quiet)
    if cfg.ray.num_actors == "auto":
        cfg.ray.num_actors = auto_num_actors(len(todo), use_gpu)
    blocks = max(1, -(-len(todo) // size))
    ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_restarts only through the deprecated ray_remote_args path
        ds = ds.map_batches(SynthesisWorker, fn_constructor_kwargs={"cfg": cfg, "fit": fit}, batch_size=size,
                            compute=ray.data.ActorPoolStrategy(size=int(cfg.ray.num_actors)),
                            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1, max_restarts=0)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _image_id(cfg: SweepConfig, dataset, index: int) -> str:
    return f"{cfg.name}-{index:06d}"


def write_batch(work: Path, cfg: SweepConfig, dataset, batch: dict, shard: int) -> None:
    """Images and masks of one finished batch, then its shard record (last, by rename: a record means its
    files are complete)."""
    palette = voc_palette()
    records = []
    for k, index in enumerate(batch["index"]):
        index = int(index)
        image_id = _image_id(cfg, dataset, index)
        sample = dataset[index]
        Image.fromarray(batch["image"][k]).save(work / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        mask = Image.fromarray(batch["label"][k].astype(np.uint8), mode="P")
        mask.putpalette(palette)
        mask.save(work / "SegmentationClass" / f"{image_id}.png")
        records.append({"index": index, "id": image_id, "prompt": sample.caption,
                        "seed": int(sample.extra.get("seed", index)), "tff": float(batch["tff"][k]),
                        "ignored": float((batch["label"][k] == IGNORE_INDEX).mean()),
                        "hist": np.asarray(batch["hist"][k]).tolist(), "unet_passes": int(batch["passes"][k])})
    tmp = work / SHARDS / f".shard-{shard:05d}.json"
    tmp.write_text(json.dumps(records))
    tmp.rename(work / SHARDS / f"shard-{shard:05d}.json")


def sample_grid(folder: Path, ids: list[str], card: dict | None = None, cell: int = 128) -> Path:
    """samples.png: each sample's image above its mask (VOC colours, ignore white), a red bar under filtered
    samples; `cell` pixels per tile."""
    kept = set((card or {}).get("kept_ids", ids))
    grid = Image.new("RGB", (cell * len(ids), 2 * cell + 6), (255, 255, 255))
    for k, image_id in enumerate(ids):
        image = Image.open(folder / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        mask = Image.open(folder / "SegmentationClass" / f"{image_id}.png").convert("RGB")
        grid.paste(image.resize((cell, cell), Image.NEAREST), (k * cell, 0))
        grid.paste(mask.resize((cell, cell), Image.NEAREST), (k * cell, cell))
        if image_id not in kept:
            grid.paste((220, 40, 40), (k * cell, 2 * cell, (k + 1) * cell, 2 * cell + 6))
    grid.save(folder / "samples.png")
    return folder / "samples.png"


def read_shards(work: Path) -> list[dict]:
    records = []
    for path in sorted((work / SHARDS).glob("shard-*.json")):
        records.extend(json.loads(path.read_text()))
    return sorted(records, key=lambda r: r["index"])


def _resume_hash(cfg: SweepConfig) -> str:
    data = {k: v for k, v in cfg.as_dict().items() if k not in ("overrides", "ray", "output_dir", "train", "fit",
                                                               "report")}
    return config_hash(data)


def synthesize(sweep_path: str, overrides: list[str]) -> Path:
    cfg = compose(sweep_path, overrides)  # nothing is written before this, synthesis_params and preflight pass
    params = synthesis_params(cfg)
    preflight(cfg)
    dataset = build_dataset(cfg.data)
    final = Path(cfg.output_dir) if cfg.output_dir else \
        Path("reports") / "synthetic" / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if final.exists():
        raise BenchError(f"dataset folder {final} already exists; choose another output_dir=")
    work = final.with_name(final.name + ".partial")
    started = work / SHARDS / STARTED
    if started.is_file():
        if json.loads(started.read_text()).get("hash") != _resume_hash(cfg):
            raise BenchError(f"the interrupted synthesis in {work} was started with another configuration; resume "
                             f"it with the same sweep and overrides, or choose another output_dir=")
        log.info("resuming the interrupted synthesis in %s", work)
    try:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", SHARDS):
            (work / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchError(f"cannot write {work}: {err.strerror}; choose a writable output_dir=") from None
    started.write_text(json.dumps({"hash": _resume_hash(cfg), "config": cfg.as_dict()}, default=str))
    run_started()  # the log lines held back while the input was checked (bench.errors)
    fit = fit_if_needed(cfg, params, work)
    done = {r["index"] for r in read_shards(work)}
    todo = [i for i in range(len(dataset)) if i not in done]
    shard = len(list((work / SHARDS).glob("shard-*.json")))
    t0 = time.time()
    finished_at: list[tuple[float, int]] = []  # (time, images) per batch: steady-state throughput
    try:
        with tqdm(total=len(dataset), initial=len(done), desc=f"{cfg.name} synthesis", unit="img",
                  dynamic_ncols=True) as bar:
            for batch in _batches(cfg, todo, fit) if todo else []:
                write_batch(work, cfg, dataset, batch, shard)
                finished_at.append((time.time(), len(batch["index"])))
                shard += 1
                bar.update(len(batch["index"]))
    except KeyboardInterrupt:
        log.error("interrupted; finished images are kept in %s; resume with: python -m bench.synthesize %s %s",
                  work, sweep_path, " ".join([*overrides, f"output_dir={final}"]))
        raise
    seconds = time.time() - t0
    records = read_shards(work)
    card = dataset_card(cfg, params, dataset, records, seconds, len(todo))
    if len(finished_at) > 2:  # after the first batch: without start-up (Ray, model load, warm-up)
        images = sum(n for _, n in finished_at[1:])
        card["throughput"]["steady_images_per_second"] = round(images / (finished_at[-1][0] - finished_at[0][0]), 4)
    split_dir = work / "ImageSets" / "Segmentation"
    kept = [r["id"] for r in records if r["id"] in set(card["kept_ids"])]
    (split_dir / "train.txt").write_text("".join(f"{i}\n" for i in kept))
    (split_dir / "all.txt").write_text("".join(f"{r['id']}\n" for r in records))
    (split_dir / "filtered.txt").write_text("".join(f"{i}\n" for i in card["filtered_ids"]))
    (work / CARD).write_text(json.dumps(card, indent=1))
    if records:
        sample_grid(work, [r["id"] for r in records[:SAMPLE_GRID]], card)
    shutil.rmtree(work / SHARDS)
    work.rename(final)
    return final


def dataset_card(cfg: SweepConfig, params, dataset, records: list[dict], seconds: float, generated: int) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    from bench.run import sweep_command

    return sweep_command(argv, __doc__, "python -m bench.synthesize SWEEP.yaml [key=value ...]   "
                         "(e.g. data.seeds_per_class=4 output_dir=synthetic/x)", synthesize)


if __name__ == "__main__":
    sys.exit(main())
