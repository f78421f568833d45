"""CLIP (transformers `CLIPModel`) for methods that need a vision-language model (DEDOS).

`load_clip(spec)`: a local folder (the shipped tiny CLIP of the shapes world, or a saved real CLIP such as
ViT-L/14@336) or a hub id resolved from the local Hugging Face cache only (`local_files_only=True`, no
network). Weights from safetensors only. The image normalisation comes from the folder's
`preprocessor_config.json` (as CLIPImageProcessor would apply it), done in torch on uint8 tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.errors import BenchError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Clip:
    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    source: str = ""

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixels(self, images_uint8: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> normalised float pixels at `size` (default: the tower's image size)."""
        size = size or self.image_size
        x = images_uint8.to(self.device).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        max_length = min(int(getattr(self.tokenizer, "model_max_length", 77)),
                         int(self.model.config.text_config.max_position_embeddings))
        tok = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt")
        return {"input_ids": tok.input_ids.to(self.device), "attention_mask": tok.attention_mask.to(self.device)}

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, P) L2-normalised projected text embeddings."""
        out = self.model.get_text_features(**self.tokenize(texts))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)

    def class_embeddings(self, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """(K, P) prompt-ensembled class embeddings (CLIP's zero-shot recipe: mean of normalised templates)."""
        per_template = torch.stack([self.text_embeddings([t.format(n) for n in names]) for t in templates])
        return F.normalize(per_template.mean(0), dim=-1)

    def dense_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, g, g, P) L2-normalised projected patch embeddings of normalised `pixels` (Clip.pixels), as
        MaskCLIP (Zhou et al., ECCV 2022) reads them: the last block's value path alone (no query-key mixing,
        which blurs patches into the global token's meaning), then the post-layernorm and the visual
        projection. Comparable with `text_embeddings` patch by patch, with nothing learnt on top."""
        vision = self.model.vision_model
        last = vision.encoder.layers[-1]
        h = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        h = h + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(h)))
        h = h + last.mlp(last.layer_norm2(h))
        patches = F.normalize(self.model.visual_projection(vision.post_layernorm(h[:, 1:])).float(), dim=-1)
        grid = int(patches.shape[1] ** 0.5)
        return patches.unflatten(1, (grid, grid))

    def region_embeddings(self, images_uint8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(n, P) L2-normalised image embeddings of one image (1, 3, H, W) uint8 seen through each of n masks
        (n, h, w) in [0, 1], resized to the tower's input: pixels outside a mask are set to the normalisation
        mean (0 after normalising), the mask prompt of two-stage open-vocabulary segmenters (OVSeg, Liang et
        al., CVPR 2023), so CLIP classifies the region as a whole image, the way it was trained."""
        px = self.pixels(images_uint8)
        keep = F.interpolate(masks[:, None].float().to(px.device), size=px.shape[-2:], mode="nearest")
        out = self.model.get_image_features(pixel_values=px * keep)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)

    def image_embeddings(self, images_uint8: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pixels(images_uint8))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)


def clip_folder(spec: str) -> Path:
    """The local folder of a CLIP spec: a saved CLIPModel folder, or a hub id resolved from the local cache only."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BenchError(f"CLIP folder {path} has no config.json; save one with CLIPModel.save_pretrained(DIR) "
                             f"and its tokenizer beside it")
        return path
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:  # a path, not an owner/name hub id
        raise BenchError(f"CLIP folder {path} does not exist; pass a saved CLIPModel folder or a cached hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise BenchError(f"CLIP {spec} is not a folder and not in the local Hugging Face cache; copy it there or "
                         f"pass a CLIPModel folder ({type(err).__name__})") from None


def load_clip(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Clip:
    """A CLIP from a local folder or a cached hub id (never the network), safetensors only."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = clip_folder(str(spec))
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot load CLIP from {folder}: {first} (only safetensors weights are loaded)") from None
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        conf = json.loads(pre.read_text())
        mean, std = tuple(conf.get("image_mean", mean)), tuple(conf.get("image_std", std))
    model.to(device).eval()
    return Clip(model, tokenizer, mean, std, source=str(folder))


def random_clip(config, tokenizer, seed: int = 0) -> Clip:
    """A CLIPModel of `config`'s architecture with seeded random weights (timing at the paper's size, tests)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return Clip(CLIPModel(config).eval(), tokenizer, source="random weights (seeded)")
