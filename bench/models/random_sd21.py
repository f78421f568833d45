"""`python -m bench.models.random_sd21 DIR`: a Stable Diffusion 2.1-base-architecture pipeline folder with
seeded random weights, for throughput measurements (random weights cost the same as trained ones).

UNet, VAE and text encoder use SD 2.1-base's published configurations (UNet: 320/640/1280/1280 channels,
attention head dims 5/10/20/20, linear projections, 1024-dim cross-attention, 64x64 latents; VAE: 128/256/512/512;
text encoder: OpenCLIP ViT-H's text tower shape, 23 layers of width 1024); the tokenizer is the embedded
model's (77 tokens), as no vocabulary can be downloaded. fp16 safetensors, loadable with model.path=DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def save_random_sd21(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.embedded import build_tokenizer

    tokenizer = build_tokenizer(max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m bench.models.random_sd21 DIR")
        return 2
    print(save_random_sd21(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
