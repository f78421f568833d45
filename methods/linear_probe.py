"""`linear_probe`: a toy trained method, the check of the fit stage (and a template for trained methods).

Features of a pixel for class k: the cross-attention of k's token(s) at each attn2 layer of `blocks`
(mean over steps and heads, bilinear to the latent size, min-max scaled per map), one value per layer. A
logistic regression shared by all classes maps them to P(pixel is k); it is fitted on the training split
(the first `train_images` images, the classes they show), full-batch Adam on the pixel BCE. Prediction:
every pixel takes its most probable class, background where that probability is below `threshold`.

The fit traces training images with the configuration's forward parameters (`fit_reads`), so a fit is
shared by every configuration that differs only in `threshold`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bench.capture import Trace, TraceRequest, request
from methods.base import ClassQuery, Method, Param, Prediction, register_method
from methods.attribution import BLOCK_CHOICES, AttributionSource, attn_layers
from methods.labels import tie_of
from methods.maps import labels_from_scores, minmax, resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt

CHECKPOINT_EVERY = 10  # Adam steps between checkpoints (a killed fit loses at most this many)


@register_method("linear_probe")
class LinearProbe(Method):
    version = "1"
    params = {
        **{k: PROMPT_PARAMS[k] for k in ("prompt", "template")},
        "blocks": Param("all", "attn2 blocks whose cross-attention are the features, one per layer: all (every "
                        "level but the mid block) or SD resolution names such as 32+16", choices=BLOCK_CHOICES,
                        kind="train"),
        "train_images": Param(16, "training images: the first of the training split", kind="train", low=1),
        "epochs": Param(60, "full-batch Adam steps", kind="train", low=1),
        "lr": Param(0.05, "Adam learning rate", kind="train", positive=True),
        "threshold": Param(0.5, "background where the most probable class is below this probability",
                           low=0, high=1),
    }
    fit_reads = ("mode", "timestep", "steps", "scheduler", "guidance", "prompt", "template")

    def trace_request(self, cfg: Mapping) -> TraceRequest:
        layers = attn_layers(cfg["blocks"], backbone=self.backbone)
        # classes absent from the prompt are re-keyed from stored queries (OVAM's attribution, as DAAM's)
        absent = cfg["classes"] == "all" or cfg["mode"] == "generation"
        return request(cross=layers, queries=layers if absent else ())

    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        return build_prompt(query, caption, cfg)

    def features(self, trace: Trace, query: ClassQuery, cfg: Mapping) -> torch.Tensor:
        """(K, L, h, w) per-class, per-layer attention maps at the latent size."""
        source = AttributionSource(self.backbone, pad=True)
        maps = source.layer_maps(trace, attn_layers(cfg["blocks"], backbone=self.backbone), query.names)
        per_layer = [minmax(resize_maps(m.float().mean(dim=(1, 2)), trace.latent_size)) for m in maps]
        return torch.stack(per_layer, dim=1)

    # -- fit ---------------------------------------------------------------------------------------------------
    def fit(self, ctx) -> dict[str, torch.Tensor]:
        cfg = self.resolve({k: v for k, v in ctx.values.items()})
        req = self.trace_request(cfg)
        feats, targets, valid = [], [], []
        for index in ctx.shard(list(range(min(cfg["train_images"], len(ctx.dataset))))):
            sample = ctx.dataset[index]
            batch = ctx.trace(self, [sample], cfg, req)
            query, trace = batch.queries[0], batch.traces[0]
            if not query.ids:
                continue
            f = self.features(trace, query, cfg)  # (K, L, h, w)
            label = torch.from_numpy(sample.label.astype("int64"))
            masks = torch.stack([(label == cid).float() for cid in query.ids])[:, None]
            known = (label != 255).float()[None, None].expand_as(masks)
            feats.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            targets.append(F.interpolate(masks, size=trace.latent_size, mode="area").reshape(-1))
            valid.append(F.interpolate(known, size=trace.latent_size, mode="area").reshape(-1))
        layers = len(attn_layers(cfg["blocks"], backbone=self.backbone))
        x = torch.cat(feats) if feats else torch.zeros(0, layers)
        y = torch.cat(targets) if targets else torch.zeros(0)
        w = torch.cat(valid) if valid else torch.zeros(0)
        total = ctx.all_sum(w.sum().reshape(1)).clamp_min(1e-8)  # pixels of every worker
        probe = torch.nn.Linear(layers, 1)
        torch.nn.init.zeros_(probe.weight)  # logistic regression is convex: a fixed start, no seed needed
        torch.nn.init.zeros_(probe.bias)
        model = ctx.prepare(probe)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        start = ctx.resume(model=probe, optimizer=opt)
        ctx.start(cfg["epochs"])
        for epoch in range(start, cfg["epochs"]):
            opt.zero_grad()
            part = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, weight=w, reduction="sum")
            # DDP averages gradients over workers; scaled so the average is that of the global pixel mean
            (part * ctx.world_size / total).backward()
            opt.step()
            ctx.log(epoch + 1, (ctx.all_sum(part.detach().reshape(1)) / total).item())
            if (epoch + 1) % CHECKPOINT_EVERY == 0 or epoch + 1 == cfg["epochs"]:
                ctx.checkpoint(epoch + 1, {"model": probe.state_dict(), "optimizer": opt.state_dict()})
        return {"weight": probe.weight.detach().clone(), "bias": probe.bias.detach().clone()}

    # -- predict -----------------------------------------------------------------------------------------------
    def probabilities(self, trace: Trace, query: ClassQuery, cfg: Mapping) -> torch.Tensor:
        fitted = self.artefact(cfg)
        f = self.features(trace, query, cfg)
        logits = torch.einsum("klhw,l->khw", f, fitted["weight"][0].float()) + fitted["bias"].float()
        return torch.sigmoid(logits)

    def predict_many(self, trace, query, cfgs, out_size):
        cache: dict[str, torch.Tensor] = {}
        out = []
        for cfg in cfgs:  # the probabilities depend on the fit only: shared by every threshold
            key = self.train_setting(cfg).key
            if key not in cache:
                cache[key] = self.probabilities(trace, query, cfg)
            scores = cache[key]
            labels = labels_from_scores(scores, query.ids, out_size, background="threshold",
                                        bg_threshold=cfg["threshold"], tie=tie_of(cfg))
            out.append(Prediction(scores, labels))
        return out
