"""Per-image evaluation without Ray: trace once per forward setting, score every configuration.

A `ForwardGroup` is the set of sweep configurations that share a UNet pass (same forward parameters and
seed); `evaluate_batch` runs the UNet once per image and group and returns one histogram per configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from bench.data.base import Sample, SegDataset
from bench.errors import BenchError
from bench.metrics import image_histograms
from bench.trace import TraceRequest
from methods.base import ClassQuery, Method


@dataclass
class Trial:
    """One configuration of the sweep: the method's full parameters and the swept subset."""

    trial_id: str
    params: dict
    swept: dict


@dataclass
class ForwardGroup:
    seed: int
    forward: tuple  # ((name, value), ...) of the method's forward parameters
    trials: list[Trial] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"seed={self.seed}," + ",".join(f"{k}={v}" for k, v in self.forward)


def group_trials(method_cls: type[Method], trials: list[Trial], seeds: list[int]) -> list[ForwardGroup]:
    groups: dict[tuple, ForwardGroup] = {}
    keys = method_cls.forward_keys()
    for seed in seeds:
        for trial in trials:
            forward = tuple((k, trial.params[k]) for k in keys)
            groups.setdefault((seed, forward), ForwardGroup(seed, forward)).trials.append(trial)
    return list(groups.values())


def class_query(sample: Sample, dataset: SegDataset, which: str) -> ClassQuery:
    ids = sample.present_class_ids() if which == "gt" else list(range(1, len(dataset.classes)))
    return ClassQuery(ids=ids, names=[dataset.classes[i] for i in ids])


def group_request(method: Method, group: ForwardGroup) -> TraceRequest:
    req = method.trace_request(group.trials[0].params)
    for trial in group.trials[1:]:
        req = req.union(method.trace_request(trial.params))
    return req


@torch.no_grad()
def evaluate_batch(method: Method, dataset: SegDataset, samples: list[Sample], group: ForwardGroup,
                   req: TraceRequest | None = None, resolution: int = 0,
                   on_predictions: Callable | None = None) -> tuple[list[np.ndarray], int]:
    """Histograms (len(samples) x len(group.trials), each (8, C): both metric protocols, see
    bench.metrics.image_histograms) in sample-major order, and image-passes.
    resolution: image size fed to the backbone (0 = its native resolution).
    on_predictions(k, sample, query, prompt, predictions) sees every image's predictions (qualitative figures)."""
    from bench.forward import run_traced

    params0 = group.trials[0].params
    setting = replace(method.forward_setting(params0, group.seed), size=resolution)
    generation = setting.mode == "generation"
    gen_gt = getattr(dataset, "generation_gt", None)
    if generation and not gen_gt:
        raise BenchError(f"dataset {dataset.name} gives no ground truth for generated images; "
                         f"use mode=inversion or a generation dataset (data.name=voc_sim | coco_cap)")
    backbone = method.backbone
    queries = [class_query(s, dataset, params0["classes"]) for s in samples]
    if generation:  # the dataset fixes what is generated: its prompt, per-image seed, (replay) image
        prompts = [s.caption for s in samples]
        image_seeds = [group.seed * 1_000_003 + int(s.extra.get("seed", i)) for i, s in enumerate(samples)]
        images = [s.image for s in samples] if gen_gt == "replay" else None
    else:
        prompts = [method.prompt(q, s.caption, params0) for q, s in zip(queries, samples)]
        image_seeds, images = None, [s.image for s in samples]
    token_ids = backbone.tokenize(prompts).tolist()
    weights = [method.key_weights(ids, q, params0) for ids, q in zip(token_ids, queries)]
    key_weights = None
    if any(w is not None for w in weights):
        key_weights = torch.stack([w if w is not None else torch.ones(len(ids)) for w, ids in zip(weights, token_ids)])
    result = run_traced(backbone, req or group_request(method, group), setting, prompts,
                        images=images, key_weights=key_weights, image_seeds=image_seeds)
    hists = []
    configs = [t.params for t in group.trials]
    for k, (sample, query, prompt, trace) in enumerate(zip(samples, queries, prompts, result.traces)):
        predictions = method.predict_many(trace, query, configs, tuple(sample.label.shape))
        if on_predictions is not None:
            on_predictions(k, sample, query, prompt, predictions)
        hists.extend(image_histograms(p.labels.numpy(), sample.label, len(dataset.classes))
                     for p in predictions)
    return hists, result.unet_passes * len(samples)
