"""Metrics against hand-computed examples (MMSegmentation IoUMetric semantics, iSeg protocol)."""

import math

import numpy as np
import pytest

from bench.metrics import ImageScorer, image_histograms, intersect_and_union, protocol_rows, summarize

CLASSES = ["background", "a", "b", "c"]


def test_intersect_and_union_by_hand_with_ignore():
    label = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [1, 3, 0, 1]])
    hist = intersect_and_union(pred, label, 4)
    # pixels with label 255 are dropped: pred 3 there must not count anywhere
    intersect, union, area_pred, area_label = hist
    assert intersect.tolist() == [1, 3, 0, 0]
    assert area_pred.tolist() == [2, 5, 0, 0]
    assert area_label.tolist() == [3, 4, 0, 0]
    assert union.tolist() == [4, 6, 0, 0]


def test_summary_mmseg_excludes_absent_and_counts_false_positives_as_zero():
    label = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted but absent from ground truth; class 3 absent everywhere
    out = summarize(intersect_and_union(pred, label, 4), CLASSES, "mmseg")
    assert out["IoU/background"] == pytest.approx(50.0)
    assert out["IoU/a"] == pytest.approx(100.0)
    assert out["IoU/b"] == pytest.approx(0.0)
    assert math.isnan(out["IoU/c"])
    assert out["mIoU"] == pytest.approx((50 + 100 + 0) / 3)
    assert out["aAcc"] == pytest.approx(75.0)
    assert out["mAcc"] == pytest.approx((50 + 100) / 2)


def test_summary_iseg_protocol_counts_only_ground_truth_classes():
    label = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])
    out = summarize(intersect_and_union(pred, label, 4), CLASSES, "iseg")
    assert out["mIoU"] == pytest.approx((50 + 100) / 2)


def test_histograms_sum_over_images_before_division():
    labels = [np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]])]
    preds = [np.array([[1, 0, 0, 0]]), np.array([[1, 1, 1, 0]])]
    total = sum(intersect_and_union(p, l, 2) for p, l in zip(preds, labels))
    out = summarize(total, ["background", "a"])
    # class a: intersect 1 + 1 = 2, union 2 + 3 = 5 (not the mean of per-image IoUs 0.5 and 0.33)
    assert out["IoU/a"] == pytest.approx(40.0)


def test_unknown_protocol_is_rejected():
    with pytest.raises(ValueError, match="protocol"):
        summarize(np.zeros((4, 2), dtype=np.int64), ["x", "y"], "coco")


def test_out_of_range_labels_follow_each_protocol():
    """A ground-truth value >= C other than 255: MMSegmentation keeps the pixel (its prediction is
    a false positive, its label counts nowhere); iSeg's release drops the pixel."""
    label = np.array([[0, 1, 7, 7]])
    pred = np.array([[0, 1, 1, 0]])
    mm = intersect_and_union(pred, label, 4, protocol="mmseg")
    isg = intersect_and_union(pred, label, 4, protocol="iseg")
    assert mm[2].tolist() == [2, 2, 0, 0] and mm[3].tolist() == [1, 1, 0, 0]  # pred counted at the 7s
    assert isg[2].tolist() == [1, 1, 0, 0] and isg[3].tolist() == [1, 1, 0, 0]
    assert summarize(mm, CLASSES, "mmseg")["mIoU"] == pytest.approx(50.0)  # IoU 1/2 for both classes
    assert summarize(np.concatenate([mm, isg]), CLASSES, "iseg")["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize("label", [np.array([[0, 0, 255, 0]]), np.array([[2, 2, 2, 2]]), np.array([[255, 255]])])
def test_iseg_protocol_skips_images_with_a_single_ground_truth_value(label):
    """iSeg's test_step returns before scoring when the ground truth (255 read as 0) holds one value: no
    foreground class, or a single class and no background. MMSegmentation scores every image."""
    pred = np.ones_like(label)
    hist = image_histograms(pred, label, 4)
    assert not protocol_rows(hist, "iseg").any()
    assert protocol_rows(hist, "mmseg")[2].sum() == (label != 255).sum()
    # the engine's scorer (one per image, many predictions) decides the skip the same way
    assert np.array_equal(ImageScorer(label, 4).histograms([pred])[0], hist[:8])
    assert ImageScorer(np.array([[0, 2, 255]]), 4).histograms([np.array([[0, 2, 0]])])[0][4:].any()


def test_both_protocols_travel_in_one_histogram_and_old_ones_read_as_mmseg():
    labels = [np.array([[0, 1, 1, 9]]), np.array([[0, 0, 0, 0]])]
    preds = [np.array([[1, 1, 1, 2]]), np.array([[0, 3, 0, 0]])]
    total = sum(image_histograms(p, l, 4) for p, l in zip(preds, labels))
    for protocol in ("mmseg", "iseg"):
        want = sum(intersect_and_union(p, l, 4, protocol=protocol) for p, l in zip(preds, labels))
        assert summarize(total, CLASSES, protocol) == pytest.approx(summarize(want, CLASSES, protocol), nan_ok=True)
    mm = sum(intersect_and_union(p, l, 4) for p, l in zip(preds, labels))
    assert np.array_equal(protocol_rows(mm, "iseg"), mm)


def test_tie_counts_count_cells_whose_two_best_classes_lie_within_tie():
    """Labels that tie-breaking decides (iSeg's chain collapses every class map to one at N = 10): counted are
    the cells where some class scores above TIE, tied those whose runner-up is within TIE of the best."""
    import torch

    from methods.maps import TIE, tie_counts

    a = torch.tensor([[0.0, 0.2, 0.9, 0.5]])
    same = torch.stack([a, a + TIE / 2, a * 0.5])[None]  # two classes equal up to TIE/2 everywhere
    apart = torch.stack([a, a * 0.5, a * 0.25])[None]
    counts = tie_counts(torch.cat([same, apart]))
    assert counts.tolist() == [[3, 3], [0, 3]]  # cells where every class scores ~0 are left to the background
    assert tie_counts(torch.rand(3, 1, 4, 4)).tolist() == [[0, 0]] * 3  # one class: nothing to tell apart
    assert tie_counts(torch.zeros(2, 0, 1, 1)).tolist() == [[0, 0]] * 2  # an image without queried classes


def test_tied_percent_pools_cells_over_images():
    from bench.metrics import tied_percent

    assert tied_percent(np.array([[3, 4], [0, 6]])) == pytest.approx(30.0)
    assert math.isnan(tied_percent(np.zeros((2, 2), dtype=np.int64)))
    assert math.isnan(tied_percent(np.zeros((0, 2), dtype=np.int64)))
