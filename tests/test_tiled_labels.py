"""Labelling by tiles (methods.tiled_labels) equals the full upsample bit for bit: labels, histograms and scores,
on random maps with ties between classes, plateaus, constant maps and every background rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.metrics import ImageScorer
from methods.iseg import release_upsample
from methods.maps import labels_from_scores_many, minmax, resize_maps
from methods.tiled_labels import TiledLabels, TiledPrediction, tileable

RULES = [("power", 2.0, 0.45), ("power", 1.0, 0.45), ("power", 0.5, 0.45), ("power", 3.0, 0.45),
         ("threshold", 2.0, 0.45), ("threshold", 2.0, 0.0), ("threshold", 2.0, 1.0), ("threshold", 2.0, 0.5)]


def random_maps(gen: torch.Generator, n: int, k: int, h: int, kind: str) -> torch.Tensor:
    maps = torch.rand(n, k, h, h, generator=gen)
    if kind == "quantized":  # many exact ties between classes and plateaus
        maps = (maps * 4).round() / 4
    elif kind == "tied":  # classes 0 and 1 equal everywhere: the first one wins every argmax
        maps[:, 1 % k] = maps[:, 0]
    elif kind == "constant":  # a flat map: min-max gives zeros, the background rule alone decides
        maps[:, 0] = 0.3
    elif kind == "smooth":  # large uniform regions (the common case: most tiles decided)
        maps = resize_maps(torch.rand(n, k, 3, 3, generator=gen), (h, h))
    return maps


def full_path(maps: torch.Tensor, mid: int, out: int, ids: list[int], rules) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = maps.shape[:2]
    scores = release_upsample(maps.reshape(n * k, *maps.shape[2:]), (mid, mid), (out, out)).reshape(n, k, out, out)
    return scores, labels_from_scores_many(scores, ids, (out, out), rules)


@pytest.mark.parametrize("kind", ["uniform", "quantized", "tied", "constant", "smooth"])
@pytest.mark.parametrize("k, h, mid, out", [(1, 8, 16, 64), (2, 16, 64, 512), (3, 8, 32, 128), (4, 16, 16, 64),
                                            (2, 8, 8, 64), (3, 16, 64, 128)])
def test_tiled_labels_and_histograms_equal_the_full_upsample(kind, k, h, mid, out):
    gen = torch.Generator().manual_seed(["uniform", "quantized", "tied", "constant", "smooth"].index(kind) * 100 + k
                                        + h + mid + out)
    n = len(RULES)
    maps = random_maps(gen, n, k, h, kind)
    ids = [3, 1, 5, 2][:k]
    scores, labels = full_path(maps, mid, out, ids, RULES)
    flat = maps.reshape(n * k, h, h)
    up = minmax(resize_maps(flat, (mid, mid)), eps=1e-12).reshape(n, k, mid, mid)
    tiled = TiledLabels(up, ids, (out, out), RULES)
    for j in range(n):
        assert torch.equal(tiled.labels(j), labels[j]), (kind, j, int((tiled.labels(j) != labels[j]).sum()))
    # histograms: ground truth with every class, an out-of-range value and ignored pixels
    label = torch.randint(0, 7, (out, out), generator=gen).numpy()
    label[:5] = 255
    label[-3:, :7] = 9
    scorer = ImageScorer(label, 6)
    preds = [TiledPrediction(tiled, j, None).scored_as() for j in range(n)]  # counted by tiles
    dense = scorer.histograms([labels[j].numpy() for j in range(n)])
    assert np.array_equal(scorer.histograms(preds), dense)
    assert np.array_equal(scorer.histograms([*preds[:2], labels[2].numpy()]), dense[:3])
    few = ImageScorer(label, 4)  # class id 5 is out of this scorer's range: counted in the "other" column
    assert np.array_equal(few.histograms(preds), few.histograms([labels[j].numpy() for j in range(n)]))


def test_tiled_prediction_reads_like_the_full_one():
    gen = torch.Generator().manual_seed(0)
    maps = random_maps(gen, 2, 2, 16, "uniform")
    scores, labels = full_path(maps, 64, 512, [1, 2], RULES[:2])
    up = minmax(resize_maps(maps.reshape(4, 16, 16), (64, 64)), eps=1e-12).reshape(2, 2, 64, 64)
    tiled = TiledLabels(up, [1, 2], (512, 512), RULES[:2])
    pred = TiledPrediction(tiled, 1, lambda: release_upsample(maps[1], (64, 64), (512, 512)))
    assert torch.equal(pred.labels, labels[1]) and torch.equal(pred.scores, scores[1])
    assert tiled.decided.float().mean() > 0.5  # most tiles need no upsampling


def test_ties_are_counted_without_building_the_full_scores():
    """The engine's tie count reads a tiled prediction's maps before the last upsampling (`decision_scores`);
    reading `scores` would upsample every configuration to the label size, the cost tiles exist to avoid."""
    from bench.evaluate import prediction_ties
    from methods.maps import tie_counts

    gen = torch.Generator().manual_seed(0)
    maps = random_maps(gen, 2, 3, 16, "uniform")
    maps[1, 2] = maps[1, 0]  # configuration 1: two classes tied everywhere
    up = minmax(resize_maps(maps.reshape(6, 16, 16), (64, 64)), eps=1e-12).reshape(2, 3, 64, 64)
    tiled = TiledLabels(up, [1, 2, 3], (512, 512), RULES[:2])

    def never():
        raise AssertionError("the full-size scores were built")

    preds = [TiledPrediction(tiled, j, never) for j in range(2)]
    ties = prediction_ties(preds)
    assert np.array_equal(ties, tie_counts(up).numpy())
    assert ties[0][0] < ties[1][0] and ties[1][0] > 0.3 * ties[1][1]


def test_only_power_of_two_factors_are_tiled():
    assert tileable(64, (512, 512)) and tileable(16, (32, 32))
    assert not tileable(64, (500, 500)) and not tileable(64, (384, 384)) and not tileable(64, (512, 256))
    assert not tileable(64, (64, 64)) and not tileable(33, (66, 66))


@pytest.mark.parametrize("tie", [("lowest", 1e-2), ("background", 1e-2), ("argmax", 1e-2), ("lowest", 0.1)])
@pytest.mark.parametrize("kind", ["uniform", "near", "tied", "smooth"])
def test_tiled_labels_follow_the_tie_rule(tie, kind):
    """Under every tie rule (methods.labels) the tiles give the full path's labels, also where class scores lie
    near the tie band's edge ("near": class 1 is class 0 plus offsets around the tolerance)."""
    gen = torch.Generator().manual_seed(7 + len(kind))
    n, k, h, mid, out = len(RULES), 3, 8, 32, 128
    maps = random_maps(gen, n, k, h, "smooth" if kind == "near" else kind)
    if kind == "near":
        maps[:, 1] = maps[:, 0] + tie[1] * (0.5 + torch.rand(n, h, h, generator=gen))
    ids = [3, 1, 5]
    flat = maps.reshape(n * k, h, h)
    scores = release_upsample(flat, (mid, mid), (out, out)).reshape(n, k, out, out)
    labels = labels_from_scores_many(scores, ids, (out, out), RULES, [tie] * n)
    up = minmax(resize_maps(flat, (mid, mid)), eps=1e-12).reshape(n, k, mid, mid)
    tiled = TiledLabels(up, ids, (out, out), RULES, tie)
    for j in range(n):
        assert torch.equal(tiled.labels(j), labels[j]), (tie, kind, j, int((tiled.labels(j) != labels[j]).sum()))
