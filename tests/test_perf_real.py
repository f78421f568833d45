"""bench.perf_real on the CPU at a tiny size: the SDXL path (today's UNet capture) measures both roles; SD3 and Flux
either measure through the joint-capture adapter or are reported as skipped with the reason (never silently)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.mark.slow  # three tiny denoisers, each timed plain and traced twice: about a minute on a shared CPU
def test_tiny_sdxl_capture_cost_on_cpu(tmp_path):
    from bench.perf_real import main

    assert main(["--tiny", "--size", "64", "--device", "cpu", "--dtype", "float32", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "capture-real-tiny-cpu.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    sdxl = rows["sdxl"]
    assert sdxl["plain_s"] > 0 and sdxl["layers"]["cross"] == sdxl["layers"]["self"] > 0
    for role in ("cross", "self"):
        assert sdxl[role]["traced_s"] > 0 and sdxl[role]["kept_mib"] > 0, sdxl[role]
    for model in ("sd3-medium", "flux"):
        assert "skipped" in rows[model] or rows[model]["cross"]["kept_mib"] > 0, rows[model]
    assert "| sdxl |" in (tmp_path / "capture-real-tiny-cpu.md").read_text()


def test_real_size_inputs_have_the_pipelines_shapes():
    """The random conditioning has the shapes the real pipelines feed (built on the meta device: no memory)."""
    from bench.perf_real import build, inputs

    meta = torch.device("meta")
    sdxl = build("sdxl", meta, torch.bfloat16)
    assert 2.5e9 < sum(p.numel() for p in sdxl.parameters()) < 2.7e9
    kw = inputs("sdxl", sdxl, 1024, torch.device("cpu"), torch.bfloat16)
    assert kw["sample"].shape == (1, 4, 128, 128) and kw["encoder_hidden_states"].shape == (1, 77, 2048)
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
