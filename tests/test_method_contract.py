"""The method tester: contracts every registered method keeps, in the spirit of diffusers' PipelineTesterMixin.
Parametrised over the registry on tiny seeded random components (tests/tiny.py): a new method file is tested
by adding it, with no test code. Mechanics only; quality is the slow set's business.

- parameters are typed (kind, version, frozen dataclass), free-form strings declare example values, and runs
  give well-formed predictions in both modes;
- a non-forward parameter leaves the UNet pass and the recorded trace bit-identical (on a pass that records
  something); a non-train parameter never changes the fit;
- `predict_many` equals `predict` per configuration, exactly on this CPU fixture, and up to `agree`'s stated
  rounding tolerance on inputs that differ by rounding; post-processing sweeps share one forward setting;
- a trained method fits, saves (safetensors), reloads and predicts identically, and a fit resumed from a
  checkpoint ends bit-identical to an undisturbed one;
- `Method` is an abstract base class; methods import nothing of the engine but its declared interfaces, and the
  engine probes no method-specific attribute.

Each parameter is varied from its default to another valid value (`alternative`): a choice, a flipped boolean, a
shifted number, or the first of a free-form string's declared `examples`. A trained method whose default fit is
long (DEDOS) names small train parameters for these tests in `Method.tester_params`; every configuration here
that may fit starts from them.
"""

import ast
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from bench.data import build_dataset
from bench.errors import BenchError
from bench.evaluate import class_query, evaluate_batch, group_request, predict_image, trace_samples
from bench.fitting import LocalFitContext
from bench.plan import Trial, group_trials
from methods import METHODS
from methods.base import KINDS, ClassQuery, Method, Param, ParamsBase, Prediction, register_method

ROOT = Path(__file__).resolve().parent.parent

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
    examples = [e for e in p.examples if e != d]
    if examples:
        return examples[0]
    kind = p.value_type
    if kind is bool:
        return not d
    if d is None:
        return 0.5 if kind is float else SKIP
    if kind is int:
        return d + 1
    if kind is float:
        return round(d * 0.5 + 0.05, 4)
    return SKIP  # a free-form string without examples: test_free_form_strings_declare_examples fails


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
    return cls.resolve({**cls.tester_params, **values})


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
    with pytest.raises(Exception):  # noqa: B017 (whatever the frozen container raises)
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


def recorded(trace) -> list[torch.Tensor]:
    """Every tensor a trace carries (attention, queries, the image), in a fixed order."""
    out = [torch.from_numpy(np.array(trace.image))] if trace.image is not None else []
    for kind in ("cross", "self_attn", "queries"):
        out += [getattr(trace, kind)[layer] for layer in sorted(getattr(trace, kind))]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_non_forward_parameters_leave_the_unet_pass_bit_identical(tiny, name):
    cls = METHODS.get(name)
    method = cls(tiny)
    # a method that reads the image alone at evaluation makes no inversion pass: its generation pass is compared
    mode = "inversion" if cls.traces_at_eval else "generation"
    dataset = build_dataset(DATA[mode])
    base = {"mode": mode, "steps": STEPS}
    configs = [cls.resolve(c) for _, c in [("defaults", base), *variants(cls, ("train", "post"), base)]]
    assert len(configs) > 1, f"{name} has no train or post-processing parameter to vary"
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])  # one pass
    req = group_request(method, group)  # as the engine traces a forward group
    reference = None
    for params in configs:
        batch = []
        calls = unet_calls(tiny, lambda: batch.append(trace_samples(method, dataset, [dataset[0]], params, 0, req)))  # noqa: B023 (called within this iteration)
        tensors = recorded(batch[0].traces[0])
        if reference is None:
            assert calls, f"{name}: the {mode} pass made no UNet call, so there is nothing to compare"
            reference = (calls, tensors)
        assert len(calls) == len(reference[0]) and len(tensors) == len(reference[1])
        for got, want in zip(calls, reference[0]):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), params
        assert all(torch.equal(a, b) for a, b in zip(tensors, reference[1])), params


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


def traced_for_post_configs(tiny, name: str):
    """The method (fitted for each), its default and post-processing variant configurations, and one image traced
    for their shared forward setting: (method, configs, sample, query, trace)."""
    cls = METHODS.get(name)
    method = cls(tiny)
    configs = [resolved(cls, c) for _, c in [("defaults", {}), *variants(cls, ("post",), {})]]
    for params in configs:
        fitted(method, params)
    (group,) = group_trials(cls, [Trial(f"t{i}", c, {}) for i, c in enumerate(configs)], [0])
    sample, query, trace = traced(method, configs[0], req=group_request(method, group))
    return method, configs, sample, query, trace


def as_float64(trace):
    """The trace with every recorded attention map and query in float64 (the method's modules stay as loaded)."""
    import dataclasses

    return dataclasses.replace(trace, **{kind: {k: v.double() if v.is_floating_point() else v
                                                for k, v in getattr(trace, kind).items()}
                                         for kind in ("cross", "self_attn", "queries")})


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_predict_many_equals_predict(tiny, name, precision):
    """The exact half of the contract (CPU, one thread): `predict_many` over every post-processing configuration
    equals `predict` of each, labels and scores bit for bit, on the float32 trace and on the same trace in
    float64. Every registered method's scores are float32 whatever the trace's precision (those that read
    attention maps cast what they read: methods.maps.resize_maps, iSeg's chain, the attribution keys): what the
    float64 case adds is that no batched path reads a trace of another precision differently."""
    method, configs, sample, query, trace = traced_for_post_configs(tiny, name)
    if precision == "float64":
        trace = as_float64(trace)
    size = tuple(sample.label.shape)
    assert query.ids, "the fixture's image must have classes to segment"
    for many, params in zip(method.predict_many(trace, query, configs, size), configs):
        one = method.predict(trace, query, params, size)
        # both paths compute in the same order on this fixture: bit-identical
        assert torch.equal(many.labels, one.labels), params
        assert torch.equal(many.scores, one.scores) and torch.equal(many.decision_scores, one.decision_scores), params


# -- agreement up to rounding ------------------------------------------------------------------------------------
# Shared (batched) maths may round differently from one configuration at a time on other devices or thread counts,
# and forcing bit-equality there would force per-image loops. The promise is then: scores allclose, and labels
# identical wherever the decision is more than MARGIN from changing.
SCORE_ATOL, SCORE_RTOL = 1e-5, 1e-4
MARGIN = 1e-4  # on [0, 1] class scores: a few float32 roundings of the maps the labels are decided from


def decision_margins(pred: Prediction, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(best, top-two gap) of the class scores at the label size, and (lo, hi): the best score of the most
    confident background pixel and of the least confident foreground pixel (every background rule here is a
    cut on the best score: background below it, foreground above)."""
    s = pred.scores.detach().float()
    if tuple(s.shape[-2:]) != size:
        s = torch.nn.functional.interpolate(s[None], size=size, mode="bilinear", align_corners=False)[0]
    top = s.topk(min(2, len(s)), dim=0).values
    best = top[0]
    gap = top[0] - top[1] if len(s) > 1 else torch.full_like(best, torch.inf)
    background = pred.labels == 0
    lo = float(best[background].max()) if background.any() else -torch.inf
    hi = float(best[~background].min()) if (~background).any() else torch.inf
    return best, gap, lo, hi


def agree(a: Prediction, b: Prediction) -> None:
    """`a` and `b` are the same prediction up to rounding: scores allclose, and labels equal wherever `b`'s
    decision is more than MARGIN from a tie between two classes and from the background cut."""
    torch.testing.assert_close(a.scores.float(), b.scores.float(), atol=SCORE_ATOL, rtol=SCORE_RTOL)
    differ = a.labels != b.labels
    if not differ.any():
        return
    best, gap, lo, hi = decision_margins(b, tuple(b.labels.shape))
    class_flip = differ & (a.labels != 0) & (b.labels != 0)
    cut_flip = differ & ~class_flip
    near_cut = ((best - lo).abs() <= MARGIN) | ((best - hi).abs() <= MARGIN)
    assert (gap[class_flip] <= MARGIN).all(), f"{int((class_flip & (gap > MARGIN)).sum())} labels swap classes " \
                                              f"with a top-two margin above {MARGIN}"
    assert near_cut[cut_flip].all(), f"{int((cut_flip & ~near_cut).sum())} pixels switch background and " \
                                     f"foreground further than {MARGIN} from the background cut"


def rounded(trace, seed: int = 0):
    """The trace with every recorded attention map and query perturbed at float32's rounding level (relative
    2^-22): what batched maths on another device does to the inputs of the post-processing."""
    import dataclasses

    gen = torch.Generator().manual_seed(seed)

    def jitter(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        noise = (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 2.0 ** -22
        return (t.double() * (1 + noise)).to(t.dtype)

    return dataclasses.replace(trace, **{kind: {k: jitter(v) for k, v in getattr(trace, kind).items()}
                                         for kind in ("cross", "self_attn", "queries")})


@pytest.mark.parametrize("name", NAMES)
def test_predictions_agree_up_to_rounding(tiny, name):
    """Every configuration predicted from a trace that differs by rounding agrees with the original by `agree`:
    the tolerance that `predict_many` keeps wherever it cannot be bit-identical."""
    method, configs, sample, query, trace = traced_for_post_configs(tiny, name)
    size = tuple(sample.label.shape)
    for many, params in zip(method.predict_many(rounded(trace), query, configs, size), configs):
        agree(many, method.predict(trace, query, params, size))


def test_agree_catches_a_changed_label():
    scores = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])
    labels = torch.tensor([[1, 2]])
    agree(Prediction(scores, labels), Prediction(scores.clone(), labels.clone()))
    with pytest.raises(AssertionError, match="swap classes"):
        agree(Prediction(scores, torch.tensor([[2, 2]])), Prediction(scores, labels))
    with pytest.raises(AssertionError, match="background"):
        agree(Prediction(scores, torch.tensor([[0, 2]])), Prediction(scores, labels))
    with pytest.raises(AssertionError):
        agree(Prediction(scores + 1e-3, labels), Prediction(scores, labels))


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

    from bench.capture import AttentionTracer, attention_layers, request

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
    import bench.capture as trace_mod
    from bench.capture import AttentionTracer, attention_layers, request

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


# -- the contract itself ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_free_form_strings_declare_examples(name):
    """A string parameter without `choices` names other valid values (`Param.examples`), so that the tests above
    vary it like every other parameter."""
    for key, p in METHODS.get(name).all_params().items():
        if p.value_type is str and not p.choices:
            others = [e for e in p.examples if e != p.default]
            assert others, f"{name}.{key}: a free-form string parameter needs examples=(...) besides its default"
            for value in others:
                METHODS.get(name).all_params()[key].coerce(key, value)  # valid as declared


def test_method_is_an_abstract_base_class():
    import abc

    assert isinstance(Method, abc.ABCMeta)
    assert {"trace_request", "prompt", "predict"} <= Method.__abstractmethods__

    class NoPredict(Method):
        def trace_request(self, cfg):
            return None

        def prompt(self, query, caption, cfg):
            return ""

    class SharesWork(NoPredict):
        def predict_many(self, trace, query, cfgs, out_size):
            return [Prediction.empty(out_size) for _ in cfgs]

    with pytest.raises(TypeError, match="abstract"):
        NoPredict()
    with pytest.raises(TypeError, match="leaves abstract predict"):
        register_method("no_predict")(NoPredict)
    assert "no_predict" not in METHODS
    assert SharesWork().predict(None, ClassQuery([1], ["a"]), {}, (2, 2)).labels.shape == (2, 2)
    for name in NAMES:
        assert not METHODS.get(name).__abstractmethods__


def test_the_engine_answers_an_image_without_classes():
    """Methods never see an empty query: the engine predicts background under every configuration."""

    class Refuses(Method):
        def trace_request(self, cfg):
            return None

        def prompt(self, query, caption, cfg):
            return ""

        def predict(self, trace, query, cfg, out_size):
            raise AssertionError("the method was asked to segment no class")

    preds = predict_image(Refuses(), None, ClassQuery([], []), [{}, {}], (3, 4))
    assert len(preds) == 2 and all(p.scores.shape[0] == 0 and not p.labels.any() and p.labels.shape == (3, 4)
                                   for p in preds)


# What methods may import of the engine: capture, the forward pass, backbones and the offline world, errors and the
# registry, the dataset contract (bench.data.base) and the scorer's input type. Fits reach training images through
# FitContext (bench.fitting, handed to `fit`), never by importing the engine.
ENGINE_INTERFACES = ("bench.capture", "bench.forward", "bench.models", "bench.embedded", "bench.errors",
                     "bench.registry", "bench.data.base")
DECLARED_NAMES = {"bench.data": {"require_generation_gt", "IGNORE_INDEX"}, "bench.metrics": {"CountedLabels"}}


def imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) of every import in a file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module, alias.name) for alias in node.names]
    return out


def test_methods_import_only_the_engines_declared_interfaces():
    bad = []
    for path in sorted((ROOT / "methods").rglob("*.py")):
        for line, module, name in imports_of(path):
            if not (module == "bench" or module.startswith("bench.")):
                continue
            if name is not None and module == "bench" and f"bench.{name}".startswith(ENGINE_INTERFACES):
                continue
            if module.startswith(tuple(f"{m}." for m in ENGINE_INTERFACES)) or module in ENGINE_INTERFACES:
                continue
            if name is not None and name in DECLARED_NAMES.get(module, ()):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {module}" + (f".{name}" if name else ""))
    assert not bad, "methods import the engine outside its declared interfaces:\n" + "\n".join(bad)


def test_the_import_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from bench.evaluate import trace_samples\n    import bench.fitting\n")
    assert [(m, n) for _, m, n in imports_of(source)] == [("bench.evaluate", "trace_samples"), ("bench.fitting", None)]


def method_specific_names() -> set[str]:
    """Attributes that the classes of methods/ define: methods, their predictions and helpers (methods, class
    attributes, and `self.x = ...` assignments)."""
    names = set()
    for path in (ROOT / "methods").rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for node in cls.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
            for node in ast.walk(cls):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for target in targets:
                    for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            names.add(t.attr)
    return {n for n in names if not n.startswith("__")}


def test_the_engine_probes_no_method_attribute():
    """hasattr / getattr with a literal name that some method or prediction defines would be a hook the `Method`
    contract does not declare: bench/ calls declared hooks instead."""
    names = method_specific_names()
    assert {"tiled", "uses_fit", "default_sweep", "methods", "synthetic_mask", "fits_class_ids"} <= names
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in names:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    assert not bad, "the engine probes method attributes:\n" + "\n".join(bad)
