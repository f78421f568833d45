"""Per-image histograms by their nonzero class columns (bench.sparse_histograms): exact round trips, and a
sweep's scores and bootstrap intervals from encoded shards equal to those of the dense histograms."""

import numpy as np
import pytest

from bench.metrics import ImageScorer
from bench.sparse_histograms import CLASSES, COUNTS, decode, dense_rows, encode, stack_rows, totals, widen


def random_histograms(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    """(rows, 8, C) counts: rows empty, rows with every class, rows with a few classes (some columns nonzero
    in one of the 8 rows only), counts from 1 to beyond uint32."""
    top = rng.choice([2, 1 << 16, 1 << 17, 1 << 33])
    hist = rng.integers(1, top, size=(rows, 8, classes), dtype=np.int64)
    for r in range(rows):
        kind = rng.integers(0, 4)
        if kind == 0:
            hist[r] = 0  # an empty image (no pixel counted)
        elif kind >= 2:  # a handful of classes, some seen in one row only (a class predicted, not labelled)
            absent = rng.random(classes) < rng.uniform(0.5, 1.0)
            hist[r][:, absent] = 0
            hist[r][rng.integers(0, 8), rng.integers(0, classes)] = 7
        # kind 1: every class nonzero
    return hist


@pytest.mark.parametrize("seed", range(40))
def test_encoding_round_trips_exactly(seed):
    rng = np.random.default_rng(seed)
    classes = int(rng.choice([1, 2, 21, 459, 847]))
    hist = random_histograms(rng, int(rng.integers(0, 12)), classes)
    enc = encode(hist)
    assert np.array_equal(decode(enc, classes), hist) and decode(enc, classes).dtype == np.int64
    assert np.array_equal(totals(enc, classes), hist.sum(0)) and totals(enc, classes).dtype == np.int64
    width = enc[CLASSES].shape[1]
    assert width == max(1, int(hist.any(1).sum(1).max(initial=0)))  # the widest row's nonzero columns, no more
    assert enc[COUNTS].dtype == (np.uint16 if hist.max(initial=0) < 1 << 16 else
                                 np.uint32 if hist.max() < 1 << 32 else np.int64)
    for r in range(len(hist)):  # each row: its nonzero classes in ascending order, then padding
        ids = enc[CLASSES][r]
        assert np.array_equal(ids[ids >= 0], np.flatnonzero(hist[r].any(0))) and (ids[len(ids[ids >= 0]):] == -1).all()


def test_batches_of_different_widths_concatenate_and_ragged_rows_are_padded():
    rng = np.random.default_rng(1)
    parts = [random_histograms(rng, n, 30) for n in (3, 1, 5)]
    parts[1][:] = 0
    encoded = widen([encode(p) for p in parts])
    joined = {k: np.concatenate([e[k] for e in encoded]) for k in (CLASSES, COUNTS)}
    assert np.array_equal(decode(joined, 30), np.concatenate(parts))
    ragged = np.empty(2, dtype=object)  # Ray Data's variable-shaped tensors come back as arrays of arrays
    ragged[:] = [np.array([3, 5], np.int16), np.array([1], np.int16)]
    assert np.array_equal(stack_rows(ragged, -1), [[3, 5], [1, -1]])


def test_sweep_scores_and_intervals_from_encoded_shards_equal_the_dense_ones(tmp_path):
    """A seeded sweep-like case: per-image histograms of real label maps (ImageScorer), shards written by the
    driver (absorb, one batch per image, a dense shard of an older run among them), scored and bootstrapped."""
    from bench.plan import ForwardGroup, Trial
    from bench.stages.score import load_scores, score
    from bench.stages.trace import absorb
    from bench.stats import bootstrap_intervals

    rng = np.random.default_rng(7)
    classes, images, size = 40, 9, (16, 16)
    names = [f"c{i}" for i in range(classes)]
    trials = [Trial(trial_id=f"t{k:04d}", params=None, swept={}) for k in range(3)]
    groups = [ForwardGroup(seed=0, forward=(), trials=trials)]
    batches, dense = [], []
    for i in range(images):
        label = rng.choice(rng.choice(classes, 4, replace=False), size=size)
        label[0, :3] = 255
        preds = [np.where(rng.random(size) < 0.2, rng.integers(0, classes, size), label) for _ in trials]
        hist = ImageScorer(label, classes).histograms(preds)
        dense.append(hist)
        batches.append({"index": np.full(len(trials), i), "group": np.zeros(len(trials), np.int64),
                        "trial": np.array([t.trial_id for t in trials]), **encode(hist),
                        "passes": np.array([1, 0, 0]), "ties": np.zeros((len(trials), 2), np.int64)})
    old = {**{k: v for k, v in batches[0].items() if k not in (CLASSES, COUNTS)}, "hist": dense[0]}
    np.savez(tmp_path / "shard-00000.npz", **old)  # a shard of a run resumed across versions
    absorb(iter(batches[::-1]), tmp_path, None, {0}, 1, images, "test")
    scores = load_scores(tmp_path)
    dense_scores = {k: v for k, v in scores.items() if k not in (CLASSES, COUNTS)}
    dense_scores["hist"] = np.concatenate(dense)  # image, then configuration: the order load_scores gives
    assert np.array_equal(decode(scores, classes), dense_scores["hist"])
    got = score(trials, groups, [0], scores, names, "iseg")
    want = score(trials, groups, [0], dense_scores, names, "iseg")
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        assert a.keys() == b.keys() and all(a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])) for k in a)
    per_image = {"trial": scores["trial"], CLASSES: scores[CLASSES], COUNTS: scores[COUNTS], "num_classes": classes}
    for trial in trials:
        keep = scores["trial"] == trial.trial_id
        assert bootstrap_intervals(dense_rows(per_image, keep), "iseg", 50) == \
            bootstrap_intervals(dense_scores["hist"][keep], "iseg", 50)


def test_totals_stay_exact_past_what_a_float_holds():
    hist = np.full((3, 8, 5), 2 ** 50 + 1, dtype=np.int64)  # sums beyond 2**53: float64 would round them
    hist[1, :, 2] = 0
    assert np.array_equal(totals(encode(hist), 5), hist.sum(0))
