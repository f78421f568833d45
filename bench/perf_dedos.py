"""DEDOS training and inference cost (the paper's Table 7: learnable parameters, s/image at 640 px).

    python -m bench.perf_dedos --size paper --device cuda --out dedos_timing.json   # the paper's size
    python -m bench.perf_dedos --size embedded --out timing.json                   # the embedded world

`paper`: an SD 2.1-base-architecture UNet and VAE and a CLIP ViT-L/14@336-architecture model, all with
seeded random weights (timing does not depend on them), 640 px crops, n = 100, c = 256, a 9-layer 256-wide
decoder, batch 4 (the paper's settings). `embedded`: the shipped embedded backbone and tiny CLIP at the shapes
sweeps' CPU settings. Training: seconds per optimiser step after warm-up; inference: seconds per image of
`predict` (CLIP + queries only), one image at a time, synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench.perf_dedos")
PAPER = {"clip": "random-vit-l14-336", "image_size": 640, "batch": 4}
EMBEDDED = {"train_classes": "circle+square+triangle", "batch": 4}


def paper_backbone(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD 2.1-base's UNet and VAE architecture (random weights) and a small random text encoder of SD 2.1's
    width (DEDOS only encodes the empty prompt, once per batch)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.embedded import build_tokenizer
    from bench.models import Backbone

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    tokenizer = build_tokenizer(77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=1024,
                                        num_hidden_layers=1, num_attention_heads=16, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    for m in (unet, vae, text):
        m.to(device, dtype).eval().requires_grad_(False)
    return Backbone("sd21-base-architecture-random", unet, vae, text, tokenizer, scheduler, device, dtype,
                    {"source": "SD 2.1-base architecture, random weights"})


def paper_clip(device: torch.device, seed: int = 0):
    """ViT-L/14@336 architecture (OpenAI CLIP's config) with random weights."""
    from transformers import CLIPConfig

    from bench.embedded import build_tokenizer
    from bench.models.clip import random_clip

    config = CLIPConfig(
        text_config=dict(vocab_size=len(build_tokenizer(77)), hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, projection_dim=768),
        vision_config=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
        projection_dim=768)
    clip = random_clip(config, build_tokenizer(77), seed)
    clip.model.to(device)
    return clip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(size: str, device: str, train_steps: int, warmup: int, images: int, clip: str = "") -> dict:
    from bench.data import build_dataset
    from bench.fitting import LocalFitContext
    from bench.models import load_backbone
    from bench.capture import Trace
    from methods.base import ClassQuery, Method
    from methods.dedos import ARCHITECTURE, Dedos, architecture, learnable_parameters

    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    method_backbone = None
    if size == "paper":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        method_backbone = paper_backbone(dev, dtype)
        values, pixels = dict(PAPER), 640
    else:
        method_backbone = load_backbone({"name": "embedded", "device": device})
        values, pixels = dict(EMBEDDED), 64
        if clip:
            values["clip"] = clip
    method = Dedos(method_backbone)
    if size == "paper":
        method._clips[PAPER["clip"]] = paper_clip(dev)
        # that CLIP lives in memory only (random weights): no folder names the fit, and timing keeps no fit,
        # so its train setting is the base method's, without the weights' identity
        method.train_setting = lambda cfg: Method.train_setting(method, cfg)
    data = {"name": "shapes", "size": pixels, "split": "train", "num_images": 32}
    train = build_dataset(data)
    cfg = Dedos.resolve({**values, "train_steps": warmup + train_steps})
    setting = method.train_setting(cfg)
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # this process's CPU time: what a step costs on a core shared with other jobs

    class Timed(LocalFitContext):
        def log(self, step, loss, series=""):
            _sync(dev)
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            super().log(step, loss, series)

    tensors = method.fit(Timed(setting, train, method_backbone))
    step_seconds = float(np.diff(stamps[warmup - 1:]).mean()) if train_steps else float("nan")
    step_cpu = float(np.diff(cpu_stamps[warmup - 1:]).mean()) if train_steps else float("nan")
    method.load_fit(setting.key, tensors)
    val = build_dataset({**data, "split": "val", "num_images": images + 2})
    names = list(val.classes[1:])
    query = ClassQuery(list(range(1, len(val.classes))), names)
    traces = [Trace("", [], [], (0, 0), image=val[i].image) for i in range(len(val))]
    for trace in traces[:2]:  # warm-up (model build, text embeddings, kernels)
        method.predict(trace, query, cfg, (pixels, pixels))
    _sync(dev)
    start, cpu_start = time.perf_counter(), time.process_time()
    for trace in traces[2:]:
        method.predict(trace, query, cfg, (pixels, pixels))
    _sync(dev)
    per_image = (time.perf_counter() - start) / images
    per_image_cpu = (time.process_time() - cpu_start) / images
    model = method.fitted_model(cfg)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (1 thread)"
    sizes = {k: architecture(cfg)[k] for k in ARCHITECTURE}
    return {"size": size, "device": device_name, "image_px": pixels, "batch": cfg["batch"], "architecture": sizes,
            "train_seconds_per_step": round(step_seconds, 4), "train_cpu_seconds_per_step": round(step_cpu, 4),
            "train_steps_timed": train_steps, "default_train_steps": Dedos.params["train_steps"].default,
            "inference_seconds_per_image": round(per_image, 5), "images_per_second": round(1 / per_image, 2),
            "inference_cpu_seconds_per_image": round(per_image_cpu, 5),
            "images_per_cpu_second": round(1 / per_image_cpu, 2), "inference_images": images,
            "load_average": [round(x, 1) for x in os.getloadavg()], "learnable_parameters_M": round(learnable_parameters(model) / 1e6, 2),
            "clip_parameters_M": round(sum(p.numel() for p in model.vision.parameters()) / 1e6, 2),
            "paper_table_7": {"learnable_parameters_M": 23.57, "inference_seconds": 0.12,
                              "device": "RTX 4090, 640 px, ViT-L/14"},
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    from bench.errors import cli_exit

    parser = argparse.ArgumentParser(prog="python -m bench.perf_dedos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("paper", "embedded"), default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--clip", default="", help="embedded size: a CLIP folder instead of the shipped one")
    parser.add_argument("--out", type=Path, default=Path("dedos_timing.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work():
        result = measure(args.size, args.device, args.train_steps, args.warmup, args.images, args.clip)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
        log.info("%s", json.dumps(result))
        return str(args.out)

    return cli_exit(work)


if __name__ == "__main__":
    sys.exit(main())
