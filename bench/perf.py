"""`python -m bench.perf [--model embedded|sd21-base-arch] [--device auto] [--dtype auto] [--out reports/perf]`:
what a sweep's per-image work costs on this machine, in one run.

Measured, each as the median of interleaved repeats after a warm-up (CUDA synchronised around every timing):
  iseg            the whole per-image cost of iSeg with its defaults (text + VAE encoding, the traced UNet pass
                  with Cat-Cross key weights, ten Ent-Self refinements, labels and histograms): images/s per
                  batch size; the paper reports 0.16 s/image (RTX 3090, fp16, batch 1).
  forward         the traced inversion forward (iSeg's trace request) against the plain one (same VAE + text +
                  UNet pass, diffusers' default SDPA processors everywhere): the capture overhead.
  generation      DAAM's traced generation (50 DDIM steps, classifier-free guidance, decode) against diffusers'
                  own StableDiffusionPipeline on the same components and scheduler.
  memory          (CUDA) peak allocated memory of iSeg at batch 1, of the plain forward, and the bytes of the
                  trace that iSeg keeps: capture must cost at most twice what it keeps.
  overhead        (`--parts overhead`, alone) the fixed cost of `bench.run sweeps/iseg_lambda.yaml data.limit=16`
                  beyond the work (and Ray's own start where it starts Ray), by phase, ray.execution=auto
                  (the driver on <= 2 cores) against actors (bench.perf_overhead).
  sharing         (`--parts sharing`, alone) end to end, K = 24 post-processing settings against K = 1 over 128
                  images: whole bench.run processes of the lambda sweep, alternating (bench.perf_overhead).
  fits            (`--parts fits`, alone) a sweep of two train settings (two SegFormer training seeds) with
                  train.max_concurrent=1 against auto: whole bench.run processes, alternating.
`sd21-base-arch` is SD2.1-base's architecture with random weights (bench.models.reference): a real checkpoint
costs the same. The report (JSON + Markdown, device line, versions, batch sizes) is written atomically to
`--out/<model>-<device kind>.{json,md}`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

from bench.env import quiet_environment

quiet_environment()

import torch

from bench.errors import BenchError, cli_exit

log = logging.getLogger(__name__)
TARGETS = {"iseg_images_per_second_gpu": 100.0, "traced_over_plain": 1.3, "generation_over_pipeline": 1.25,
           "peak_mib_batch1": 5120.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Median / min seconds of each function, the functions alternating within every round (A B A B ...), so
    drift of the machine (clocks, other load) falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "repeats": len(t)} for name, t in times.items()}


def _iseg_setup(backbone, batch: int):
    """iSeg with its defaults over `batch` shapes images at the backbone's native size."""
    from bench.data import build_dataset
    from bench.evaluate import group_request
    from bench.plan import ForwardGroup, Trial
    from methods import METHODS

    method = METHODS.get("iseg")(backbone)
    params = method.resolve({})
    group = ForwardGroup(seed=0, forward=tuple((k, params[k]) for k in method.forward_keys()),
                         trials=[Trial("iseg-default", params, {})])
    dataset = build_dataset({"name": "shapes", "num_images": batch, "size": backbone.resolution, "split": "val"})
    return method, params, group, dataset, [dataset[i] for i in range(batch)], group_request(method, group)


def measure_inversion(backbone, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        try:
            row = _measure_batch(backbone, batch, repeats)
        except torch.OutOfMemoryError:
            log.warning("batch %d does not fit in memory; stopping the batch sweep", batch)
            torch.cuda.empty_cache()
            break
        rows.append(row)
        log.info("batch %d: %s", batch, row)
    return rows


def _measure_batch(backbone, batch: int, repeats: int) -> dict:
    from bench.evaluate import evaluate_batch, trace_samples
    from bench.forward import run_traced
    from bench.capture import request

    method, params, group, dataset, samples, req = _iseg_setup(backbone, batch)
    setting = replace(method.forward_setting(params, 0), size=backbone.resolution)
    prompts = [f"a photograph of a {s.caption or 'shape'}" for s in samples]
    images = [s.image for s in samples]
    timings = interleaved({
        "plain": lambda: run_traced(backbone, request(), setting, prompts, images=images),
        "traced": lambda: trace_samples(method, dataset, samples, params, 0, req, backbone.resolution),
        "iseg": lambda: evaluate_batch(method, dataset, samples, group, req, backbone.resolution, ties=[]),
    }, backbone.device, repeats)
    row = {"batch": batch, **{f"{k}_s_per_batch": round(v["median_s"], 5) for k, v in timings.items()}}
    row["iseg_images_per_second"] = round(batch / timings["iseg"]["median_s"], 3)
    row["iseg_s_per_image"] = round(timings["iseg"]["median_s"] / batch, 5)
    row["traced_over_plain"] = round(timings["traced"]["median_s"] / timings["plain"]["median_s"], 3)
    return row


def measure_generation(backbone, steps: int, repeats: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from bench.forward import ForwardSetting, run_traced
    from methods import METHODS

    daam = METHODS.get("daam")(backbone)
    req = daam.trace_request(daam.resolve({"mode": "generation"}))
    scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder,
                                   tokenizer=backbone.tokenizer, unet=backbone.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photograph of a red circle"
    setting = ForwardSetting(mode="generation", steps=steps, scheduler="auto", guidance=7.5)
    generator = torch.Generator(backbone.device).manual_seed(0)
    timings = interleaved({
        "pipeline": lambda: pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                                 generator=generator),
        "traced": lambda: run_traced(backbone, req, setting, [prompt]),
    }, backbone.device, repeats)
    return {"steps": steps, "batch": 1, **{f"{k}_s": round(v["median_s"], 4) for k, v in timings.items()},
            "traced_over_pipeline": round(timings["traced"]["median_s"] / timings["pipeline"]["median_s"], 3)}


def _static_mmap_threshold() -> None:
    """Make glibc serve every allocation of 1 MiB or more by its own mmap, returned to the system when freed,
    for the rest of this process. By default glibc raises that threshold after the first large free (up to
    32 MiB), after which tensors come from the heap and freed pages stay resident or are reused: the same
    traced layer then measured anywhere from 12 to 398 MiB in successive runs, against 110 MiB every time
    with this. Other C libraries: no change (resident sizes are then only approximate)."""
    global _MMAP_STATIC
    if _MMAP_STATIC:
        return
    _MMAP_STATIC = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (setting it also turns off the dynamic adjustment)
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: give a freed heap top back early


_MMAP_STATIC = False


class RssPeak:
    """Peak resident memory of this process above its level at entry, sampled every half millisecond from
    /proc/self/statm (CPU runs: torch keeps no allocator statistics there). Large tensors are mmapped by the
    allocator and unmapped when freed, so the resident size follows them."""

    def __init__(self):
        _static_mmap_threshold()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __enter__(self) -> "RssPeak":
        gc.collect()
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _peak(device: torch.device, fn) -> tuple[int, object]:
    """Peak memory `fn` needs beyond what is held before it (CUDA: allocated bytes; CPU: resident bytes)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    with RssPeak() as rss:
        out = fn()
    return rss.extra, out


def measure_memory(backbone) -> dict:
    """Peak memory (beyond what the weights hold) of the traced forward of iSeg at batch 1 against the plain
    forward, and the bytes of the trace iSeg keeps: capture must cost at most twice what it keeps."""
    from bench.evaluate import evaluate_batch, trace_samples
    from bench.forward import run_traced
    from bench.capture import request

    device = backbone.device
    method, params, group, dataset, samples, req = _iseg_setup(backbone, 1)
    setting = replace(method.forward_setting(params, 0), size=backbone.resolution)
    images = [samples[0].image]
    for _ in range(2):  # warm: first calls allocate caches (cuDNN/oneDNN workspaces, tokenizer) once
        run_traced(backbone, request(), setting, ["a photograph of a shape"], images=images)
        trace_samples(method, dataset, samples, params, 0, req, backbone.resolution)
    plain, _ = _peak(device, lambda: run_traced(backbone, request(), setting, ["a photograph of a shape"],
                                                images=images))
    traced, batch = _peak(device, lambda: trace_samples(method, dataset, samples, params, 0, req,
                                                        backbone.resolution))
    trace = batch.traces[0]
    kept = sum(t.numel() * t.element_size() for kind in ("cross", "self_attn", "queries")
               for t in getattr(trace, kind).values())
    del batch, trace
    mib = 2**20
    out = {"how": "CUDA max_memory_allocated" if device.type == "cuda" else "resident memory sampled every 0.5 ms",
           "plain_forward_peak_mib": round(plain / mib, 1), "traced_forward_peak_mib": round(traced / mib, 1),
           "trace_kept_mib": round(kept / mib, 1), "capture_within_bound": bool(traced <= plain + 2 * kept)}
    if device.type == "cuda":
        weights = torch.cuda.memory_allocated(device)
        whole, _ = _peak(device, lambda: evaluate_batch(method, dataset, samples, group, req, backbone.resolution,
                                                        ties=[]))
        out["weights_mib"] = round(weights / mib, 1)
        out["iseg_batch1_peak_mib"] = round((weights + whole) / mib, 1)
    return out


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "diffusers", "transformers")}


PARTS = ("inversion", "generation", "memory")
EXTRA_PARTS = ("overhead", "sharing", "fits")  # asked for by name only, alone: whole `bench.run` processes
# (bench.perf_overhead)


def run_perf(model: str, device: str, dtype: str, batches: list[int], repeats: int, steps: int,
             out_dir: Path, parts: tuple[str, ...] = PARTS) -> Path:
    from bench.atomic import write_text
    from bench.models import MODELS, load_backbone

    MODELS.get(model)  # unknown names: one line with a suggestion, before anything loads
    if parts == ("overhead",):
        return _run_overhead(repeats, out_dir)
    if parts == ("sharing",):
        return _run_sharing(repeats, out_dir)
    if parts == ("fits",):
        return _run_fits(repeats, out_dir)
    if model == "sd3-medium-arch":  # a joint-attention transformer: bench.perf_joint measures its roles
        from bench.perf_joint import run_joint_perf

        return run_joint_perf(model, device, dtype, repeats, out_dir)
    started = time.time()
    backbone = load_backbone({"name": model, "device": device, "dtype": dtype})
    log.info("loaded %s on %s (%s) in %.1f s", model, backbone.device, backbone.dtype, time.time() - started)
    result = {"model": model, "device": device_line(backbone.device), "device_kind": backbone.device.type,
              "dtype": str(backbone.dtype).replace("torch.", ""), "resolution": backbone.resolution,
              "versions": versions(), "repeats": repeats, "targets": TARGETS}
    if "inversion" in parts:
        result["inversion"] = measure_inversion(backbone, batches, repeats)
    if "generation" in parts:
        result["generation"] = measure_generation(backbone, steps, repeats)
    if "memory" in parts:
        result["memory"] = measure_memory(backbone)
    result["seconds"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{model}-{backbone.device.type}" if parts == PARTS else \
        out_dir / f"{model}-{backbone.device.type}-{'-'.join(parts)}"
    write_text(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), render_markdown(result))
    return stem.with_suffix(".md")


def _write_cpu_part(part: str, title: str, stem_name: str, measure, render, repeats: int, out_dir: Path) -> Path:
    """Measure one whole-process CPU part (`measure(repeats)`), write <stem>.json and <stem>.md in out_dir."""
    from bench.atomic import write_text

    started = time.time()
    result = {"device": device_line(torch.device("cpu")), "versions": versions(), part: measure(repeats)}
    result["seconds"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    write_text(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    lines = [f"# {title}", "", f"Device: {result['device']}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             *render(result[part]), "",
             f"Measured in {result['seconds']} s by `python -m bench.perf --parts {part} --repeats {repeats}`.", ""]
    write_text(stem.with_suffix(".md"), "\n".join(lines))
    return stem.with_suffix(".md")


def _run_overhead(repeats: int, out_dir: Path) -> Path:
    from bench.perf_overhead import measure_overhead, render_overhead

    return _write_cpu_part("overhead", "Fixed overhead of a local run", "overhead-cpu", measure_overhead,
                           render_overhead, repeats, out_dir)


def _run_sharing(repeats: int, out_dir: Path) -> Path:
    from bench.perf_overhead import measure_sharing, render_sharing

    return _write_cpu_part("sharing", "End-to-end cost of K post-processing settings", "sharing-cpu",
                           measure_sharing, render_sharing, repeats, out_dir)


def _run_fits(repeats: int, out_dir: Path) -> Path:
    from bench.perf_overhead import measure_fits, render_fits

    return _write_cpu_part("fits", "Train settings fitted at once", "fits-cpu", measure_fits, render_fits, repeats,
                           out_dir)


def render_markdown(r: dict) -> str:
    lines = [f"# Per-image cost: {r['model']} ({r['dtype']}, {r['resolution']} px)", "",
             f"Device: {r['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
             + f". Medians of {r['repeats']} interleaved repeats after a warm-up.", ""]
    gpu = r["device_kind"] == "cuda"
    if r.get("inversion"):
        inv = r["inversion"]
        lines += ["## iSeg with its defaults (inversion, one traced UNet pass, Cat-Cross, N = 10 Ent-Self)", "",
                  "| batch | iSeg images/s | iSeg s/image | plain forward s/batch | traced forward s/batch "
                  "| traced / plain |", "|---:|---:|---:|---:|---:|---:|"]
        for row in inv:
            lines.append(f"| {row['batch']} | {row['iseg_images_per_second']:.2f} | {row['iseg_s_per_image']:.4f} "
                         f"| {row['plain_s_per_batch']:.4f} | {row['traced_s_per_batch']:.4f} "
                         f"| {row['traced_over_plain']:.2f} |")
        best = max(inv, key=lambda row: row["iseg_images_per_second"])
        target = f" (target >= {TARGETS['iseg_images_per_second_gpu']:.0f} on a GPU)" if gpu else ""
        worst = max(row["traced_over_plain"] for row in inv)
        lines += ["", "Paper (iSeg Sec. 4): 0.16 s/image on an RTX 3090, fp16, batch 1.", "",
                  f"Best: {best['iseg_images_per_second']:.1f} images/s at batch {best['batch']}{target}.",
                  f"Capture overhead, traced / plain forward: at most {worst:.2f}x over the batch sizes "
                  f"(target <= {TARGETS['traced_over_plain']}x)."]
    if r.get("generation"):
        gen = r["generation"]
        lines += ["", f"## Generation ({gen['steps']} DDIM steps, guidance 7.5, batch 1)", "",
                  f"diffusers StableDiffusionPipeline {gen['pipeline_s']:.3f} s, DAAM's traced generation "
                  f"{gen['traced_s']:.3f} s: {gen['traced_over_pipeline']:.2f}x "
                  f"(target <= {TARGETS['generation_over_pipeline']}x)."]
    if r.get("memory"):
        m = r["memory"]
        within = "yes" if m["capture_within_bound"] else "NO"
        lines += ["", f"## Memory (batch 1; {m['how']})", "",
                  f"Peak beyond the weights: plain forward {m['plain_forward_peak_mib']} MiB, traced forward "
                  f"{m['traced_forward_peak_mib']} MiB, trace kept {m['trace_kept_mib']} MiB (traced within plain + "
                  f"2 x kept: {within})."]
        if "iseg_batch1_peak_mib" in m:
            lines.append(f"Weights {m['weights_mib']} MiB; iSeg at batch 1 peaks at {m['iseg_batch1_peak_mib']} MiB in "
                         f"all (paper: 5 GB; target <= {TARGETS['peak_mib_batch1']:.0f} MiB).")
    lines += ["", f"Measured in {r['seconds']} s by `python -m bench.perf --model {r['model']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded | sd21-base-arch | sd3-medium-arch (random "
                        "weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: 1,4,16 on CPU; "
                        "1,8,16,32,64 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="generation steps")
    parser.add_argument("--out", default="reports/perf")
    parser.add_argument("--parts", default=",".join(PARTS), help="what to measure: " + ", ".join(PARTS + EXTRA_PARTS)
                        + " (overhead: whole bench.run processes, alone)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def go() -> Path:
        try:
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
        except ValueError:
            raise BenchError(f"--batches={args.batches!r} must be comma-separated integers, e.g. 1,8,32") from None
        if any(b < 1 for b in batches) or args.repeats < 1 or args.steps < 1:
            raise BenchError("--batches, --repeats and --steps must be positive")
        parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
        if not parts or set(parts) - set(PARTS + EXTRA_PARTS):
            raise BenchError(f"--parts={args.parts!r}: choose among {', '.join(PARTS + EXTRA_PARTS)}, comma-separated")
        for extra in EXTRA_PARTS:
            if extra in parts and len(parts) > 1:
                raise BenchError(f"--parts={extra} runs whole bench.run processes: ask for it alone")
        if parts in (("overhead",), ("sharing",), ("fits",)):
            return run_perf(args.model, "cpu", args.dtype, [], args.repeats, args.steps, Path(args.out), parts)
        cuda = torch.cuda.is_available() and args.device != "cpu"
        batches = batches or ([1, 8, 16, 32, 64] if cuda else [1, 4, 16])
        if not cuda:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        return run_perf(args.model, args.device, args.dtype, batches, args.repeats, args.steps, Path(args.out),
                        tuple(p for p in PARTS if p in parts))

    return cli_exit(go)


if __name__ == "__main__":
    sys.exit(main())
