"""The shared forward's per-image path is exact: configurations predicted together equal each one predicted
alone, bit for bit, and the batched histograms equal the per-prediction reference (bench.metrics)."""

import numpy as np
import pytest
import torch

from bench.data import build_dataset
from bench.evaluate import evaluate_batch, group_request, trace_samples
from bench.metrics import ImageScorer, image_histograms
from bench.plan import Trial, group_trials
from methods import METHODS

LAMBDAS = [0, 0.001, 0.01, 0.1]
CONFIGS = {
    "iseg": [{"lambda": lam, "iterations": n} for lam in LAMBDAS for n in (0, 1, 3, 10)]
    + [{"resize": "direct"}, {"background": "threshold"}, {"bg_power": 3.0},
       {"variant": "code", "kmeans": 0}, {"variant": "code", "lambda": 0.1, "iterations": 2, "kmeans": 0}],
    "daam": [{"tau": t, "norm": nm, "resize": r} for t in (0.2, 0.4) for nm in ("minmax", "max")
             for r in ("code", "direct")],
    "ovam": [{"tau": t, "refine": r, "binarise": b, "crf": False} for t in (0.3, 0.5) for r in (False, True)
             for b in ("paper", "code")],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_predict_many_is_predict_bit_for_bit(tiny, name):
    cls = METHODS.get(name)
    method = cls(tiny)
    trials = [Trial(f"t{i}", cls.resolve(c), c) for i, c in enumerate(CONFIGS[name])]
    dataset = build_dataset({"name": "shapes", "size": 48, "limit": 2})
    for group in group_trials(cls, trials, [0]):
        configs = [t.params for t in group.trials]
        samples = [dataset[0], dataset[1]]
        batch = trace_samples(method, dataset, samples, configs[0], 0, group_request(method, group))
        for sample, query, trace in zip(samples, batch.queries, batch.traces):
            size = tuple(sample.label.shape)
            many = method.predict_many(trace, query, configs, size)
            for params, got in zip(configs, many):
                want = method.predict(trace, query, params, size)
                assert torch.equal(got.labels, want.labels), params
                assert torch.equal(got.scores, want.scores), params
        # and the engine's batched histograms are the reference's, per image and configuration
        hists, _ = evaluate_batch(method, dataset, samples, group)
        for k, sample in enumerate(samples):
            query, trace = batch.queries[k], batch.traces[k]
            preds = method.predict_many(trace, query, configs, tuple(sample.label.shape))
            want = [image_histograms(p.labels.numpy(), sample.label, len(dataset.classes))[:8] for p in preds]
            assert all((h == w).all() for h, w in zip(hists[k * len(configs):(k + 1) * len(configs)], want))


def test_image_scorer_equals_the_reference_on_odd_labels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        classes = int(rng.integers(1, 6))
        shape = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        pool = [*range(classes), 255, -1, classes, classes + 3]  # ignored and other out-of-range labels
        label = rng.choice(pool[:int(rng.integers(1, len(pool) + 1))], size=shape)
        if rng.random() < 0.3:  # a single value: iSeg's protocol skips the image
            label[:] = rng.choice([0, 255, 1])
        preds = [rng.choice([*range(classes), -2, classes, 255], size=shape) for _ in range(3)]
        preds.append(preds[0].copy())  # a repeated label map is counted once, reported twice
        got = ImageScorer(label, classes).histograms(preds, hungarian=True)
        want = np.stack([image_histograms(p, label, classes) for p in preds])
        assert got.dtype == np.int64 and (got == want).all()
        assert (ImageScorer(label, classes).histograms(preds) == want[:, :8]).all()
