"""Point-prompted SAM (transformers `SamModel`) for FreeGen's pseudo-masks.

`load_sam(source)`: "embedded" (the tiny SAM trained on the shapes world, bench/embedded/sam/, by
`python -m bench.embedded.sam`), a local transformers folder, or a hub id resolved from the local cache only
(e.g. facebook/sam-vit-base). Weights load from safetensors only.

`SamSegmenter.mask(image, points)` follows SAM's preprocessing: the longest side resized to the model's input
size, padded at the bottom/right, ImageNet normalisation; points (x, y) in image pixels are scaled the same
way; the mask logits are cropped and resized back, mask = logit > 0. A folder trained with dense point
prompts (`"dense_points": true` in its train_config.json: the embedded SAM) also gets the points as SAM's mask
prompt (`point_blobs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.errors import BenchError

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
EMBEDDED_SAM = Path(__file__).resolve().parent.parent / "embedded" / "sam"
POINT_SIGMA = 2.0  # pixels of the dense point prompt's Gaussians at the mask-prompt resolution


@dataclass
class SamSegmenter:
    model: torch.nn.Module
    source: str
    dense_points: bool = False  # the points also as the mask prompt (how the embedded SAM was trained)

    @property
    def input_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, float, tuple[int, int]]:
        h, w = image.shape[:2]
        scale = self.input_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        resized = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((nw, nh), Image.BILINEAR))
        x = pixel_values(resized[None])[0]
        padded = torch.zeros(3, self.input_size, self.input_size)
        padded[:, :nh, :nw] = x
        return padded, scale, (nh, nw)

    @torch.no_grad()
    def logits(self, image: np.ndarray, points: list[tuple[float, float]], labels: list[int] | None = None
               ) -> torch.Tensor:
        """Single-mask logits (H, W) at the image's size for one prompt of `points` (x, y) (labels: 1
        foreground, 0 background; default all foreground)."""
        if not points:
            raise ValueError("SAM needs at least one prompt point")
        pv, scale, (nh, nw) = self._prepare(image)
        pts = torch.tensor(points, dtype=torch.float32)[None, None] * scale
        lab = torch.tensor(labels if labels is not None else [1] * len(points), dtype=torch.long)[None, None]
        masks = None
        if self.dense_points:
            size = int(self.model.config.prompt_encoder_config.image_embedding_size) * 4
            fg = pts[0, 0][lab[0, 0] == 1][None] * (size / self.input_size)
            masks = point_blobs(fg, size).to(self.device) if len(fg[0]) else None
        out = self.model(pixel_values=pv[None].to(self.device), input_points=pts.to(self.device),
                         input_labels=lab.to(self.device), input_masks=masks, multimask_output=False)
        low = out.pred_masks[0, 0, :1].float()  # (1, h, w) over the padded input
        full = F.interpolate(low[None], size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False)[0, :, :nh, :nw]
        return F.interpolate(full[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].cpu()

    def mask(self, image: np.ndarray, points: list[tuple[float, float]], labels: list[int] | None = None
             ) -> np.ndarray:
        return (self.logits(image, points, labels) > 0).numpy()


def sam_folder(source: str = "embedded") -> Path:
    """The local folder of a SAM source (embedded, a folder, or a hub id resolved from the local cache only)."""
    if source == "embedded":
        return EMBEDDED_SAM
    if Path(source).expanduser().exists():
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise BenchError(f"SAM {source!r} is neither a local folder nor in the local Hugging Face cache; "
                         f"download it first or use sam=embedded") from None


def load_sam(source: str = "embedded", device: str = "cpu") -> SamSegmenter:
    from transformers import SamModel

    if source == "embedded":
        folder = EMBEDDED_SAM
        if not (folder / "config.json").is_file():
            raise BenchError(f"the embedded SAM is not in {folder}; train it with python -m bench.embedded.sam")
        where = str(folder)
    elif Path(source).expanduser().exists():
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise BenchError(f"sam={source} is not a transformers SAM folder (no config.json); give a folder "
                             f"written by SamModel.save_pretrained or a cached hub id")
        where = str(folder)
    else:
        where = source
    try:
        model = SamModel.from_pretrained(where, local_files_only=True, use_safetensors=True)
    except OSError:
        raise BenchError(f"SAM {source!r} is neither a local folder nor in the local Hugging Face cache; "
                         f"download it first or use sam=embedded") from None
    recipe = Path(where) / "train_config.json"
    dense = bool(json.loads(recipe.read_text()).get("dense_points", False)) if recipe.is_file() else False
    return SamSegmenter(model.to(device).eval(), source, dense)


def point_blobs(points: torch.Tensor, size: int, sigma: float = POINT_SIGMA) -> torch.Tensor:
    """SAM's dense (mask) prompt drawn from point prompts: (B, n, 2) pixel (x, y) -> (B, 1, size, size), the
    maximum over the points of a Gaussian of `sigma` pixels (1 at each point). Why: the sparse point tokens
    alone were not learned by the tiny SAM (it masked every object whatever the prompt, 47 IoU); the same
    points as a mask prompt are added to the image embedding where they are."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    px, py = (points[..., 0] + 0.5)[..., None, None], (points[..., 1] + 0.5)[..., None, None]
    d2 = (xx - px) ** 2 + (yy - py) ** 2  # (B, n, size, size)
    return torch.exp(-d2 / (2 * sigma ** 2)).amax(1, keepdim=True)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> SAM's normalised (B, 3, H, W) float input."""
    # a copy: images may arrive read-only (decoded, or from Ray's object store), which torch would share and warn
    x = torch.from_numpy(np.array(images)).float().div(255).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    return (x - mean) / std
