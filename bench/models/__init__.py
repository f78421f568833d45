"""Backbones (`model=`): the embedded default, a local diffusers SD folder, or a hub id from the local cache.

Every backbone loads the same way: diffusers/transformers classes from a standard pipeline layout, safetensors
only (never pickle). fp16 on CUDA by default, fp32 on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.registry import Registry

log = logging.getLogger(__name__)

MODELS: Registry = Registry("model", "model.name")
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# `scheduler=` values of the generation mode: auto = the folder's own (what the papers ran: PNDM for SD 1.x,
# DDIM / Euler ... as saved), else one of these diffusers classes built from the folder's scheduler config.
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
              "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "dpm_multistep": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler",
              "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler"}
SCHEDULER_CHOICES = ("auto", *SCHEDULERS)


@dataclass
class Backbone:
    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    _noising: object = field(default=None, init=False, repr=False, compare=False)
    # the family's other components (SDXL/SD3/Flux: second and third text encoders and tokenizers)
    extra: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # SD 1.x/2.x (`unet` is the denoiser: a UNet2DConditionModel here, the transformer on SD3/Flux)
    family = "sd"
    uses_cfg = True  # generation runs [uncond, cond] batches (Flux: one guidance-distilled branch)

    @property
    def max_length(self) -> int:
        return int(getattr(self.tokenizer, "model_max_length", 77))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, D) last hidden states (77 tokens on SD), as SD feeds them to cross-attention."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def condition(self, prompts: list[str]) -> dict:
        """The denoiser's text inputs for `prompts`, batch first (bench.models.families for the other families)."""
        return {"encoder_hidden_states": self.encode_text(prompts)}

    def negative_condition(self, n: int) -> dict:
        return self.condition([""] * n)

    def extra_parts(self) -> dict:
        """The family's other pipeline components by their pipeline names (text_encoder_2, tokenizer_2, ...)."""
        return {k: v for k, v in self.extra.items() if k != "clip_tokenizer"}

    def attribution_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Text states of token ids (B, L') that the attention layers' key projection reads (OVAM's X', Eq. 4):
        the text encoder's last hidden states on SD (bench.models.families for the others)."""
        return self.text_encoder(ids)[0]

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(latents, t, **cond).sample

    def noise_to(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int):
        """q(x_t | x_0) at `timestep` and the denoiser's timestep input (bench.models.families: `timestep`)."""
        t = torch.tensor([timestep], device=latents.device, dtype=torch.long)
        return self.noising_scheduler().add_noise(latents, noise, t), t

    def text_columns(self) -> slice:
        """Which text positions of the denoiser's text sequence `tokenize()`'s ids describe (all on UNets)."""
        return slice(None)

    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray], size: int) -> torch.Tensor:
        """VAE posterior mean x scaling factor of RGB uint8 images resized to size x size."""
        x = torch.stack([torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1) for im in images]).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        x = (x / 127.5 - 1.0).to(self.device, self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean
        return self.scale_latents(latents).to(self.dtype)

    @property
    def resolution(self) -> int:
        """Native image size: denoiser sample size x VAE downsampling factor (512 for SD 1.x / 2.1-base); Flux's
        transformer names none: its VAE's sample size (1024 on Flux.1, FluxPipeline's default size)."""
        sample = getattr(self.unet.config, "sample_size", None)
        if sample is None:
            return int(self.vae.config.sample_size)
        return int(sample) * self.vae_factor()

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
                "scheduler": type(self.scheduler).__name__, **self.info}

    def make_scheduler(self, name: str = "auto"):
        """A fresh scheduler for one generation (set_timesteps mutates it): the folder's own class (auto) or
        the named one (SCHEDULERS), configured from the folder's scheduler config."""
        import diffusers

        if name != "auto" and name not in SCHEDULERS:
            raise BenchError(f"scheduler={name!r} is not one of {', '.join(SCHEDULER_CHOICES)}")
        cls = type(self.scheduler) if name == "auto" else getattr(diffusers, SCHEDULERS[name])
        return cls.from_config(self.scheduler.config)

    def noising_scheduler(self):
        """q(x_t | x_0) of the inversion pass: DDIM's add_noise over the folder's alphas_cumprod, whatever the
        folder's sampler (iSeg's release builds a DDIMScheduler for it; sigma-based samplers would scale x_t).
        Built once per backbone (from_config costs ~4 ms, per image before): add_noise keeps no state between
        calls."""
        if self._noising is None:
            from diffusers import DDIMScheduler

            self._noising = DDIMScheduler.from_config(self.scheduler.config)
        return self._noising


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"model.device={requested} but CUDA is not available; use model.device=auto or cpu")
    return torch.device(requested)


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if requested not in table:
        raise BenchError(f"model.dtype={requested!r} is not one of auto, float32, float16, bfloat16")
    return table[requested]


def check_pipeline_folder(path: str | os.PathLike, shown: str | None = None) -> Path:
    """Fail early (on the driver, before any run directory exists) when a weights folder is unusable: a
    supported family (bench.models.families) with every part that family loads. `shown`: what the user gave
    (a URI whose node-local copy `path` is)."""
    from bench.models.families import FAMILY_PARTS, detect_family

    folder = Path(path).expanduser()
    shown = shown or str(folder)
    if not folder.is_dir():
        raise BenchError(f"model.path={shown} does not exist; expected a diffusers Stable Diffusion folder "
                         f"(model_index.json, {', '.join(PIPELINE_PARTS)}/) there")
    parts = FAMILY_PARTS[detect_family(folder)] if (folder / "model_index.json").is_file() else PIPELINE_PARTS
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        what = ", ".join(missing + ([] if (folder / "model_index.json").is_file() else ["model_index.json"]))
        raise BenchError(f"model.path={shown} is not a diffusers pipeline folder (missing {what}); save one "
                         f"with pipe.save_pretrained(DIR, safe_serialization=True)")
    return folder


def model_folder_path(cfg: dict) -> Path:
    """The local folder a diffusers model (`model.path` / `model.id`) loads from: model.path itself, or where it
    is a URI (s3://...) its copy in this node's cache (bench.node_cache: fetched once per node, keyed by the
    stored folder's fingerprint); model.id's snapshot in the local Hugging Face cache."""
    if cfg.get("path"):
        from bench.node_cache import local_path

        return local_path(cfg["path"], "models", "model.path")
    return resolve_hub_id(cfg["id"])


def resolve_hub_id(model_id: str) -> Path:
    """A hub id resolved from the local Hugging Face cache only (no network, ever)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise BenchError(f"model.id={model_id} is not in the local Hugging Face cache ({cache}); copy it there "
                         f"or pass model.path=<diffusers folder> ({type(err).__name__})") from None


def folder_scheduler_class(folder: Path):
    """The scheduler class a pipeline folder was saved with (scheduler_config.json's _class_name); DDIM when it
    names none diffusers knows (logged)."""
    import json

    import diffusers

    config = folder / "scheduler" / "scheduler_config.json"
    name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    cls = getattr(diffusers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_config"):
        log.warning("scheduler %r of %s is unknown to diffusers; using DDIMScheduler", name, folder)
        return diffusers.DDIMScheduler
    return cls


def scheduler_name(model_cfg: dict, requested: str = "auto") -> str:
    """The scheduler class a generation with `scheduler=requested` uses on this model (driver side, no weights
    loaded): for provenance."""
    if requested != "auto":
        return SCHEDULERS.get(requested, requested)
    kind = model_kind(model_cfg)
    if kind == "embedded":
        from bench.embedded import shipped_folder

        folder = None if model_cfg.get("random") else shipped_folder()
        return folder_scheduler_class(folder).__name__ if folder is not None else "DDIMScheduler"
    return folder_scheduler_class(model_folder_path(model_cfg)).__name__


def load_pipeline_folder(folder: Path, device: torch.device, dtype: torch.dtype, name: str) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from bench.models.families import build_backbone, detect_family, load_family_parts

    folder = check_pipeline_folder(folder)
    family = detect_family(folder)
    if family != "sd":
        try:
            parts = load_family_parts(folder, family, dtype)
        except (OSError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BenchError(f"cannot load weights from {folder}: {first} (only safetensors weights are loaded; "
                             f"re-save with safe_serialization=True)") from None
        scheduler = parts["scheduler"]
        info = {"path": str(folder), "prediction_type": scheduler.config.get("prediction_type")}
        return build_backbone(family, name, parts, device, dtype, info)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True,
                                                     torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = folder_scheduler_class(folder).from_pretrained(folder, subfolder="scheduler")
    except (OSError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot load weights from {folder}: {first} (only safetensors weights are loaded; "
                         f"re-save with safe_serialization=True)") from None
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for module in parts.values():
        module.to(device).eval().requires_grad_(False)
    info = {"path": str(folder), "prediction_type": scheduler.config.get("prediction_type")}
    return Backbone(name, unet, vae, text_encoder, tokenizer, scheduler, device, dtype, info)


@MODELS.register("embedded")
def load_embedded(cfg: dict, device: torch.device, dtype: torch.dtype) -> Backbone:
    """The shipped trained folder when present (same code path as real SD), else seeded random weights."""
    from bench.embedded import build_components, shipped_folder

    folder = shipped_folder()
    if folder is not None and not cfg.get("random"):
        return load_pipeline_folder(folder, device, dtype, name="embedded")
    c = build_components(seed=int(cfg.get("seed", 0)))
    for key in ("unet", "vae", "text_encoder"):
        c[key].to(device) if dtype == torch.float32 else c[key].to(device, dtype)
    return Backbone("embedded-random", c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                    device, dtype, {"source": "built in-process from configs (random weights, seeded)"})


@MODELS.register("sd21-base-arch")
def load_sd21_base_arch(cfg: dict, device: torch.device, dtype: torch.dtype) -> Backbone:
    """SD2.1-base's architecture with seeded random weights (bench.models.reference): for timing and memory."""
    from bench.models.reference import build_sd21_base_arch

    c = build_sd21_base_arch(device, dtype, seed=int(cfg.get("seed", 0)))
    return Backbone("sd21-base-arch", c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                    device, dtype, {"source": "SD2.1-base configs, random weights (timing only)"})


@MODELS.register("sd3-medium-arch")
def load_sd3_medium_arch(cfg: dict, device: torch.device, dtype: torch.dtype) -> Backbone:
    """SD3 Medium's transformer and VAE with seeded random weights and random text embeddings
    (bench.models.reference): for timing and memory of joint-attention capture."""
    from bench.models.reference import build_sd3_medium_arch

    return build_sd3_medium_arch(device, dtype, seed=int(cfg.get("seed", 0)))


@MODELS.register("diffusers")
def load_diffusers(cfg: dict, device: torch.device, dtype: torch.dtype) -> Backbone:
    if not cfg.get("path") and not cfg.get("id"):
        raise BenchError("model.name=diffusers needs model.path=<diffusers folder or URI> or model.id=<hub id>")
    folder = model_folder_path(cfg)
    name = cfg.get("id") or str(cfg["path"]).rstrip("/").rsplit("/", 1)[-1]  # a URI's copy: the stored name
    backbone = load_pipeline_folder(folder, device, dtype, name=name)
    if cfg.get("path") and str(folder) != str(Path(str(cfg["path"])).expanduser()):
        backbone.info["stored"] = str(cfg["path"])  # what the user gave; info["path"] is this node's copy
    return backbone


def model_kind(cfg: dict) -> str:
    """`model.path` / `model.id` select the diffusers loader whatever `model.name` says."""
    return "diffusers" if cfg.get("path") or cfg.get("id") else cfg.get("name", "embedded")


def validate_model_config(cfg: dict) -> None:
    """Driver-side checks that need no weights loaded."""
    kind = model_kind(cfg)
    MODELS.get(kind)
    if cfg.get("path") or cfg.get("id"):
        folder = model_folder_path(cfg)
        if cfg.get("path"):
            check_pipeline_folder(folder, shown=str(cfg["path"]))
    choose_dtype(cfg.get("dtype", "auto"), choose_device(cfg.get("device", "auto")))
    check_transformer_options(cfg)


def check_transformer_options(cfg: dict) -> None:
    """model.depth / flux_blocks / joint_rows: valid values, and set only where a transformer reads them."""
    from bench.models.families import family_of
    from bench.models.layers import FLUX_BLOCKS, parse_depth
    from bench.trace_joint import ROWS

    parse_depth(cfg.get("depth", "all"))
    if cfg.get("flux_blocks", "double") not in FLUX_BLOCKS:
        raise BenchError(f"model.flux_blocks={cfg['flux_blocks']!r} is not one of {', '.join(FLUX_BLOCKS)}")
    if cfg.get("joint_rows", "renormalised") not in ROWS:
        raise BenchError(f"model.joint_rows={cfg['joint_rows']!r} is not one of {', '.join(ROWS)}")
    changed = [k for k, default in (("depth", "all"), ("flux_blocks", "double"), ("joint_rows", "renormalised"))
               if str(cfg.get(k, default)) != default]
    if changed and family_of(cfg) not in ("sd3", "flux"):
        raise BenchError(f"model.{changed[0]} applies to transformer backbones (SD3, Flux) only; this model is a "
                         f"UNet ({family_of(cfg)}): drop model.{changed[0]}")


def model_provenance(cfg: dict) -> dict:
    """run.json's `backbone`: the family (from model_index.json), and whether the weights are random (the
    built-in random models, a folder whose model_index.json says `_random_weights`, such as the tests' tiny
    pipelines): reports label such a backbone and no conclusion is drawn from it."""
    import json

    from bench.models.families import family_of

    kind = model_kind(cfg)
    random = bool(cfg.get("random")) or kind in ("sd21-base-arch", "sd3-medium-arch")
    if kind == "diffusers":
        folder = model_folder_path(cfg)
        try:
            random = bool(json.loads((folder / "model_index.json").read_text()).get("_random_weights"))
        except (OSError, ValueError):
            pass
    elif kind == "embedded" and not random:
        from bench.embedded import shipped_folder

        random = shipped_folder() is None
    out = {"family": family_of(cfg), "random_weights": random}
    out.update({k: cfg[k] for k in ("depth", "flux_blocks", "joint_rows") if k in cfg})
    return out


def load_backbone(cfg: dict) -> Backbone:
    device = choose_device(cfg.get("device", "auto"))
    dtype = choose_dtype(cfg.get("dtype", "auto"), device)
    backbone = MODELS.get(model_kind(cfg))(cfg, device, dtype)
    backbone.depth = str(cfg.get("depth", "all"))
    backbone.flux_blocks = cfg.get("flux_blocks", "double")
    backbone.joint_rows = cfg.get("joint_rows", "renormalised")
    log.info("loaded backbone %s on %s (%s)", backbone.name, device, dtype)
    return backbone
