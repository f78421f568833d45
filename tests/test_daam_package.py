"""DAAM against the castorini/daam package end to end: the package traces its own generation on a tiny
random-weight SD pipeline (bench.peers.tiny_sd21_pipeline: SD 2.1-base's layout, 512 px, the size daam's hooker
assumes) and this project traces the same prompt, seed and schedule; the raw word heat maps, the normalised maps
at the image size (daam's WordHeatMap.expand_as against `resize=code`) and the masks at tau must agree.

daam pins libraries this project has outgrown (diffusers 0.21, transformers 4.30), so it runs in its own
environment, named by DIFFSEG_DAAM_PYTHON; the test skips with the install command when daam is not importable
there. It never runs in CI (CONTRIBUTING.md lists it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

PROMPT = "a photograph of a dog and a cat"
WORDS = ["dog", "cat"]
STEPS, SEED, TAU = 4, 3, 0.4
INSTALL = ("python3 -m venv venv-daam && venv-daam/bin/pip install torch daam==0.2.0 matplotlib "
           "huggingface_hub==0.25.2 numpy==1.26.4, then DIFFSEG_DAAM_PYTHON=venv-daam/bin/python")

# the package's documented use (README "Using DAAM as a Library"), writing what it computed to an .npz
RELEASE = """
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionPipeline
from daam import set_seed, trace
folder, out, prompt, words, steps, seed, tau = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), \\
    int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
result = {}
with torch.no_grad():
    with trace(pipe) as tc:
        image = pipe(prompt, num_inference_steps=steps, generator=set_seed(seed)).images[0]
        global_map = tc.compute_global_heat_map()
        for word in words:
            word_map = global_map.compute_word_heat_map(word)
            result[word + "/raw"] = word_map.heatmap.float().numpy()
            result[word + "/expanded"] = word_map.expand_as(image).numpy()
            result[word + "/mask"] = word_map.expand_as(image, threshold=tau).numpy() > 0
result["image"] = np.asarray(image)
np.savez(out, **result)
"""


def daam_python() -> str:
    python = os.environ.get("DIFFSEG_DAAM_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import daam"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"daam is not importable by {python}: {INSTALL}")
    return python


@pytest.mark.slow
def test_daam_heat_maps_and_masks_equal_the_package(tmp_path):
    python = daam_python()
    from bench.forward import run_traced
    from bench.models import load_pipeline_folder
    from bench.peers import save_tiny_sd21
    from methods.base import ClassQuery
    from methods.daam import DAAM

    folder = save_tiny_sd21(tmp_path / "pipeline")
    out = tmp_path / "daam.npz"
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, "-c", RELEASE, str(folder), str(out), PROMPT, json.dumps(WORDS), str(STEPS),
                           str(SEED), str(TAU)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "newly initialized" not in proc.stderr, "daam's environment left part of the pipeline random"
    release = dict(np.load(out, allow_pickle=False))

    backbone = load_pipeline_folder(folder, torch.device("cpu"), torch.float32, "tiny-sd21")
    method = DAAM(backbone)
    cfg = DAAM.resolve({"mode": "generation", "steps": STEPS, "guidance": 7.5, "tau": TAU, "tie_rule": "argmax"})
    trace = run_traced(backbone, method.trace_request(cfg), method.forward_setting(cfg, SEED), [PROMPT]).traces[0]
    assert np.abs(trace.image.astype(int) - release["image"].astype(int)).max() <= 1  # the same generation
    query = ClassQuery([1, 2], WORDS)
    raw = method.heatmaps(trace, query, cfg).numpy()
    pred = method.predict(trace, query, cfg, (512, 512))
    for k, word in enumerate(WORDS):
        want = release[word + "/raw"]
        assert np.abs(raw[k] - want).max() <= 1e-5 * np.abs(want).max(), word
        assert np.abs(pred.scores[k].numpy() - release[word + "/expanded"]).max() < 1e-4, word
        ours, theirs = pred.scores[k].numpy() > TAU, release[word + "/mask"]
        assert (ours & theirs).sum() / max((ours | theirs).sum(), 1) >= 0.999, word
