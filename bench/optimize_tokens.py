"""`python -m bench.optimize_tokens --out DIR [options]`: OVAM token optimisation (Marcos-Manchon et al. 2024,
Sec. 3.3, Eq. 6-7) for every class of a dataset, from `--images-per-class` annotated image(s) per class.

For each class: trace the first image(s) of the dataset that contain it (queries of the attn2 layers, stored),
initialise X' = [<SoT> of the attribution prompt, the class name's token] (post-encoder embeddings), and
minimise the loss between the OVAM maps D(X') and [1 - mask, mask] by SGD. Writes to DIR:

    tokens.safetensors   {class name: (2, D) [background, class]} (methods: tokens=DIR/tokens.safetensors)
    loss.csv / loss.png  the loss curve of every class
    summary.json         settings, initial and best loss per class

Use images the evaluation does not use (the paper: distinct seeds), e.g. --data name=shapes split=train or
--data name=voc_sim seed_offset=1000.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from bench.errors import BenchError


def _kv(items: list[str], defaults: dict) -> dict:
    import yaml

    out = dict(defaults)
    for item in items:
        if "=" not in item:
            raise BenchError(f"{item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.optimize_tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--data", nargs="*", default=[], help="dataset key=value (default name=shapes split=train)")
    p.add_argument("--model", nargs="*", default=[], help="model key=value (default name=embedded)")
    p.add_argument("--classes", nargs="*", default=None, help="class names (default: every dataset class)")
    p.add_argument("--images-per-class", type=int, default=1, help="annotated images per class (paper: 1)")
    p.add_argument("--mode", choices=("inversion", "generation"), default="inversion")
    p.add_argument("--timestep", type=int, default=100, help="inversion noise level")
    p.add_argument("--steps", type=int, default=50, help="generation: denoising steps (the model's own scheduler)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--branch", choices=("cond", "uncond"), default="cond", help="generation: query branch")
    p.add_argument("--blocks", default="64+32+16", help="attn2 resolutions (as OVAM's blocks=)")
    p.add_argument("--template", default="A photograph of a {name}", help="prompt / attribution prompt")
    p.add_argument("--loss", choices=("bce", "ce"), default="bce", help="bce (paper Eq. 7) or ce (released code)")
    p.add_argument("--epochs", type=int, default=500, help="paper: 500 (released code: 800)")
    p.add_argument("--lr", type=float, default=100.0, help="SGD learning rate (released code: 100)")
    p.add_argument("--step-size", type=int, default=120, help="StepLR step (released code: 120)")
    p.add_argument("--lr-gamma", type=float, default=0.7, help="StepLR decay (released code: 0.7)")
    p.add_argument("--resolution", type=int, default=0, help="image size fed to the model (0 = native)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def training_examples(backbone, dataset, cid: int, args, layers: list[str]) -> list:
    """(trace, class mask at the latent size) for the first images that contain class `cid`."""
    import torch
    import torch.nn.functional as F

    from bench.forward import ForwardSetting, run_traced
    from bench.trace import request

    name = dataset.classes[cid]
    setting = ForwardSetting(mode=args.mode, timestep=args.timestep, seed=args.seed, steps=args.steps,
                             guidance=args.guidance, branch=args.branch, size=args.resolution)
    gen_gt = getattr(dataset, "generation_gt", None)
    if args.mode == "generation" and not gen_gt:
        raise BenchError(f"--mode generation needs a generation dataset (voc_sim, coco_cap), not {dataset.name}")
    out = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if cid not in sample.present_class_ids():
            continue
        if args.mode == "generation":
            prompt, images = sample.caption, ([sample.image] if gen_gt == "replay" else None)
            seeds = [int(sample.extra.get("seed", index))]
        else:
            prompt, images, seeds = args.template.format(name=name), [sample.image], None
        trace = run_traced(backbone, request(queries=layers, per_head=True), setting, [prompt], images=images,
                           image_seeds=seeds).traces[0]
        mask = torch.from_numpy((sample.label == cid).astype("float32"))[None, None]
        target = F.interpolate(mask, size=trace.latent_size, mode="area")[0, 0]
        out.append((trace, target))
        if len(out) == args.images_per_class:
            break
    return out


def initial_tokens(backbone, name: str, template: str):
    """X' = [SoT of the attribution prompt, mean of the class name's tokens] (post-encoder)."""
    import torch

    from methods.postprocess import attribution_embedding, token_indices

    emb, ids = attribution_embedding(backbone, template.format(name=name), pad=False)
    idx = token_indices(backbone.tokenizer, ids, name)
    return torch.stack([emb[0], emb[idx].mean(0)]).float()


def plot(curves: dict[str, list[float]], path: Path, loss: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({loss})")
    ax.set_title("OVAM token optimisation")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from bench.data import build_dataset
    from bench.models import load_backbone, validate_model_config
    from methods.ovam import optimize_tokens
    from methods.postprocess import BLOCK_CHOICES, attn_layers, save_tokens

    if args.blocks not in BLOCK_CHOICES:
        raise BenchError(f"--blocks {args.blocks} is not one of {', '.join(BLOCK_CHOICES)}")
    model_cfg = _kv(args.model, {"name": "embedded", "device": "auto", "dtype": "float32"})
    validate_model_config(model_cfg)
    dataset = build_dataset(_kv(args.data, {"name": "shapes", "split": "train"}))
    names = args.classes or dataset.classes[1:]
    unknown = [n for n in names if n not in dataset.classes]
    if unknown:
        raise BenchError(f"classes {unknown} are not classes of {dataset.name}: {', '.join(dataset.classes[1:])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(model_cfg)
    layers = attn_layers(args.blocks)
    tokens, curves, summary = {}, {}, {}
    bar = tqdm(total=len(names) * args.epochs, desc="token optimisation", unit="epoch", dynamic_ncols=True,
               disable=args.no_progress)
    for name in names:
        examples = training_examples(backbone, dataset, dataset.classes.index(name), args, layers)
        if not examples:
            tqdm.write(f"no image of {name!r} in {dataset.name}; skipped")
            bar.update(args.epochs)
            continue
        bar.set_postfix(cls=name)
        with torch.enable_grad():
            best, curve = optimize_tokens(examples, initial_tokens(backbone, name, args.template), layers,
                                          args.loss, args.epochs, args.lr, args.step_size, args.lr_gamma,
                                          progress=lambda v: (bar.update(1),
                                                              bar.set_postfix(cls=name, loss=f"{v:.4f}")))
        tokens[name], curves[name] = best, curve
        summary[name] = {"images": [t.prompt for t, _ in examples], "initial_loss": curve[0],
                         "best_loss": min(curve), "final_loss": curve[-1]}
    bar.close()
    if not tokens:
        raise BenchError("no class had a training image; check --data and --classes")
    meta = {"model": backbone.name, "blocks": args.blocks, "loss": args.loss, "mode": args.mode,
            "template": args.template}
    save_tokens(out / "tokens.safetensors", tokens, meta)
    with open(out / "loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "epoch", "loss"])
        for name, curve in curves.items():
            writer.writerows([name, i + 1, f"{v:.6g}"] for i, v in enumerate(curve))
    plot(curves, out / "loss.png", args.loss)
    settings = {k: v for k, v in vars(args).items()}
    (out / "summary.json").write_text(json.dumps({"settings": settings, "model": backbone.describe(),
                                                  "dataset": dataset.describe(), "classes": summary}, indent=2,
                                                 default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        out = run(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out / "tokens.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
