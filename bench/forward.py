"""The two ways of running the UNet under a tracer.

Inversion (real images): VAE posterior mean x scaling factor -> q(x_t | x_0) at a fixed t with a fixed seed
(DDIM's add_noise over the folder's alphas) -> one UNet pass with the prompt, no guidance (iSeg Eq. 3;
OVAM/DAAM on real images).
Generation: full denoising with classifier-free guidance by the folder's own scheduler (`scheduler=auto`, what
the papers ran) or a named one; the UNet batch is [uncond, cond] and the tracer records the conditional half
unless `branch` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.models import Backbone
from bench.trace import AttentionTracer, Trace, TraceRequest


@dataclass(frozen=True)
class ForwardSetting:
    """Everything that changes the UNet pass (besides the prompt and Cat-Cross weights)."""

    mode: str = "inversion"  # inversion | generation
    timestep: int = 100  # inversion: the noise level t
    seed: int = 0  # inversion: noise seed shared by every image; generation: base of per-image seeds
    steps: int = 50  # generation: denoising steps
    scheduler: str = "auto"  # generation: the folder's own scheduler, or a bench.models.SCHEDULERS name
    guidance: float = 7.5  # generation: classifier-free guidance scale
    branch: str = "cond"  # generation: which half of the batch to record: cond | uncond | both
    size: int = 0  # image size fed to the VAE; 0 = the backbone's native resolution


@dataclass
class ForwardResult:
    traces: list[Trace]
    unet_passes: int  # UNet forward calls (a CFG pair counts once)


def _branch_slice(branch: str, batch: int) -> slice:
    return {"cond": slice(batch, 2 * batch), "uncond": slice(0, batch), "both": slice(None)}[branch]


@torch.no_grad()
def run_traced(backbone: Backbone, req: TraceRequest, setting: ForwardSetting, prompts: list[str],
               images: list[np.ndarray] | None = None, key_weights: torch.Tensor | None = None,
               image_seeds: list[int] | None = None) -> ForwardResult:
    """Trace a batch: inversion of `images`, or generation from `prompts` (mode=generation).

    Generation with `images` given replays them: every DDIM step's latent is q(x_t | x_0) of the image's own
    latent (fixed per-image noise), so the UNet sees a full guided denoising trajectory whose end point IS the
    given image and its ground truth stays exact (synthetic generation-mode datasets, bench.data.synthetic).

    key_weights: (B, T) Cat-Cross weights per prompt token (iSeg Eq. 8), or None for plain attention.
    """
    if setting.mode not in ("inversion", "generation"):
        raise ValueError(f"unknown trace mode {setting.mode!r}")
    if setting.mode == "inversion" and images is None:
        raise ValueError("inversion mode needs images")
    token_ids = backbone.tokenize(prompts)
    text = backbone.encode_text(prompts)
    weights = None if key_weights is None else key_weights.to(backbone.device)
    with AttentionTracer(backbone.unet, req, weight_keys=weights is not None) as tracer:
        if setting.mode == "inversion":
            tracer.set_key_weights(weights)
            passes = _invert(backbone, images, text, setting)
            generated = [np.asarray(im) for im in images]  # trace.image: the traced image (dCRF needs it)
        else:
            uncond = backbone.encode_text([""] * len(prompts))
            if weights is not None:
                weights = torch.cat([torch.ones_like(weights), weights])
            tracer.set_key_weights(weights)
            tracer.set_branch(_branch_slice(setting.branch, len(prompts)))
            seeds = image_seeds or [setting.seed + i for i in range(len(prompts))]
            x0 = None if images is None else backbone.encode_images(images, setting.size or backbone.resolution)
            generated, passes = _generate(backbone, torch.cat([uncond, text]), setting, seeds, x0)
            if images is not None:
                generated = [np.asarray(im) for im in images]
        traces = tracer.traces(prompts, token_ids)
    if generated is not None:
        for trace, image in zip(traces, generated):
            trace.image = image
    return ForwardResult(traces, passes)


def _invert(backbone: Backbone, images, text, setting: ForwardSetting) -> int:
    size = setting.size or backbone.resolution
    latents = backbone.encode_images(images, size)
    # One noise draw shared by every image, so an image's trace does not depend on its batch.
    generator = torch.Generator().manual_seed(setting.seed)
    noise = torch.randn(latents.shape[1:], generator=generator).to(latents.device, latents.dtype)
    t = torch.tensor([setting.timestep], device=latents.device, dtype=torch.long)
    noisy = backbone.noising_scheduler().add_noise(latents, noise.expand_as(latents), t)
    backbone.unet(noisy, t, encoder_hidden_states=text)
    return 1


def _generate(backbone: Backbone, text_pair, setting: ForwardSetting, seeds: list[int], x0=None):
    import inspect

    scheduler = backbone.make_scheduler(setting.scheduler)
    scheduler.set_timesteps(setting.steps)
    # stochastic samplers (DDPM, Euler ancestral) draw their noise from a seeded generator: runs repeat
    step_kw = {"generator": torch.Generator().manual_seed(seeds[0])} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    size = setting.size or backbone.resolution
    factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    shape = (backbone.unet.config.in_channels, size // factor, size // factor)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents.to(backbone.device, backbone.dtype) * scheduler.init_noise_sigma
    noise = latents
    for t in scheduler.timesteps:
        if x0 is not None:  # replay: the trajectory of the given latents (see run_traced)
            latents = scheduler.add_noise(x0, noise, t.reshape(1))
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = backbone.unet(model_in, t, encoder_hidden_states=text_pair).sample.chunk(2)
        guided = uncond + setting.guidance * (cond - uncond)
        latents = scheduler.step(guided, t, latents, **step_kw).prev_sample
    if x0 is not None:
        return None, len(scheduler.timesteps)
    decoded = backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample
    images = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [im.numpy() for im in images], len(scheduler.timesteps)
