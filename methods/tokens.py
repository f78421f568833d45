"""OVAM token optimisation (Marcos-Manchon et al. 2024, Sec. 3.3) as a fit: `tokens=auto` on the fit stage, and
the function behind `python -m bench.optimize_tokens`.

For each class: trace the first image(s) of the training split that contain it (queries of the attn2 layers,
stored), initialise X' = [<SoT> of the attribution prompt, the class name's token] (post-encoder embeddings),
and minimise the loss between the OVAM maps D(X') and [1 - mask, mask] by SGD (optimize_tokens below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.data import require_generation_gt
from bench.forward import ForwardSetting, run_traced
from bench.capture import Trace, request
from methods.base import TrainSetting
from methods.attribution import attn_layers, attribution_embedding, rekey, token_indices
from methods.maps import resize_maps

TOKENS_FITTER = "ovam-tokens"
TOKENS_FIT_VERSION = "1"
AUTO_EPOCHS = 100  # tokens=auto: OVAM Sec. 4.1's protocol, shortened from 500 epochs


# -- optimised-token files (OVAM Sec. 3.3) ---------------------------------------------------------------------
TOKENS_FORMAT = "ovam-tokens/1"


def save_tokens(path, tokens: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """{class name: (2, D) [background, class] post-encoder embeddings} -> safetensors file."""
    from safetensors.torch import save_file

    meta = {"format": TOKENS_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file({name: t.detach().float().cpu().contiguous() for name, t in tokens.items()}, str(path), metadata=meta)


_TOKEN_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def load_tokens(path: str) -> dict[str, torch.Tensor]:
    """Optimised [background, class] embeddings by class name from a file written by save_tokens."""
    from pathlib import Path

    from safetensors import safe_open

    from bench.errors import BenchError

    if path in _TOKEN_CACHE:
        return _TOKEN_CACHE[path]
    if not Path(path).is_file():
        raise BenchError(f"tokens={path} not found; write one with python -m bench.optimize_tokens")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != TOKENS_FORMAT:
            raise BenchError(f"tokens={path} is not an optimised-token file ({TOKENS_FORMAT})")
        tokens = {k: fh.get_tensor(k) for k in fh.keys()}
    _TOKEN_CACHE[path] = tokens
    return tokens



@dataclass(frozen=True)
class TokenSettings:
    mode: str = "inversion"
    timestep: int = 100
    steps: int = 50
    scheduler: str = "auto"  # generation: the model folder's own scheduler, or a named one
    guidance: float = 7.5
    seed: int = 0
    branch: str = "cond"  # generation: which half of the CFG batch gives the queries
    blocks: str = "all"  # every down/up attention level (SD: 64+32+16, the paper's)
    template: str = "A photograph of a {name}"  # prompt (inversion) and attribution prompt
    loss: str = "bce"  # bce (paper Eq. 7) or ce (released code)
    epochs: int = 500
    lr: float = 100.0
    step_size: int = 120
    lr_gamma: float = 0.7
    images_per_class: int = 1
    resolution: int = 0  # image size fed to the model (0 = native)


@dataclass
class ClassFit:
    name: str
    tokens: torch.Tensor | None  # (2, D) [background, class]; None: no training image of the class
    curve: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def training_examples(backbone, dataset, cid: int, s: TokenSettings, layers: list[str]) -> list:
    """(trace, class mask at the latent size) for the first images that contain class `cid`."""
    name = dataset.classes[cid]
    setting = ForwardSetting(mode=s.mode, timestep=s.timestep, seed=s.seed, steps=s.steps, guidance=s.guidance,
                             scheduler=s.scheduler, branch=s.branch, size=s.resolution)
    gen_gt = require_generation_gt(dataset, s.mode)
    out = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if cid not in sample.present_class_ids():
            continue
        if gen_gt:
            prompt, images = sample.caption, ([sample.image] if gen_gt == "replay" else None)
            seeds = [int(sample.extra.get("seed", index))]
        else:
            prompt, images, seeds = s.template.format(name=name), [sample.image], None
        trace = run_traced(backbone, request(queries=layers, per_head=True), setting, [prompt], images=images,
                           image_seeds=seeds).traces[0]
        mask = torch.from_numpy((sample.label == cid).astype("float32"))[None, None]
        target = F.interpolate(mask, size=trace.latent_size, mode="area")[0, 0]
        out.append((trace, target))
        if len(out) == s.images_per_class:
            break
    return out


def initial_tokens(backbone, name: str, template: str) -> torch.Tensor:
    """X' = [SoT of the attribution prompt, mean of the class name's tokens] (post-encoder)."""
    emb, ids = attribution_embedding(backbone, template.format(name=name), pad=False)
    idx = token_indices(backbone.tokenizer, ids, name)
    return torch.stack([emb[0], emb[idx].mean(0)]).float()


def fit_class(backbone, dataset, name: str, s: TokenSettings, progress: Callable | None = None) -> ClassFit:
    layers = attn_layers(s.blocks, backbone=backbone)
    examples = training_examples(backbone, dataset, dataset.classes.index(name), s, layers)
    if not examples:
        return ClassFit(name, None)
    with torch.enable_grad():
        best, curve = optimize_tokens(examples, initial_tokens(backbone, name, s.template), layers, s.loss,
                                      s.epochs, s.lr, s.step_size, s.lr_gamma, progress=progress)
    return ClassFit(name, best, curve, [t.prompt for t, _ in examples])


def fit_tokens(backbone, dataset, s: TokenSettings, classes: list[str] | None = None,
               progress: Callable | None = None) -> list[ClassFit]:
    """Optimised tokens of every class (default: every dataset class), in one process."""
    return [fit_class(backbone, dataset, name, s, progress) for name in (classes or dataset.classes[1:])]


class AutoTokens:
    """Mixin for methods taking `tokens=`: a file of optimised tokens, or `auto`, which the fit stage learns on
    the training split (one image per class, AUTO_EPOCHS epochs; OVAM Sec. 4.1 protocol, shortened) once per
    forward setting it depends on, shared by every method of a `compare` sweep."""

    fit_reads = ("mode", "timestep", "steps", "scheduler", "guidance")  # the fit traces its images with these

    def train_setting(self, cfg: Mapping) -> TrainSetting | None:
        if cfg["tokens"] != "auto":
            return None
        values = tuple((k, cfg[k]) for k in self.fit_reads)
        return TrainSetting(TOKENS_FITTER, TOKENS_FIT_VERSION, values)

    def can_fit(self, setting: TrainSetting) -> bool:
        return setting.fitter == TOKENS_FITTER

    def fit(self, ctx) -> dict[str, torch.Tensor]:
        """Classes are shared out over the workers round by round; a checkpoint after every round."""
        v = ctx.values
        s = TokenSettings(mode=v["mode"], timestep=v["timestep"], steps=v["steps"], scheduler=v["scheduler"],
                          guidance=v["guidance"], epochs=AUTO_EPOCHS, resolution=ctx.resolution)
        names = ctx.dataset.classes[1:]
        rounds = math.ceil(len(names) / ctx.world_size)
        ctx.start(rounds)
        tokens: dict[str, torch.Tensor] = {}
        start = 0
        restored = ctx.restore()
        if restored is not None:
            start, state = restored
            tokens = dict(state["tokens"])
        for r in range(start, rounds):
            k = r * ctx.world_size + ctx.rank
            mine = fit_class(ctx.backbone, ctx.dataset, names[k], s) if k < len(names) else None
            for got in ctx.gather(None if mine is None else (mine.name, mine.tokens, mine.curve)):
                if got is None:
                    continue
                name, best, curve = got
                if best is not None:
                    tokens[name] = best
                for epoch, value in enumerate(curve, 1):
                    ctx.log(epoch, value, series=name)
            ctx.checkpoint(r + 1, {"tokens": tokens})
        if not tokens:
            raise RuntimeError("tokens=auto: no class has a training image in the training split")
        return tokens

    def tokens_for(self, cfg: Mapping) -> dict | None:
        spec = cfg["tokens"]
        if not spec:
            return None
        if spec == "auto":
            return self.artefact(cfg)
        return load_tokens(spec)


# -- the optimisation itself (OVAM Eq. 5-7) -------------------------------------------------------------------
def token_maps(trace: Trace, layers: list[str], emb: torch.Tensor, size: tuple[int, int],
               reduce: str = "mean") -> torch.Tensor:
    """D_X(X') for every token of X' (L', h, w), differentiable in emb: Eq. 5's sum (reduce="sum") or its
    mean over (layer, step, head) (reduce="mean": each pixel's maps then sum to 1 over X', like a softmax)."""
    total, count = 0, 0
    for layer in layers:
        probs = rekey(trace, layer, emb)  # (S, H, h, w, L')
        maps = probs.permute(4, 0, 1, 2, 3).flatten(1, 2)  # (L', S*H, h, w)
        total = total + resize_maps(maps, size).sum(1)
        count += maps.shape[1]
    return total / count if reduce == "mean" else total


def token_loss(maps_mean: torch.Tensor, maps_sum: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Eq. 7 for X' = [background, class] against the class mask `target` (h, w) in [0, 1].
    bce (paper): sum over tokens of BCE(D_k, G_k) with G = [1 - target, target], D the per-map mean;
    ce (released code, ovam/optimize/optimize.py optimize_embedding with apply_min_max): the summed maps
    min-max scaled over all tokens and pixels at once, then cross-entropy over the token axis (the scaled maps
    as logits) against [1 - target, target]."""
    goal = torch.stack([1 - target, target])
    if loss == "bce":
        d = maps_mean.clamp(1e-6, 1 - 1e-6)
        return sum(torch.nn.functional.binary_cross_entropy(d[k], goal[k]) for k in range(2))
    if loss == "ce":
        scaled = (maps_sum - maps_sum.min()) / (maps_sum.max() - maps_sum.min())
        return torch.nn.functional.cross_entropy(scaled[None], goal[None])
    raise ValueError(f"unknown loss {loss!r}")


def optimize_tokens(examples: list[tuple[Trace, torch.Tensor]], init: torch.Tensor, layers: list[str],
                    loss: str = "bce", epochs: int = 500, lr: float = 100.0, step_size: int = 120,
                    gamma: float = 0.7, progress=None) -> tuple[torch.Tensor, list[float]]:
    """Eq. 6: X* = argmin_X' sum_j L(D_{X_j}(X'), G_{X_j}) by gradient descent on the post-encoder embeddings
    X' = init (2, D) ([background from SoT, class from the class name]), the queries of each example's trace
    fixed. SGD with StepLR (released code: lr 100, step 120, gamma 0.7); returns the lowest-loss embedding and
    the loss per epoch. examples: (trace with stored queries, class mask at the trace's latent size)."""
    emb = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([emb], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    best, best_loss, curve = emb.detach().clone(), float("inf"), []
    for _ in range(epochs):
        opt.zero_grad()
        total = 0
        for trace, target in examples:
            maps_sum = token_maps(trace, layers, emb, trace.latent_size, reduce="sum")
            n = maps_sum.detach().sum(0).mean().clamp_min(1e-8)  # number of summed maps (softmax sums to 1)
            total = total + token_loss(maps_sum / n, maps_sum, target, loss)
        total = total / len(examples)
        value = total.item()
        if value < best_loss:
            best, best_loss = emb.detach().clone(), value
        total.backward()
        opt.step()
        sched.step()
        curve.append(value)
        if progress is not None:
            progress(value)
    return best, curve
