"""A tiny CLIP of the shapes world: the embedded stand-in for OpenAI's CLIP (DEDOS's vision-language model).

    python -m bench.embedded.clip --out bench/embedded/clip     # train (CPU defaults, one thread, seeded)
    python -m bench.embedded.clip --evaluate                    # zero-shot shape accuracy of the shipped folder

A transformers `CLIPModel` (ViT image tower with 8 px patches on 64 px images, a small text transformer over
the embedded diffusion model's tokenizer) trained contrastively (CLIP's symmetric InfoNCE with a learned
temperature) on rendered shapes images and their captions from the shapes world's own renderer and captioner.
Captions are varied so that class-name prompts stay in distribution: objects shuffled, colour words dropped
for a share of captions, and a share of captions are bare class-name templates ("a photo of a star").

So that shape, not colour, solves the objective (the first version matched colours: 28.4% zero-shot): every
image of a batch that a caption is true of is its positive (`caption_matches`; one-hot targets made every
other star image a negative of "a star"), most captions name no colour, and under a colourless caption half of
the images get their colour channels permuted (`recolour`).

Saved as a standard transformers folder (`save_pretrained`, safetensors) with its tokenizer and a
`preprocessor_config.json` (image size, mean, std), loaded by `bench.models.clip.load_clip` exactly as a real
CLIP folder is.
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

log = logging.getLogger("bench.embedded.clip")
CLIP_DIR = Path(__file__).parent / "clip"
# OpenAI CLIP's image normalisation (what a real CLIP folder's preprocessor_config.json carries)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ZERO_SHOT_TEMPLATES = ("a photo of a {}", "a {}")
BACKGROUND_MEANING = (("background", None),)

DEFAULTS = {
    "size": 64,
    "patch": 8,
    "width": 64,  # vision and text hidden size
    "layers": 3,  # vision layers (text: 2)
    "heads": 4,
    "projection": 64,
    "max_length": 16,
    "num_train_images": 10000,
    "steps": 2400,
    "batch": 96,
    "lr": 1e-3,
    "warmup": 200,
    "weight_decay": 0.1,
    "template_prob": 0.3,  # share of captions replaced by a class-name template of one shape in the image
    "drop_colour_prob": 0.6,  # share of captions without colour words
    "seed": 0,
    "semantic_positives": 1,  # 1: every caption true of an image is its positive (caption_matches)
    "recolour_prob": 0.5,  # share of colourless-caption images whose colour channels are permuted
    "single_share": 0.0,  # share of the training pool rendered as single-object scenes (the rest: 1-3 objects)
    "background_share": 0.1,  # share rendered with no objects, captioned "a photo of a background" (teaches the word)
    "val_every": 0,  # >0: log zero-shot accuracy on 200 shapes *val* images every N steps (never test)
    "dense_weight": 0.0,  # >0: add the dense alignment loss (dense_alignment_loss) with this weight
    "world": "shapes",  # the scenes it learns: shapes (5 shapes) or shapes_many (16: the open-vocabulary world)
}
WORLDS = ("shapes", "shapes_many")


def world_dataset(world: str):
    """The dataset class of a world (`--world`)."""
    from bench.data.shapes import ManyShapesDataset, ShapesDataset

    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
    return ManyShapesDataset if world == "shapes_many" else ShapesDataset


def shipped_clip(name: str = "clip") -> Path | None:
    """The trained tiny CLIP folder `bench/embedded/<name>` shipped in the package (clip: the shapes world's,
    clip_many: the sixteen-shape world's), if it has been trained and committed."""
    folder = CLIP_DIR.parent / name
    return folder if (folder / "config.json").is_file() else None


def build_clip(size: int = 64, patch: int = 8, width: int = 64, layers: int = 3, heads: int = 4,
               projection: int = 64, max_length: int = 16, seed: int = 0, text_layers: int = 2,
               world: str = "shapes"):
    """(CLIPModel with seeded random weights, its tokenizer): the tiny architecture (also used by tests).
    world=shapes_many: the tokenizer also spells that world's shape names as whole words (appended after the
    embedded tokenizer's own, which keep their ids)."""
    from transformers import CLIPConfig, CLIPModel

    from bench.embedded import build_tokenizer

    tokenizer = build_tokenizer(max_length=max_length, extra_words=world_dataset(world).shapes)
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=max_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection)
    vision = dict(image_size=size, patch_size=patch, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    return CLIPModel(config), tokenizer


# ----------------------------------------------------------------------------------------------------- data
def caption_variants(objects: list[dict], rng: np.random.Generator, template_prob: float,
                     drop_colour_prob: float) -> tuple[str, tuple[tuple, bool]]:
    """One training caption of a scene and its meaning: the shapes captioner's phrase per object, shuffled,
    colours sometimes dropped; or a class-name template of one of its shapes.

    The meaning is ((shape, colour or None) per mentioned object, complete), where complete says the caption
    names every object of the scene (a template names one): `caption_matches` decides from it which images of
    a batch the caption is true of."""
    from bench.data.shapes import article

    if not objects:  # an empty scene: all it shows is the background (`background_share`)
        text = ZERO_SHOT_TEMPLATES[int(rng.integers(len(ZERO_SHOT_TEMPLATES)))].format("background")
        return text, (BACKGROUND_MEANING, True)
    if rng.random() < template_prob:
        obj = objects[int(rng.integers(len(objects)))]
        text = ZERO_SHOT_TEMPLATES[int(rng.integers(len(ZERO_SHOT_TEMPLATES)))].format(obj["shape"])
        return text, (((obj["shape"], None),), False)
    order = rng.permutation(len(objects))
    colour = rng.random() >= drop_colour_prob
    words = [f"{article(objects[i]['colour'])} {objects[i]['colour']} {objects[i]['shape']}" if colour
             else f"a {objects[i]['shape']}" for i in order]
    items = tuple((objects[i]["shape"], objects[i]["colour"] if colour else None) for i in order)
    return " and ".join(words), (items, True)


def caption_matches(meaning: tuple[tuple, bool], objects: list[dict]) -> bool:
    """Whether a caption with this meaning is true of a scene: its objects can be paired one-to-one with the
    scene's (same shape, same colour where the caption names one), covering the scene when it is complete."""
    from itertools import permutations

    items, complete = meaning
    if items == BACKGROUND_MEANING:  # "a background" is true of the scenes that show nothing else
        return not objects
    if len(items) > len(objects) or (complete and len(items) != len(objects)):
        return False
    return any(all(shape == objects[k]["shape"] and colour in (None, objects[k]["colour"])
                   for (shape, colour), k in zip(items, chosen))
               for chosen in permutations(range(len(objects)), len(items)))


def recolour(images_uint8: torch.Tensor, which: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Permute the colour channels of the images marked in `which` (one random permutation each): the shapes
    keep their outlines while their colours change, so colour cannot stand in for shape. Applied only where
    the caption names no colour (it would make a colour word false)."""
    perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(len(images_uint8))])
    permuted = torch.gather(images_uint8, 1, perms.view(-1, 3, 1, 1).expand_as(images_uint8))
    return torch.where(which.view(-1, 1, 1, 1), permuted, images_uint8)


def render_pool(num_images: int, size: int, seed: int, split: str = "train", min_objects: int = 1,
                max_objects: int = 3, empty: bool = False, labels: list | None = None, world: str = "shapes"
                ) -> tuple[torch.Tensor, list[list[dict]]]:
    """(N, 3, size, size) uint8 images and their scene layouts, from the shapes world's own renderer
    (empty: the backgrounds alone, no objects). `labels`: a list that receives each image's label map."""
    ds = world_dataset(world)(num_images=num_images, size=size, seed=seed, split=split, min_objects=min_objects,
                              max_objects=max_objects)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    layouts = []
    for i in tqdm(range(num_images), desc="render", unit="img", mininterval=5, leave=False):
        objects = [] if empty else ds.layout(i)
        images[i], label = ds.render(objects, i)
        layouts.append(objects)
        if labels is not None:
            labels.append(np.asarray(label, dtype=np.uint8))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), layouts


def normalise(images_uint8: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    x = images_uint8.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------- train
def contrastive_loss(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positives: torch.Tensor | None = None, outputs: list | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-text similarities (learned temperature).

    positives: optional (images, captions) bool matrix of which captions are true of which images (diagonal
    included). A small world repeats meanings within a batch ("a star" fits every image with a star); CLIP's
    one-hot targets would push those true pairs apart, so the targets spread over every true pair instead.
    outputs: a list that receives the model's output (dense_alignment_loss reads its vision tokens)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    if outputs is not None:
        outputs.append(out)
    if positives is None:
        targets = torch.arange(len(pixel_values), device=pixel_values.device)
        return 0.5 * (F.cross_entropy(out.logits_per_image, targets) +
                      F.cross_entropy(out.logits_per_text, targets))
    pos = positives.float()
    image_targets = pos / pos.sum(1, keepdim=True)
    text_targets = pos.T / pos.T.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(out.logits_per_image, image_targets) +
                  F.cross_entropy(out.logits_per_text, text_targets))


def patch_labels(labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """(N, g, g) the most frequent class of every patch of label maps (N, S, S) (the first on ties)."""
    out = []
    for chunk in labels.split(500):
        n, size = chunk.shape[0], chunk.shape[-1]
        g = size // patch
        blocks = chunk.long().view(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g, g, patch * patch)
        counts = F.one_hot(blocks.clamp(max=num_classes - 1), num_classes).sum(3)
        out.append(counts.argmax(-1))
    return torch.cat(out)


def dense_alignment_loss(model, output, targets: torch.Tensor, class_ids: torch.Tensor,
                         class_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every patch's projected embedding (the final patch tokens through the post-layernorm and
    the visual projection, what CAT-Seg's cost volume reads) against the class-name texts, targets (B, g, g) the
    renderer's majority class of each patch. The recipe's stand-in for what web-scale CLIPs know of regions
    (a CLIP trained on whole-image captions only knew the shapes in its image embedding, not in its patches:
    bench/embedded/README.md); off by default (`--dense-weight`)."""
    vision = model.vision_model
    tokens = output.vision_model_output.last_hidden_state[:, 1:]
    patches = F.normalize(model.visual_projection(vision.post_layernorm(tokens)), dim=-1)
    text = model.get_text_features(input_ids=class_ids, attention_mask=class_mask)
    text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
    logits = patches @ text.T * model.logit_scale.exp()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train(args: argparse.Namespace, out: Path) -> dict:
    from transformers import CLIPImageProcessor, get_cosine_schedule_with_warmup

    from bench.atomic import staged_dir

    torch.set_num_threads(1)
    model, tokenizer = build_clip(args.size, args.patch, args.width, args.layers, args.heads, args.projection,
                                  args.max_length, args.seed, world=args.world)
    started, cpu_started = time.time(), time.process_time()
    single = int(round(args.num_train_images * args.single_share))
    empty = int(round(args.num_train_images * args.background_share))
    labels = [] if args.dense_weight > 0 else None
    images, layouts = render_pool(args.num_train_images - single - empty, args.size, args.seed, labels=labels,
                                  world=args.world)
    if single:  # a second seed stream: single-object scenes with their own backgrounds
        one, one_layouts = render_pool(single, args.size, args.seed + 1, min_objects=1, max_objects=1,
                                       labels=labels, world=args.world)
        images, layouts = torch.cat([images, one]), layouts + one_layouts
    if empty:  # a third seed stream: backgrounds alone, so that "background" names something
        none, none_layouts = render_pool(empty, args.size, args.seed + 2, empty=True, labels=labels,
                                         world=args.world)
        images, layouts = torch.cat([images, none]), layouts + none_layouts
    dense = None
    if labels is not None:  # the renderer's classes of every patch, and the class-name texts they are matched to
        names = world_dataset(args.world).classes
        dense = patch_labels(torch.from_numpy(np.stack(labels)), args.patch, len(names))
        class_tok = tokenizer([ZERO_SHOT_TEMPLATES[0].format(n) for n in names], padding="max_length",
                              max_length=args.max_length, truncation=True, return_tensors="pt")
    log.info("rendered %d training images in %.0f s", len(images), time.time() - started)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    model.train()
    bar = tqdm(range(args.steps), desc="clip", unit="step", mininterval=10)
    for step in bar:
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        batch = images[idx]
        flip = torch.rand(args.batch, generator=gen) < 0.5  # shapes are mirror-symmetric classes
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        drawn = [caption_variants(layouts[int(i)], rng, args.template_prob, args.drop_colour_prob) for i in idx]
        captions = [text for text, _ in drawn]
        positives = None
        if args.semantic_positives:
            positives = torch.tensor([[caption_matches(meaning, layouts[int(i)]) for _, meaning in drawn]
                                      for i in idx])
            positives |= torch.eye(args.batch, dtype=torch.bool)  # a recoloured image still fits its caption
        if args.recolour_prob > 0:
            colourless = torch.tensor([all(c is None for _, c in meaning[0]) for _, meaning in drawn])
            chosen = colourless & (torch.rand(args.batch, generator=gen) < args.recolour_prob)
            batch = recolour(batch, chosen, gen)
        tok = tokenizer(captions, padding="max_length", max_length=args.max_length, truncation=True,
                        return_tensors="pt")
        outputs = []
        loss = contrastive_loss(model, normalise(batch), tok.input_ids, tok.attention_mask, positives, outputs)
        if dense is not None:
            targets = torch.where(flip.view(-1, 1, 1), dense[idx].flip(-1), dense[idx])
            loss = loss + args.dense_weight * dense_alignment_loss(model, outputs[0], targets, class_tok.input_ids,
                                                                   class_tok.attention_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))  # CLIP clips the temperature at 100
        curve.append(float(loss.detach()))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(curve[-100:]):.3f}")
        if args.val_every and (step + 1) % args.val_every == 0:
            model.eval()
            from bench.models.clip import Clip

            val = zero_shot_accuracy(Clip(model, tokenizer, CLIP_MEAN, CLIP_STD), 200, split="val",
                                     world=args.world)
            log.info("step %d: loss %.3f, val zero-shot %.1f%% %s", step + 1, np.mean(curve[-100:]),
                     100 * val["accuracy"], {k: round(v, 2) for k, v in val["per_class"].items()})
            model.train()
    minutes = (time.time() - started) / 60
    model.eval()
    with staged_dir(out, "--out DIR", tag="clip") as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        CLIPImageProcessor(size={"shortest_edge": args.size}, crop_size={"height": args.size, "width": args.size},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(work)
        arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        record = {"args": arguments, "minutes": round(minutes, 1),
                  "cpu_minutes": round((time.process_time() - cpu_started) / 60, 1),
                  "final_loss": float(np.mean(curve[-100:])), "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
        (work / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("saved %s (%.1f min, final loss %.3f)", out, minutes, record["final_loss"])
    return record


# ------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def zero_shot_accuracy(clip, num_images: int = 500, seed: int = 0, split: str = "test",
                       world: str = "shapes") -> dict:
    """Zero-shot shape classification of held-out single-object images (shapes test split, never trained on):
    the class whose prompt-ensembled text embedding (ZERO_SHOT_TEMPLATES) is most similar to the image's."""
    shapes = world_dataset(world).shapes
    images, layouts = render_pool(num_images, clip.image_size, seed, split=split, min_objects=1, max_objects=1,
                                  world=world)
    truth = torch.tensor([shapes.index(objs[0]["shape"]) for objs in layouts])
    text = clip.class_embeddings(shapes, ZERO_SHOT_TEMPLATES)
    feats = torch.cat([clip.image_embeddings(images[i:i + 256]) for i in range(0, num_images, 256)])
    predicted = (feats @ text.T).argmax(-1)
    per_class = {name: float((predicted[truth == k] == k).float().mean()) for k, name in enumerate(shapes)}
    return {"accuracy": float((predicted == truth).float().mean()), "per_class": per_class,
            "images": num_images, "split": split, "seed": seed, "chance": 1 / len(shapes), "world": world}


@torch.no_grad()
def dense_zero_shot(clip, num_images: int = 100, size: int = 64, world: str = "shapes") -> dict:
    """Training-free dense zero-shot segmentation of shapes val (the images DEDOS's open-vocabulary sweep
    scores): every patch takes the class, "background" included, whose prompt-ensembled text embedding is most
    similar to the patch's projected embedding (bench.models.clip.Clip.dense_embeddings: MaskCLIP's recipe),
    bilinearly upsampled to the label size. What the CLIP's patches know of each class with nothing learnt
    on top: a reference for open-vocabulary methods trained on a subset of the classes (unseen classes above
    zero here are reachable in principle)."""
    import torch.nn.functional as F

    from bench.data import build_dataset
    from bench.metrics import ImageScorer, summarize

    val = build_dataset({"name": world, "size": size, "split": "val", "num_images": num_images})
    names = list(val.classes)
    text = clip.class_embeddings(names, ZERO_SHOT_TEMPLATES)
    hist = 0
    for i in range(len(val)):
        sample = val[i]
        patches = clip.dense_embeddings(clip.pixels(torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None]))
        logits = (patches[0] @ text.T).permute(2, 0, 1)  # (K, g, g)
        pred = F.interpolate(logits[None], size=sample.label.shape, mode="bilinear", align_corners=False)[0]
        hist = hist + ImageScorer(sample.label, len(names), sample.ignore_index).histograms(
            [pred.argmax(0).cpu().numpy()])[0]
    result = summarize(hist, names, "mmseg")
    return {"mIoU": float(result["mIoU"]), "IoU": {n: float(result[f"IoU/{n}"]) for n in names},
            "images": num_images, "size": size, "recipe": "MaskCLIP value path, prompt ensemble"}


@torch.no_grad()
def region_zero_shot(clip, num_images: int = 100, size: int = 64, world: str = "shapes") -> dict:
    """Zero-shot classification of every ground-truth shape region of shapes val (the images DEDOS's
    open-vocabulary sweep scores) among the shape names, two ways: `pooled`, the CLIP's dense patches
    (Clip.dense_embeddings) averaged over the region (FC-CLIP's out-of-vocabulary path with perfect masks), and
    `masked`, the CLIP's image embedding of the region alone, the rest at the normalisation mean
    (Clip.region_embeddings: OVSeg's mask prompt, perfect masks). Per-shape accuracy: what a mask classifier
    built on this CLIP can know of classes it was not trained on."""
    import torch.nn.functional as F

    from bench.data import build_dataset

    val = build_dataset({"name": world, "size": size, "split": "val", "num_images": num_images})
    shapes = list(val.classes[1:])
    text = clip.class_embeddings(shapes, ZERO_SHOT_TEMPLATES)
    hits = {way: {n: [] for n in shapes} for way in ("pooled", "masked")}
    for i in range(len(val)):
        sample = val[i]
        image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None]
        label = torch.from_numpy(np.asarray(sample.label).astype(np.int64))
        ids = [int(c) for c in label.unique() if 0 < int(c) <= len(shapes)]
        if not ids:
            continue
        masks = torch.stack([label == c for c in ids])
        patches = clip.dense_embeddings(clip.pixels(image))[0]  # (g, g, P)
        weights = F.interpolate(masks[:, None].float(), size=patches.shape[:2], mode="area")[:, 0]
        pooled = torch.einsum("nhw,hwp->np", weights, patches) / weights.sum((1, 2))[:, None].clamp_min(1e-6)
        for way, emb in (("pooled", F.normalize(pooled, dim=-1)), ("masked", clip.region_embeddings(image, masks))):
            for c, guess in zip(ids, (emb @ text.T).argmax(-1).tolist()):
                hits[way][shapes[c - 1]].append(guess == c - 1)
    return {way: {n: float(np.mean(v)) if v else None for n, v in per.items()} for way, per in hits.items()} | {
        "regions": sum(len(v) for v in hits["pooled"].values()), "images": num_images, "size": size,
        "chance": 1 / len(shapes)}


def main(argv: list[str] | None = None) -> int:
    from bench.errors import BenchError, cli_exit

    parser = argparse.ArgumentParser(prog="python -m bench.embedded.clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CLIP_DIR, help="folder to write (absent or empty)")
    parser.add_argument("--evaluate", action="store_true", help="measure zero-shot accuracy (images), dense zero-shot segmentation and ground-truth region "
                        "classification (shapes val) of --model instead")
    parser.add_argument("--model", default=None, help="CLIP folder or cached hub id to evaluate (default: shipped)")
    parser.add_argument("--eval-images", type=int, default=500)
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                            choices=WORLDS if key == "world" else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work():
        from bench.models.clip import load_clip

        if args.evaluate:
            clip = load_clip(args.model or str(CLIP_DIR))
            result = zero_shot_accuracy(clip, args.eval_images, world=args.world)
            result["dense_zero_shot"] = dense_zero_shot(clip, world=args.world)
            result["region_zero_shot"] = region_zero_shot(clip, world=args.world)
            return json.dumps(result)
        if args.out.exists() and any(args.out.iterdir()):
            raise BenchError(f"--out {args.out} is not empty; remove it or choose another folder")
        train(args, args.out)
        return str(args.out)

    return cli_exit(work)


if __name__ == "__main__":
    sys.exit(main())
