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
SIZE = 128  # image and model resolution (latent 16x16)
STEPS = 3  # generation: DDIM steps
DATA = {"inversion": {"name": "shapes", "size": SIZE, "limit": 2},
        "generation": {"name": "voc_sim", "size": SIZE, "limit": 2}}


@pytest.fixture(scope="module")
def backbone():
    from bench.models import load_backbone

    return load_backbone({"name": "embedded", "device": "cpu", "dtype": "float32"})


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
