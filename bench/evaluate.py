"""Per-image evaluation without Ray: trace once per forward setting, score every configuration.

`trace_samples` is the one way a method's images reach the UNet (evaluation and fits alike): the dataset
fixes what is generated in generation mode, the method builds the prompt and Cat-Cross weights in inversion
mode. `evaluate_batch` runs it once per image and forward group and returns one histogram per configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from bench.data import require_generation_gt
from bench.data.base import Sample, SegDataset
from bench.forward import run_traced
from bench.metrics import ImageScorer
from bench.plan import ForwardGroup, Trial, group_trials  # noqa: F401  (re-exported: callers group and evaluate)
from bench.capture import Trace, TraceRequest
from methods.base import ClassQuery, Method, Prediction
from methods.maps import tie_counts, tie_grid


def class_query(sample: Sample, dataset: SegDataset, which: str) -> ClassQuery:
    ids = sample.present_class_ids() if which == "gt" else list(range(1, len(dataset.classes)))
    return ClassQuery(ids=ids, names=[dataset.classes[i] for i in ids])


def group_request(method: Method, group: ForwardGroup) -> TraceRequest:
    req = method.trace_request(group.trials[0].params)
    for trial in group.trials[1:]:
        req = req.union(method.trace_request(trial.params))
    return req


@dataclass
class TracedBatch:
    queries: list[ClassQuery]
    prompts: list[str]
    traces: list[Trace]
    image_passes: int  # UNet passes x images


@torch.no_grad()
def trace_samples(method: Method, dataset: SegDataset, samples: list[Sample], params: Mapping, seed: int,
                  req: TraceRequest, resolution: int = 0, classes: str | None = None) -> TracedBatch:
    """Trace `samples` under the forward parameters of `params` (noise seed `seed`).
    resolution: image size fed to the backbone (0 = its native resolution); classes: gt | all (default: the
    configuration's)."""
    setting = replace(method.forward_setting(params, seed), size=resolution)
    gen_gt = require_generation_gt(dataset, setting.mode)
    queries = [class_query(s, dataset, classes or params["classes"]) for s in samples]
    if gen_gt:  # the dataset fixes what is generated: its prompt, per-image seed, (replay) image
        prompts = [s.caption for s in samples]
        image_seeds = [seed * 1_000_003 + int(s.extra.get("seed", i)) for i, s in enumerate(samples)]
        images = [s.image for s in samples] if gen_gt == "replay" else None
    else:
        prompts = [method.prompt(q, s.caption, params) for q, s in zip(queries, samples)]
        image_seeds, images = None, [s.image for s in samples]
    if not method.traces_at_eval and setting.mode == "inversion":  # predict reads the image alone: no UNet pass
        return TracedBatch(queries, prompts, [Trace(p, [], [], (0, 0), image=np.asarray(s.image))
                                              for p, s in zip(prompts, samples)], 0)
    backbone = method.backbone
    token_ids = backbone.tokenize(prompts).tolist()
    weights = [method.key_weights(ids, q, params) for ids, q in zip(token_ids, queries)]
    key_weights = None
    if any(w is not None for w in weights):
        key_weights = torch.stack([w if w is not None else torch.ones(len(ids)) for w, ids in zip(weights, token_ids)])
    on_embeddings = key_weights is not None and method.token_weights_on(params) == "embeddings"
    result = run_traced(backbone, req, setting, prompts, images=images,
                        key_weights=None if on_embeddings else key_weights,
                        embedding_weights=key_weights if on_embeddings else None, image_seeds=image_seeds)
    return TracedBatch(queries, prompts, result.traces, result.unet_passes * len(samples))


def predict_image(method: Method, trace: Trace, query: ClassQuery, cfgs: list[Mapping],
                  out_size: tuple[int, int]) -> list[Prediction]:
    """Every configuration's prediction for one image: the method's `predict_many`, except for an image with no
    class to segment, which is background under every configuration (`Prediction.empty`): methods never see an
    empty query."""
    if not query.ids:
        return [Prediction.empty(out_size) for _ in cfgs]
    return method.predict_many(trace, query, cfgs, out_size)


def prediction_ties(predictions: list) -> np.ndarray:
    """(len(predictions), 2) [tied, counted] cells of each prediction's decision scores (`Prediction.
    decision_scores`), one call per score shape."""
    out = np.zeros((len(predictions), 2), dtype=np.int64)
    maps = [tie_grid(p.decision_scores) for p in predictions]  # strided before stacking: no full-size copy
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for rows in by_shape.values():
        out[rows] = tie_counts(torch.stack([maps[i] for i in rows])).numpy()
    return out


@torch.no_grad()
def evaluate_batch(method: Method, dataset: SegDataset, samples: list[Sample], group: ForwardGroup,
                   req: TraceRequest | None = None, resolution: int = 0,
                   on_predictions: Callable | None = None, protocol: str = "mmseg",
                   ties: list | None = None) -> tuple[list[np.ndarray], int]:
    """Histograms (len(samples) x len(group.trials), each (8, C): the mmseg and iseg protocols' rows, (12, C)
    with protocol="hungarian", see bench.metrics.ImageScorer) in sample-major order, and image-passes.
    on_predictions(k, sample, query, prompt, predictions) sees every image's predictions (qualitative figures);
    `ties`, where given, is extended in the same order with each prediction's [tied, counted] score cells
    (methods.maps.tie_counts: labels that tie-breaking decided)."""
    params0 = group.trials[0].params
    batch = trace_samples(method, dataset, samples, params0, group.seed, req or group_request(method, group),
                          resolution)
    hists = []
    configs = [t.params for t in group.trials]
    for k, (sample, query, prompt, trace) in enumerate(zip(samples, batch.queries, batch.prompts, batch.traces)):
        predictions = predict_image(method, trace, query, configs, tuple(sample.label.shape))
        if on_predictions is not None:
            on_predictions(k, sample, query, prompt, predictions)
        if ties is not None:
            ties.extend(prediction_ties(predictions))
        # the ground truth is read once per image; identical label maps are counted once
        scorer = ImageScorer(sample.label, len(dataset.classes), sample.ignore_index,
                             first_class=0 if getattr(dataset, "has_background", True) else 1)
        # each prediction says how it is counted (labels by tiles are never expanded to pixels)
        hists.extend(scorer.histograms([p.scored_as() for p in predictions],
                                       hungarian=protocol == "hungarian"))
    return hists, batch.image_passes
