"""DEDOS's training-time diffusion front end (Sec. 3.2, Eq. 1-2): the image's latent is denoised for a few
DDIM steps by the frozen UNet with the empty prompt, and the features of every UNet transformer block are
kept for the proxy queries (Eq. 3). Never used at inference.

z_0 = V(x) (Eq. 1, the VAE posterior mean) -> z_{t_1} = sqrt(a_{t_1}) z_0 + sqrt(1 - a_{t_1}) eps at the
largest timestep -> for t_1 > t_2 > ... > t_N: one UNet pass, its DDIM x0 prediction, the deterministic DDIM
step (eta = 0) to the next timestep. The last x0 prediction decoded by the VAE is "the image after denoising"
(x_a, Eq. 9); the input image is "the image before denoising" (x_b).

`noise="none"` follows Sec. 3.2's last sentence literally ("we treat the latent code corresponding to the
original image x as noisy samples z_t"): the first pass sees z_0 itself, labelled t_1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def parse_timesteps(text: str, iterations: int) -> list[int]:
    """The denoising timesteps, largest first. `timesteps` lists them ("50+100+200", DEDOS Table 6); when
    `iterations` (Table 5) differs from their number, that many are spread evenly between the smallest and the
    largest (the paper does not say which timesteps its 2/5/7-iteration runs used)."""
    values = sorted({int(v) for v in str(text).replace(",", "+").split("+") if v.strip()})
    if not values or any(v < 1 or v > 999 for v in values):
        raise ValueError(f"timesteps={text!r}: give timesteps in 1..999 joined by +, e.g. 50+100+200")
    if iterations != len(values):
        values = sorted({int(round(v)) for v in np.linspace(values[0], values[-1], iterations)})
    return values[::-1]


def transformer_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The first transformer block of every UNet attention module (Transformer2DModel), in registration
    order; forward hooks record them in call order."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and name.endswith("transformer_blocks.0"):
            blocks.append(module)
    return blocks


def block_channels(unet: torch.nn.Module) -> list[int]:
    """Channels of every hooked block's output, in the order a UNet pass calls them."""
    order: list[int] = []
    handles = [b.register_forward_hook(lambda m, a, o: order.append(o.shape[-1])) for b in transformer_blocks(unet)]
    try:
        cfg = unet.config
        size = int(cfg.sample_size)
        x = torch.zeros(1, cfg.in_channels, size, size, device=unet.device, dtype=unet.dtype)
        text = torch.zeros(1, 1, cfg.cross_attention_dim, device=unet.device, dtype=unet.dtype)
        with torch.no_grad():
            unet(x, torch.tensor([1], device=unet.device), encoder_hidden_states=text)
    finally:
        for h in handles:
            h.remove()
    return order


@dataclass
class Denoised:
    features: list[list[torch.Tensor]]  # [timestep][block] (B, tokens, C), float32
    after: torch.Tensor  # (B, 3, H, W) uint8: the decoded last x0 prediction (x_a)


def random_unet(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same UNet architecture with seeded random weights (DEDOS Table 4's control on the embedded model:
    does the diffusion model's knowledge matter?)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    fresh = UNet2DConditionModel.from_config(unet.config)
    return fresh.to(unet.device, unet.dtype).eval().requires_grad_(False)


@torch.no_grad()
def denoise(backbone, unet: torch.nn.Module, images: list[np.ndarray], timesteps: list[int],
            generator: torch.Generator, noise: str = "add", size: int = 0,
            latents: torch.Tensor | None = None) -> Denoised:
    """Run the front end on RGB uint8 images (see the module docstring). latents: their z_0 if already
    encoded (the posterior mean is deterministic, so a fit encodes each training image once)."""
    size = size or backbone.resolution
    z0 = latents if latents is not None else backbone.encode_images(images, size)  # Eq. 1: VAE posterior mean
    text = backbone.encode_text([""] * len(images))  # the empty prompt
    sched = backbone.noising_scheduler()
    alphas = sched.alphas_cumprod.to(z0.device, torch.float32)
    prediction = sched.config.get("prediction_type", "epsilon")
    eps = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    a = alphas[timesteps[0]]
    z = z0 if noise == "none" else (a.sqrt() * z0.float() + (1 - a).sqrt() * eps.float()).to(z0.dtype)
    captured: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, args, out: captured.append(out.float()))
               for b in transformer_blocks(unet)]
    features, x0 = [], z0.float()
    try:
        for k, t in enumerate(timesteps):
            captured.clear()
            out = unet(z, torch.tensor([t], device=z.device), encoder_hidden_states=text).sample.float()
            features.append(list(captured))
            a, zf = alphas[t], z.float()
            if prediction == "v_prediction":
                x0 = a.sqrt() * zf - (1 - a).sqrt() * out
                eps_hat = a.sqrt() * out + (1 - a).sqrt() * zf
            else:
                x0 = (zf - (1 - a).sqrt() * out) / a.sqrt()
                eps_hat = out
            if k + 1 < len(timesteps):  # deterministic DDIM step (eta = 0) to the next timestep
                a_next = alphas[timesteps[k + 1]]
                z = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps_hat).to(z0.dtype)
    finally:
        for h in handles:
            h.remove()
    decoded = backbone.vae.decode((x0 / backbone.vae.config.scaling_factor).to(backbone.vae.dtype)).sample
    after = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return Denoised(features, after)
