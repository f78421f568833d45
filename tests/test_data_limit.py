"""data.limit larger than the dataset: a generated dataset grows to it, a fixed one is refused (never capped)."""

import pytest

from bench.data import build_dataset
from bench.errors import BenchError


def test_limit_grows_a_generated_dataset_left_at_its_default_size():
    grown = build_dataset({"name": "shapes", "size": 32, "limit": 130})
    default = build_dataset({"name": "shapes", "size": 32})
    assert len(default) == 100 and len(grown) == 130
    # the same images where both have them: growing only appends
    assert (grown[7].label == default[7].label).all() and grown[7].caption == default[7].caption


def test_limit_beyond_an_explicit_size_is_refused():
    with pytest.raises(BenchError, match=r"data.limit=150 .* only 100 images; use data.num_images=150"):
        build_dataset({"name": "shapes", "size": 32, "num_images": 100, "limit": 150})


def test_limit_beyond_a_fixed_dataset_is_refused():
    with pytest.raises(BenchError, match=r"voc_sim has only \d+ images; use data.limit<="):
        build_dataset({"name": "voc_sim", "size": 32, "limit": 100000})
