"""`python -m bench.perf --model sd3-medium-arch`: what capturing joint attention costs on SD3 Medium's
architecture (random weights, random text embeddings: bench.models.reference) at 512 px, one transformer pass
(4096 latent pixels in 1024 image tokens, 77 + 256 text tokens, 24 joint blocks).

Three traced passes against the plain one, the functions interleaved (bench.perf.interleaved): the image->text
role of every block (cross), the image->image role of every block (self), and both; and the peak resident
memory beyond the weights of each (bench.perf.RssPeak), with the bytes each trace keeps: capture must stay within
plain + 2 x kept (the bound tests/test_backbone_memory.py checks on one layer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

SIZE = 512


def measure_joint(backbone, repeats: int, size: int = SIZE) -> dict:
    from bench.perf import RssPeak, _static_mmap_threshold, interleaved
    from bench.capture import AttentionTracer, attention_layers, request

    # before the first pass: glibc's dynamic mmap threshold would otherwise keep the warm-up's freed pages
    # resident and reuse them, and every later peak would read near zero
    _static_mmap_threshold()
    layers = [n for n, k in attention_layers(backbone.unet).items() if k == "joint"]
    requests = {"cross": request(cross=layers), "self": request(self_attn=layers),
                "both": request(cross=layers, self_attn=layers)}
    side = size // backbone.vae_factor()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, backbone.vae.config.latent_channels, side, side, generator=g).to(backbone.device,
                                                                                         backbone.dtype)
    noisy, t = backbone.noise_to(x0, torch.randn(x0.shape, generator=g).to(x0), 100)
    cond = backbone.condition(["a photograph of a shape"])
    kept: dict[str, int] = {}

    def plain():
        with torch.no_grad():
            return backbone.denoise(noisy, t, cond)

    def traced(role):
        def fn():
            with torch.no_grad(), AttentionTracer(backbone.unet, requests[role], family=backbone.family,
                                                  text_columns=backbone.text_columns()) as tracer:
                tracer.set_latent_size((side, side))
                out = backbone.denoise(noisy, t, cond)
            kept[role] = sum(v.numel() * v.element_size() for per_layer in tracer.recorder.data.values()
                             for values in per_layer.values() for v in values)
            return out
        return fn

    fns = {"plain": plain, **{f"traced_{role}": traced(role) for role in requests}}
    times = interleaved(fns, backbone.device, repeats)
    peaks = {}
    for name, fn in fns.items():
        with RssPeak() as rss:
            out = fn()
        del out
        peaks[name] = rss.extra
    mib = 2**20
    # the fastest repeat of each: on a shared machine other load only ever adds time
    plain_s = times["plain"]["min_s"]
    roles = {}
    for role in requests:
        name = f"traced_{role}"
        roles[role] = {"traced_s": round(times[name]["min_s"], 3),
                       "traced_median_s": round(times[name]["median_s"], 3),
                       "traced_over_plain": round(times[name]["min_s"] / plain_s, 3),
                       "peak_mib": round(peaks[name] / mib, 1), "kept_mib": round(kept[role] / mib, 1),
                       "within_bound": bool(peaks[name] <= peaks["plain"] + 2 * kept[role])}
    return {"size": size, "image_tokens": (side // 2) ** 2, "text_tokens": int(cond["encoder_hidden_states"].shape[1]),
            "joint_layers": len(layers), "plain_s": round(plain_s, 3),
            "plain_median_s": round(times["plain"]["median_s"], 3), "plain_peak_mib": round(peaks["plain"] / mib, 1),
            "roles": roles}


def render_joint(r: dict) -> str:
    j = r["joint"]
    lines = [f"# Joint-attention capture: {r['model']} ({r['dtype']}, {j['size']} px)", "",
             f"Device: {r['device']}. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
             + f". Fastest of {r['repeats']} interleaved repeats after a warm-up (other load only adds time; "
             f"medians in the .json). Random weights and random text "
             f"embeddings: the cost of the architecture, not of a checkpoint.", "",
             f"One transformer pass: {j['image_tokens']} image tokens, {j['text_tokens']} text tokens, "
             f"{j['joint_layers']} joint blocks, every block traced; plain pass {j['plain_s']:.2f} s, peak "
             f"{j['plain_peak_mib']} MiB beyond the weights.", "",
             "| role (every block) | traced s | traced / plain | peak MiB | trace kept MiB | within plain + 2 x kept |",
             "|---|---:|---:|---:|---:|---|"]
    names = {"cross": "image->text (cross)", "self": "image->image (self)", "both": "both"}
    for role, row in j["roles"].items():
        lines.append(f"| {names[role]} | {row['traced_s']:.2f} | {row['traced_over_plain']:.2f} | {row['peak_mib']} "
                     f"| {row['kept_mib']} | {'yes' if row['within_bound'] else 'NO'} |")
    lines += ["", f"Measured in {r['seconds']} s by `python -m bench.perf --model {r['model']} --repeats "
                  f"{r['repeats']}`.", ""]
    return "\n".join(lines)


def run_joint_perf(model: str, device: str, dtype: str, repeats: int, out_dir: Path) -> Path:
    from bench.atomic import write_text
    from bench.models import load_backbone
    from bench.perf import device_line, versions

    started = time.time()
    backbone = load_backbone({"name": model, "device": device, "dtype": dtype})
    result = {"model": model, "device": device_line(backbone.device),
              "dtype": str(backbone.dtype).replace("torch.", ""), "versions": versions(), "repeats": repeats,
              "joint": measure_joint(backbone, repeats)}
    result["seconds"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{model}-{backbone.device.type}"
    write_text(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), render_joint(result))
    return stem.with_suffix(".md")
