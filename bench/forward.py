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

from bench.errors import BenchError
from bench.models import Backbone
from bench.capture import AttentionTracer, Trace, TraceRequest


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
               image_seeds: list[int] | None = None, embedding_weights: torch.Tensor | None = None) -> ForwardResult:
    """Trace a batch: inversion of `images`, or generation from `prompts` (mode=generation).

    Generation with `images` given replays them: every DDIM step's latent is q(x_t | x_0) of the image's own
    latent (fixed per-image noise), so the UNet sees a full guided denoising trajectory whose end point IS the
    given image and its ground truth stays exact (synthetic generation-mode datasets, bench.data.synthetic).

    key_weights: (B, T) Cat-Cross weights per prompt token (iSeg Eq. 8), or None for plain attention.
    embedding_weights: (B, T) weights of the prompt tokens' text embeddings before the UNet (iSeg's released
    Cat-Cross: keys and values), or None.
    """
    if setting.mode not in ("inversion", "generation"):
        raise ValueError(f"unknown trace mode {setting.mode!r}")
    if setting.mode == "inversion" and images is None:
        raise ValueError("inversion mode needs images")
    token_ids = backbone.tokenize(prompts)
    text = backbone.condition(prompts)
    if embedding_weights is not None:  # the conditional prompts' embeddings only (CFG's unconditional: unweighted)
        states = text["encoder_hidden_states"]
        if backbone.family not in ("sd", "sdxl") or states.shape[1] != embedding_weights.shape[1]:
            # a joint transformer's text stream runs through every block: scaling its input is no cross-attention
            # weighting of keys and values
            raise BenchError(f"token weights on the text embeddings (iSeg gamma_on=embeddings) scale a UNet's "
                             f"cross-attention keys and values; {backbone.family} has none: use gamma_on=keys")
        text = {**text, "encoder_hidden_states": states * embedding_weights.to(states.device, states.dtype)[:, :, None]}
    weights = None if key_weights is None else key_weights.to(backbone.device)
    if backbone.family != "sd":
        backbone.guidance = setting.guidance
    with AttentionTracer(backbone.unet, req, weight_keys=weights is not None, family=backbone.family,
                         text_columns=backbone.text_columns(),
                         rows=getattr(backbone, "joint_rows", "renormalised")) as tracer:
        if setting.mode == "inversion":
            tracer.set_key_weights(weights)
            passes = _invert(backbone, images, text, setting, tracer)
            generated = [np.asarray(im) for im in images]  # trace.image: the traced image (dCRF needs it)
        else:
            if weights is not None and backbone.uses_cfg:  # the [uncond, cond] batch: unconditional keys unweighted
                weights = torch.cat([torch.ones_like(weights), weights])
            tracer.set_key_weights(weights)
            if backbone.uses_cfg:
                uncond = backbone.negative_condition(len(prompts))
                text = {k: torch.cat([uncond[k], text[k]]) for k in text}
                tracer.set_branch(_branch_slice(setting.branch, len(prompts)))
            elif setting.branch != "cond":
                raise BenchError(f"branch={setting.branch}: {backbone.family} generates without an unconditional "
                                 f"branch (guidance-distilled); use branch=cond")
            seeds = image_seeds or [setting.seed + i for i in range(len(prompts))]
            x0 = None if images is None else backbone.encode_images(images, setting.size or backbone.resolution)
            generated, passes = _generate(backbone, text, setting, seeds, x0, tracer)
            if images is not None:
                generated = [np.asarray(im) for im in images]
        traces = tracer.traces(prompts, token_ids)
    if generated is not None:
        for trace, image in zip(traces, generated):
            trace.image = image
    return ForwardResult(traces, passes)


def _latent_hw(backbone: Backbone, size: int) -> tuple[int, int]:
    return size // backbone.vae_factor(), size // backbone.vae_factor()


def _invert(backbone: Backbone, images, text, setting: ForwardSetting, tracer) -> int:
    size = setting.size or backbone.resolution
    latents = backbone.encode_images(images, size)
    # One noise draw shared by every image, so an image's trace does not depend on its batch.
    generator = torch.Generator().manual_seed(setting.seed)
    noise = torch.randn(latents.shape[1:], generator=generator).to(latents.device, latents.dtype)
    noisy, t = backbone.noise_to(latents, noise.expand_as(latents), setting.timestep)
    tracer.set_latent_size(tuple(latents.shape[-2:]))
    backbone.denoise(noisy, t, text)
    return 1


def _set_flow_timesteps(backbone: Backbone, scheduler, steps: int, latent_hw) -> None:
    """The pipeline's schedule: SD3 `set_timesteps(steps)`; Flux sigmas linspace(1, 1/steps) with its `mu`."""
    if backbone.family == "flux":
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=backbone.shift_mu(latent_hw))
    else:
        scheduler.set_timesteps(steps, mu=backbone.shift_mu(latent_hw))


def _generate(backbone: Backbone, text_pair, setting: ForwardSetting, seeds: list[int], x0=None, tracer=None):
    import inspect

    flow = backbone.family in ("sd3", "flux")
    scheduler = backbone.make_scheduler(setting.scheduler)
    size = setting.size or backbone.resolution
    factor = backbone.vae_factor()
    if flow:
        _set_flow_timesteps(backbone, scheduler, setting.steps, _latent_hw(backbone, size))
    else:
        scheduler.set_timesteps(setting.steps)
    # stochastic samplers (DDPM, Euler ancestral) draw their noise from a seeded generator: runs repeat
    step_kw = {"generator": torch.Generator().manual_seed(seeds[0])} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    channels = backbone.unet.config.in_channels if backbone.family == "sd" else backbone.vae.config.latent_channels
    shape = (channels, size // factor, size // factor)
    if tracer is not None:
        tracer.set_latent_size(shape[1:])
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    latents = latents.to(backbone.device, backbone.dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    noise = latents
    for t in scheduler.timesteps:
        if x0 is not None:  # replay: the trajectory of the given latents (see run_traced)
            latents = scheduler.scale_noise(x0, t.reshape(1), noise) if flow \
                else scheduler.add_noise(x0, noise, t.reshape(1))
        if backbone.uses_cfg:
            model_in = torch.cat([latents, latents])
            if hasattr(scheduler, "scale_model_input"):
                model_in = scheduler.scale_model_input(model_in, t)
            uncond, cond = backbone.denoise(model_in, t, text_pair).chunk(2)
            guided = uncond + setting.guidance * (cond - uncond)
        else:
            guided = backbone.denoise(latents, t, text_pair)
        latents = scheduler.step(guided, t, latents, **step_kw).prev_sample
    if x0 is not None:
        return None, len(scheduler.timesteps)
    decoded = backbone.vae.decode(backbone.unscale_latents(latents)).sample
    images = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [im.numpy() for im in images], len(scheduler.timesteps)
