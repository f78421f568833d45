"""The tiny SAM shipped for the embedded default (bench/embedded/sam/) and its loader (bench/models/sam.py)."""

import numpy as np
import pytest

from bench.data.shapes import ShapesDataset
from bench.data.shapes_gt import object_masks
from bench.errors import BenchError
from bench.models.sam import EMBEDDED_SAM, load_sam

FLOOR = 70.0  # shipped: 77.4 3-point mIoU on 200 held-out scenes (eval.json), 78.2 on these 30; a regression guard
USEFUL = 80.0  # what pseudo-masks for FreeGen's ASR would need (the embedded model's attention maps: ~75-94)


@pytest.fixture(scope="module")
def sam():
    return load_sam("embedded")


@pytest.fixture(scope="module")
def held_out_iou(sam):
    from bench.embedded.sam import evaluate

    return evaluate(sam.model, num_images=30, points=(3,), dense_points=sam.dense_points)["mIoU_3pt"]


def test_shipped_folder_is_a_transformers_sam(sam):
    from transformers import SamModel

    assert isinstance(sam.model, SamModel) and sam.input_size == 64
    assert (EMBEDDED_SAM / "model.safetensors").is_file() and (EMBEDDED_SAM / "eval.json").is_file()


def test_point_prompted_iou_above_floor(held_out_iou):
    assert held_out_iou >= FLOOR


@pytest.mark.xfail(strict=True, reason="tiny SAM after 700 CPU steps (batch 16): 77.4 3-point mIoU on 200 held-out "
                                       "scenes (78.2 on these 30); SAM pseudo-masks would need ~80 to help FreeGen's ASR")
def test_point_prompted_iou_useful_for_pseudo_masks(held_out_iou):
    assert held_out_iou >= USEFUL


def test_mask_at_any_image_size(sam):
    data = ShapesDataset(num_images=1, size=96, split="val")
    layout = data.layout(0)
    image, _ = data.render(layout, 0)
    truth = object_masks(layout, 96)[0]
    ys, xs = np.nonzero(truth)
    mask = sam.mask(image, [(float(xs.mean()), float(ys.mean()))])
    assert mask.shape == (96, 96) and mask.dtype == bool


def test_missing_sam_is_one_line_error(tmp_path):
    with pytest.raises(BenchError, match="not a transformers SAM folder"):
        load_sam(str(tmp_path))
    with pytest.raises(BenchError, match="local Hugging Face cache"):
        load_sam("nobody/no-such-sam")


def test_dense_point_prompt_peaks_at_each_point():
    import torch

    from bench.embedded.sam import point_blobs

    blobs = point_blobs(torch.tensor([[[3.0, 5.0], [10.0, 1.0]]]), 16, sigma=1.0)
    assert blobs.shape == (1, 1, 16, 16)
    assert blobs[0, 0, 5, 3] == 1 and blobs[0, 0, 1, 10] == 1  # (x, y) -> row y, column x
    assert blobs[0, 0, 12, 12] < 1e-6 and float(blobs.max()) == 1.0
