"""Backbone families beyond SD 1.x/2.x: SDXL (a UNet with `text_time` added conditioning), SD3/SD3.5 (MM-DiT,
joint attention `[image, text]`) and Flux.1 (MM-DiT, joint attention `[text, image]`, 19 double + 38 single
blocks). Each family is detected from a diffusers folder's `model_index.json` and conditions its denoiser exactly
as its diffusers pipeline does (the pipeline files named in each class).

Every family exposes the same four things to `bench.forward`: `condition(prompts)` (the denoiser's text inputs,
batch first), `negative_condition(n)` (the unconditional branch of classifier-free guidance), `denoise(latents,
t, cond)` (latents (B, C, h, w) in, the model output in the same layout) and `noise_to(latents, noise,
timestep)` (the papers' "inversion": q(x_t | x_0) at one user `timestep`).

`timestep` means the same on every family: the position t in the model's training schedule, 0 <= t <
num_train_timesteps (1000), noise growing with t. On SD/SDXL it is DDPM's t (x_t = sqrt(a_t) x0 + sqrt(1 - a_t)
eps); on the flow-matching families it is the scheduler's own sigma at t / num_train_timesteps after the model's
shift (SD3: static shift 3.0; Flux: dynamic, `mu` from the image's token count as FluxPipeline computes it), and
x_t = (1 - sigma) x0 + sigma eps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.models import Backbone

# model_index.json `_class_name` -> family
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux",
}
FAMILIES = ("sd", "sdxl", "sd3", "flux")
# Sub-folders each family needs (the tokenizers / encoders the pipeline loads); optional ones may be null in
# model_index.json (SD3 without T5).
FAMILY_PARTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
FLOW_FAMILIES = ("sd3", "flux")


def detect_family(folder: Path) -> str:
    """The family of a diffusers folder, from model_index.json's pipeline class; a one-line error otherwise."""
    index = folder / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        name = None
    family = PIPELINE_FAMILIES.get(name)
    if family is None:
        raise BenchError(f"model.path={folder}: pipeline {name!r} (model_index.json) is not a supported backbone; "
                         f"supported: {', '.join(sorted(set(PIPELINE_FAMILIES)))}")
    return family


def family_of(model_cfg: dict) -> str:
    """The family a `model.*` config loads (driver side, no weights)."""
    from bench.models import model_folder_path, model_kind

    if model_kind(model_cfg) == "sd3-medium-arch":
        return "sd3"
    if model_kind(model_cfg) != "diffusers":
        return "sd"
    return detect_family(model_folder_path(model_cfg))


def _load(folder: Path, part: str, dtype, kind: str):
    """One component of a pipeline folder by its class in model_index.json (safetensors only)."""
    import diffusers
    import transformers

    entry = json.loads((folder / "model_index.json").read_text()).get(part)
    if not entry or entry[1] is None:
        return None
    library, cls_name = entry
    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise BenchError(f"model.path={folder}: {part} is a {library}.{cls_name}, unknown to the installed {library}")
    if kind == "tokenizer":
        return cls.from_pretrained(folder / part)
    if kind == "scheduler":
        return cls.from_pretrained(folder, subfolder=part)
    return cls.from_pretrained(folder, subfolder=part, use_safetensors=True, torch_dtype=dtype)


def load_family_parts(folder: Path, family: str, dtype) -> dict:
    """Every component of a family's folder, by the classes model_index.json names."""
    parts = {}
    for part in FAMILY_PARTS[family] + (("text_encoder_3", "tokenizer_3") if family == "sd3" else ()):
        kind = "tokenizer" if part.startswith("tokenizer") else "scheduler" if part == "scheduler" else "model"
        parts[part] = _load(folder, part, dtype, kind)
    return parts


def _clip_states(tokenizer, encoder, prompts, device):
    """(penultimate hidden states, pooled/projected output) of one CLIP tower, as the SDXL and SD3 pipelines take
    them (`hidden_states[-2]`, `output[0]`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def build_backbone(family: str, name: str, parts: dict, device, dtype, info: dict):
    cls = {"sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}[family]
    denoiser = parts.get("unet") or parts["transformer"]
    # `tokenizer` is the one whose ids the attribution columns carry: T5's on Flux (CLIP there is pooled only)
    tokenizer = parts["tokenizer_2"] if family == "flux" else parts["tokenizer"]
    backbone = cls(name, denoiser, parts["vae"], parts["text_encoder"], tokenizer, parts["scheduler"],
                   device, dtype, info)
    backbone.extra = {k: v for k, v in parts.items()
                      if k not in ("unet", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
    backbone.extra["clip_tokenizer"] = parts["tokenizer"]
    if family == "sdxl":
        index = json.loads((Path(info["path"]) / "model_index.json").read_text())
        backbone.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    for module in [denoiser, parts["vae"], *parts.values()]:
        if isinstance(module, torch.nn.Module):
            module.to(device).eval().requires_grad_(False)
    return backbone


class SDXLBackbone(Backbone):
    """SDXL: `StableDiffusionXLPipeline.encode_prompt` (diffusers 0.42): both CLIP towers' `hidden_states[-2]`
    concatenated on the feature axis, the pooled embedding of `text_encoder_2`, and `add_time_ids` = original
    size + crop top-left (0, 0) + target size. The negative branch is zeros where the folder's
    `force_zeros_for_empty_prompt` is set (SDXL base), else the encoded empty prompt."""

    family = "sdxl"

    def condition(self, prompts):
        states1, _ = _clip_states(self.tokenizer, self.text_encoder, prompts, self.device)
        states2, pooled = _clip_states(self.extra["tokenizer_2"], self.extra["text_encoder_2"], prompts,
                                       self.device)
        states = torch.cat([states1, states2], dim=-1).to(self.dtype)
        return {"encoder_hidden_states": states, "text_embeds": pooled.to(self.dtype)}

    force_zeros = True  # model_index.json's force_zeros_for_empty_prompt (True on SDXL base)

    def negative_condition(self, n: int):
        cond = self.condition([""] * n)
        return {k: torch.zeros_like(v) for k, v in cond.items()} if self.force_zeros else cond

    def encode_text(self, prompts):
        return self.condition(prompts)["encoder_hidden_states"]

    def attribution_states(self, ids):
        """Both towers' penultimate states of the same ids, concatenated: what attn2's to_k reads."""
        one = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        two = self.extra["text_encoder_2"](ids, output_hidden_states=True).hidden_states[-2]
        return torch.cat([one, two], dim=-1)

    def denoise(self, latents, t, cond):
        h, w = latents.shape[-2:]
        size = self.vae_factor()
        time_ids = torch.tensor([h * size, w * size, 0, 0, h * size, w * size], dtype=self.dtype,
                                device=latents.device).repeat(latents.shape[0], 1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return self.unet(latents, t, encoder_hidden_states=cond["encoder_hidden_states"],
                         added_cond_kwargs=added).sample


class _FlowBackbone(Backbone):
    """Flow matching (FlowMatchEulerDiscreteScheduler): x_t = (1 - sigma) x0 + sigma eps."""

    def shift_mu(self, latent_hw) -> float | None:
        return None

    def sigma_at(self, timestep: int, latent_hw) -> tuple[float, float]:
        """(sigma, the scheduler's timestep for it) at user `timestep` (module docstring), with the scheduler's own
        shift: a fresh scheduler set to the one unshifted sigma t / num_train_timesteps."""
        scheduler = self.make_scheduler()
        n = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(sigmas=[timestep / n], mu=self.shift_mu(latent_hw))
        return float(scheduler.sigmas[0]), float(scheduler.timesteps[0])

    def noise_to(self, latents, noise, timestep: int):
        sigma, model_t = self.sigma_at(timestep, latents.shape[-2:])
        noisy = (1.0 - sigma) * latents + sigma * noise
        return noisy, torch.tensor([model_t], device=latents.device)

    def scale_latents(self, latents):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def unscale_latents(self, latents):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift


class SD3Backbone(_FlowBackbone):
    """SD3 / SD3.5: `StableDiffusion3Pipeline.encode_prompt` (diffusers 0.42): CLIP-L and CLIP-G `hidden_states[-2]`
    concatenated on the feature axis and zero-padded to T5's width, then T5's states (256 tokens; zeros when the
    folder has no T5) appended on the sequence axis: text = [CLIP (77), T5]. Pooled = both towers' projections
    concatenated. The negative branch encodes "" (the pipeline's default negative prompt).

    Attribution columns: the 77 CLIP positions, whose token ids are `tokenize()`'s (the cross-attention role's
    text columns)."""

    family = "sd3"
    t5_length = 256

    def condition(self, prompts):
        s1, p1 = _clip_states(self.tokenizer, self.text_encoder, prompts, self.device)
        s2, p2 = _clip_states(self.extra["tokenizer_2"], self.extra["text_encoder_2"], prompts, self.device)
        clip = torch.cat([s1, s2], dim=-1)
        t5_dim = self.unet.config.joint_attention_dim
        encoder, tokenizer = self.extra.get("text_encoder_3"), self.extra.get("tokenizer_3")
        if encoder is None:
            t5 = torch.zeros(len(prompts), self.tokenizer.model_max_length, t5_dim, device=self.device,
                             dtype=clip.dtype)
        else:
            length = min(self.t5_length, tokenizer.model_max_length)
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = encoder(ids)[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        states = torch.cat([clip, t5], dim=-2).to(self.dtype)
        return {"encoder_hidden_states": states, "pooled_projections": torch.cat([p1, p2], -1).to(self.dtype)}

    def negative_condition(self, n: int):
        return self.condition([""] * n)

    def encode_text(self, prompts):
        return self.condition(prompts)["encoder_hidden_states"][:, :self.max_length]

    def text_columns(self) -> slice:
        return slice(0, self.max_length)

    def attribution_states(self, ids):
        """The CLIP part of the text sequence for ids (B, L'): both towers' penultimate states, concatenated and
        zero-padded to T5's width, as `condition` builds the first 77 positions (bench.trace_joint.TextStream)."""
        one = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        two = self.extra["text_encoder_2"](ids, output_hidden_states=True).hidden_states[-2]
        clip = torch.cat([one, two], dim=-1)
        return torch.nn.functional.pad(clip, (0, self.unet.config.joint_attention_dim - clip.shape[-1]))

    def denoise(self, latents, t, cond):
        t = t.to(latents.dtype).expand(latents.shape[0])
        return self.unet(hidden_states=latents, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                         pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class FluxBackbone(_FlowBackbone):
    """Flux.1: `FluxPipeline.encode_prompt` (diffusers 0.42): CLIP's pooled output and T5's last hidden states
    (512 tokens, or the tokenizer's own length when shorter), text ids zeros. Latents are packed 2x2 into tokens
    inside `denoise`; the image ids are `_prepare_latent_image_ids`. No classifier-free guidance (the pipeline's
    default, true_cfg_scale=1): the `guidance` value goes to the guidance embedding where the model has one.
    The tokenizer of the attribution columns is T5's (`tokenizer_2`): all text tokens are its."""

    family = "flux"
    t5_length = 512
    uses_cfg = False

    guidance = 3.5  # FluxPipeline's default guidance_scale; bench.forward sets the setting's

    @property
    def max_length(self) -> int:
        return int(min(self.t5_length, self.tokenizer.model_max_length))

    def attribution_states(self, ids):
        return self.extra["text_encoder_2"](ids, output_hidden_states=False)[0]

    def condition(self, prompts):
        clip = self.extra["clip_tokenizer"]
        ids = clip(prompts, padding="max_length", max_length=clip.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        t5 = self.extra["text_encoder_2"](self.tokenize(prompts).to(self.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": t5.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def encode_text(self, prompts):
        return self.condition(prompts)["encoder_hidden_states"]

    def text_columns(self) -> slice:
        return slice(None)

    def shift_mu(self, latent_hw) -> float | None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        tokens = (int(latent_hw[0]) // 2) * (int(latent_hw[1]) // 2)
        return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def denoise(self, latents, t, cond):
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.unet.config.get("guidance_embeds"):
            guidance = torch.full([b], float(self.guidance), device=latents.device, dtype=torch.float32)
        timestep = (t.to(latents.dtype) / 1000).expand(b)  # FluxPipeline passes t / 1000; the model scales back
        out = self.unet(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=
                        cond["pooled_projections"], encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def check_method_family(method: str, cls, family: str) -> None:
    """A method that reads one family's internals (`families` on its class) refused on any other, in one line
    before anything runs (docs/backbones.md, "Trained methods")."""
    supported = cls.families
    if supported is not None and family not in supported:
        raise BenchError(f"method={method} runs on {'/'.join(supported)} backbones only ({cls.families_why}); this "
                         f"model is {family}: use model=embedded or an SD 1.x/2.x folder")
