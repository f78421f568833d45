"""The method tester: contracts every registered method keeps, in the spirit of diffusers' PipelineTesterMixin.
Parametrised over the registry on tiny seeded random components (tests/tiny.py): a new method file is tested
by adding it, with no test code. Mechanics only; quality is the slow set's business.

- parameters are typed (kind, version, frozen dataclass) and runs give well-formed predictions in both modes;
- a non-forward parameter leaves the UNet pass bit-identical; a non-train parameter never changes the fit;
- `predict_many` equals `predict` per configuration; post-processing sweeps share one forward setting;
- a trained method fits, saves (safetensors), reloads and predicts identically, and a fit resumed from a
  checkpoint ends bit-identical to an undisturbed one.

A trained method whose default fit is long (DEDOS) names small train parameters for these tests in its
`tester_params` class attribute; every configuration here that may fit starts from them.
"""

import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from bench.data import build_dataset
from bench.errors import BenchError
from bench.evaluate import class_query, evaluate_batch, group_request, trace_samples
from bench.fitting import LocalFitContext
from bench.plan import Trial, group_trials
from methods import METHODS
from methods.base import KINDS, Method, Param, ParamsBase, register_method

NAMES = METHODS.names()
SIZE = 32  # dataset images; the tiny backbone sees them at 8 px
STEPS = 2  # generation: DDIM steps
DATA = {"inversion": {"name": "shapes", "size": SIZE, "limit": 2},
        "generation": {"name": "voc_sim", "size": SIZE, "limit": 2}}
TRAIN = {mode: {**DATA[mode], "split": "train", "limit": None} for mode in DATA}
SKIP = object()


def alternative(name: str, p: Param):
    """Another valid value of a parameter, or SKIP."""
    d = p.default
    if p.choices:
        others = [c for c in p.choices if c != d]
        return others[0] if others else SKIP
    kind = p.value_type
    if kind is bool:
        return not d
    if d is None:
        return 0.5 if kind is float else ("auto" if name.split("__")[-1] == "tokens" else SKIP)
    if kind is int:
        return d + 1
    if kind is float:
        return round(d * 0.5 + 0.05, 4)
    if kind is str and "{" in d:
        return d + " ."  # still a valid template
    return SKIP


def variants(cls, kinds: tuple[str, ...], base: dict) -> list[tuple[str, dict]]:
    out = []
    for name, p in cls.all_params().items():
        if p.kind in kinds and name not in base:
            value = alternative(name, p)
            if value is not SKIP:
                out.append((name, {**base, name: value}))
    return out


def resolved(cls, values: dict):
    """`cls.resolve(values)` over the method's `tester_params` (a few steps of a long fit)."""
    return cls.resolve({**getattr(cls, "tester_params", {}), **values})


def fit_config(cls) -> dict | None:
    """Parameters under which the method fits (its defaults, or tokens=auto), or None for no fit."""
    if cls.is_trained():
        return {}
    if "tokens" in cls.all_params():
        return {"tokens": "auto"}
    return None


_FITS: dict[str, dict] = {}  # TrainSetting.key -> artefact: methods sharing a fitter share one fit


def fitted(method: Method, params) -> None:
    """Fit (once per setting, in this process) and load what `params` needs."""
    setting = method.train_setting(params)
    if setting is None:
        return
    if setting.key not in _FITS:
        train = build_dataset(TRAIN[params["mode"]])
        _FITS[setting.key] = method.fit(LocalFitContext(setting, train, method.backbone))
    method.load_fit(setting.key, _FITS[setting.key])


def traced(method, params, mode="inversion", req=None):
    dataset = build_dataset(DATA[mode])
    sample = dataset[0]
    batch = trace_samples(method, dataset, [sample], params, 0, req or method.trace_request(params))
    return sample, batch.queries[0], batch.traces[0]


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_typed_and_versioned(name):
    cls = METHODS.get(name)
    assert isinstance(cls.version, str) and cls.version
    assert all(p.kind in KINDS for p in cls.all_params().values())
    params = cls.resolve({})
    assert isinstance(params, ParamsBase) and dict(params) == params.as_dict()
    assert pickle.loads(pickle.dumps(params)) == params and hash(params) == hash(cls.resolve({}))
    with pytest.raises(BenchError, match="Did you mean .mode."):
        cls.resolve({"mdoe": "inversion"})
    with pytest.raises(Exception):
        params.mode = "generation"  # frozen


@pytest.mark.parametrize("name", NAMES)
def test_no_parameter_shadows_a_results_column(name):
    """A parameter is a results column of its own: one named like an engine column (trial, seed, mIoU, ...)
    would overwrite it or be overwritten in results.parquet / summary.csv."""
    from bench.results import RESERVED_COLUMNS, RESERVED_PREFIXES

    clashes = [k for k in METHODS.get(name).all_params() if k in RESERVED_COLUMNS or k.startswith(RESERVED_PREFIXES)]
    assert not clashes, f"{name}: parameters {clashes} are named like results columns; rename them"


@pytest.mark.parametrize("mode", ["inversion", "generation"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_in_both_modes(tiny, name, mode):
    cls = METHODS.get(name)
    method = cls(tiny)
    params = resolved(cls, {"mode": mode, "steps": STEPS, "classes": "all"})
    fitted(method, params)
    sample, query, trace = traced(method, params, mode)
    pred = method.predict(trace, query, params, tuple(sample.label.shape))
    assert pred.scores.shape[0] == len(query.ids) and pred.scores.ndim == 3
    assert torch.isfinite(pred.scores).all()
    assert pred.labels.shape == sample.label.shape and pred.labels.dtype == torch.long
    assert set(pred.labels.unique().tolist()) <= {0, *query.ids}
    dataset = build_dataset(DATA[mode])
    (group,) = group_trials(cls, [Trial("t0", params, {})], [0])
    ties = []
    hists, passes = evaluate_batch(method, dataset, [dataset[0]], group, ties=ties)
    assert len(hists) == 1 and np.isfinite(hists[0]).all() and hists[0].sum() > 0
    assert len(ties) == 1 and 0 <= ties[0][0] <= ties[0][1] <= pred.decision_scores[0].numel()  # [tied, counted]
    inversion_passes = 1 if cls.traces_at_eval else 0  # methods that read only the image skip the UNet pass
    assert passes == (inversion_passes if mode == "inversion" else STEPS)


def unet_calls(backbone, fn) -> list:
    """Every UNet call (inputs and output) while fn runs."""
    calls = []

    def hook(_module, args, kwargs, output):
        calls.append([t.clone() for t in (*args, *kwargs.values(), output.sample) if torch.is_tensor(t)])

    handle = backbone.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_non_forward_parameters_leave_the_unet_pass_bit_identical(tiny, name):
    cls = METHODS.get(name)
    method = cls(tiny)
    dataset = build_dataset(DATA["inversion"])
    configs = [cls.resolve(c) for _, c in [("defaults", {}), *variants(cls, ("train", "post"), {})]]
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])  # one pass
    req = group_request(method, group)  # as the engine traces a forward group
    reference = None
    for params in configs:
        calls = unet_calls(tiny, lambda: trace_samples(method, dataset, [dataset[0]], params, 0, req))
        reference = reference or calls
        assert len(calls) == len(reference)
        for got, want in zip(calls, reference):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), params


@pytest.mark.parametrize("name", NAMES)
def test_non_train_parameters_never_change_the_fit(name):
    cls = METHODS.get(name)
    method = cls()
    for base in ({}, fit_config(cls) or {}):
        setting = method.train_setting(cls.resolve(base))
        for key, params in variants(cls, ("forward", "post"), base):
            if key in cls.train_keys():  # forward parameters the fit reads (fit_reads)
                continue
            assert method.train_setting(cls.resolve(params)) == setting, key


@pytest.mark.parametrize("name", NAMES)
def test_predict_many_equals_predict(tiny, name):
    cls = METHODS.get(name)
    method = cls(tiny)
    configs = [resolved(cls, c) for _, c in [("defaults", {}), *variants(cls, ("post",), {})]]
    for params in configs:
        fitted(method, params)
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])
    sample, query, trace = traced(method, configs[0], req=group_request(method, group))
    size = tuple(sample.label.shape)
    for many, params in zip(method.predict_many(trace, query, configs, size), configs):
        one = method.predict(trace, query, params, size)
        # shared work may round differently (iSeg's refine_sweep): equal maps up to float rounding, labels
        # equal but for pixels that rounding tips over a decision boundary (random weights: many near-ties)
        torch.testing.assert_close(many.scores, one.scores, atol=1e-5, rtol=1e-4)
        assert (many.labels != one.labels).float().mean() <= 0.02, params


@pytest.mark.parametrize("name", NAMES)
def test_a_post_processing_sweep_shares_one_forward_setting(tiny, name):
    cls = METHODS.get(name)
    method = cls(tiny)
    trials = [Trial(f"t{i}", resolved(cls, c), {}) for i, (_, c) in enumerate(variants(cls, ("post",), {})[:4])]
    if not trials:
        pytest.skip(f"{name} has no post-processing parameter")
    (group,) = group_trials(cls, trials, [0])
    for trial in trials:
        fitted(method, trial.params)
    dataset = build_dataset(DATA["inversion"])
    hists, passes = evaluate_batch(method, dataset, [dataset[0], dataset[1]], group)
    per_image = 1 if cls.traces_at_eval else 0  # one pass per image for every configuration (none: image only)
    assert len(hists) == 2 * len(trials) and passes == 2 * per_image


_RESUMED: set[str] = set()  # fitters whose resumption has been checked (methods may share a fitter)


@pytest.mark.parametrize("name", [n for n in NAMES if fit_config(METHODS.get(n)) is not None])
def test_trained_method_fits_saves_reloads_and_predicts_identically(tiny, name):
    cls = METHODS.get(name)
    params = resolved(cls, fit_config(cls))
    method = cls(tiny)
    setting = method.train_setting(params)
    fitted(method, params)
    tensors = _FITS[setting.key]
    assert tensors and all(torch.is_tensor(t) for t in tensors.values())
    reloaded = cls(tiny)
    reloaded.load_fit(setting.key, load_bytes(save_bytes({k: v.contiguous() for k, v in tensors.items()})))
    sample, query, trace = traced(method, params)
    a = method.predict(trace, query, params, tuple(sample.label.shape))
    b = reloaded.predict(trace, query, params, tuple(sample.label.shape))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)
    with pytest.raises(RuntimeError, match="was not loaded"):
        cls(tiny).predict(trace, query, params, tuple(sample.label.shape))
    if setting.fitter in _RESUMED:
        return
    _RESUMED.add(setting.fitter)
    # a fit stopped after its first checkpoint and resumed from it ends where an undisturbed fit ends
    train = build_dataset(TRAIN[params["mode"]])
    stopped = LocalFitContext(setting, train, tiny, fail_after=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        method.fit(stopped)
    assert stopped.curve  # the loss curve is logged as the fit goes
    resumed = method.fit(LocalFitContext(setting, train, tiny, resume_from=stopped.checkpoints[-1]))
    assert resumed.keys() == tensors.keys() and all(torch.equal(resumed[k], tensors[k]) for k in tensors)


# -- the registry ---------------------------------------------------------------------------------------------------
def test_every_method_file_is_discovered():
    from pathlib import Path

    import methods

    folder = Path(methods.__file__).parent
    def registers(path) -> bool:
        return re.search(r"^@register_method\(", path.read_text(), re.M) is not None

    registering = {p.stem for p in folder.glob("*.py") if registers(p)}
    registering |= {p.parent.name for p in folder.glob("*/*.py") if registers(p)}  # packages: methods/<name>/
    modules = {METHODS.get(n).__module__.split(".")[1] for n in NAMES}
    assert registering == modules and "linear_probe" in NAMES


def test_registry_checks_the_base_class_and_suggests_names():
    with pytest.raises(TypeError, match="not a subclass of methods.base.Method"):
        register_method("not_a_method")(type("NotAMethod", (), {}))
    assert "not_a_method" not in METHODS
    with pytest.raises(BenchError, match="Did you mean .iseg."):
        METHODS.get("isge")


def test_compare_defaults_to_every_training_free_method():
    compare = METHODS.get("compare")
    default = compare.default_sweep()["method"]["grid"]
    assert set(default) == {n for n in NAMES if n != "compare" and not METHODS.get(n).is_trained()}
    assert "linear_probe" not in default and "linear_probe" in compare.all_params()["method"].choices
    assert compare().train_setting(compare.resolve({"method": "linear_probe"})) is not None
    assert compare().train_setting(compare.resolve({"method": "daam"})) is None


def test_capture_processors_give_diffusers_outputs(tiny):
    """CaptureProcessor mirrors diffusers' AttnProcessor (explicit softmax) exactly and the default SDPA
    processor up to rounding; WeightedKeyProcessor with unit weights is the SDPA processor."""
    from diffusers.models.attention_processor import AttnProcessor

    from bench.trace import AttentionTracer, attention_layers, request

    unet = tiny.unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = tiny.encode_text(["a red circle"])
    t = torch.tensor([100])
    layers = attention_layers(unet)
    everything = request(cross=[n for n, k in layers.items() if k == "cross"],
                         self_attn=[n for n, k in layers.items() if k == "self"])
    with torch.no_grad():
        sdpa = unet(x, t, encoder_hidden_states=text).sample
        with AttentionTracer(unet, everything):
            captured = unet(x, t, encoder_hidden_states=text).sample
        with AttentionTracer(unet, request(), weight_keys=True) as tracer:
            tracer.set_key_weights(torch.ones(1, text.shape[1]))
            weighted = unet(x, t, encoder_hidden_states=text).sample
        saved = dict(unet.attn_processors)
        unet.set_attn_processor(AttnProcessor())
        classic = unet(x, t, encoder_hidden_states=text).sample
        unet.set_attn_processor(saved)
    assert torch.equal(captured, classic)
    torch.testing.assert_close(captured, sdpa, atol=1e-5, rtol=1e-4)
    assert torch.equal(weighted, sdpa)


def test_class_query_all_lists_every_foreground_class():
    dataset = build_dataset(DATA["inversion"])
    assert class_query(dataset[0], dataset, "all").ids == list(range(1, len(dataset.classes)))


def test_capture_in_row_blocks_equals_one_block(tiny, monkeypatch):
    """Probabilities computed a block of query rows at a time (the capture-memory bound) give the same UNet
    output and the same recorded attention as one block."""
    import bench.trace as trace_mod
    from bench.trace import AttentionTracer, attention_layers, request

    unet = tiny.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = tiny.encode_text(["a red circle", "a blue square"])
    t = torch.tensor([100])
    layers = attention_layers(unet)
    req = request(cross=[n for n, k in layers.items() if k == "cross"],
                  self_attn=[n for n, k in layers.items() if k == "self"], per_head=True)

    def traced():
        with torch.no_grad(), AttentionTracer(unet, req) as tracer:
            tracer.set_branch(slice(1, 2))
            out = unet(x, t, encoder_hidden_states=text).sample
        return out, tracer.traces(["b"], torch.zeros(1, 4, dtype=torch.long))[0]

    whole_out, whole = traced()
    monkeypatch.setattr(trace_mod, "MIN_SCORE_BLOCK_BYTES", 1)  # tiny layers keep little: many blocks
    block_out, blocks = traced()
    torch.testing.assert_close(block_out, whole_out, atol=1e-6, rtol=1e-5)
    for kind in ("cross", "self_attn"):
        mine, ref = getattr(blocks, kind), getattr(whole, kind)
        assert mine.keys() == ref.keys() and mine
        for layer in ref:
            assert mine[layer].shape == ref[layer].shape
            torch.testing.assert_close(mine[layer], ref[layer], atol=1e-6, rtol=1e-5)
