"""Resumable training state of `bench.embedded.train`, as safetensors files in one folder.

A training run cut off by a time limit (a lent GPU's command limit, say) resumes from the last state exactly where
it stopped: same weights, EMA weights, AdamW moments, step and random-number generator, so on one CPU thread a
resumed run equals an uninterrupted one bit for bit. Four files, each under 16 MiB for the embedded model's sizes
(one fp32 copy of its ~3.4M parameters is ~14 MB), so a folder that brings back at most 16 MiB a file can hold them:

    model.safetensors   unet.*, text_encoder.*, vae.* (fp32), rng.generator; metadata: step, total_steps,
                        scaling_factor, config (JSON), format
    ema.safetensors     the EMA copies of unet.* and text_encoder.*
    adam_m.safetensors  AdamW's first moments, keyed like model.safetensors
    adam_v.safetensors  AdamW's second moments

Each file is written under a temporary name and renamed into place, model.safetensors last, so the folder never
holds a step's weights with another step's moments: `load_state` checks that all four name the same step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "bench.embedded.train_state/1"
FILES = ("ema", "adam_m", "adam_v", "model")  # written in this order: model.safetensors last


def _named(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": t.detach().float().cpu().contiguous()
            for key, module in models.items() for name, t in module.state_dict().items()}


def param_names(models: dict[str, torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    return {p: f"{key}.{name}" for key, module in models.items() for name, p in module.named_parameters()}


def save_state(folder: Path, step: int, total_steps: int, cfg: dict, models: dict, ema: dict,
               opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """models: {"unet", "text_encoder", "vae"} being trained (the VAE frozen); ema: {"unet", "text_encoder"}."""
    folder.mkdir(parents=True, exist_ok=True)
    names = param_names({k: models[k] for k in ("unet", "text_encoder")})
    moments = {"adam_m": {}, "adam_v": {}}
    for p, name in names.items():
        state = opt.state.get(p)
        if state:  # no state before the first step
            moments["adam_m"][name] = state["exp_avg"].detach().float().cpu().contiguous()
            moments["adam_v"][name] = state["exp_avg_sq"].detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "step": str(step), "total_steps": str(total_steps),
            "scaling_factor": repr(float(models["vae"].config.scaling_factor)),
            "config": json.dumps(cfg, sort_keys=True)}
    tensors = {"ema": _named(ema), **moments,
               "model": _named(models) | {"rng.generator": gen.get_state().cpu()}}
    for name in FILES:
        tmp = folder / f".{name}.safetensors.tmp"
        save_file(tensors[name], str(tmp), metadata=meta)
        os.replace(tmp, folder / f"{name}.safetensors")


def read_meta(folder: Path) -> dict:
    """The state's metadata (step, total_steps, scaling_factor, config), checked; ValueError naming the fix."""
    metas = {}
    for name in FILES:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"{folder} holds no {path.name}: not a training state written by --state-dir")
        with safe_open(str(path), "pt") as f:
            metas[name] = f.metadata() or {}
    if any(m.get("format") != FORMAT for m in metas.values()):
        raise ValueError(f"{folder} is not a {FORMAT} training state")
    if len({m["step"] for m in metas.values()}) != 1:
        raise ValueError(f"{folder}: its files name different steps (a save was cut off); resume from another state")
    meta = metas["model"]
    return {"step": int(meta["step"]), "total_steps": int(meta["total_steps"]),
            "scaling_factor": float(meta["scaling_factor"]), "config": json.loads(meta["config"])}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)


def restore(models: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for key, module in models.items():
        prefix = key + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)


def load_state(folder: Path, models: dict, ema: dict, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """Restore a `save_state` folder into freshly built models, EMA copies, optimizer and generator (on their
    devices); returns `read_meta`."""
    meta = read_meta(folder)
    model = load_tensors(folder / "model.safetensors")
    gen.set_state(model.pop("rng.generator"))
    restore(models, model)
    restore(ema, load_tensors(folder / "ema.safetensors"))
    m, v = load_tensors(folder / "adam_m.safetensors"), load_tensors(folder / "adam_v.safetensors")
    for p, name in param_names({k: models[k] for k in ("unet", "text_encoder")}).items():
        if name in m:
            opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": m[name].to(p.device),
                            "exp_avg_sq": v[name].to(p.device)}
    return meta
