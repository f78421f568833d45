"""Every registered method on the embedded default, in both trace modes: finite per-class maps of the right
shape, and label maps of dataset ids. Parametrised over METHODS: a new method needs no new test code."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from bench.data import build_dataset
from bench.evaluate import ForwardGroup, Trial, class_query, evaluate_batch
from bench.forward import run_traced
from methods import METHODS

torch.set_num_threads(1)
SIZE = 64  # image and model resolution
STEPS = 3  # generation: DDIM steps
DATA = {"inversion": {"name": "shapes", "size": SIZE, "limit": 2},
        "generation": {"name": "voc_sim", "size": SIZE, "limit": 2}}


def _params(cls, mode):
    return cls.resolve({"mode": mode, "steps": STEPS, "classes": "all"})


@pytest.mark.parametrize("mode", ["inversion", "generation"])
@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_in_both_modes(backbone, name, mode):
    cls = METHODS.get(name)
    method = cls(backbone)
    dataset = build_dataset(DATA[mode])
    params = _params(cls, mode)
    if cls.needs_fit:
        method.fit(dataset, params)
    sample = dataset[0]
    query = class_query(sample, dataset, "all")  # every class: most are absent from the prompt
    setting = method.forward_setting(params, seed=0)
    from dataclasses import replace
    setting = replace(setting, size=SIZE)
    if mode == "generation":
        prompts, images = [sample.caption], [sample.image]
    else:
        prompts, images = [method.prompt(query, sample.caption, params)], [sample.image]
    trace = run_traced(backbone, method.trace_request(params), setting, prompts, images=images).traces[0]
    pred = method.predict(trace, query, params, tuple(sample.label.shape))
    assert pred.scores.shape[0] == len(query.ids) and pred.scores.ndim == 3
    assert torch.isfinite(pred.scores).all()
    assert pred.labels.shape == sample.label.shape and pred.labels.dtype == torch.long
    assert set(pred.labels.unique().tolist()) <= {0, *query.ids}

    group = ForwardGroup(0, (), [Trial("t0", params, {})])
    hists, passes = evaluate_batch(method, dataset, [sample], group, resolution=SIZE)
    assert len(hists) == 1 and np.isfinite(hists[0]).all() and hists[0].sum() > 0
    assert passes == (1 if mode == "inversion" else STEPS)


def test_iseg_code_variant(backbone):
    """Released-code refinement: non-negative, row-stochastic Ent-Self; the whole variant runs (with k-means)."""
    from methods.iseg import ent_self_code

    attn = torch.rand(16, 16).softmax(1)
    out = ent_self_code(attn, 0.015)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(16))
    cls = METHODS.get("iseg")
    method = cls(backbone)
    dataset = build_dataset(DATA["inversion"])
    sample = dataset[0]
    for params in (cls.resolve({"variant": "code", "kmeans": 3}), cls.resolve({"modules": "baseline"})):
        group = ForwardGroup(0, (), [Trial("t0", params, {})])
        hists, _ = evaluate_batch(method, dataset, [sample], group, resolution=SIZE)
        assert hists[0].sum() > 0


def test_compare_runs_every_method_on_one_trace(backbone):
    cls = METHODS.get("compare")
    method = cls(backbone)
    dataset = build_dataset(DATA["generation"])
    trials = [Trial(f"t{i}", cls.resolve({"method": m, "mode": "generation", "steps": STEPS}), {"method": m})
              for i, m in enumerate(("daam", "attn2mask", "ovam", "iseg"))]
    group = ForwardGroup(0, (), trials)
    hists, passes = evaluate_batch(method, dataset, [dataset[0]], group, resolution=SIZE)
    assert len(hists) == 4 and passes == STEPS  # one generation serves all four
