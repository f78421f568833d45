"""`dedos`: DEDOS, "Images as Noisy Labels" (ICCV 2025), a trained open-vocabulary segmenter.

Training (fit): the frozen diffusion model denoises each training image for `iterations` DDIM steps with the
empty prompt (frontend.py, Sec. 3.2); learnable proxy queries cross-attend to every UNet transformer block's
features with a random key mask (Eq. 3-5), progressively per timestep from basic (x) diffusion kernels (Eq. 6)
and are fused into global proxy queries Q (Eq. 7-8); a consistency loss between CLIP's similarity matrices
before/after denoising and those of the query-projected features separates texture (Eq. 9-12); Q refines the
CLIP image features after every layer (Eq. 13-14) and queries a Mask2Former-style decoder whose object
embeddings meet the class text embeddings in a text aggregation module (Sec. 3.6); loss Eq. 15-16.

Inference (predict): CLIP + queries only, no diffusion (the paper's Sec. 3.6 last sentence). With no image at
inference to denoise, Q comes from what training left: `inference_queries=memory` (default) is the running
mean of the Q of training images (the paper's "q_t is replaced by the resulting q_{L,t}"), `kernels` is Eq. 6-8
applied to the learned kernels without diffusion features. predict reads only `trace.image`, so evaluation runs
no UNet pass at all (`traces_at_eval = False`).

`components` is Table 3: baseline (CLIP + Mask2Former decoder, plain learnable queries, no diffusion), once
(+ proxy queries, one denoising step), progressive (+ Eq. 6-8 over `iterations` steps), decoupling (+ Eq. 9-12),
full (+ text interaction). Open-vocabulary protocol: `train_classes` names the classes the fit sees (pixels of
the others are ignored); prediction scores every class the query names (`classes=all`: the whole dataset).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import BenchError
from bench.capture import Trace, TraceRequest, request
from methods.base import ARGMAX_TIE, ClassQuery, Method, Param, Prediction, register_method
from methods.dedos.cost import HEADS as COST_HEADS
from methods.dedos.cost import CostAggregation
from methods.dedos.frontend import block_channels, denoise, parse_timesteps, random_unet
from methods.dedos.losses import WEIGHTS, seg_loss
from methods.dedos.model import (CLIPRefiner, DedosDecoder, ProxyQueries, clip_tokens, consistency_loss,
                                 geometric_ensemble, maskpool_probs, semantic_scores)


COMPONENTS = ("baseline", "once", "progressive", "decoupling", "full")  # Table 3 (I)-(V)
ARCHITECTURE = ("n", "c", "heads", "decoder_dim", "decoder_layers", "cost_dim")
# `0` (auto) in any ARCHITECTURE parameter: the paper's value with a real CLIP, the embedded value with the tiny
# CLIP of the shapes world (clip=embedded). Paper: n = 100 proxy queries of c = 256 (Sec. 4.1), Mask2Former's
# 9-layer 256-wide decoder with 8 heads. Embedded, interpreted so that it works as the paper describes at the
# tiny CLIP's size: c = decoder width = 64, the tiny CLIP's width (the paper's 256 is a quarter of ViT-L's
# 1024; a quarter of 64 would make queries and decoder narrower than the 64-d CLIP embeddings they are matched
# against, so the width stays the tower's); n = 20 queries (Mask2Former's 100 serve COCO scenes with dozens of segments of 171 classes, a shapes
# image has at most 4 segments of 6 classes; 20 keeps n1 x n2 with the default 5-row diffusion kernel);
# 3 decoder layers = one round over the three scales (Mask2Former's 9 = three rounds); 4 heads (the tiny
# CLIP's); the cost aggregation (cost.py) 128 channels wide as CAT-Seg's, a quarter of that with the tiny CLIP, as
# its 64-d embeddings are a sixteenth of ViT-L/14's 768 (32 keeps the upsampling decoder's d/8 guidance at 4).
# Measured effect on a CPU step and on inference: docs/studies/dedos.md (Cost).
PAPER_SIZES = {"n": 100, "c": 256, "heads": 8, "decoder_dim": 256, "decoder_layers": 9, "cost_dim": 128}
EMBEDDED_SIZES = {"n": 20, "c": 64, "heads": 4, "decoder_dim": 64, "decoder_layers": 3, "cost_dim": 32}
TEMPLATES = ("a photo of a {}", "a {}")
CHECKPOINT_EVERY = 50
MEMORY_DECAY = 0.99
BACKGROUND = "background"
EMBEDDED_CLIPS = {"embedded": "clip", "embedded_many": "clip_many"}  # clip= value -> folder in bench/embedded


def clip_spec(value: str) -> str:
    """`clip=embedded`: the shipped tiny CLIP of the shapes world; `clip=embedded_many`: the shipped tiny CLIP of
    the sixteen-shape world (`shapes_many`, the open-vocabulary protocol); anything else: a folder or cached
    hub id."""
    if value not in EMBEDDED_CLIPS:
        return value
    from bench.embedded.clip import shipped_clip

    folder = shipped_clip(EMBEDDED_CLIPS[value])
    if folder is None:
        raise BenchError(f"clip={value} but bench/embedded/{EMBEDDED_CLIPS[value]}/ holds no trained CLIP; train "
                         f"it with python -m bench.embedded.clip --world {'shapes_many' if value == 'embedded_many' else 'shapes'} "
                         f"--out bench/embedded/{EMBEDDED_CLIPS[value]} or pass clip=<CLIP folder or cached hub id>")
    return str(folder)


def architecture(cfg: Mapping) -> dict:
    """The configuration with every `0` (auto) ARCHITECTURE parameter replaced by its paper or embedded value."""
    sizes = EMBEDDED_SIZES if cfg["clip"] in EMBEDDED_CLIPS else PAPER_SIZES
    out = {k: cfg[k] for k in ("components", "image_size", "kernel_n", "kernel_c", "clip", "cost_aggregation")}
    out.update({k: int(cfg[k]) or sizes[k] for k in ARCHITECTURE})
    return out


def tap_layers(layers: int) -> tuple[int, ...]:
    """CLIP layers feeding the pixel decoder: the release's 7/11/15/last of ViT-L's 24, scaled to `layers`."""
    taps = sorted({max(0, round(layers * f) - 1) for f in (8 / 24, 12 / 24, 16 / 24)} | {layers - 1})
    while len(taps) < 4:  # very shallow towers: repeat the last
        taps.append(taps[-1])
    return tuple(taps)


class DedosModel(nn.Module):
    """Everything DEDOS learns: the CLIP image tower (fine-tuned at a reduced rate), the proxy queries and
    their CLIP refinement, the consistency projections and the decoder."""

    def __init__(self, vision: nn.Module, text_dim: int, cfg: Mapping, feature_dims: list[int], steps: int,
                 projection: nn.Module | None = None):
        super().__init__()
        vc = vision.config
        self.vision = vision
        self.components = cfg["components"]
        self.size = int(cfg["image_size"]) or int(vc.image_size)
        self.grid = (self.size // vc.patch_size,) * 2
        self.taps = tap_layers(vc.num_hidden_layers)
        n, c = cfg["n"], cfg["c"]
        proxy = self.components != "baseline"
        self.proxy = ProxyQueries(n, c, feature_dims, steps, cfg["heads"], self.components != "once",
                                  cfg["kernel_n"], cfg["kernel_c"]) if proxy else None
        self.queries = None if proxy else nn.Parameter(torch.randn(n, c) * 0.02)
        self.refiner = CLIPRefiner(c, vc.hidden_size, vc.num_hidden_layers) if proxy else None
        decoupled = self.components in ("decoupling", "full")
        self.proj_q = nn.Linear(c, c) if decoupled else None  # P^L (Eq. 10)
        self.proj_f = nn.Linear(vc.hidden_size, c) if decoupled else None  # P^C (1x1 convolution)
        self.decoder = DedosDecoder(c, vc.hidden_size, text_dim, cfg["decoder_dim"], cfg["decoder_layers"],
                                    cfg["heads"], n, text_interaction=self.components == "full")
        self.register_buffer("memory", torch.zeros(n, c))  # running mean of training Q (inference_queries)
        self.projection = self.cost = None
        if cfg["cost_aggregation"] == "catseg":  # the baseline's and DEDOS's cost aggregation (cost.py)
            if projection is None:
                raise ValueError("cost_aggregation=catseg needs the CLIP's visual projection")
            self.projection = projection  # part of the CLIP: fine-tuned at its rate
            self.cost = CostAggregation(text_dim, vc.hidden_size, cfg["decoder_dim"], cfg["cost_dim"], self.grid)

    def segment(self, pixels: torch.Tensor, queries: torch.Tensor, text: torch.Tensor, final_only: bool = False):
        """Decoder outputs for a batch: queries (B, n, c) or (n, c); text (K, P) normalised embeddings."""
        queries = queries.expand(len(pixels), -1, -1) if queries.ndim == 2 else queries
        q_hat = self.refiner.mlp(queries) if self.refiner is not None else None
        final, taps = clip_tokens(self.vision, pixels, self.refiner, q_hat, self.taps)
        aggregate = None
        if self.cost is not None:  # CAT-Seg's dense embeddings: the final patch tokens, normed and projected
            patches = final[:, 1:]
            dense = self.projection(self.vision.post_layernorm(patches)).unflatten(1, self.grid)
            aggregate = lambda scales: self.cost(dense, patches, text, scales[1:])
        return self.decoder(queries, taps, self.grid, text, final_only, aggregate)

    def forward(self, pixels, text, features=None, keep: float = 0.7, generator=None, clip_before=None,
                clip_after=None):
        """Training: (decoder outputs, Q, consistency loss or None). Q from the diffusion features (Eq. 3-8)
        when given, else the plain learnable queries (baseline)."""
        queries = self.proxy(features, keep, generator) if features is not None else self.queries
        outputs = self.segment(pixels, queries, text)
        consist = None
        if self.proj_q is not None and clip_before is not None:
            consist = consistency_loss(queries, clip_before, clip_after, self.proj_q, self.proj_f)
        return outputs, queries, consist

    def inference_queries(self, which: str) -> torch.Tensor:
        if self.proxy is None:
            return self.queries
        return self.memory if which == "memory" else self.proxy.static()


@register_method("dedos")
class Dedos(Method):
    # 3: CAT-Seg cost aggregation (cost_aggregation=catseg) in every arm by default; 4: clip_lr_scale > 0 really
    # fine-tunes the CLIP tower (versions <= 3 left it frozen: their fits equal clip_lr_scale=0)
    version = "4"
    traces_at_eval = False  # inference is CLIP + queries: the engine skips the UNet pass
    families = ("sd",)
    families_why = "its training front end runs DDIM steps of an SD UNet and reads its transformer blocks"
    params = {
        "tie_rule": ARGMAX_TIE,
        "classes": Param("all", "classes scored per image: all (every dataset class, the open-vocabulary "
                         "protocol) or gt (image-level labels)", kind="forward", choices=("gt", "all")),
        "clip": Param("embedded", "CLIP: embedded (the shipped tiny CLIP of the shapes world), embedded_many (of "
                      "the sixteen-shape world, data=shapes_many), a CLIPModel folder or a cached hub id (the "
                      "paper: ViT-L/14@336)", kind="train", examples=("embedded_many",)),
        "components": Param("full", "Table 3: baseline | once | progressive | decoupling | full",
                            choices=COMPONENTS, kind="train"),
        "train_classes": Param("all", "classes the fit sees, joined by + (open-vocabulary protocol: the others "
                               "are unseen); all = every dataset class", kind="train",
                               examples=("circle+square",)),
        "timesteps": Param("50+100+200", "denoising timesteps (Table 6)", kind="train", examples=("50+100", "100")),
        "iterations": Param(3, "denoising iterations N (Table 5); timesteps spread evenly if it differs from their "
                            "number", kind="train"),
        "noise": Param("add", "add: noise the image latent to the first timestep (release); none: the image latent "
                       "is z_t itself (Sec. 3.2)", choices=("add", "none"), kind="train"),
        "unet_weights": Param("trained", "the UNet of the front end: the backbone's trained weights or the same "
                              "architecture with random weights (Table 4's control)", choices=("trained", "random"),
                              kind="train"),
        "n": Param(0, "number of proxy queries (Fig. 4); 0: auto (the paper's 100; 20 with clip=embedded)",
                   kind="train"),
        "c": Param(0, "proxy query dimension (Fig. 4); 0: auto (the paper's 256; 64 with clip=embedded)",
                   kind="train"),
        "kernel_n": Param(5, "rows n2 of the per-timestep diffusion kernel (Eq. 6; not given by the paper)",
                          kind="train"),
        "kernel_c": Param(4, "columns c2 of the per-timestep diffusion kernel (Eq. 6; not given by the paper)",
                          kind="train"),
        "heads": Param(0, "attention heads of the query layers and the decoder; 0: auto (the release's 8; 4 with "
                       "clip=embedded)", kind="train"),
        "key_keep": Param(0.7, "probability that a diffusion feature is kept as key (Eq. 4's mask M_i)",
                          type=float, kind="train"),
        "consistency_weight": Param(10.0, "gamma of Eq. 16", kind="train"),
        "seg_loss": Param("paper", "Eq. 15: paper (CE + BCE + dice, equal weights) or release (CE + 20 focal + "
                          "dice)", choices=tuple(WEIGHTS), kind="train"),
        "decoder_dim": Param(0, "Mask2Former decoder width; 0: auto (256; 64 with clip=embedded)", kind="train"),
        "decoder_layers": Param(0, "Mask2Former decoder layers; 0: auto (Mask2Former's 9; 3 with clip=embedded)",
                                kind="train"),
        "cost_aggregation": Param("catseg", "catseg: CAT-Seg's cost aggregation after the pixel decoder, in the "
                                  "baseline and DEDOS (Sec. 4.3; cost.py); none: without it (before method version 3)",
                                  choices=("catseg", "none"), kind="train"),
        "cost_dim": Param(0, "cost aggregation width; 0: auto (CAT-Seg's 128; 32 with clip=embedded)", kind="train"),
        "image_size": Param(0, "image size fed to CLIP (0: the CLIP's own; the paper crops 640)", kind="train"),
        "train_steps": Param(1500, "optimiser steps (the paper: 60k at batch 4; this default: the CPU budget on "
                             "the embedded world)", kind="train"),
        "batch": Param(8, "training images per step and worker (the paper: 4)", kind="train"),
        "lr": Param(2e-4, "AdamW learning rate (decoder and queries)", kind="train"),
        "clip_lr_scale": Param(0.01, "CLIP image tower learning rate as a fraction of lr (0: frozen)", kind="train"),
        "weight_decay": Param(1e-4, "AdamW weight decay", kind="train"),
        "fit_seed": Param(0, "seed of the fit (initialisation, batches, noise, key masks)", kind="train"),
        "ov_ensemble": Param("none", "classification at inference: none (DEDOS: the decoder's cosine logits); "
                             "not in the paper, FC-CLIP's geometric ensemble (model.geometric_ensemble) of the "
                             "decoder with a frozen CLIP's per-query classification: fcclip (FC-CLIP: its dense "
                             "patches pooled by each query's mask) or maskprompt (the image seen through each "
                             "query's mask, OVSeg's mask prompt; Clip.region_embeddings)",
                             choices=("none", "fcclip", "maskprompt")),
        "ov_alpha": Param(0.4, "fcclip, maskprompt: weight of CLIP's classification for classes the fit saw "
                          "(FC-CLIP: 0.4)",
                          type=float, low=0.0, high=1.0),
        "ov_beta": Param(0.8, "fcclip, maskprompt: weight of CLIP's classification for unseen classes "
                         "(FC-CLIP: 0.8)",
                         type=float, low=0.0, high=1.0),
        "inference_queries": Param("memory", "Q at inference (no diffusion): memory (running mean of training "
                                   "Q) or kernels (Eq. 6-8 on the learned kernels)", choices=("memory", "kernels")),
    }
    # The method tester's fits on tiny components (tests/test_method_contract.py): a few steps, small sizes.
    tester_params = {"train_steps": 3, "iterations": 2, "n": 8, "c": 16, "kernel_n": 2, "kernel_c": 2, "heads": 2,
                     "decoder_dim": 16, "decoder_layers": 3, "cost_dim": 16, "batch": 2}

    def __init__(self, backbone=None):
        super().__init__(backbone)
        self._clips: dict[str, object] = {}
        self._models: dict[str, DedosModel] = {}
        self._text: dict[tuple, torch.Tensor] = {}

    # -- what the engine runs ------------------------------------------------------------------------------------
    def trace_request(self, cfg: Mapping) -> TraceRequest:
        return request()  # nothing recorded: predict reads the image only

    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        return ""

    def train_setting(self, cfg: Mapping):
        """One fit per train setting; the setting's values are checked here, on the driver, before Ray starts
        (the plan asks for every trial's setting)."""
        a = architecture(cfg)
        checks = [(min(a[k] for k in ARCHITECTURE) >= 1, "n, c, heads, decoder_dim and decoder_layers must be "
                   "positive (0: auto)"),
                  (a["n"] % a["kernel_n"] == 0, f"n={a['n']} is not a multiple of kernel_n={a['kernel_n']} "
                   f"(Eq. 6: n = n1 x n2)"),
                  (a["c"] % a["kernel_c"] == 0, f"c={a['c']} is not a multiple of kernel_c={a['kernel_c']} "
                   f"(Eq. 6: c = c1 x c2)"),
                  (a["c"] % a["heads"] == 0 and a["decoder_dim"] % a["heads"] == 0,
                   f"c={a['c']} and decoder_dim={a['decoder_dim']} must be multiples of heads={a['heads']}"),
                  (a["cost_dim"] % (4 * COST_HEADS) == 0, f"cost_dim={a['cost_dim']} must be a multiple of "
                   f"{4 * COST_HEADS} (CAT-Seg's {COST_HEADS} heads, upsampling guidance at cost_dim / 8)"),
                  (0 < cfg["key_keep"] <= 1, f"key_keep={cfg['key_keep']} must be in (0, 1]"),
                  (cfg["train_steps"] >= 1 and cfg["batch"] >= 1, "train_steps and batch must be positive")]
        for ok, message in checks:
            if not ok:
                raise BenchError(f"dedos: {message}; change the parameter in params/sweep")
        try:
            parse_timesteps(cfg["timesteps"], cfg["iterations"])
        except ValueError as err:
            raise BenchError(f"dedos: {err}") from None
        from bench.models.clip import clip_folder
        from bench.models.identity import folder_identity

        # the CLIP the fit learns against is part of its identity: clip=embedded names whatever is shipped
        clip = folder_identity(clip_folder(clip_spec(cfg["clip"])))
        return dataclasses.replace(super().train_setting(cfg), weights=(("clip", clip),))

    def load_fit(self, key, tensors):
        super().load_fit(key, tensors)
        self._models.pop(key, None)

    # -- components ------------------------------------------------------------------------------------------------
    def clip(self, cfg: Mapping):
        from bench.models.clip import load_clip

        spec = clip_spec(cfg["clip"])
        if spec not in self._clips:
            device = self.backbone.device if self.backbone is not None else "cpu"
            clip = load_clip(spec, device)
            clip.model.requires_grad_(False)
            self._clips[spec] = clip
        return self._clips[spec]

    def text(self, cfg: Mapping, names: list[str]) -> torch.Tensor:
        key = (clip_spec(cfg["clip"]), tuple(names))
        if key not in self._text:
            with torch.no_grad():
                self._text[key] = self.clip(cfg).class_embeddings(names, TEMPLATES)
        return self._text[key]

    def schedule(self, cfg: Mapping) -> list[int]:
        steps = parse_timesteps(cfg["timesteps"], cfg["iterations"])
        if cfg["components"] == "once":  # Table 3 (II): a single denoising step (the middle timestep)
            return [steps[len(steps) // 2]]
        return steps

    def build(self, cfg: Mapping, feature_dims: list[int] | None = None) -> DedosModel:
        clip = self.clip(cfg)
        vision = copy.deepcopy(clip.model.vision_model)
        if feature_dims is None:
            feature_dims = block_channels(self.backbone.unet) if cfg["components"] != "baseline" else []
        torch.manual_seed(cfg["fit_seed"])
        model = DedosModel(vision, clip.model.config.projection_dim, architecture(cfg), feature_dims,
                           len(self.schedule(cfg)), copy.deepcopy(clip.model.visual_projection))
        return model.to(clip.device)

    # -- fit -------------------------------------------------------------------------------------------------------
    def fit(self, ctx) -> dict[str, torch.Tensor]:
        cfg = self.resolve(dict(ctx.values))
        dataset = ctx.dataset
        names = self.train_names(cfg, dataset.classes)
        class_ids = [dataset.classes.index(n) for n in names]
        text = self.text(cfg, names)
        clip = self.clip(cfg)
        diffusion = cfg["components"] != "baseline"
        timesteps = self.schedule(cfg)
        unet = self.backbone.unet
        if diffusion and cfg["unet_weights"] == "random":
            unet = random_unet(unet, cfg["fit_seed"])
        if diffusion and clip.device.type == "cpu":  # the front end's convolutions run ~15% faster channels-last
            unet = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        model = self.build(cfg, block_channels(unet) if diffusion else [])
        vision = [*model.vision.parameters(), *(model.projection.parameters() if model.projection else ())]
        ids = {id(p) for p in vision}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": cfg["lr"]}]
        if cfg["clip_lr_scale"] > 0:
            groups.append({"params": vision, "lr": cfg["lr"] * cfg["clip_lr_scale"]})
        # the copy of the shared CLIP tower inherits its frozen flags: fine-tuned only when asked (version 4;
        # every fit before it kept the tower frozen whatever clip_lr_scale said)
        for p in vision:
            p.requires_grad_(cfg["clip_lr_scale"] > 0)
        trained = ctx.prepare(model)
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg["train_steps"]))
        start = ctx.resume(model=model, optimizer=opt, scheduler=sched)
        indices = ctx.shard(list(range(len(dataset))))
        cache: dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor | None]] = {}
        mask_size = tuple(4 * g for g in model.grid)
        ctx.start(cfg["train_steps"])
        model.train()
        for step in range(start, cfg["train_steps"]):
            gen = torch.Generator().manual_seed(cfg["fit_seed"] * 1_000_003 + step * 131 + ctx.rank)
            pick = [indices[int(i)] for i in torch.randint(len(indices), (cfg["batch"],), generator=gen)]
            for i in pick:
                if i not in cache:  # images, labels and (Eq. 1) their deterministic VAE latents, once each
                    s = dataset[i]
                    z0 = None
                    if diffusion:
                        with torch.no_grad():
                            z0 = self.backbone.encode_images([s.image], self.backbone.resolution)
                    cache[i] = (s.image, s.label, z0)
            images = [cache[i][0] for i in pick]
            targets = [self.target(cache[i][1], class_ids, mask_size, clip.device) for i in pick]
            before = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
            pixels = clip.pixels(before, model.size)
            features = fb = fa = None
            if diffusion:
                den = denoise(self.backbone, unet, images, timesteps, gen, cfg["noise"],
                              latents=torch.cat([cache[i][2] for i in pick]))
                features = den.features
                if model.proj_q is not None and cfg["consistency_weight"] > 0:
                    last = (len(model.vision.encoder.layers) - 1,)
                    with torch.no_grad():  # Eq. 9: the unrefined CLIP on the images before and after denoising
                        fb = clip_tokens(model.vision, pixels, taps=last)[1][0]
                        fa = clip_tokens(model.vision, clip.pixels(den.after, model.size), taps=last)[1][0]
            outputs, queries, consist = trained(pixels, text, features, cfg["key_keep"], gen, fb, fa)
            if diffusion:
                with torch.no_grad():  # the running mean of Q that inference uses (inference_queries=memory)
                    decay = MEMORY_DECAY if step else 0.0
                    model.memory.mul_(decay).add_(queries.detach().mean(0) * (1 - decay))
            loss = sum(seg_loss(cls_logits, masks, targets, cfg["seg_loss"]) for cls_logits, masks in outputs)
            if consist is not None:
                loss = loss + cfg["consistency_weight"] * consist  # Eq. 16
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ctx.log(step + 1, float(ctx.all_sum(loss.detach().reshape(1)) / ctx.world_size))
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == cfg["train_steps"]:
                ctx.checkpoint(step + 1, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict()})
        model.eval()
        return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def train_names(cfg: Mapping, classes: list[str]) -> list[str]:
        """The classes the fit sees: background first, then `train_classes` (all: every dataset class)."""
        if cfg["train_classes"] == "all":
            return [BACKGROUND, *[c for c in classes[1:]]]
        names = [n.strip() for n in cfg["train_classes"].split("+") if n.strip()]
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise BenchError(f"train_classes names {', '.join(unknown)}, not classes of this dataset "
                             f"({', '.join(classes[1:])}); join dataset class names with +")
        return [BACKGROUND, *[n for n in classes[1:] if n in names]]

    @staticmethod
    def target(label: np.ndarray, class_ids: list[int], size: tuple[int, int], device) -> dict:
        """Mask-classification targets at the mask resolution; pixels of classes the fit does not see (and the
        ignore label) are not valid."""
        lab = torch.from_numpy(np.asarray(label).astype(np.int64))[None, None].float()
        lab = F.interpolate(lab, size=size, mode="nearest")[0, 0].long()
        lookup = torch.full((256,), -1, dtype=torch.long)
        lookup[torch.tensor(class_ids)] = torch.arange(len(class_ids))
        idx = lookup[lab.clamp(0, 255)]
        present = sorted(int(k) for k in idx.unique() if k >= 0)
        masks = torch.stack([(idx == k).float() for k in present]) if present else torch.zeros(0, *size)
        return {"classes": torch.tensor(present, dtype=torch.long, device=device), "masks": masks.to(device),
                "valid": (idx >= 0).float().to(device)}

    # -- predict ---------------------------------------------------------------------------------------------------
    def fitted_model(self, cfg: Mapping) -> DedosModel:
        key = self.train_setting(cfg).key
        if key not in self._models:
            tensors = self.artefact(cfg)
            dims = [] if cfg["components"] == "baseline" else None
            if dims is None:  # the artefact fixes the query layers' widths: no UNet needed to rebuild them
                dims = [int(tensors[f"proxy.layers.{i}.norm.weight"].shape[0])
                        for i in range(sum(1 for k in tensors if k.startswith("proxy.layers.") and
                                           k.endswith(".norm.weight")))]
            model = self.build(cfg, dims)
            model.load_state_dict(tensors)
            self._models[key] = model.eval()
        return self._models[key]

    @torch.no_grad()
    def scores(self, image: np.ndarray, names: list[str], cfg: Mapping, out_size: tuple[int, int]) -> torch.Tensor:
        """(K, H, W) per-class probabilities (each pixel's distribution over `names`), CLIP + queries only."""
        model = self.fitted_model(cfg)
        clip = self.clip(cfg)
        pixels = clip.pixels(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None], model.size)
        class_logits, mask_logits = model.segment(pixels, model.inference_queries(cfg["inference_queries"]),
                                                  self.text(cfg, names), final_only=True)[-1]
        if cfg["ov_ensemble"] != "none":
            text = self.text(cfg, names)
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
            if cfg["ov_ensemble"] == "fcclip":  # the frozen CLIP's dense patches pooled by each query's mask
                p_out = maskpool_probs(mask_logits, clip.dense_embeddings(clip.pixels(image)), text,
                                       float(clip.model.logit_scale.exp()))
            else:  # maskprompt: the frozen CLIP on the image seen through each query's binarised mask
                regions = clip.region_embeddings(image, mask_logits[0].sigmoid() > 0.5)
                p_out = (regions @ text.T * clip.model.logit_scale.exp()).softmax(-1)[None]
            seen = torch.tensor([cfg["train_classes"] == "all" or n == BACKGROUND
                                 or n in cfg["train_classes"].split("+") for n in names])
            class_logits = geometric_ensemble(class_logits, p_out, seen, cfg["ov_alpha"], cfg["ov_beta"])
        sem = semantic_scores(class_logits, mask_logits)
        sem = F.interpolate(sem, size=out_size, mode="bilinear", align_corners=False)[0]
        return (sem / sem.sum(0, keepdim=True).clamp_min(1e-8)).cpu()

    def predict(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]) -> Prediction:
        if trace.image is None:
            raise BenchError("dedos segments the traced image; this trace carries none")
        probs = self.scores(trace.image, [BACKGROUND, *query.names], cfg, out_size)
        ids = torch.tensor([0, *query.ids])
        return Prediction(probs[1:], ids[probs.argmax(0)])


def learnable_parameters(model: DedosModel) -> int:
    """What DEDOS learns beyond the frozen CLIP (Table 7 counts learnable parameters)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vision.", "projection.")))


__all__ = ["Dedos", "DedosModel", "learnable_parameters", "tap_layers"]
