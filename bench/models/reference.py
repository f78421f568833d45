"""Reference architectures with random weights (`model.name=sd21-base-arch`): what a real checkpoint costs to
run, without the checkpoint. Used to measure throughput and memory at the papers' sizes (bench.perf, the
trained methods' timings); their outputs mean nothing.

The configurations are those of the public `stabilityai/stable-diffusion-2-1-base` folder (unet, vae and
text_encoder config.json: UNet 865M parameters with linear projections and 5/10/20/20 heads, the SD VAE, the
OpenCLIP ViT-H/14 text tower of 23 layers). The tokenizer is the embedded world's CLIP tokenizer padded to 77
tokens (its ids are valid for the 49408-token embedding table; timing does not depend on which words they are).
"""

from __future__ import annotations

import torch

SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu")
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
OPENCLIP_H_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=1,
    pad_token_id=1)


def build_sd21_base_arch(device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Tokenizer, text encoder, UNet, VAE and scheduler of SD2.1-base's architecture, seeded random weights,
    built directly on `device` (an 865M-parameter UNet initialised on the CPU takes tens of seconds)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.embedded import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for module in (unet, vae, text_encoder):
        module.to(device, dtype).eval().requires_grad_(False)
    return {"tokenizer": build_tokenizer(max_length=77), "text_encoder": text_encoder, "unet": unet, "vae": vae,
            "scheduler": scheduler}


# SD3 Medium (`stabilityai/stable-diffusion-3-medium-diffusers`: transformer/config.json, vae/config.json): 24
# joint blocks of 24 heads x 64, 2.0B parameters; the 16-channel SD3 VAE.
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False)
SD3_TEXT_TOKENS = (77, 256)  # CLIP positions, T5 positions (StableDiffusion3Pipeline's max_sequence_length)


def build_sd3_medium_arch(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD3 Medium's transformer and VAE with seeded random weights, its flow-matching scheduler, and random text
    embeddings of the pipeline's shape in place of CLIP-L/G and T5-XXL (~19 GB in fp32; the attention cost does
    not depend on which text it reads)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from bench.embedded import build_tokenizer
    from bench.models.families import SD3Backbone

    class RandomTextSD3(SD3Backbone):
        def condition(self, prompts):
            g = torch.Generator().manual_seed(seed)
            text = torch.randn(len(prompts), sum(SD3_TEXT_TOKENS), 4096, generator=g)
            pooled = torch.randn(len(prompts), 2048, generator=g)
            return {"encoder_hidden_states": text.to(self.device, self.dtype),
                    "pooled_projections": pooled.to(self.device, self.dtype)}

        def attribution_states(self, ids):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(*ids.shape, 4096, generator=g).to(self.device, self.dtype)

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**SD3_VAE)
    for module in (transformer, vae):  # .to(dtype) only where it changes (the VAE warns on a no-op cast)
        (module.to(device) if dtype == torch.float32 else module.to(device, dtype)).eval().requires_grad_(False)
    backbone = RandomTextSD3("sd3-medium-arch", transformer, vae, None, build_tokenizer(max_length=77),
                             FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), device, dtype,
                             {"source": "SD3 Medium configs, random weights and random text embeddings (timing "
                                        "only)", "family": "sd3"})
    return backbone
