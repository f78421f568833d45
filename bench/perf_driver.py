"""The driver's cost per image at cluster scale, measured with a stub backbone: what one driver absorbs while
many GPUs trace.

On a cluster the tracing actors send each image's histograms back to the driver. For K configurations and C
classes that is K rows of (8, C) int64 counts (bench.metrics.ImageScorer.histograms). The driver filters
repeats, writes one shard per batch and advances the bar (bench.stages.trace.absorb). At the end it loads
every shard and merges the histograms per configuration (bench.stages.score). This module replays that
driver work on synthetic result batches of the real shapes. No model runs and no actor starts, so what is
timed is the driver alone.

    python -m bench.perf_driver [--images N] [--out reports/perf]

The target: one driver absorbs >= 5,000 images/s, so 64 GPUs at ~80 images/s each are not held back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.metrics import ROWS
from bench.storage import Location

TARGET_IMAGES_PER_SECOND = 5000.0
CLASS_COUNTS = (21, 459, 847)  # VOC, Context-459, ADE-847: the shipped sweeps' largest label sets
CONFIGS = 24


def result_batch(first: int, images: int, configs: int, classes: int, rng: np.random.Generator) -> dict:
    """A result batch as an actor returns it (bench.stages.trace.SweepWorker.__call__), one forward group."""
    rows = images * configs
    return {"index": np.repeat(np.arange(first, first + images, dtype=np.int64), configs),
            "group": np.zeros(rows, dtype=np.int64),
            "trial": np.tile(np.array([f"t{k:03d}" for k in range(configs)]), images),
            "hist": rng.integers(0, 4096, size=(rows, 2 * ROWS, classes), dtype=np.int64),
            "passes": np.tile(np.eye(1, configs, dtype=np.int64)[0], images),
            "ties": np.zeros((rows, 2), dtype=np.int64),
            "qualitative_name": np.full(rows, "", dtype=str),
            "qualitative_data": np.full(rows, b"", dtype=object)}


def batch_bytes(batch: dict) -> int:
    return int(sum(v.nbytes if v.dtype != object else sum(len(x) for x in v) for v in batch.values()))


def measure(classes: int, images: int, configs: int = CONFIGS, batch_size: int = 1, seed: int = 0) -> dict:
    """Images per second the driver absorbs (shards written) and merges (shards loaded, histograms summed per
    configuration), and the bytes per image that reach it, for one label-set size."""
    from bench.stages.trace import absorb, load_shards

    rng = np.random.default_rng(seed)
    template = result_batch(0, batch_size, configs, classes, rng)
    per_image = batch_bytes(template) / batch_size

    def batches():
        for first in range(0, images, batch_size):
            n = min(batch_size, images - first)
            batch = {k: v[: n * configs] for k, v in template.items()}
            batch["index"] = np.repeat(np.arange(first, first + n, dtype=np.int64), configs)
            yield batch

    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        shards = Location.of(Path(tmp) / "shards")
        start = time.perf_counter()
        absorb(batches(), shards, None, set(), 0, images, f"{classes} classes")
        absorbed = time.perf_counter() - start
        start = time.perf_counter()
        scores = load_shards(shards)
        order = np.lexsort((scores["trial"], scores["group"], scores["index"]))
        hist = scores["hist"][order]
        trials = scores["trial"][order]
        merged = {t: hist[trials == t].sum(0) for t in np.unique(trials)}  # bench.stages.score's sum
        merge_seconds = time.perf_counter() - start
        assert len(merged) == configs
    total = absorbed + merge_seconds
    return {"classes": classes, "configs": configs, "images": images, "batch_size": batch_size,
            "bytes_per_image": int(per_image), "absorb_seconds": round(absorbed, 3),
            "merge_seconds": round(merge_seconds, 3),
            "absorb_images_per_second": round(images / absorbed, 1),
            "images_per_second": round(images / total, 1)}


def write_report(results: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()[0],
            "target_images_per_second": TARGET_IMAGES_PER_SECOND}
    (out / "driver-cpu.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    lines = ["# The driver's cost per image (stub backbone)", "",
             (f"`python -m bench.perf_driver` on {meta['machine']} ({meta['cpus']} CPUs, load {meta['load']:.1f} "
             f"at the start). K = {CONFIGS} configurations, one forward setting, result batches of "
             "`ray.batch_size` images (1 is the default), shards on the node's local disk. Absorb: what the driver does "
             "per result batch while actors trace (drop repeats, write the shard, advance the bar). Merge: at the "
             "end, every shard loaded and the histograms summed per configuration. Target: "
             f"{TARGET_IMAGES_PER_SECOND:,.0f} images/s (64 GPUs at ~80 images/s)."), "",
             ("| classes | ray.batch_size | bytes/image to the driver | absorb images/s | absorb + merge images/s "
             "| meets target |"),
             "|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        ok = "yes" if r["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "no"
        lines.append(f"| {r['classes']} | {r['batch_size']} | {r['bytes_per_image']:,} | "
                     f"{r['absorb_images_per_second']:,.0f} | {r['images_per_second']:,.0f} | {ok} |")
    lines += ["", ("Bytes per image grow with the classes: every configuration sends its (8, C) int64 counts "
              "(K x 8 x C x 8 bytes), which the bootstrap intervals need per image. What would carry a driver "
              "past its limit: each actor sums its images' histograms per configuration before sending, and "
              "keeps the per-image rows in its own shard on the run's storage, so the driver receives K x 8 x C "
              "counts per batch instead of per image. Ray Data's transfer of the batches to the driver (object "
              "store, deserialisation) is not in these numbers; it adds to them in proportion to the bytes. On a "
              "shared machine under load the numbers are low in absolute terms; the pattern holds at any load: "
              "per-shard costs dominate at `ray.batch_size=1`, and the bytes dominate past a few hundred "
              "classes."), ""]
    (out / "driver-cpu.md").write_text("\n".join(lines))
    return out / "driver-cpu.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_driver", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", default="reports/perf")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the bar is part of the driver's work, its drawing is not
    results = [measure(c, args.images, batch_size=b) for c in CLASS_COUNTS for b in (1, 16)]
    print(write_report(results, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
