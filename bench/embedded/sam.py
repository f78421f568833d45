"""`python -m bench.embedded.sam`: train a tiny SAM (transformers `SamModel`) for point-prompted masks on the
shapes world, for FreeGen's pseudo-masks on the embedded default (FreeGen prompts SAM with the 3 strongest /
farthest points of each class map; SAM's own weights are for 1024 px photographs).

Same classes as the released SAM (SamVisionEncoder ViT with windowed and global attention, SamPromptEncoder,
SamMaskDecoder two-way transformer), scaled to the shapes world: 64 px input, 4 px patches (a 16x16
embedding grid, two ViT blocks; the decoder's 4x upsampling gives full-resolution 64x64 masks), width 64. Trained on rendered
`shapes` train scenes (disjoint from val): per step a batch of objects, each prompted with 1-3 points drawn
uniformly inside the object (foreground label 1), single-mask output, BCE + Dice against the object's exact
mask (SAM's focal + Dice, with BCE in place of focal for a small, balanced problem). Seeded and
deterministic on CPU; the defaults are the shipped recipe. The folder it writes (`--out`, default
bench/embedded/sam/) is a standard transformers folder (`SamModel.from_pretrained`, safetensors, plus the
image processor's config); `bench.models.sam` loads it.

Evaluation (`--evaluate-only` or at the end of training): mean IoU of the predicted mask (logit > 0) with
the object's mask on held-out shapes val scenes, for 1 and 3 prompt points; written to `eval.json` in the folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.data.shapes import ShapesDataset
from bench.data.shapes_gt import object_masks
from bench.models.sam import IMAGE_MEAN, IMAGE_STD, pixel_values, point_blobs

log = logging.getLogger("bench.embedded.sam")
SAM_DIR = Path(__file__).parent / "sam"


def tiny_sam_config(size: int = 64, width: int = 64):
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    # two ViT blocks: one windowed (4x4 windows), one global, with SAM's relative positions
    vision = SamVisionConfig(hidden_size=width, output_channels=width, num_hidden_layers=2, num_attention_heads=4,
                             image_size=size, patch_size=4, mlp_dim=4 * width, window_size=4,
                             global_attn_indexes=(1,), num_pos_feats=width // 2, initializer_range=0.02)
    prompt = SamPromptEncoderConfig(hidden_size=width, image_size=size, patch_size=4, mask_input_channels=8)
    decoder = SamMaskDecoderConfig(hidden_size=width, mlp_dim=4 * width, num_hidden_layers=2, num_attention_heads=4,
                                   iou_head_hidden_dim=width)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict(), initializer_range=0.02)


def reset_positional_frequencies(model, scale: float = 1.0) -> None:
    """SAM's random Fourier position encoding (shared by the image's dense positions and the prompt points)
    draws its frequencies as scale * N(0, 1) with scale = 1 (the released code's `PositionEmbeddingRandom`,
    a fixed buffer). transformers' `SamVisionConfig` sets scale = hidden_size // 2 (32 at width 64) and makes it
    a trainable parameter, which only matters when training from scratch: at 32 cycles per unit a 64 px image
    aliases at one pixel, so a point's encoding says almost nothing about where it is (the 47.7-IoU tiny SAM
    shipped before had this). Redrawn at `scale` and frozen, as in SAM."""
    pe = model.shared_image_embedding.positional_embedding
    with torch.no_grad():
        pe.copy_(torch.randn(pe.shape) * scale)
    pe.requires_grad_(False)


def object_pool(split: str, num_images: int, size: int, seed: int, min_objects: int = 1
                ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Rendered scenes and their objects: images (N, H, W, 3) and [(image index, boolean mask)]."""
    data = ShapesDataset(num_images=num_images, size=size, seed=seed, split=split, min_objects=min_objects)
    images, objects = [], []
    for i in range(num_images):
        layout = data.layout(i)
        image, _ = data.render(layout, i)
        images.append(image)
        for mask in object_masks(layout, size):
            if mask.sum() >= 4:
                objects.append((i, mask))
    return np.stack(images), objects


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points drawn uniformly among the mask's pixels, (n, 2) as (x, y) pixel coordinates."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, len(xs), size=n)
    return np.stack([xs[pick], ys[pick]], 1).astype(np.float32)


def predict_masks(model, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                  dense_points: bool = False) -> torch.Tensor:
    """Single-mask logits (B, H, W) at the input resolution; points (B, n, 2) in pixels, labels (B, n);
    dense_points: the foreground points also as SAM's mask prompt (`point_blobs`)."""
    masks = None
    if dense_points:
        size = int(model.config.prompt_encoder_config.image_embedding_size) * 4
        scale = size / images.shape[-1]
        masks = point_blobs(points * scale, size) * (labels[:, :, None, None] == 1).any(1, keepdim=True)
    out = model(pixel_values=images, input_points=points[:, None], input_labels=labels[:, None],
                input_masks=masks, multimask_output=False)
    logits = out.pred_masks[:, 0, 0]  # (B, h, w): 4x the embedding grid
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return logits


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


@torch.no_grad()
def evaluate(model, size: int = 64, num_images: int = 200, seed: int = 0, points: tuple[int, ...] = (1, 3),
             dense_points: bool = False) -> dict:
    """Mean IoU of point-prompted masks (logit > 0) on shapes val scenes (held out from training)."""
    model.eval()
    images, objects = object_pool("val", num_images, size, seed)
    rng = np.random.default_rng(12345)
    out = {"images": num_images, "objects": len(objects), "split": "val", "size": size}
    for n in points:
        ious = []
        for start in range(0, len(objects), 64):
            chunk = objects[start:start + 64]
            pv = pixel_values(images[[i for i, _ in chunk]])
            pts = torch.from_numpy(np.stack([sample_points(m, n, rng) for _, m in chunk]))
            pred = predict_masks(model, pv, pts, torch.ones(len(chunk), n, dtype=torch.long), dense_points) > 0
            truth = torch.from_numpy(np.stack([m for _, m in chunk]))
            inter = (pred & truth).flatten(1).sum(1).float()
            union = (pred | truth).flatten(1).sum(1).float().clamp_min(1)
            ious.extend((inter / union).tolist())
        out[f"mIoU_{n}pt"] = round(100 * float(np.mean(ious)), 2)
    return out


def train(out: Path, steps: int = 700, batch: int = 16, lr: float = 1e-3, train_images: int = 4000,
          size: int = 64, seed: int = 0, pe_scale: float = 1.0, min_objects: int = 2,
          dense_points: bool = True) -> dict:
    torch.manual_seed(seed)
    from transformers import SamModel

    model = SamModel(tiny_sam_config(size))
    reset_positional_frequencies(model, pe_scale)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny SAM: %.2fM parameters; rendering %d training scenes", n_params / 1e6, train_images)
    images, objects = object_pool("train", train_images, size, seed, min_objects)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    curve = []
    started = time.time()
    for _ in tqdm(range(steps), desc="tiny SAM", unit="step", dynamic_ncols=True):
        pick = rng.integers(0, len(objects), size=batch)
        n = int(rng.integers(1, 4))  # 1-3 points per prompt (FreeGen prompts with 3)
        chunk = [objects[k] for k in pick]
        pv = pixel_values(images[[i for i, _ in chunk]])
        pts = torch.from_numpy(np.stack([sample_points(m, n, rng) for _, m in chunk]))
        target = torch.from_numpy(np.stack([m for _, m in chunk])).float()
        loss = mask_loss(predict_masks(model, pv, pts, torch.ones(batch, n, dtype=torch.long), dense_points), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss))
    seconds = time.time() - started
    result = evaluate(model, size, dense_points=dense_points)
    save(model, out, {"steps": steps, "batch": batch, "lr": lr, "train_images": train_images, "size": size,
                      "seed": seed, "pe_scale": pe_scale, "min_objects": min_objects, "dense_points": dense_points, "parameters": n_params, "train_seconds": round(seconds, 1),
                      "final_loss_mean_last_100": round(float(np.mean(curve[-100:])), 4),
                      "torch_threads": torch.get_num_threads()}, result)
    return result


def save(model, out: Path, recipe: dict, result: dict) -> None:
    """Write the folder under a temporary name, rename when complete."""
    from bench.atomic import staged_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        import shutil

        shutil.rmtree(out)
    with staged_dir(out, "--out DIR", "sam") as work:
        model.save_pretrained(work, safe_serialization=True)
        try:
            from transformers import SamImageProcessorPil

            SamImageProcessorPil(size={"longest_edge": recipe["size"]},
                                 pad_size={"height": recipe["size"], "width": recipe["size"]},
                                 image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD)).save_pretrained(work)
        except ImportError:  # older transformers: the model folder alone still loads
            pass
        (work / "train_config.json").write_text(json.dumps(recipe, indent=1))
        (work / "eval.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default=str(SAM_DIR))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pe-scale", type=float, default=1.0,
                        help="std of the position encoding's random frequencies (SAM: 1; transformers' init: width/2)")
    parser.add_argument("--min-objects", type=int, default=2,
                        help="fewest objects per training scene (2: no single-object scene rewards masking everything)")
    parser.add_argument("--sparse-only", action="store_true",
                        help="point prompts as SAM's sparse tokens only (no dense point prompt)")
    parser.add_argument("--evaluate-only", action="store_true", help="measure the folder at --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    if args.evaluate_only:
        from bench.models.sam import load_sam

        sam = load_sam(args.out)
        print(json.dumps(evaluate(sam.model, dense_points=sam.dense_points), indent=1))
        return 0
    result = train(Path(args.out), args.steps, args.batch, args.lr, args.train_images, seed=args.seed,
                   pe_scale=args.pe_scale, min_objects=args.min_objects, dense_points=not args.sparse_only)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
