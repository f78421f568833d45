"""Capture memory of the joint-attention processors (bench.trace_joint): a traced layer costs at most twice the
attention it keeps beyond the plain layer, as for the UNet processors (tests/test_capture_memory.py).

Measured on one joint layer with SD's 64x64 token grid (4096 image tokens, 5 heads of 64: the bound's reference
size) and 77 + 256 text tokens (SD3's CLIP + T5 sequence), keeping both roles head-averaged: the image->image block
(64 MiB in fp32) and the image->text block of the 77 CLIP columns. The full joint matrix of that layer would be
5 x 4429^2 x 4 B = 374 MiB per image; materialising it breaks the bound. The resident-memory sampler of
bench.perf runs in a fresh interpreter (see tests/test_capture_memory.py for why)."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

N_IMG, N_TXT, COLS = 4096, 77 + 256, 77
KEPT = N_IMG * N_IMG * 4 + N_IMG * COLS * 4  # head means, fp32


def _measure(kind: str) -> dict[str, int]:
    import torch
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    from bench.perf import RssPeak
    from bench.capture import _Recorder, request
    from bench.trace_joint import FluxCaptureProcessor, JointCaptureProcessor

    torch.manual_seed(0)
    dim = 320
    if kind == "sd3":
        attn = Attention(query_dim=dim, added_kv_proj_dim=dim, dim_head=64, heads=5, out_dim=dim, bias=True,
                         context_pre_only=False,
                         qk_norm="rms_norm", eps=1e-6, processor=JointAttnProcessor2_0()).eval()
        stock, capture = JointAttnProcessor2_0, JointCaptureProcessor
    else:
        attn = FluxAttention(query_dim=dim, heads=5, dim_head=64, added_kv_proj_dim=dim, bias=True,
                             eps=1e-6, processor=FluxAttnProcessor()).eval()
        stock, capture = FluxAttnProcessor, FluxCaptureProcessor
    x, text = torch.randn(1, N_IMG, dim), torch.randn(1, N_TXT, dim)
    recorder = _Recorder(request(cross=["layer"], self_attn=["layer"]))
    recorder.latent_size, recorder.text_columns = (64, 64), slice(0, COLS)

    def plain():
        attn.set_processor(stock())
        return attn(x, encoder_hidden_states=text)

    def traced():
        attn.set_processor(capture(recorder, "layer", {"cross", "self_attn"}))
        out = attn(x, encoder_hidden_states=text)
        for kept in recorder.data.values():  # what was kept is counted by the bound, not held across runs
            kept.clear()
        return out

    RssPeak()
    with torch.no_grad():
        for fn in (plain, traced):
            fn()
        gc.collect()
        peaks = {}
        for name, fn in (("plain", plain), ("traced", traced), ("plain2", plain), ("traced2", traced)):
            with RssPeak() as rss:
                out = fn()
            del out
            peaks[name] = rss.extra
    return peaks


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_traced_joint_layer_peak_within_plain_plus_twice_kept(kind):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, __file__, kind], env=env, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    traced_peak = min(peaks["traced"], peaks["traced2"])
    plain_peak = max(peaks["plain"], peaks["plain2"])
    assert traced_peak <= plain_peak + 2 * KEPT, {k: v / 2**20 for k, v in peaks.items()}


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1])))
