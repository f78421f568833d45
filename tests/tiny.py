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
