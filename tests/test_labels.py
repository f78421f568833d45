"""The tie rule (methods.labels): labels that float rounding cannot move.

Unit checks of the rule, then the property it exists for on the embedded model: a trace perturbed by ~1e-7
keeps every label, and the main job's summary is identical under another matrix kernel (oneDNN off, or two
threads instead of one), where argmax labels move."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from methods.labels import TIE_TOL, choose, decide
from methods.maps import labels_from_scores, labels_from_threshold

ROOT = Path(__file__).resolve().parents[1]


def test_lowest_id_wins_within_the_tolerance():
    scores = torch.tensor([[0.50, 0.20, 0.9], [0.50 + TIE_TOL / 2, 0.80, 0.9 - 2 * TIE_TOL]])  # (K=2, 3 pixels)
    best, labels = choose(scores, [4, 7], "lowest", TIE_TOL, dim=0)
    assert labels.tolist() == [4, 7, 4]
    assert torch.equal(best, scores.max(0).values)
    _, arg = choose(scores, [4, 7], "argmax", TIE_TOL, dim=0)
    assert arg.tolist() == [7, 7, 4]  # the first maximum as computed
    _, bg = choose(scores, [4, 7], "background", TIE_TOL, dim=0)
    assert bg.tolist() == [0, 7, 4]


@pytest.mark.parametrize("name", ["dedos", "segformer", "freegen"])
def test_trained_heads_refuse_a_tie_rule_they_would_not_apply(name):
    """The trained heads label by argmax: their resolved tie_rule says so, and another rule is a one-line error."""
    from bench.errors import BenchError
    from methods import METHODS

    cls = METHODS.get(name)
    assert cls.resolve({})["tie_rule"] == "argmax"
    for rule in ("lowest", "background"):
        with pytest.raises(BenchError, match=f"tie_rule='{rule}' is not one of argmax"):
            cls.resolve({"tie_rule": rule})


def test_lowest_follows_ids_not_index_order():
    scores = torch.tensor([[0.5], [0.5], [0.1]])
    assert choose(scores, [9, 2, 1], "lowest", TIE_TOL, dim=0)[1].tolist() == [2]
    _, index, tied = decide(scores[None], "lowest", TIE_TOL, order=torch.tensor([9, 2, 1]))
    assert index.tolist() == [[1]] and tied.tolist() == [[True]]


def test_bad_rule_is_refused():
    with pytest.raises(ValueError, match="unknown tie rule"):
        decide(torch.rand(1, 2, 3, 3), "random")
    with pytest.raises(ValueError, match=">= 0"):
        decide(torch.rand(1, 2, 3, 3), "lowest", -1.0)


def test_threshold_and_score_labels_use_the_rule():
    a = torch.full((1, 4, 4), 0.7)
    scores = torch.cat([a, a + TIE_TOL / 3])
    assert labels_from_threshold(scores, [5, 3], (4, 4), 0.4).unique().tolist() == [3]
    assert labels_from_threshold(scores, [5, 3], (4, 4), 0.4, tie=("argmax", TIE_TOL)).unique().tolist() == [3]
    assert labels_from_threshold(scores, [3, 5], (4, 4), 0.4, tie=("argmax", TIE_TOL)).unique().tolist() == [5]
    assert labels_from_scores(scores, [3, 5], (4, 4)).unique().tolist() == [3]
    assert labels_from_scores(scores, [3, 5], (4, 4), tie=("background", TIE_TOL)).unique().tolist() == [0]


def _iseg_predictions(backbone, images: int, perturb: float = 0.0, tie_rule: str = "lowest"):
    """iSeg's main-job settings (every lambda of sweeps/iseg_lambda.yaml) on shapes images: labels and decision
    scores; `perturb`: relative noise added to every traced attention tensor."""
    from bench.data import build_dataset
    from bench.evaluate import group_request, trace_samples
    from bench.plan import ForwardGroup, Trial
    from methods import METHODS

    method = METHODS.get("iseg")(backbone)
    cfgs = [method.resolve({"lambda": lam, "tie_rule": tie_rule}) for lam in (0, 0.001, 0.005, 0.01, 0.05, 0.1)]
    group = ForwardGroup(seed=0, forward=tuple((k, cfgs[0][k]) for k in method.forward_keys()),
                         trials=[Trial(f"t{i}", c, {}) for i, c in enumerate(cfgs)])
    dataset = build_dataset({"name": "shapes", "limit": images, "split": "val", "size": 512})
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(images):
        sample = dataset[i]
        batch = trace_samples(method, dataset, [sample], cfgs[0], 0, group_request(method, group),
                              backbone.resolution)
        trace = batch.traces[0]
        if perturb:
            for store in (trace.cross, trace.self_attn):
                for name, t in store.items():
                    store[name] = t * (1 + perturb * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        preds = method.predict_many(trace, batch.queries[0], cfgs, tuple(sample.label.shape))
        out.append([(p.labels.clone(), p.decision_scores.clone()) for p in preds])
    return out


def test_perturbed_trace_keeps_every_label(backbone):
    """Traced attention perturbed by 1e-7 (relative; float32's own rounding is 6e-8): the same labels everywhere
    under the default rule, while argmax labels move (so the perturbation reaches the decisions)."""
    base = _iseg_predictions(backbone, 2)
    moved = _iseg_predictions(backbone, 2, perturb=1e-7)
    assert any(not torch.equal(b[1], m[1]) for bi, mi in zip(base, moved) for b, m in zip(bi, mi))
    for bi, mi in zip(base, moved):
        for b, m in zip(bi, mi):
            assert torch.equal(b[0], m[0]), int((b[0] != m[0]).sum())
    arg_base = _iseg_predictions(backbone, 2, tie_rule="argmax")
    arg_moved = _iseg_predictions(backbone, 2, perturb=1e-7, tie_rule="argmax")
    assert sum(int((b[0] != m[0]).sum()) for bi, mi in zip(arg_base, arg_moved) for b, m in zip(bi, mi)) > 0


def _main_job(tmp: Path, name: str, limit: int | None, kernel) -> pd.DataFrame:
    from bench.run import run

    overrides = [f"output_dir={tmp / name}", "ray.num_actors=0"] + ([f"data.limit={limit}"] if limit else [])
    with kernel():
        out = run(str(ROOT / "sweeps" / "iseg_lambda.yaml"), overrides)
    return pd.read_csv(out / "summary.csv")


@contextlib.contextmanager
def _mkldnn(enabled: bool):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _mkldnn_off():
    return _mkldnn(False)


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def test_kernel_change_moves_raw_scores(backbone):
    """oneDNN off changes the traced scores themselves (so the next test compares two different kernels)."""
    on = _iseg_predictions(backbone, 1)
    with _mkldnn_off():
        off = _iseg_predictions(backbone, 1)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(on[0], off[0]))


def test_main_job_summary_is_identical_under_another_kernel(tmp_path):
    a = _main_job(tmp_path, "on", 2, lambda: _mkldnn(True))
    b = _main_job(tmp_path, "off", 2, _mkldnn_off)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["threads", "mkldnn"])
def test_full_main_job_summary_is_identical_under_another_kernel(tmp_path, kernel):
    """The whole main job (16 images): one thread against two, and oneDNN on against off."""
    a = _main_job(tmp_path, "a", None, lambda: _threads(1))
    b = _main_job(tmp_path, "b", None, (lambda: _threads(2)) if kernel == "threads" else _mkldnn_off)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
