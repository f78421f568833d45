"""Both metric protocols against their references on seeded label maps with ignored pixels (255), ground-truth
values outside the classes and images without foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.metrics import image_histograms, summarize

C = 21  # VOC: background + 20 classes
NAMES = [str(i) for i in range(C)]


def dataset(n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        label = rng.integers(0, C, (60, 80))
        label[rng.random(label.shape) < 0.1] = 255
        if i % 5 == 1:
            label[rng.random(label.shape) < 0.05] = C + 3  # a value the class list does not have
        if i % 7 == 2:
            label = np.where(rng.random(label.shape) < 0.1, 255, 0)  # background and ignore only
        if i % 11 == 3:
            label = np.full(label.shape, 4)  # one class, no background
        pred = np.where(rng.random(label.shape) < 0.6, np.where(label < C, label, 0), rng.integers(0, C, label.shape))
        pairs.append((pred, label))
    return pairs


# open-mmlab/mmsegmentation @ 01c96235453a5dff67473f782d01e9458f0b8a57, mmseg/evaluation/metrics/iou_metric.py:
# IoUMetric.intersect_and_union (label != ignore_index kept; torch.histc over [0, C - 1]), compute_metrics /
# total_area_to_metrics (sums over images; aAcc, IoU, Acc; nanmean).
def mmseg(pairs) -> dict[str, float]:
    totals = [0, 0, 0, 0]
    for pred, label in pairs:
        pred, label = torch.from_numpy(pred), torch.from_numpy(label)
        mask = label != 255
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        hist = lambda x: torch.histc(x.float(), bins=C, min=0, max=C - 1)
        a_i, a_p, a_l = hist(inter), hist(pred), hist(label)
        for k, v in enumerate((a_i, a_p + a_l - a_i, a_p, a_l)):
            totals[k] = totals[k] + v.double()
    a_i, a_u, _, a_l = totals
    return {"mIoU": float(np.nanmean((a_i / a_u).numpy())) * 100, "aAcc": float(a_i.sum() / a_l.sum()) * 100,
            "mAcc": float(np.nanmean((a_i / a_l).numpy())) * 100}


# linsun449/iseg.code @ 4b0784cba374bec5e6536c298a5564d635a082a0, util/miou.py ShowSegmentResult._fast_hist (only
# 0 <= label < C) and calculate (mIoU over classes with ground truth); wsss/iSeg.py @ 87debb0b (test_step: an image
# whose ground truth, 255 read as 0, holds one value is not scored).
def iseg(pairs) -> dict[str, float]:
    hist = np.zeros((C, C))
    for pred, label in pairs:
        values = np.unique(np.where(label == 255, 0, label))
        if len(values) == 1:
            continue
        t, p = label.flatten(), pred.flatten()
        mask = (t >= 0) & (t < C)
        hist += np.bincount(C * t[mask].astype(int) + p[mask], minlength=C ** 2).reshape(C, C)
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        return {"mIoU": float(np.nanmean(iu[hist.sum(1) > 0])) * 100,
                "aAcc": float(np.diag(hist).sum() / hist.sum()) * 100,
                "mAcc": float(np.nanmean(np.diag(hist) / hist.sum(1))) * 100}


@pytest.mark.parametrize("protocol, reference", [("mmseg", mmseg), ("iseg", iseg)])
def test_protocol_equals_its_reference(protocol, reference):
    pairs = dataset()
    total = sum(image_histograms(p, lab, C) for p, lab in pairs)
    got = summarize(total, NAMES, protocol)
    want = reference(pairs)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    other = summarize(total, NAMES, "iseg" if protocol == "mmseg" else "mmseg")
    assert other["mIoU"] != pytest.approx(got["mIoU"]), "the data must tell the protocols apart"
