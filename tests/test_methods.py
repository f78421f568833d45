"""Method-specific mechanics on tiny random components (the contracts every method keeps are in
test_method_contract.py)."""

import torch

from bench.data import build_dataset
from bench.evaluate import evaluate_batch
from bench.plan import ForwardGroup, Trial
from methods import METHODS

SIZE = 32
STEPS = 2


def test_iseg_code_variant(tiny):
    """Released-code refinement: non-negative, row-stochastic Ent-Self; the whole variant runs (with k-means)."""
    from methods.iseg import ent_self_code

    attn = torch.rand(16, 16).softmax(1)
    out = ent_self_code(attn, 0.015)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(16))
    cls = METHODS.get("iseg")
    method = cls(tiny)
    dataset = build_dataset({"name": "shapes", "size": SIZE, "limit": 1})
    for params in (cls.resolve({"variant": "code", "kmeans": 3}), cls.resolve({"modules": "baseline"})):
        group = ForwardGroup(0, (), [Trial("t0", params, {})])
        hists, _ = evaluate_batch(method, dataset, [dataset[0]], group)
        assert hists[0].sum() > 0


def test_compare_runs_every_method_on_one_trace(tiny):
    cls = METHODS.get("compare")
    method = cls(tiny)
    dataset = build_dataset({"name": "voc_sim", "size": SIZE, "limit": 1})
    trials = [Trial(f"t{i}", cls.resolve({"method": m, "mode": "generation", "steps": STEPS}), {"method": m})
              for i, m in enumerate(("daam", "attn2mask", "ovam", "iseg"))]
    group = ForwardGroup(0, (), trials)
    hists, passes = evaluate_batch(method, dataset, [dataset[0]], group)
    assert len(hists) == 4 and passes == STEPS  # one generation serves all four
