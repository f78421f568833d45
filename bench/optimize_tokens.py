"""`python -m bench.optimize_tokens --out DIR [options]`: OVAM token optimisation (Marcos-Manchon et al. 2024,
Sec. 3.3, Eq. 6-7) for every class of a dataset, from `--images-per-class` annotated image(s) per class.

A thin shell over `methods.tokens.fit_tokens`, the function the fit stage runs for `tokens=auto`. Writes to DIR
(complete or not at all):

    tokens.safetensors   {class name: (2, D) [background, class]} (methods: tokens=DIR/tokens.safetensors)
    loss.csv / loss.png  the loss curve of every class
    summary.json         settings, initial and best loss per class

Use images the evaluation does not use (the paper: distinct seeds), e.g. --data name=shapes split=train or
--data name=voc_sim seed_offset=1000. Bad input: one `error:` line naming the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import yaml
from tqdm import tqdm

from bench.atomic import staged_dir
from bench.data import build_dataset
from bench.env import quiet_environment
from bench.errors import BenchError, cli_exit
from bench.models import SCHEDULER_CHOICES, load_backbone, validate_model_config
from methods.attribution import BLOCK_CHOICES
from methods.tokens import TokenSettings, fit_class, save_tokens

USAGE = "python -m bench.optimize_tokens --out DIR [--data k=v ...] [--model k=v ...] [--classes ...]"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as bench.run does
        raise BenchError(f"{message}; usage: {USAGE}")


def _kv(items: list[str], defaults: dict) -> dict:
    out = dict(defaults)
    for item in items:
        if "=" not in item:
            raise BenchError(f"{item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    d = TokenSettings()
    p = _Parser(prog="python -m bench.optimize_tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created; must not exist or be empty)")
    p.add_argument("--data", nargs="*", default=[], help="dataset key=value (default name=shapes split=train)")
    p.add_argument("--model", nargs="*", default=[], help="model key=value (default name=embedded)")
    p.add_argument("--classes", nargs="*", default=None, help="class names (default: every dataset class)")
    p.add_argument("--images-per-class", type=int, default=d.images_per_class, help="annotated images per class")
    p.add_argument("--mode", choices=("inversion", "generation"), default=d.mode)
    p.add_argument("--timestep", type=int, default=d.timestep, help="inversion noise level")
    p.add_argument("--steps", type=int, default=d.steps, help="generation: denoising steps (the model's own scheduler)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=d.scheduler,
                   help="generation: auto (the model folder's own) or a named diffusers scheduler")
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--branch", choices=("cond", "uncond"), default=d.branch, help="generation: query branch")
    p.add_argument("--blocks", choices=BLOCK_CHOICES, default=d.blocks,
                   help="attn2 blocks (OVAM's blocks=): all, or SD resolution names such as 64+16")
    p.add_argument("--template", default=d.template, help="prompt / attribution prompt")
    p.add_argument("--loss", choices=("bce", "ce"), default=d.loss, help="bce (paper Eq. 7) or ce (released code)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="paper: 500 (released code: 800)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (released code: 100)")
    p.add_argument("--step-size", type=int, default=d.step_size, help="StepLR step (released code: 120)")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR decay (released code: 0.7)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="image size fed to the model (0 = native)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> TokenSettings:
    return TokenSettings(**{f.name: getattr(args, f.name) for f in fields(TokenSettings)})


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
    settings = settings_of(args)
    model_cfg = _kv(args.model, {"name": "embedded", "device": "auto", "dtype": "float32"})
    validate_model_config(model_cfg)
    dataset = build_dataset(_kv(args.data, {"name": "shapes", "split": "train"}))
    names = args.classes or dataset.classes[1:]
    unknown = [n for n in names if n not in dataset.classes]
    if unknown:
        raise BenchError(f"classes {unknown} are not classes of {dataset.name}: {', '.join(dataset.classes[1:])}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BenchError(f"--out {out} exists and is not empty; choose another --out")
    backbone = load_backbone(model_cfg)
    bar = tqdm(total=len(names) * settings.epochs, desc="token optimisation", unit="epoch", dynamic_ncols=True,
               disable=args.no_progress)
    fits = []
    for name in names:
        bar.set_postfix(cls=name)
        fit = fit_class(backbone, dataset, name, settings,
                        progress=lambda v, name=name: (bar.update(1), bar.set_postfix(cls=name, loss=f"{v:.4f}")))
        if fit.tokens is None:
            tqdm.write(f"no image of {name!r} in {dataset.name}; skipped")
            bar.update(settings.epochs)
        fits.append(fit)
    bar.close()
    fits = [f for f in fits if f.tokens is not None]
    if not fits:
        raise BenchError("no class had a training image; check --data and --classes")
    with staged_dir(out, "--out DIR") as tmp:
        meta = {"model": backbone.name, "blocks": settings.blocks, "loss": settings.loss, "mode": settings.mode,
                "template": settings.template}
        save_tokens(tmp / "tokens.safetensors", {f.name: f.tokens for f in fits}, meta)
        with open(tmp / "loss.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["class", "epoch", "loss"])
            for f in fits:
                writer.writerows([f.name, i + 1, f"{v:.6g}"] for i, v in enumerate(f.curve))
        plot({f.name: f.curve for f in fits}, tmp / "loss.png", settings.loss)
        summary = {f.name: {"images": f.images, "initial_loss": f.curve[0], "best_loss": min(f.curve),
                            "final_loss": f.curve[-1]} for f in fits}
        (tmp / "summary.json").write_text(json.dumps({"settings": asdict(settings), "model": backbone.describe(),
                                                      "dataset": dataset.describe(), "classes": summary},
                                                     indent=2, default=str))
    return out / "tokens.safetensors"


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_exit(lambda: run(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
