"""A fit is named by the weights it learned against, not only by its config (bench.models.identity)."""

import shutil

from bench.embedded.clip import shipped_clip
from bench.models.identity import folder_identity, model_identity
from methods.dedos import Dedos


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_folder_identity_follows_weight_files_only(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    first = folder_identity(tmp_path)
    (tmp_path / "README.md").write_text("notes")  # not a weight or config file
    assert folder_identity(tmp_path) == first
    _flip_last_byte(tmp_path / "model.safetensors")
    assert folder_identity(tmp_path) != first
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    assert folder_identity(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert folder_identity(tmp_path) != first


def test_model_identity_of_a_folder_and_of_random_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\1" * 32)
    first = model_identity({"name": "embedded", "path": str(tmp_path)})
    _flip_last_byte(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert model_identity({"name": "embedded", "path": str(tmp_path)}) != first
    assert model_identity({"name": "embedded", "random": True}) == "random:embedded"


def test_dedos_fit_depends_on_the_clip_weights(tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(shipped_clip(), clip)
    method = Dedos()
    setting = method.train_setting(Dedos.resolve({"clip": str(clip)}))
    _flip_last_byte(clip / "model.safetensors")
    changed = method.train_setting(Dedos.resolve({"clip": str(clip)}))
    assert setting.values == changed.values and setting.as_dict() != changed.as_dict()
    assert setting.as_dict()["weights"]["clip"] == folder_identity(shipped_clip())


def test_freegen_fit_depends_on_the_sam_weights_it_learns_from(tmp_path):
    from bench.models.sam import EMBEDDED_SAM
    from methods.freegen import FreeGen

    sam = tmp_path / "sam"
    shutil.copytree(EMBEDDED_SAM, sam)
    method = FreeGen()
    cfg = {"asr": "learned", "asr_targets": "sam", "sam": str(sam)}
    setting = method.train_setting(FreeGen.resolve(cfg))
    _flip_last_byte(sam / "model.safetensors")
    assert method.train_setting(FreeGen.resolve(cfg)).as_dict() != setting.as_dict()
