"""The embedded default backbone: a small Stable-Diffusion-architecture pipeline built from configs.

Same classes and block layout as SD 1.x/2.x (4 UNet levels, `down_blocks.{0,1,2}`, `mid_block`,
`up_blocks.{1,2,3}` with attn1/attn2), so every layer name a method uses on real SD exists here too.
Weights are seeded, so two builds are identical. No file or network access.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench.data.shapes import COLOURS, SHAPES

# Whole-word tokens: the shapes world, the iSeg/OVAM prompt templates and the VOC classes. Any other word
# still tokenizes, into characters.
WORDS = sorted({
    *SHAPES, *COLOURS, "a", "an", "and", "photograph", "of", "other", "objects", "background", "the", "with",
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining", "table",
    "dog", "horse", "motorbike", "person", "potted", "plant", "sheep", "sofa", "train", "tv", "monitor",
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "picture", "photo",
})
HIDDEN = 64
WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_folder() -> Path | None:
    """The trained diffusers pipeline folder shipped in the package, if it has been trained and committed."""
    return WEIGHTS_DIR if (WEIGHTS_DIR / "model_index.json").is_file() else None


def build_tokenizer(max_length: int = 77, extra_words: list[str] | tuple[str, ...] = ()) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over characters plus merges that spell every word of WORDS as one token.

    BPE applies the lowest-ranked merge first, so a word's chain can be cut by another word's merge; any word
    not yet whole gets merges appended that join its current pieces left to right, until all are whole.
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    # extra words come after WORDS, so WORDS' own vocabulary and merges come first, as without them
    words = [*WORDS, *(w for w in extra_words if w not in WORDS)]
    pending = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words if len(w) > 1}
    for _ in range(20):
        for pieces in pending.values():
            prefix = pieces[0]
            for piece in pieces[1:]:
                if (prefix, piece) not in merges:
                    merges.append((prefix, piece))
                prefix += piece
                vocab.setdefault(prefix, len(vocab))
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
        pending = {w: p for w in words if len(p := tokenizer.tokenize(w)) > 1}
        if not pending:
            return tokenizer
    raise RuntimeError(f"could not build single-token merges for {sorted(pending)}")


def tiny_text_encoder(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextModel:
    """A two-layer CLIP text encoder of width `hidden` over `tokenizer`'s vocabulary, random weights from torch's
    current seed (the embedded default's and the peer comparison's tiny pipelines)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=hidden))


def build_components(seed: int = 0) -> dict:
    """Tokenizer, text encoder, UNet, VAE and scheduler with deterministic random weights."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(tokenizer, HIDDEN)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=HIDDEN,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, layers_per_block=1, sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae,
            "scheduler": scheduler}
