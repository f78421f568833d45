"""`segformer`: a downstream semantic segmenter, fitted on a dataset's training split and predicting on images.

The last step of the data-synthesis methods' protocol (FreeGen Tables 1-3, "train on synthetic, test on
real"): a segmenter is trained on the image-mask pairs of a synthetic dataset (a `bench.synthesize` folder,
read by `voc2012` through `train.data`) or on real training images (the paper's "R" rows), then evaluated on
the real val split. It reads nothing of the diffusion model: its input is the image (`trace.image`, the real
image in inversion mode, the generated one in generation mode).

Why SegFormer (Xie et al., NeurIPS 2021, `SegformerForSemanticSegmentation` from transformers): it is one of
the downstream segmenter families FreeGen and the synthetic-data papers it compares with report (DeepLabV3,
Mask2Former, SegFormer-class models); it is light (MiT-b0 has 3.7M parameters, the `tiny` scale 0.35M) and it
is transformers-native (config, model, loss: the all-MLP decoder's logits at 1/4 resolution, upsampled to the
labels and scored with cross-entropy ignoring 255), so a fit needs no code of its own beyond the loop.

Training follows SegFormer's recipe where it applies to a model without ImageNet weights (no internet here):
AdamW (weight decay 0.01), polynomial decay of power 1.0 over `steps` iterations, random horizontal flips,
images resized to `size`. `augment=mmseg` adds the rest of MMSegmentation's SegFormer training pipeline (the
one the synthetic-data papers' downstream configs use): RandomResize (ratio 0.5-2.0 of `size`), RandomCrop of
`size` with cat_max_ratio 0.75 (up to 10 re-draws while one class fills 75% of the crop), RandomFlip,
PhotoMetricDistortion (brightness +-32, contrast and saturation x 0.5-1.5, hue +-18 on OpenCV's 180-degree
scale, each with probability 0.5, contrast before or after the HSV steps; uint8 rounding after each step), and
the data preprocessor's padding to `size` (image 0 after normalisation, label 255); one difference: shrinking
is antialiased here (mmcv resizes with OpenCV's plain bilinear). `augment=none` (the default) is the flips-only
recipe of the committed downstream report (docs/studies/freegen.md also reports runs with `augment=mmseg`).

The learning rate is raised from the paper's 6e-5 (fine-tuning an ImageNet-trained encoder) to 3e-3 (training
from scratch; fitted on 40 real shapes at 64 px and scored on the first 40 val images: 24.5 mIoU at 3e-3 and
1000 steps, 23.1 at 1e-3 and 600 steps; 33.3 with 200 training images).
Dropout and stochastic depth are off at the `tiny` scale and at SegFormer's values at `b0`; every random
draw (initialisation, batch order, flips, drop paths) comes from (train_seed, step), so a fit resumed from a
checkpoint ends bit-identical to an undisturbed one.

Prediction: softmax over the fitted classes at `size`, bilinear to the label size. With `classes=all` (the
paper's protocol: the segmenter is told nothing about the image) every pixel takes its most probable class;
with `classes=gt` the argmax runs over background and the image's classes only, as for the other methods.
The fitted class ids are the training dataset's, so the training and evaluated datasets must have the same
classes (checked before a run starts: `fits_class_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from bench.capture import Trace, TraceRequest, request
from methods.base import ARGMAX_TIE, ClassQuery, Method, Param, Prediction, register_method

# ImageNet statistics, SegformerImageProcessor's defaults (image_mean / image_std)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IGNORE = 255
CHECKPOINT_EVERY = 50  # optimiser steps between checkpoints
CACHE_BYTES = 1 << 30  # training images kept in memory at the model's size (beyond: read per step)

# Mix Transformer encoders: MiT-b0 (SegFormer Table 1) and a tiny one for 64 px worlds (shapes)
SCALES = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    "tiny": dict(hidden_sizes=[16, 32, 64, 96], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
                 decoder_hidden_size=64, drop_path_rate=0.0, classifier_dropout_prob=0.0),
}


def segformer_config(scale: str, num_labels: int):
    from transformers import SegformerConfig

    return SegformerConfig(num_labels=num_labels, semantic_loss_ignore_index=IGNORE, **SCALES[scale])


def pixel_values(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (N, 3, size, size) normalised floats (bilinear, as the image processor)."""
    out = []
    for image in images:
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return (torch.cat(out) - MEAN) / STD


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> HSV as OpenCV's uint8 convention: H in [0, 180), S and V in [0, 255]."""
    r, g, b = rgb
    v, _ = rgb.max(0)
    c = v - rgb.min(0).values
    s = torch.where(v > 0, 255 * c / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = c.clamp_min(1e-12)
    h = torch.where(v == r, 60 * (g - b) / safe, torch.where(v == g, 120 + 60 * (b - r) / safe,
                                                              240 + 60 * (r - g) / safe))
    h = torch.where(c > 0, h % 360, torch.zeros_like(h))
    return torch.stack([h / 2, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_hsv: (3, H, W) with H in [0, 180), S, V in [0, 255] -> RGB in [0, 255]."""
    h, s, v = hsv[0] * 2, hsv[1] / 255, hsv[2]
    c = v * s
    x = c * (1 - ((h / 60) % 2 - 1).abs())
    m = v - c
    sector = (h / 60).floor().long() % 6
    zero = torch.zeros_like(c)
    table = torch.stack([torch.stack(rgb) for rgb in ((c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c),
                                                       (x, zero, c), (c, zero, x))])  # (6 sectors, 3, H, W)
    return table.gather(0, sector.expand(1, 3, *sector.shape))[0] + m


def photometric_distortion(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MMSegmentation's PhotoMetricDistortion on (3, H, W) RGB in [0, 255] (uint8 values as floats)."""
    def uint8(x):  # mmseg converts back to uint8 (clip, then truncate) after every step
        return x.clamp(0, 255).floor()

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    def chance():
        return torch.randint(2, (), generator=gen).item() == 1

    def contrast(x):
        return uint8(x * u(0.5, 1.5)) if chance() else x

    if chance():  # brightness
        rgb = uint8(rgb + u(-32, 32))
    contrast_first = torch.randint(2, (), generator=gen).item() == 1
    if contrast_first:
        rgb = contrast(rgb)
    hsv = rgb_to_hsv(rgb).round()  # OpenCV's uint8 HSV
    hsv[0] = hsv[0] % 180
    if chance():  # saturation
        hsv[1] = uint8(hsv[1] * u(0.5, 1.5))
    if chance():  # hue, OpenCV's 180-degree scale
        hsv[0] = (hsv[0] + torch.randint(-18, 18, (), generator=gen).item()) % 180
    rgb = uint8(hsv_to_rgb(hsv))
    if not contrast_first:
        rgb = contrast(rgb)
    return rgb


def mmseg_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, flip: bool,
                  cat_max_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """MMSegmentation's RandomResize -> RandomCrop -> RandomFlip (when `flip`: the fit's own draw) ->
    PhotoMetricDistortion -> padding for one normalised image x (3, S, S) and its labels y (S, S) -> the same
    shapes. Every other draw comes from `gen`."""
    size = x.shape[-1]
    rgb = ((x * STD[0] + MEAN[0]) * 255).clamp(0, 255).round()  # the uint8 image the pipeline starts from
    n = max(1, int(size * (0.5 + 1.5 * torch.rand((), generator=gen).item()) + 0.5))
    rgb = F.interpolate(rgb[None], size=(n, n), mode="bilinear", align_corners=False, antialias=n < size)[0].round()
    lab = F.interpolate(y[None, None].float(), size=(n, n), mode="nearest")[0, 0].long()
    if n > size:
        for _ in range(10):
            oy, ox = (torch.randint(n - size + 1, (2,), generator=gen)).tolist()
            crop = lab[oy:oy + size, ox:ox + size]
            counts = torch.bincount(crop[crop != IGNORE].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
        rgb, lab = rgb[:, oy:oy + size, ox:ox + size], lab[oy:oy + size, ox:ox + size]
    if flip:
        rgb, lab = rgb.flip(-1), lab.flip(-1)
    rgb = photometric_distortion(rgb, gen)
    image = torch.zeros(3, size, size, dtype=x.dtype)  # padding: 0 after normalisation, ignored labels
    label = torch.full((size, size), IGNORE, dtype=y.dtype)
    h = min(n, size)
    image[:, :h, :h] = (rgb / 255 - MEAN[0]) / STD[0]
    label[:h, :h] = lab
    return image, label


def label_values(labels: list[np.ndarray], size: int) -> torch.Tensor:
    """(H, W) class-id maps -> (N, size, size) long, nearest (ids are not interpolated; 255 stays ignore)."""
    out = [F.interpolate(torch.from_numpy(lab.astype(np.int64))[None, None].float(), size=(size, size),
                         mode="nearest")[0, 0].long() for lab in labels]
    return torch.stack(out)


@register_method("segformer")
class SegFormer(Method):
    version = "1"
    fits_class_ids = True  # predicts the training dataset's class ids (preflight: same classes as evaluated)
    traces_at_eval = False  # predicts from the image alone: evaluation in inversion mode skips the UNet pass
    params = {
        "tie_rule": ARGMAX_TIE,
        "scale": Param("tiny", "encoder: tiny (0.35M parameters, 64 px worlds) or b0 (MiT-b0, SegFormer Table 1)",
                       choices=tuple(SCALES), kind="train"),
        "size": Param(64, "image size the segmenter trains and predicts at (square; the encoder downsamples 32x)",
                      kind="train", low=32),
        "train_images": Param(0, "the first N images of the training split (0: all): synthetic set size",
                              kind="train", low=0),
        "steps": Param(1000, "optimiser iterations (polynomial decay, power 1)", kind="train", low=1),
        "batch_size": Param(8, "images per iteration, split across workers", kind="train", low=1),
        "lr": Param(3e-3, "AdamW learning rate (SegFormer: 6e-5 with ImageNet weights; from scratch here)",
                    kind="train", positive=True),
        "weight_decay": Param(0.01, "AdamW weight decay (SegFormer's)", kind="train", low=0),
        "flip": Param(True, "random horizontal flips", kind="train"),
        "augment": Param("none", "none (flips only) or mmseg (MMSegmentation's SegFormer pipeline: random resize "
                         "0.5-2x, crop with cat_max_ratio 0.75, photometric distortion, padding)",
                         choices=("none", "mmseg"), kind="train"),
        "train_seed": Param(0, "initialisation, batch order and augmentation (not `seed`: the noise seeds of a run)",
                            kind="train", low=0),
    }
    # a small fit for the registry's contract tests (tests/test_method_contract.py)
    tester_params = {"steps": 4, "batch_size": 2, "size": 32}

    def trace_request(self, cfg: Mapping) -> TraceRequest:
        return request()  # nothing recorded: the segmenter reads the image only

    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        return caption or " ".join(query.names) or "a photograph"

    # -- model ---------------------------------------------------------------------------------------------------
    @staticmethod
    def build(scale: str, num_labels: int, seed: int):
        from transformers import SegformerForSemanticSegmentation

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SegformerForSemanticSegmentation(segformer_config(scale, num_labels))

    def model_for(self, cfg: Mapping):
        """The fitted segmenter of this configuration (built once per fit and kept)."""
        key = self.train_setting(cfg).key
        cache = self.__dict__.setdefault("_models", {})
        if key not in cache:
            tensors = self.artefact(cfg)
            num_labels = tensors["decode_head.classifier.weight"].shape[0]
            model = self.build(cfg["scale"], num_labels, 0)
            model.load_state_dict(tensors)
            cache[key] = model.eval()
        return cache[key]

    def load_fit(self, key, tensors):
        super().load_fit(key, tensors)
        self.__dict__.get("_models", {}).pop(key, None)

    # -- fit -------------------------------------------------------------------------------------------------------
    def fit(self, ctx) -> dict[str, torch.Tensor]:
        cfg = self.resolve(dict(ctx.values))
        dataset = ctx.dataset
        count = len(dataset) if not cfg["train_images"] else min(cfg["train_images"], len(dataset))
        if count == 0:
            raise ValueError(f"segformer: the training data ({type(dataset).__name__}) has no images")
        size = cfg["size"]
        model = self.build(cfg["scale"], len(dataset.classes), cfg["train_seed"])
        model.train()
        wrapped = ctx.prepare(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        schedule = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg["steps"], power=1.0)
        start = ctx.resume(model=model, optimizer=opt, scheduler=schedule)
        ctx.start(cfg["steps"])
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        per_image = 3 * size * size * 4 + size * size * 8

        def load(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            if index in cache:
                return cache[index]
            sample = dataset[index]
            item = pixel_values([sample.image], size)[0], label_values([sample.label], size)[0]
            if (len(cache) + 1) * per_image <= CACHE_BYTES:
                cache[index] = item
            return item

        for step in range(start, cfg["steps"]):
            draw = torch.Generator().manual_seed(cfg["train_seed"] * 1_000_003 + step)
            batch = torch.randint(count, (cfg["batch_size"],), generator=draw).tolist()
            flips = torch.rand(cfg["batch_size"], generator=draw) < 0.5 if cfg["flip"] else \
                torch.zeros(cfg["batch_size"], dtype=torch.bool)
            mine = ctx.shard(list(range(cfg["batch_size"])))  # this worker's share of the global batch
            pixels, labels = [], []
            for k in mine:
                x, y = load(batch[k])
                if cfg["augment"] == "mmseg":  # its own draws per sample: the same on any number of workers
                    x, y = mmseg_augment(x, y, torch.Generator().manual_seed(
                        (cfg["train_seed"] * 1_000_003 + step) * 1_000_003 + k), flip=bool(flips[k]))
                elif flips[k]:
                    x, y = x.flip(-1), y.flip(-1)
                pixels.append(x)
                labels.append(y)
            with torch.random.fork_rng(devices=[]):  # drop paths / dropout: drawn from (seed, step, rank)
                torch.manual_seed(cfg["train_seed"] * 1_000_003 + step * 997 + ctx.rank)
                if pixels:
                    logits = wrapped(pixel_values=torch.stack(pixels)).logits
                    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
                    target = torch.stack(labels)
                    loss_sum = F.cross_entropy(up, target, ignore_index=IGNORE, reduction="sum")
                    pixels_here = (target != IGNORE).sum()
                else:  # more workers than images in the batch: take part in DDP's reduction with zero loss
                    loss_sum = sum(p.sum() for p in wrapped.parameters()) * 0.0
                    pixels_here = torch.tensor(0)
            total = ctx.all_sum(pixels_here.float().reshape(1)).clamp_min(1.0)
            opt.zero_grad()
            # DDP averages gradients over workers; scaled so the average is the global pixel mean's gradient
            (loss_sum * ctx.world_size / total).backward()
            opt.step()
            schedule.step()
            ctx.log(step + 1, (ctx.all_sum(loss_sum.detach().reshape(1)) / total).item())
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == cfg["steps"]:
                ctx.checkpoint(step + 1, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": schedule.state_dict()})
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # -- predict ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, image: np.ndarray, cfg: Mapping) -> torch.Tensor:
        """(C, size/4, size/4) class probabilities over the fitted classes."""
        model = self.model_for(cfg)
        logits = model(pixel_values=pixel_values([image], cfg["size"])).logits[0]
        return logits.float().softmax(0)

    def predict_many(self, trace: Trace, query: ClassQuery, cfgs: list[Mapping],
                     out_size: tuple[int, int]) -> list[Prediction]:
        if trace.image is None:
            raise ValueError("segformer predicts from the traced image, and this trace has none")
        cache: dict[str, torch.Tensor] = {}
        out = []
        for cfg in cfgs:  # the probabilities depend on the fit only
            key = self.train_setting(cfg).key
            if key not in cache:
                probs = self.probabilities(trace.image, cfg)
                cache[key] = F.interpolate(probs[None], size=out_size, mode="bilinear", align_corners=False)[0]
            probs = cache[key]
            allowed = [0, *query.ids]
            if max(allowed) >= probs.shape[0]:
                raise ValueError(f"segformer was fitted on {probs.shape[0]} classes, but class {max(allowed)} is "
                                 f"queried; fit on a dataset with the evaluated classes")
            labels = torch.tensor(allowed, dtype=torch.long, device=probs.device)[probs[allowed].argmax(0)]
            out.append(Prediction(probs[query.ids].clone(), labels))
        return out
