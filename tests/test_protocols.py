"""The papers' evaluation protocols: WSSS (classes=gt) and open vocabulary (classes=all) class queries, the
unsupervised Hungarian protocol against DiffSeg's released evaluation, the background slot of layouts without
background, wide (uint16) label maps, and seen/unseen reporting."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from bench.data import build_dataset
from bench.data.fixtures import write_fixture
from bench.evaluate import class_query
from bench.metrics import (hungarian_histograms, hungarian_match_dataset, image_histograms, protocol_rows,
                           seen_classes, seen_unseen, segment_class_histogram, summarize)


def diffseg_reference(preds, labels, n_class):
    """DiffSeg's benchmarks.ipynb / utils.hungarian_matching re-stated: per image a (class x segment) histogram
    of labels in [0, n_class), matched with maximize=True; TP, FP (matched columns only), FN summed; ACC and
    nanmean IoU."""
    tp, fp, fn, total = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class), 0
    for pred, label in zip(preds, labels):
        pred, label = pred.ravel(), label.ravel()
        width = max(n_class, pred.max() + 1)
        keep = (label >= 0) & (label < n_class)
        hist = np.bincount(width * label[keep] + pred[keep], minlength=n_class * width).reshape(n_class, width)
        rows, cols = linear_sum_assignment(hist, maximize=True)
        total += hist.sum()
        fn += hist.sum(1) - hist[rows, cols]
        tp[rows] += hist[rows, cols]
        reordered = hist[:, cols]
        fp[rows] += reordered.sum(0) - np.diag(reordered[rows])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    return 100 * tp.sum() / total, 100 * np.nanmean(iou)


def test_hungarian_protocol_matches_diffsegs_evaluation():
    rng = np.random.default_rng(0)
    n_class = 6
    preds, labels = [], []
    for _ in range(5):
        label = rng.integers(0, n_class, size=(12, 12))
        label[rng.random((12, 12)) < 0.1] = 255  # unlabelled
        pred = np.where(rng.random((12, 12)) < 0.7, (label * 3 + 1) % 9, rng.integers(0, 9, size=(12, 12)))
        preds.append(pred)
        labels.append(label)
    acc, miou = diffseg_reference(preds, labels, n_class)
    hist = sum(image_histograms(p, lab, n_class) for p, lab in zip(preds, labels))
    ours = summarize(hist, [str(c) for c in range(n_class)], "hungarian")
    assert ours["aAcc"] == pytest.approx(acc) and ours["mIoU"] == pytest.approx(miou)
    assert acc < 99 and miou < 99  # the case is not trivial


def test_hungarian_ignores_segment_names():
    label = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 3]])
    pred = np.array([[7, 7, 4, 4], [7, 7, 4, 4], [9, 9, 9, 2]])  # a perfect partition, arbitrary ids
    rows = hungarian_histograms(pred, label, 4)
    out = summarize(rows, ["bg", "a", "b", "c"], "hungarian")
    assert out["aAcc"] == 100 and out["mIoU"] == 100
    # the class-labelled protocols see the same prediction as wrong everywhere
    assert summarize(image_histograms(pred, label, 4), ["bg", "a", "b", "c"], "mmseg")["aAcc"] == 0


def test_dataset_level_matching_differs_from_per_image_matching():
    """IIC / PiCIE / STEGO match cluster ids once for the dataset: a segment id must mean one class everywhere."""
    labels = [np.array([[0, 1]]), np.array([[0, 1]])]
    preds = [np.array([[0, 1]]), np.array([[1, 0]])]  # image 2 swaps the ids
    per_image = sum(hungarian_histograms(p, lab, 2) for p, lab in zip(preds, labels))
    once = hungarian_match_dataset([segment_class_histogram(p, lab, 2) for p, lab in zip(preds, labels)])
    names = ["a", "b"]
    assert summarize(per_image, names, "hungarian")["aAcc"] == 100
    assert summarize(once, names, "hungarian")["aAcc"] == 50


def test_layouts_without_background_leave_the_slot_out(tmp_path):
    """A pixel left as background (id 0) on Context-59 is a miss of its class, not an IoU-0 background class."""
    write_fixture("context59", tmp_path, num_images=1, size=32)
    ds = build_dataset({"name": "context59", "root": str(tmp_path)})
    label = ds[0].label
    pred = np.where(label == 255, 0, label).astype(np.int64)
    cls = ds[0].present_class_ids()[0]
    pred[label == cls] = 0  # one class entirely left as background
    names = ds.classes
    with_slot = summarize(image_histograms(pred, label, len(names)), names, "mmseg")
    without = summarize(image_histograms(pred, label, len(names), first_class=1), names, "mmseg")
    present = ds[0].present_class_ids()
    assert np.isnan(without["IoU/background"]) and without[f"IoU/{names[cls]}"] == 0
    assert without["mIoU"] == pytest.approx(100 * (len(present) - 1) / len(present))
    assert with_slot["mIoU"] < without["mIoU"]  # the slot would have counted as a class with IoU 0
    iseg = summarize(image_histograms(pred, label, len(names), first_class=1), names, "iseg")
    assert iseg["mIoU"] == pytest.approx(without["mIoU"])
    # to the unsupervised protocol 0 is one more segment id: the partition is perfect
    assert summarize(image_histograms(pred, label, len(names), first_class=1), names, "hungarian")["mIoU"] == 100


def test_wide_label_maps_ignore_65535(tmp_path):
    write_fixture("ade847", tmp_path, num_images=1, size=32)
    sample = build_dataset({"name": "ade847", "root": str(tmp_path)})[0]
    assert sample.label.dtype == np.uint16 and (sample.label == 65535).any()
    pred = np.where(sample.label == 65535, 5, sample.label).astype(np.int64)  # wrong only on ignored pixels
    hist = image_histograms(pred, sample.label, 848, sample.ignore_index, first_class=1)
    for protocol in ("mmseg", "iseg", "hungarian"):
        assert summarize(hist, [str(c) for c in range(848)], protocol)["mIoU"] == 100


def test_wsss_queries_the_image_labels_and_open_vocabulary_every_class(tmp_path):
    """iSeg's WSSS protocol (classes=gt: image-level labels) vs open vocabulary (classes=all: every class name)."""
    write_fixture("coco_object", tmp_path, num_images=1)
    ds = build_dataset({"name": "coco_object", "root": str(tmp_path)})
    sample = ds[0]
    gt, every = class_query(sample, ds, "gt"), class_query(sample, ds, "all")
    assert gt.ids == sample.present_class_ids() and set(gt.names) <= {"person", "cat", "dog", "car", "bird"}
    assert every.ids == list(range(1, 81)) and len(every.names) == 80 and "background" not in every.names
    write_fixture("ade150", tmp_path, num_images=1)
    ade = build_dataset({"name": "ade150", "root": str(tmp_path)})
    assert class_query(ade[0], ade, "all").ids == list(range(1, 151))  # the id-0 slot is never queried


def test_seen_unseen_reporting():
    seen = seen_classes(["person", "Potted Plant", "grass", "zebra crossing"], ["person", "potted plant", "grass"])
    assert seen == [True, True, True, False]
    metrics = {"IoU/a": 60.0, "IoU/b": 40.0, "IoU/c": 30.0, "IoU/d": float("nan")}
    out = seen_unseen(metrics, ["a", "b", "c", "d"], [True, True, False, False])
    assert out["mIoU/seen"] == 50 and out["mIoU/unseen"] == 30
    assert out["hIoU"] == pytest.approx(2 * 50 * 30 / 80)


def test_eight_row_histograms_predate_the_hungarian_protocol():
    old = np.ones((8, 3))
    assert protocol_rows(old, "iseg").shape == (4, 3)
    with pytest.raises(ValueError, match="predate"):
        protocol_rows(old, "hungarian")


def test_results_report_seen_unseen_and_their_harmonic_mean():
    """report.unseen names the unseen classes; results carry mIoU_seen / mIoU_unseen / hIoU from the same
    definition as bench.metrics.seen_unseen (NaN classes left out)."""
    from bench.results import results_frame

    cfg = {"report": {"bootstrap": 0, "unseen": "star+cross"}, "metric": {"protocol": "mmseg"}}
    rows = [{"trial": "t0", "seed": 0, "mIoU": 50.0, "IoU/background": 80.0, "IoU/circle": 60.0,
             "IoU/star": 20.0, "IoU/cross": float("nan")}]
    frame = results_frame(cfg, rows)
    assert frame.loc[0, "mIoU_seen"] == pytest.approx(70.0)
    assert frame.loc[0, "mIoU_unseen"] == pytest.approx(20.0)
    assert frame.loc[0, "hIoU"] == pytest.approx(2 * 70 * 20 / 90)


def test_image_scorer_hungarian_rows_equal_the_protocol_function():
    """The shared-forward scorer derives the hungarian rows from its joint counts: equal to
    hungarian_histograms per prediction, with and without a background slot, and for segment ids beyond the
    classes (counted apart)."""
    from bench.metrics import ImageScorer, hungarian_histograms

    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (16, 16))
    label[0, :4] = 255
    preds = [rng.integers(0, 5, (16, 16)), np.roll(label, 1, 0).clip(0, 4), rng.integers(0, 9, (16, 16))]
    for first in (0, 1):
        rows = ImageScorer(label, 5, 255, first_class=first).histograms(preds, hungarian=True)
        assert rows.shape == (3, 12, 5)
        for k, pred in enumerate(preds):
            want = hungarian_histograms(pred, label, 5, 255, first)
            want[:, :first] = 0
            np.testing.assert_array_equal(rows[k, 8:], want)
    assert ImageScorer(label, 5, 255).histograms(preds).shape == (3, 8, 5)
