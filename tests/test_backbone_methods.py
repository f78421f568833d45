"""The method tester's contracts (tests/test_method_contract.py) for every training-free method on every tiny
transformer-or-SDXL family (tests/tiny.py, loaded by model.path= as a user's folder): runs in both modes with
well-formed, finite predictions; a non-forward parameter leaves the denoiser's pass bit-identical;
`predict_many` equals `predict`."""

import re

import pytest
import torch

from bench.data import build_dataset
from bench.errors import BenchError
from bench.evaluate import group_request, trace_samples
from bench.models import load_backbone
from bench.plan import Trial, group_trials
from methods import METHODS
from bench.fitting import LocalFitContext
from test_method_contract import DATA, STEPS, TRAIN, resolved, traced, variants
from tiny import save_tiny_family

FAMILIES = ("sdxl", "sd3", "flux")
TRAINING_FREE = ("daam", "attn2mask", "ovam", "iseg")


@pytest.fixture(scope="module")
def family_backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("method-families")
    return {f: load_backbone({"path": str(save_tiny_family(f, root / f)), "device": "cpu"}) for f in FAMILIES}


def on_this_layout(method, configs: list) -> list:
    """The configurations this backbone's layout has layers for. The others name UNet levels it lacks (a
    resolution spec on a transformer, SDXL's missing finest level, iSeg's per-level released-code weights) and
    are refused with a one-line error (docs/backbones.md), which is checked here."""
    kept = []
    for params in configs:
        try:
            method.trace_request(params)
        except BenchError as err:
            assert re.search(r"UNet levels|no cross-attention at rank|no transformer counterpart", str(err)), err
            continue
        kept.append(params)
    assert kept, "the defaults run on every family"
    return kept


def denoiser_calls(backbone, fn) -> list:
    calls = []

    def hook(_module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        calls.append([t.clone() for t in (*args, *kwargs.values(), out) if torch.is_tensor(t)])

    handle = backbone.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("mode", ["inversion", "generation"])
@pytest.mark.parametrize("name", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_in_both_modes(family_backbones, family, name, mode):
    backbone = family_backbones[family]
    cls = METHODS.get(name)
    method = cls(backbone)
    params = resolved(cls, {"mode": mode, "steps": STEPS, "classes": "all"})
    sample, query, trace = traced(method, params, mode)
    pred = method.predict(trace, query, params, tuple(sample.label.shape))
    assert pred.scores.shape[0] == len(query.ids) and torch.isfinite(pred.scores).all()
    assert pred.labels.shape == sample.label.shape
    assert set(pred.labels.unique().tolist()) <= {0, *query.ids}


@pytest.mark.parametrize("name", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_non_forward_parameters_leave_the_pass_bit_identical(family_backbones, family, name):
    backbone = family_backbones[family]
    cls = METHODS.get(name)
    method = cls(backbone)
    dataset = build_dataset(DATA["inversion"])
    configs = on_this_layout(method, [cls.resolve(c) for _, c in [("defaults", {}), *variants(cls, ("post",), {})]])
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])
    req = group_request(method, group)
    reference = None
    for params in configs:
        calls = denoiser_calls(backbone, lambda: trace_samples(method, dataset, [dataset[0]], params, 0, req))  # noqa: B023 (called within this iteration)
        reference = reference or calls
        assert len(calls) == len(reference) == 1
        for got, want in zip(calls, reference):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), params


@pytest.mark.parametrize("name", TRAINING_FREE)
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_many_equals_predict(family_backbones, family, name):
    backbone = family_backbones[family]
    cls = METHODS.get(name)
    method = cls(backbone)
    configs = on_this_layout(method, [resolved(cls, c) for _, c in [("defaults", {}), *variants(cls, ("post",), {})]])
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])
    sample, query, trace = traced(method, configs[0], req=group_request(method, group))
    size = tuple(sample.label.shape)
    for many, params in zip(method.predict_many(trace, query, configs, size), configs):
        one = method.predict(trace, query, params, size)
        torch.testing.assert_close(many.scores, one.scores, atol=1e-5, rtol=1e-4)
        assert (many.labels != one.labels).float().mean() <= 0.02, params


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_probe_fits_and_predicts_on_every_family(family_backbones, family):
    """The linear probe reads attention roles only: it fits on the family's own traces and predicts finite
    scores (DEDOS and FreeGen are refused on these families: tests/test_backbones.py)."""
    backbone = family_backbones[family]
    cls = METHODS.get("linear_probe")
    method = cls(backbone)
    params = resolved(cls, {"train_images": 2, "epochs": 3})
    setting = method.train_setting(params)
    method.load_fit(setting.key, method.fit(LocalFitContext(setting, build_dataset(TRAIN["inversion"]), backbone)))
    sample, query, trace = traced(method, params)
    pred = method.predict(trace, query, params, tuple(sample.label.shape))
    assert pred.scores.shape[0] == len(query.ids) and torch.isfinite(pred.scores).all()
