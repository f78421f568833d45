"""`python -m bench.perf_real [--models sdxl sd3-medium flux] [--size 1024] [--device cuda] [--out reports/perf]`:
what attention capture costs on the real-size denoisers of SDXL, SD3-medium and Flux.1, with random weights.

Each denoiser is built from its public configuration (below) with seeded random weights, directly on the device in
bf16: random weights cost the same as real ones. There are no text encoders (T5-XXL alone is 4.7B parameters):
the text embeddings, pooled embeddings and SDXL's size conditioning are random tensors of the real shapes. One
denoiser pass at batch 1 per timing, at `--size` px (latent size / 8), measured as the median of interleaved
repeats after a warm-up (`bench.perf.interleaved`, CUDA synchronised around every timing), for:

  plain   the denoiser with its own attention processors
  cross   traced, recording the cross role at every layer that has one (DAAM's `blocks=all`): the UNet's attn2
          layers; SD3's and Flux's joint layers, image->text block
  self    traced, recording the self role at every layer that has one: the UNet's attn1 layers (head-averaged
          HW x HW each); the joint layers' image->image block

and the peak memory each needs beyond the weights (CUDA `max_memory_allocated`), with the bytes the trace keeps.

SD3 and Flux go through one adapter, `tracer()`, onto the capture API for joint (MM-DiT) attention, which comes with
the transformer-backbone support (`AttentionTracer(..., family=, text_columns=)` with the joint capture processors).
Where that support is missing the two models are reported as skipped, with the reason; SDXL's UNet runs on today's
capture processors. The report (JSON + Markdown with the device line) is written to `--out/capture-real-<device>.*`.
`--tiny` shrinks every architecture to a few channels and layers (same block types and inputs) to check the code
path on a CPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.perf_real")

# Public configurations (the diffusers folders' unet / transformer config.json).
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0: 2.57B parameters
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers: 2.03B parameters
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev: 11.9B parameters
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56)}
TEXT_TOKENS = {"sdxl": 77, "sd3-medium": 77 + 256, "flux": 512}  # CLIP (+ T5) sequence each model is fed
CLIP_TOKENS = 77  # the cross role keeps the CLIP columns of SD3's joint text (its prompt's words)
TINY = {  # same block types and inputs, a few channels and layers
    "sdxl": {"block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 2),
             "attention_head_dim": (2, 4, 4), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8},
    "sd3-medium": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 64,
                   "caption_projection_dim": 32, "pooled_projection_dim": 64},
    "flux": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)},
}
MODELS = ("sdxl", "sd3-medium", "flux")


def build(model: str, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> torch.nn.Module:
    from diffusers import (
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    cls, config = {"sdxl": (UNet2DConditionModel, SDXL_UNET), "sd3-medium": (SD3Transformer2DModel, SD3_MEDIUM),
                   "flux": (FluxTransformer2DModel, FLUX_DEV)}[model]
    torch.manual_seed(0)
    with torch.device(device):
        net = cls(**(config | (TINY[model] if tiny else {})))
    return net.to(device, dtype).eval().requires_grad_(False)


def inputs(model: str, net: torch.nn.Module, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Keyword arguments of one denoiser pass at `size` px, batch 1, with random conditioning of the real shapes."""
    gen = torch.Generator(device).manual_seed(0)
    cfg = net.config

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    latent, tokens = size // 8, TEXT_TOKENS[model]
    if model == "sdxl":
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"sample": randn(1, cfg.in_channels, latent, latent), "timestep": torch.tensor([500], device=device),
                "encoder_hidden_states": randn(1, tokens, cfg.cross_attention_dim),
                "added_cond_kwargs": {"text_embeds": randn(1, pooled), "time_ids": time_ids}}
    if model == "sd3-medium":
        return {"hidden_states": randn(1, cfg.in_channels, latent, latent),
                "encoder_hidden_states": randn(1, tokens, cfg.joint_attention_dim),
                "pooled_projections": randn(1, cfg.pooled_projection_dim),
                "timestep": torch.tensor([500.0], device=device)}
    packed = (latent // 2) ** 2  # Flux packs 2x2 latent patches of 16 channels into 64-channel tokens
    rows, cols = torch.meshgrid(torch.arange(latent // 2), torch.arange(latent // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(packed, 3).to(device, dtype)
    return {"hidden_states": randn(1, packed, cfg.in_channels), "encoder_hidden_states": randn(1, tokens,
                                                                                               cfg.joint_attention_dim),
            "pooled_projections": randn(1, cfg.pooled_projection_dim), "timestep": torch.tensor([0.5], device=device,
                                                                                                dtype=dtype),
            "img_ids": img_ids, "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "guidance": torch.tensor([3.5], device=device, dtype=dtype)}


def role_request(net: torch.nn.Module, role: str):
    """The trace request of one role at every layer that has it."""
    from bench.capture import attention_layers, request

    kinds = attention_layers(net)
    wanted = "cross" if role == "cross" else "self"
    names = [n for n, k in kinds.items() if k in (wanted, "joint")]
    return request(cross=names) if role == "cross" else request(self_attn=names)


def tracer(model: str, net: torch.nn.Module, req, size: int):
    """The capture API, in one place. SDXL: today's UNet tracer. SD3 / Flux: DEPENDS ON the transformer-backbone
    support (joint capture processors, `AttentionTracer(family=, text_columns=)`, `set_latent_size` for Flux's
    packed tokens); RuntimeError naming what is missing where it is absent."""
    import inspect

    from bench.capture import AttentionTracer

    if model == "sdxl":
        return AttentionTracer(net, req)
    if "family" not in inspect.signature(AttentionTracer).parameters:
        raise RuntimeError("needs joint-attention capture for SD3/Flux (bench.trace_joint, AttentionTracer(family=)),"
                           " which this checkout lacks")
    family = "flux" if model == "flux" else "sd3"
    columns = slice(0, CLIP_TOKENS) if model == "sd3-medium" else slice(None)
    t = AttentionTracer(net, req, family=family, text_columns=columns)
    if model == "flux":
        t.set_latent_size((size // 16, size // 16))  # the token grid of the packed latent
    return t


def kept_bytes(t) -> int:
    return sum(x.numel() * x.element_size() for per_layer in t.recorder.data.values() for values in per_layer.values()
               for x in values)


def measure(model: str, size: int, device: torch.device, dtype: torch.dtype, repeats: int, tiny: bool) -> dict:
    from bench.perf import _peak, interleaved

    started = time.time()
    net = build(model, device, dtype, tiny)
    params = sum(p.numel() for p in net.parameters())
    kwargs = inputs(model, net, size, device, dtype)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    log.info("%s: %.2fB parameters built in %.0f s", model, params / 1e9, time.time() - started)

    def plain():
        with torch.no_grad():
            return net(**kwargs)

    roles = {}
    for role in ("cross", "self"):
        req = role_request(net, role)

        def traced(req=req):
            with torch.no_grad(), tracer(model, net, req, size) as t:
                net(**kwargs)
            return t

        roles[role] = traced
    row = {"model": model, "parameters": params, "size": size, "dtype": str(dtype).removeprefix("torch."),
           "text_tokens": TEXT_TOKENS[model], "layers": {}}
    try:
        timings = interleaved({"plain": plain, **roles}, device, repeats)
    except RuntimeError as err:  # the adapter's missing capture support
        return row | {"skipped": str(err).splitlines()[0]}
    row["plain_s"] = round(timings["plain"]["median_s"], 5)
    for role, fn in roles.items():
        peak_plain, _ = _peak(device, plain)
        peak, t = _peak(device, fn)
        row[role] = {"traced_s": round(timings[role]["median_s"], 5),
                     "traced_over_plain": round(timings[role]["median_s"] / timings["plain"]["median_s"], 3),
                     "peak_beyond_weights_mib": round(peak / 2**20, 1),
                     "plain_peak_beyond_weights_mib": round(peak_plain / 2**20, 1),
                     "kept_mib": round(kept_bytes(t) / 2**20, 3)}
        row["layers"][role] = len(t.layer_kinds)
        del t
    row["weights_mib"] = round(weights / 2**20, 1)
    row["seconds"] = round(time.time() - started, 1)
    return row


def render_markdown(report: dict) -> str:
    lines = [f"# Capture cost on real-size denoisers ({report['size']} px, {report['dtype']}, random weights)", "",
             f"Device: {report['device']}. Versions: {json.dumps(report['versions'])}. Command: `{report['command']}`.",
             "", ("| model | parameters | plain s | role | layers | traced s | traced / plain | peak MiB (plain) "
             "| kept MiB |"), "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r.get('parameters', 0) / 1e9:.2f}B | - | skipped: {r['skipped']} | | | | | |")
            continue
        for role in ("cross", "self"):
            m = r[role]
            lines.append(f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['plain_s']} | {role} | "
                         f"{r['layers'][role]} | {m['traced_s']} | {m['traced_over_plain']} | "
                         f"{m['peak_beyond_weights_mib']} ({m['plain_peak_beyond_weights_mib']}) | {m['kept_mib']} |")
    lines += ["", ("Peak: beyond the weights, CUDA `max_memory_allocated` (CPU: resident memory). Median of "
              f"{report['repeats']} interleaved repeats, batch 1, one denoiser pass, random text embeddings.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.perf import device_line, versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--size", type=int, default=1024, help="image size in px (a multiple of 16)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a few channels and layers: checks the code path only")
    parser.add_argument("--out", type=Path, default=Path("reports/perf"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.size % 16 or args.size < 32:
        parser.error(f"--size must be a multiple of 16 and at least 32; got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu (with --tiny)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"capture-real-{'tiny-' if args.tiny else ''}{device.type}"
    for model in args.models:  # the report is rewritten after each model: a run cut off keeps what it measured
        try:
            rows.append(measure(model, args.size, device, dtype, args.repeats, args.tiny))
        except torch.OutOfMemoryError as err:
            rows.append({"model": model, "skipped": f"out of memory: {str(err).splitlines()[0]}"})
        if device.type == "cuda":  # the model built by `measure` is gone: give its memory back for the next
            torch.cuda.empty_cache()
        log.info("%s", json.dumps(rows[-1]))
        report = {"device": device_line(device), "versions": versions(), "size": args.size, "dtype": args.dtype,
                  "repeats": args.repeats, "tiny": args.tiny, "rows": rows,
                  "command": " ".join(["python -m bench.perf_real", *(argv if argv is not None else sys.argv[1:])])}
        for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", render_markdown(report))):
            tmp = stem.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(stem.with_suffix(suffix))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
