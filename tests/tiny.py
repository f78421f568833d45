"""Tiny seeded random SD-architecture components (diffusers' get_dummy_components pattern) for tests of
mechanics: the SD block layout and layer names of the real model (so every method's layers exist), 8 px
images, a 16-token text encoder. Two builds with the same seed are identical."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from bench.embedded import build_tokenizer
from bench.models import Backbone

HIDDEN = 16
TOKENS = 16


def tiny_components(seed: int = 0) -> dict:
    tokenizer = build_tokenizer(max_length=TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=HIDDEN))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
        norm_num_groups=4, cross_attention_dim=HIDDEN, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, layers_per_block=1, sample_size=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def tiny_backbone(seed: int = 0) -> Backbone:
    c = tiny_components(seed)
    return Backbone("tiny", c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"],
                    torch.device("cpu"), torch.float32, {"source": "tests/tiny.py (random weights, seeded)"})


def save_tiny_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny components as a diffusers pipeline folder (safetensors), loadable with model.path=."""
    pipe = StableDiffusionPipeline(**tiny_components(seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# -- the other families: tiny random-weight pipelines from configs, as diffusers' own model tests build them ---------
# Text towers are CLIP/T5 of HIDDEN width over the embedded CLIP tokenizer (its vocabulary also serves the tiny
# T5: offline, no sentencepiece model). Latents are 16 x 16 (a one-level VAE, 16 px images).
LATENT = 16


def _clip(tokenizer, projection: bool):
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=HIDDEN)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=1,
                                   eos_token_id=1, decoder_start_token_id=0))


def _flow_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, layers_per_block=1, sample_size=LATENT, scaling_factor=1.5305,
                         shift_factor=0.0609)


def tiny_sdxl_components(seed: int = 0) -> dict:
    """SDXL's layout at toy width: text_time added conditioning, two CLIP towers (the second with projection), a
    three-level UNet with attention at its two coarsest levels and two transformer blocks at the coarsest."""
    from diffusers import EulerDiscreteScheduler

    tokenizer = build_tokenizer(max_length=TOKENS)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip(tokenizer, False), _clip(tokenizer, True)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        norm_num_groups=4, cross_attention_dim=2 * HIDDEN, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, layers_per_block=1, sample_size=LATENT, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    parts = {"tokenizer": tokenizer, "tokenizer_2": build_tokenizer(max_length=TOKENS), "text_encoder": text_encoder,
             "text_encoder_2": text_encoder_2, "unet": unet, "vae": vae, "scheduler": scheduler}
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval().requires_grad_(False)
    return parts


def tiny_sd3_components(seed: int = 0, sd35: bool = True) -> dict:
    """SD3 (sd35=False) or SD3.5 Medium's layout (RMS qk-norm, an image-only attn2 in block 0) at toy width: three
    joint blocks (the last context_pre_only), CLIP x2 + T5, patch 2 over 16 x 16 latents (64 image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer = build_tokenizer(max_length=TOKENS)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2, text_encoder_3 = _clip(tokenizer, True), _clip(tokenizer, True), _t5(tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=2 * HIDDEN,
        pos_embed_max_size=LATENT, qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else ())
    parts = {"tokenizer": tokenizer, "tokenizer_2": build_tokenizer(max_length=TOKENS),
             "tokenizer_3": build_tokenizer(max_length=TOKENS), "text_encoder": text_encoder,
             "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3, "transformer": transformer,
             "vae": _flow_vae(), "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)}
    for module in (text_encoder, text_encoder_2, text_encoder_3, transformer, parts["vae"]):
        module.eval().requires_grad_(False)
    return parts


def tiny_flux_components(seed: int = 0) -> dict:
    """Flux.1-dev's layout at toy width: 2 double + 2 single blocks, guidance embedding, CLIP (pooled) + T5,
    16 x 16 latents packed 2 x 2 (64 image tokens), the dynamically shifted flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = build_tokenizer(max_length=TOKENS)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip(tokenizer, False), _t5(tokenizer)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=HIDDEN, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    parts = {"tokenizer": tokenizer, "tokenizer_2": build_tokenizer(max_length=TOKENS), "text_encoder": text_encoder,
             "text_encoder_2": text_encoder_2, "transformer": transformer, "vae": _flow_vae(),
             "scheduler": scheduler}
    for module in (text_encoder, text_encoder_2, transformer, parts["vae"]):
        module.eval().requires_grad_(False)
    return parts


TINY_FAMILIES = {"sdxl": tiny_sdxl_components, "sd3": tiny_sd3_components, "flux": tiny_flux_components}


def save_tiny_family(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny family as a diffusers pipeline folder (safetensors, model_index.json), loadable with model.path=."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if family == "sd":
        return save_tiny_folder(folder, seed)
    cls = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    cls(**TINY_FAMILIES[family](seed)).save_pretrained(folder, safe_serialization=True)
    mark_random(folder)
    return folder


def mark_random(folder: Path) -> None:
    """Label the folder's weights as random (model_index.json `_random_weights`, ignored by diffusers): run.json
    and the reports say so."""
    import json

    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_random_weights": True}, indent=2) + "\n")
