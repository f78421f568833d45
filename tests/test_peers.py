"""The peer-comparison driver (bench.peers) without the releases: the options it claims match them are valid
configurations of this project, its inputs are deterministic, and a bad argument is a one-line error, exit 2.
The comparison itself runs by hand (docs/peers.md; reports/peers is its committed result)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import peers


def test_matching_options_resolve():
    from methods.base import ClassQuery
    from methods.iseg import ISeg
    from methods.ovam import OVAM

    for setting in peers.ISEG_SETTINGS:
        cfg = ISeg.resolve({**peers.ISEG_COMMON, **setting["project"]})
        assert cfg["variant"] == "code" and cfg["tie_rule"] == "argmax"
    prompt = ISeg(None).prompt(ClassQuery([8, 12], ["cat", "dog"]), None, ISeg.resolve(peers.ISEG_COMMON))
    assert prompt.startswith("a photograph of cat and dog and other object and background, ground, land")  # release's
    OVAM.resolve({"mode": "generation", "branch": "uncond", "pad": False, "binarise": "code", "crf": False,
                  "tie_rule": "argmax", "attribution": peers.OVAM_COMMON["attribution"]})


def test_synthetic_images_are_seeded_and_labelled():
    a, label = peers.synthetic_image((40, 50), [(3, "bird"), (16, "potted plant")], seed=1)
    b, _ = peers.synthetic_image((40, 50), [(3, "bird"), (16, "potted plant")], seed=1)
    assert a.shape == (40, 50, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert set(np.unique(label)) == {0, 3, 16}


def test_checkpoint_formats_for_the_pinned_libraries(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    vae = tmp_path / "vae"
    vae.mkdir()
    save_file({"encoder.mid_block.attentions.0.to_q.weight": torch.ones(2, 2),
               "encoder.mid_block.attentions.0.to_out.0.bias": torch.zeros(2),
               "encoder.conv_in.weight": torch.ones(1)}, vae / "diffusion_pytorch_model.safetensors")
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    peers.legacy_vae(vae, tmp_path / "legacy")
    keys = set(load_file(tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"))
    assert keys == {"encoder.mid_block.attentions.0.query.weight", "encoder.mid_block.attentions.0.proj_attn.bias",
                    "encoder.conv_in.weight"}
    text = tmp_path / "text"
    text.mkdir()
    save_file({"embeddings.token_embedding.weight": torch.ones(2)}, text / "model.safetensors")
    peers.prefixed_text_encoder(text)
    assert set(load_file(text / "model.safetensors")) == {"text_model.embeddings.token_embedding.weight"}


@pytest.mark.parametrize("args, fix", [
    (["--iseg-repo", "/nonexistent", "--iseg-python", "x", "--ovam-repo", ".", "--ovam-python", "y"],
     "fetch the repository"),
    (["--iseg-repo", ".", "--iseg-python", "/nonexistent/python", "--ovam-repo", ".", "--ovam-python", "y"],
     "release environment's interpreter"),
])
def test_bad_arguments_exit_2_with_the_fix(args, fix, capsys):
    assert peers.main(args) == 2
    err = capsys.readouterr().err
    assert fix in err and len(err.strip().splitlines()) == 1
