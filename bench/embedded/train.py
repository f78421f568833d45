"""Train the embedded backbone: a small text-to-image latent diffusion model of the shapes world.

    python -m bench.embedded.train --seed 0 --out DIR            # the CPU recipe (defaults), about 2 h
    python -m bench.embedded.train --device cuda ... --out DIR   # the shipped weights (v2): bench/embedded/README.md
    python -m bench.embedded.train --recipe v3 --out DIR --state-dir STATE   # v3 (RECIPES), one GPU, ~5 min
    python -m bench.embedded.train --resume STATE --out DIR --state-dir STATE2  # continue a cut-off run
    python -m bench.embedded.train --export-state STATE --out DIR  # the EMA pipeline of a state, as trained

A recipe (`--recipe`) only sets defaults: any flag given overrides it, and train_config.json records the result.

Two stages, deterministic given --seed on a single CPU thread (CUDA runs are not bit-reproducible):
  1. a small AutoencoderKL on rendered shapes images (downsampling factor 2 by default: two levels;
     --vae-factor 1 gives pixel-like latents);
  2. the UNet (SD's block classes and four levels, attention only at --attention-levels, 1 and 2 by default:
     no attention at the finest level; layers_per_block=2) jointly with a from-scratch CLIPTextModel,
     v-prediction, caption dropout for classifier-free guidance, on VAE latents of a pre-rendered training set.
The result is saved as a standard diffusers pipeline folder (safetensors, fp16): model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/, plus train_config.json with the exact arguments.

Training for a wall-clock budget (`--time-budget S`, for a lent GPU's command limit): with `--steps 0` the
cosine schedule's length is set from the step time measured over steps 5-25 (still inside the warmup, whose
learning rates do not depend on the length), so that the schedule ends with the budget; either way training
stops when the budget is spent and saves as if finished. `--state-dir` receives the resumable training state
(`bench.embedded.train_state`: weights, EMA, AdamW moments, step, generator) every `--state-every` seconds and
at the end; `--resume` continues it (same recipe; the schedule runs on to the state's length, or to `--steps`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger("bench.embedded.train")
# Class-name prompts of the bench's methods (iSeg's template; DAAM's / OVAM's template and attribution prompt).
# Training on them keeps those prompts in distribution, and with no colour word to lean on, a shape word has to
# find its object by itself.
TEMPLATES = ("A photograph of {classes} and other objects and background", "A photograph of a {classes}",
             "a {classes}")

DEFAULTS = {
    "size": 64,  # native image size; latent = size / vae_factor
    "vae_factor": 2,  # VAE downsampling factor: 1 (one level, pixel-like latents) or 2 (two levels)
    "max_length": 16,  # tokenizer model_max_length = text encoder positions (longest shapes caption: 13)
    "vae_steps": 1000,
    "vae_batch": 16,
    "vae_lr": 2e-3,
    "num_train_images": 50000,
    "steps": 3000,
    "batch": 32,
    "lr": 1e-3,
    "warmup": 100,
    "cfg_dropout": 0.1,
    "template_prob": 0.3,  # share of steps' captions replaced by a class-name prompt template (see TEMPLATES)
    "same_colour_prob": 0.5,
    "ema_decay": 0.998,
    "min_snr_gamma": 0.0,  # > 0: min-SNR-gamma loss weighting; 0: plain v-prediction MSE
    "channels": [32, 64, 64, 64],
    # UNet levels (0 = finest) whose blocks have attention; [0, 1, 2] is SD's layout. Without attention at the
    # finest level (the costliest layer, and the one whose self-attention stayed uniform in v1) the decoder's
    # last self-attention is at latent/2.
    "attention_levels": [1, 2],
    "heads": 4,
    "device": "auto",  # auto: cuda when available, else cpu (single-threaded, bit-reproducible)
    "render_workers": 1,  # processes rendering the training set (images depend only on their index)
    "init": "",  # continue from a pipeline folder saved by this script (its unet, text encoder and VAE)
    "checkpoint_every": 0,  # also save the EMA pipeline to OUT/checkpoints/step-N every N steps
    "stop_after": 0,  # > 0: end after this many steps (the schedule still spans --steps), saving as if finished
    # Start from another pipeline folder of a different layout: its VAE whole, every UNet / text-encoder tensor
    # whose shape matches, position embeddings row by row; new attention blocks start as identity (see
    # `warm_start`). "" = from scratch.
    "warm_start": "",
    "time_budget": 0.0,  # > 0: seconds of UNet training, then save as if finished; with --steps 0, sizes the run
    "state_every": 0.0,  # > 0: write the resumable training state to --state-dir every this many seconds
}
# Steps whose time sizes a --steps 0 schedule (the first ones include cuDNN autotuning and allocator warm-up).
PROBE = (5, 25)
# Recipes: named sets of defaults (flags given on the command line override them).
RECIPES = {
    # v3: v2's recipe (bench/embedded/README.md) with attention at the finest (32x32 latent) level again, the
    # layout v2's measurements name as the stronger lever for iSeg's last-decoder self-attention, and a text
    # context of 77 positions (the methods' templates uncut: `prompt_lengths`). Warm-started from the v2 folder
    # (its VAE, and every UNet and text-encoder tensor the layouts share; the new 32x32 attention starts as
    # identity), then trained for a wall-clock budget on one GPU at v2's second-stage learning rate.
    "v3": {"size": 64, "vae_factor": 2, "max_length": 77, "vae_steps": 0, "num_train_images": 200000,
           "steps": 0, "time_budget": 300.0, "state_every": 60.0, "batch": 512, "lr": 5e-4, "warmup": 100,
           "cfg_dropout": 0.1, "template_prob": 0.3, "same_colour_prob": 0.5, "ema_decay": 0.999,
           "min_snr_gamma": 0.0, "channels": [32, 64, 64, 64], "attention_levels": [0, 1, 2], "heads": 4,
           "render_workers": 12, "warm_start": "bench/embedded/weights"},
}
# What a resumed run may change: how it runs, not what it learns (the rest comes from the state).
RUN_KEYS = ("time_budget", "state_every", "checkpoint_every", "render_workers", "device", "steps", "stop_after")


def set_single_thread() -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


# ----------------------------------------------------------------------------------------------- data
def training_dataset(num_images: int, size: int, seed: int, same_colour_prob: float):
    """The train split of `ShapesDataset`, with a share of multi-object scenes recoloured to one colour
    (same-colour pairs are the hardest binding case, so they are over-sampled)."""
    from bench.data.shapes import ShapesDataset

    class TrainShapes(ShapesDataset):
        def layout(self, index: int) -> list[dict]:
            objects = super().layout(index)
            rng = np.random.default_rng([self.seed, self._split_offset, index, 7])
            if len(objects) > 1 and rng.uniform() < same_colour_prob:
                for obj in objects[1:]:
                    obj["colour"] = objects[0]["colour"]
            return objects

    return TrainShapes(num_images=num_images, size=size, seed=seed, split="train")


def template_prompt(objects: list[dict], rng: np.random.Generator) -> str:
    """One of TEMPLATES with the image's distinct shape names in random order."""
    names = list(dict.fromkeys(o["shape"] for o in objects))
    names = [names[k] for k in rng.permutation(len(names))]
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(classes=" and ".join(names))


def prompt_lengths(max_classes: int | None = None) -> dict[str, int]:
    """Tokens (with start and end) of each prompt the methods build on the embedded model at its longest: every
    shipped template (TEMPLATES, the methods' `template` / `attribution` defaults, DEDOS' templates) filled with
    all classes of the shapes world and of PASCAL VOC (prompt names), and the longest shapes caption."""
    from bench.data.shapes import SHAPES
    from bench.embedded import build_tokenizer
    from methods import METHODS
    from methods.dedos import TEMPLATES as DEDOS_TEMPLATES

    tokenizer = build_tokenizer(1000)
    voc = [line.split("\t")[1] for line in (Path(__file__).parents[1] / "data" / "classes" / "voc.txt")
           .read_text().splitlines() if line and not line.startswith("#")][1:]
    templates = set(TEMPLATES) | {t.replace("{}", "{classes}") for t in DEDOS_TEMPLATES}
    for name in METHODS.names():
        for key in ("template", "attribution"):
            param = METHODS.get(name).params.get(key)
            if param is not None and isinstance(param.default, str):
                templates.add(param.default.replace("{name}", "{classes}").replace("{prompt}", ""))
    out = {}
    for classes in (SHAPES, voc):
        names = " and ".join(classes[:max_classes])
        for template in sorted(templates):
            text = template.format(classes=names) if "{classes}" in template else template
            out[text] = len(tokenizer(text).input_ids)
    from bench.data.shapes import ShapesDataset

    captions = ShapesDataset(num_images=200, size=64, seed=0, split="val")
    caption = max((captions[i].caption for i in range(len(captions))), key=lambda c: len(tokenizer(c).input_ids))
    out[caption] = len(tokenizer(caption).input_ids)
    return out


_RENDER_DS = None  # the dataset rendered by forked workers (set before the pool forks; nothing is pickled)


def _render_range(bounds: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, str, list[dict]]]:
    out = []
    for i in range(*bounds):
        s = _RENDER_DS[i]
        out.append((s.image, s.label > 0, s.caption, s.extra["objects"]))
    return out


def render_all(ds, seed: int, workers: int = 1) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Images (N, S, S, 3) uint8, foreground masks (N, S, S) bool, captions, template prompts.

    Image i depends only on (seed, i), so rendering in `workers` forked processes gives the same arrays."""
    global _RENDER_DS
    images = np.empty((len(ds), ds.size, ds.size, 3), dtype=np.uint8)
    foreground = np.empty((len(ds), ds.size, ds.size), dtype=bool)
    captions, templated = [], []
    rng = np.random.default_rng([seed, 11])
    chunk = 500
    ranges = [(i, min(i + chunk, len(ds))) for i in range(0, len(ds), chunk)]
    _RENDER_DS = ds
    try:
        if workers > 1:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(workers)
            parts = pool.imap(_render_range, ranges)
        else:
            pool, parts = None, map(_render_range, ranges)
        bar = tqdm(total=len(ds), desc="render", unit="img", mininterval=2.0)
        i = 0
        for part in parts:
            for image, fg, caption, objects in part:
                images[i], foreground[i] = image, fg
                captions.append(caption)
                templated.append(template_prompt(objects, rng))
                i += 1
            bar.update(len(part))
        bar.close()
        if pool is not None:
            pool.close()
    finally:
        _RENDER_DS = None
    return images, foreground, captions, templated


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- models
def config_error(cfg: dict) -> str | None:
    """What is wrong with the training arguments, as one line naming the flag; None if nothing."""
    if cfg["vae_factor"] not in (1, 2) or cfg["size"] % cfg["vae_factor"]:
        return f"--vae-factor must be 1 or 2 and divide --size ({cfg['size']}); got {cfg['vae_factor']}"
    levels = cfg["attention_levels"]
    if not levels or len(set(levels)) != len(levels) or not all(0 <= k <= 3 for k in levels):
        return f"--attention-levels takes distinct UNet levels among 0 1 2 3; got {' '.join(map(str, levels))}"
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        return f"--device must be auto, cpu or cuda; got {cfg['device']}"
    if not 0 <= cfg["template_prob"] <= 1:
        return f"--template-prob is a probability in [0, 1]; got {cfg['template_prob']}"
    if cfg["steps"] < 0 or (cfg["steps"] == 0 and cfg["time_budget"] <= 0):
        return "--steps 0 (sized from the measured step time) needs --time-budget SECONDS; or give --steps N"
    if cfg["steps"] == 0 and cfg["warmup"] <= PROBE[1]:
        return f"--steps 0 needs --warmup above {PROBE[1]} (the schedule's length is set at step {PROBE[1]})"
    if cfg["warm_start"] and cfg["init"]:
        return "--warm-start and --init both name a starting folder; give one"
    for key in ("warm_start", "init"):
        if cfg[key] and not (Path(cfg[key]) / "model_index.json").is_file():
            return f"--{key.replace('_', '-')} {cfg[key]} is not a pipeline folder (no model_index.json)"
    return None


def build_models(cfg: dict, tokenizer) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.embedded import HIDDEN

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=cfg["max_length"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=HIDDEN))
    if error := config_error(cfg):
        raise ValueError(error)
    latent = cfg["size"] // cfg["vae_factor"]
    vae_channels = (32,) if cfg["vae_factor"] == 1 else (16, 32)
    down = tuple("CrossAttnDownBlock2D" if k in cfg["attention_levels"] else "DownBlock2D" for k in range(4))
    up = tuple("CrossAttnUpBlock2D" if k in cfg["attention_levels"] else "UpBlock2D" for k in reversed(range(4)))
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(cfg["channels"]), norm_num_groups=8, cross_attention_dim=HIDDEN,
        down_block_types=down, up_block_types=up,
        attention_head_dim=cfg["heads"])  # diffusers' legacy name: this is the number of heads
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=8, layers_per_block=1, sample_size=cfg["size"], mid_block_add_attention=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="v_prediction")
    return {"text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05
    return f


# ----------------------------------------------------------------------------------------------- stages
def train_vae(vae, images: np.ndarray, foreground: np.ndarray, cfg: dict, gen: torch.Generator) -> None:
    """L1 + MSE reconstruction (object pixels weighted 5x: they are few but carry colour and shape) + tiny KL."""
    vae.train().requires_grad_(True)
    dev = gen.device
    images, foreground = torch.from_numpy(images).to(dev), torch.from_numpy(foreground).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(50, cfg["vae_steps"]))
    bar = tqdm(range(cfg["vae_steps"]), desc="vae", unit="step", mininterval=2.0)
    for step in bar:
        idx = torch.randint(len(images), (cfg["vae_batch"],), generator=gen, device=dev)
        x = to_tensor(images[idx])
        w = 1.0 + 4.0 * foreground[idx].float()[:, None]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = (w * (rec - x).abs()).mean() + (w * (rec - x) ** 2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg["vae_steps"] - 1:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.3f}")
            log.info("vae step %d l1 %.4f kl/dim %.3f", step, l1.item(), kl.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    dev = next(vae.parameters()).device
    for i in tqdm(range(0, len(images), batch), desc="encode", unit="batch", mininterval=2.0):
        post = vae.encode(to_tensor(images[i:i + batch]).to(dev)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(models: dict, tokenizer, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str],
               templated: list[str], cfg: dict, gen: torch.Generator, checkpoint=None,
               state_dir: Path | None = None, resume: Path | None = None,
               stop_at: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    from bench.embedded.train_state import load_state, save_state

    unet, text_encoder, scheduler = models["unet"], models["text_encoder"], models["scheduler"]
    mean, std = latents
    sf = models["vae"].config.scaling_factor

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=cfg["max_length"], truncation=True,
                         return_tensors="pt").input_ids

    dev = gen.device
    ids_all, ids_templated, empty_ids = (tokenize(x).to(dev) for x in (captions, templated, [""]))
    alphas = scheduler.alphas_cumprod.to(dev)
    snr_all = alphas / (1 - alphas)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    for m in (unet, text_encoder):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.99))
    total = [cfg["steps"]]  # the schedule's length; 0 until PROBE[1] when sized from the budget
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_lambda(cfg["warmup"], max(total[0], k + 1))(k))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    first = 0
    trained = {k: models[k] for k in ("unet", "text_encoder", "vae")}
    if resume is not None:
        meta = load_state(resume, trained, {"unet": ema_unet, "text_encoder": ema_text}, opt, gen)
        first = meta["step"]
        total[0] = cfg["steps"] or meta["total_steps"]
        sched.last_epoch = first  # as after `first` scheduler steps
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * sched.lr_lambdas[0](first)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        log.info("resumed from %s at step %d of a %d-step schedule", resume, first, total[0])

    def save(done: int) -> None:
        save_state(state_dir, done, total[0], cfg, trained, {"unet": ema_unet, "text_encoder": ema_text}, opt, gen)
        log.info("training state at step %d written to %s", done, state_dir)

    running, t0 = None, time.time()
    # the budget, cut to what is left before an absolute deadline (a lent machine's command limit)
    budget = min(cfg["time_budget"] or math.inf, stop_at - t0 if stop_at else math.inf)
    if budget < math.inf:
        log.info("training for %.0f s of wall clock", budget)
    else:
        budget = 0
    last_state, probe_start = t0, None
    bar = tqdm(total=total[0] or None, initial=first, desc="unet", unit="step", mininterval=5.0)
    step = first
    while total[0] == 0 or step < total[0]:
        if total[0] == 0 and step == first + PROBE[0]:
            probe_start = time.time()
        if total[0] == 0 and step == first + PROBE[1]:
            per_step = (time.time() - probe_start) / (PROBE[1] - PROBE[0])
            total[0] = step + max(1, int(0.97 * (budget - (time.time() - t0)) / per_step))
            bar.total = total[0]
            log.info("step time %.4f s (steps %d-%d): the schedule spans %d steps in the %.0f s budget", per_step,
                     first + PROBE[0], first + PROBE[1], total[0], budget)
        idx = torch.randint(len(mean), (cfg["batch"],), generator=gen, device=dev)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=dev)) * sf
        ids = ids_all[idx].clone()
        if cfg["template_prob"] > 0:  # (no random draw when off: the generator stream stays as without templates)
            use_template = torch.rand(cfg["batch"], generator=gen, device=dev) < cfg["template_prob"]
            ids[use_template] = ids_templated[idx][use_template]
        drop = torch.rand(cfg["batch"], generator=gen, device=dev) < cfg["cfg_dropout"]
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg["batch"],), generator=gen, device=dev)
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        snr = snr_all[t]
        # min-SNR weighting for v-prediction (gamma <= 0: plain v-prediction MSE)
        weight = (torch.clamp(snr, max=cfg["min_snr_gamma"]) / (snr + 1) if cfg["min_snr_gamma"] > 0
                  else torch.ones_like(snr))
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in ema_pairs:
                pe.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        last = step == total[0]
        if step % 25 == 1 or last:
            running = loss.item() if running is None else 0.8 * running + 0.2 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if step % 100 == 1 or last:
            log.info("unet step %d loss %.4f (%.1f s)", step - 1, loss.item(), time.time() - t0)
        if checkpoint is not None and step % cfg["checkpoint_every"] == 0:
            checkpoint(step, ema_unet, ema_text)
        if cfg["stop_after"] and step >= cfg["stop_after"]:
            log.info("stopping after step %d of a %d-step schedule (--stop-after)", step, total[0])
            break
        if budget and time.time() - t0 >= budget:
            log.info("stopping after step %d of a %d-step schedule: the %.0f s budget is spent", step, total[0],
                     budget)
            break
        if state_dir is not None and cfg["state_every"] and time.time() - last_state >= cfg["state_every"]:
            save(step)
            last_state = time.time()
    bar.close()
    if state_dir is not None:
        save(step)
    log.info("unet: %d steps of batch %d in %.1f s", step - first, cfg["batch"], time.time() - t0)
    return ema_unet, ema_text


def save_pipeline(out: Path, models: dict, tokenizer, cfg: dict, fp16: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    for key in ("unet", "vae", "text_encoder"):
        module = copy.deepcopy(models[key]).to(dtype)
        module.save_pretrained(out / key, safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    models["scheduler"].save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "train_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_init(folder: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"use_safetensors": True, "torch_dtype": torch.float32}
    return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw).eval().requires_grad_(False),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def warm_start(models: dict, folder: Path) -> dict:
    """Copy a pipeline folder of another layout into freshly built models: the VAE whole (its scaling factor
    too); of the UNet and text encoder, every tensor whose name and shape match, and tensors that only grew
    along their first axis (position embeddings: 16 -> 77 positions) row by row. Attention blocks the folder
    lacks keep their initialisation, except their output projection (`proj_out`), zeroed so that each new
    block starts as the identity on its residual stream (Stable Diffusion's zero-initialised `proj_out`).
    Returns counts of copied / grown / new tensors per part."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"use_safetensors": True, "torch_dtype": torch.float32}
    source = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw).state_dict(),
              "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw).state_dict()}
    models["vae"] = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw).eval().requires_grad_(False)
    counts = {}
    for key, src in source.items():
        dst = models[key].state_dict()
        n = {"copied": 0, "grown": 0, "new": 0}
        for name, t in dst.items():
            s = src.get(name)
            if s is not None and s.shape == t.shape:
                t.copy_(s)
                n["copied"] += 1
            elif s is not None and s.dim() == t.dim() and s.shape[1:] == t.shape[1:] and s.shape[0] < t.shape[0]:
                t[:s.shape[0]].copy_(s)
                n["grown"] += 1
            else:
                if s is None and ".attentions." in name and ".proj_out." in name:
                    t.zero_()
                n["new"] += 1
        counts[key] = n
    return counts


def export_state(state: Path, out: Path) -> None:
    """The EMA pipeline of a training state, saved like a finished run's folder (and swapped in whole)."""
    from bench.embedded import build_tokenizer
    from bench.embedded.train_state import load_tensors, read_meta, restore

    meta = read_meta(state)
    cfg = meta["config"] | {"completed_steps": meta["step"]}
    tokenizer = build_tokenizer(cfg["max_length"])
    models = build_models(cfg, tokenizer)
    model, ema = load_tensors(state / "model.safetensors"), load_tensors(state / "ema.safetensors")
    restore({"vae": models["vae"]}, model)
    models["vae"].register_to_config(scaling_factor=meta["scaling_factor"])
    restore({k: models[k] for k in ("unet", "text_encoder")}, ema)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pipeline(partial, models, tokenizer, cfg)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log.info("exported the EMA pipeline of %s (step %d of %d) to %s", state, meta["step"], meta["total_steps"], out)


def train(cfg: dict, out: Path, state_dir: Path | None = None, resume: Path | None = None,
          stop_at: float = 0.0) -> None:
    from bench.embedded import build_tokenizer

    dev = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                       "cpu" if cfg["device"] == "auto" else cfg["device"])
    if dev.type == "cpu":  # bit-reproducible on one thread; CUDA runs are not (atomics in the backward pass)
        set_single_thread()
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(dev).manual_seed(cfg["seed"])
    tokenizer = build_tokenizer(cfg["max_length"])
    models = build_models(cfg, tokenizer)
    if cfg["init"]:
        models.update(load_init(Path(cfg["init"])))
        log.info("initialised unet, text encoder and vae from %s", cfg["init"])
    if cfg["warm_start"] and resume is None:
        counts = warm_start(models, Path(cfg["warm_start"]))
        cfg["warm_start_unet_sha256"] = file_sha256(Path(cfg["warm_start"]) / "unet" /
                                                    "diffusion_pytorch_model.safetensors")
        log.info("warm start from %s: %s", cfg["warm_start"], json.dumps(counts))
    if resume is not None:  # the VAE (and its scaling factor) come from the state
        from bench.embedded.train_state import read_meta

        models["vae"].register_to_config(scaling_factor=read_meta(resume)["scaling_factor"])
    for key in ("unet", "vae", "text_encoder"):
        models[key].to(dev)
    models["vae"].eval().requires_grad_(False)
    log.info("device %s", dev)
    log.info("config %s", json.dumps(cfg, sort_keys=True))
    log.info("parameters: unet %d, vae %d, text_encoder %d", n_params(models["unet"]), n_params(models["vae"]),
             n_params(models["text_encoder"]))

    t0 = time.time()
    ds = training_dataset(cfg["num_train_images"], cfg["size"], cfg["seed"], cfg["same_colour_prob"])
    images, foreground, captions, templated = render_all(ds, cfg["seed"], cfg["render_workers"])
    log.info("rendered %d training images at %d px in %.0f s", len(images), cfg["size"], time.time() - t0)

    if resume is not None:
        from bench.embedded.train_state import load_tensors, restore

        restore({"vae": models["vae"]}, load_tensors(resume / "model.safetensors"))
    elif cfg["vae_steps"] > 0:
        train_vae(models["vae"], images, foreground, cfg, gen)
        models["vae"].eval().requires_grad_(False)
    mean, std = encode_all(models["vae"], images)
    if not (cfg["init"] or cfg["warm_start"] or resume is not None):
        models["vae"].register_to_config(scaling_factor=float(1.0 / mean.std()))
    log.info("vae done at %.0f s; latent scaling_factor %.4f", time.time() - t0, models["vae"].config.scaling_factor)

    def checkpoint(step, ema_unet, ema_text):
        save_pipeline(out / "checkpoints" / f"step-{step}", models | {"unet": ema_unet, "text_encoder": ema_text},
                      tokenizer, cfg | {"completed_steps": step})

    ema_unet, ema_text = train_unet(models, tokenizer, (mean, std), captions, templated, cfg, gen,
                                    checkpoint if cfg["checkpoint_every"] else None, state_dir, resume, stop_at)
    models["unet"], models["text_encoder"] = ema_unet, ema_text
    # Written next to OUT and swapped in whole, so a crash never leaves a half-written pipeline in OUT.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pipeline(partial, models, tokenizer, cfg)
    if (out / "checkpoints").is_dir():
        (out / "checkpoints").rename(partial / "checkpoints")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log.info("saved pipeline to %s (total %.0f s)", out, time.time() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="named defaults (RECIPES); flags given override them")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="resumable training state (every --state-every s and at the end); default OUT.state")
    parser.add_argument("--resume", type=Path, default=None, help="continue the training state in this folder")
    parser.add_argument("--stop-at", type=float, default=0.0,
                        help="Unix time by which UNet training ends, whatever the budget (not part of the recipe)")
    parser.add_argument("--export-state", type=Path, default=None,
                        help="only save the EMA pipeline of this training state to --out")
    for key, value in DEFAULTS.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=None)
        else:
            parser.add_argument(flag, type=type(value), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    given = {k: v for k in [*DEFAULTS, "seed"] if (v := getattr(args, k)) is not None}
    if args.export_state is not None:
        try:
            export_state(args.export_state, args.out)
        except ValueError as err:
            parser.error(str(err))
        return
    if args.resume is not None:
        from bench.embedded.train_state import read_meta

        try:
            saved = read_meta(args.resume)["config"]
        except ValueError as err:
            parser.error(str(err))
        if args.recipe or (changed := [k for k, v in given.items() if k not in RUN_KEYS and v != saved.get(k)]):
            parser.error("--resume continues the state's own recipe; drop "
                         + ("--recipe" if args.recipe else " ".join(f"--{k.replace('_', '-')}" for k in changed))
                         + f" (a resumed run may change only {', '.join(RUN_KEYS)})")
        cfg = saved | {k: v for k, v in given.items() if k in RUN_KEYS}
    else:
        cfg = DEFAULTS | {"seed": 0} | RECIPES.get(args.recipe, {}) | given
        if args.recipe:
            cfg["recipe"] = args.recipe
    if error := config_error(cfg):
        parser.error(error)
    state_dir = args.state_dir or (args.out.with_name(args.out.name + ".state") if cfg["state_every"] else None)
    train(cfg, args.out, state_dir, args.resume, args.stop_at)


if __name__ == "__main__":
    main()
