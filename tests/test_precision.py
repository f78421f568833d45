"""bench.precision: fp32 against bf16 on the CPU, per method (two backbone loads: slow)."""

import pytest


@pytest.mark.slow
def test_precision_report_on_one_image(tmp_path):
    import pandas as pd

    from bench.precision import METHODS_COMPARED, main

    assert main(["--images", "1", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["method"]) == list(METHODS_COMPARED)
    assert ((frame["label_agreement_percent"] > 90) & (frame["label_agreement_percent"] <= 100)).all()
    assert (frame["mIoU_difference"] == frame["mIoU_bfloat16"] - frame["mIoU_fp32"]).all()
    assert "python -m bench.precision --images 1" in (tmp_path / "README.md").read_text()
