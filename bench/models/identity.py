"""What weights a fit learned against, as a short digest: part of the fit directory's hash (bench.plan.fit_hash).

A fit trained on one CLIP, SAM or UNet is wrong for another, and the config alone does not say which weights
`clip=embedded`, `model.name=embedded` or `model.path=/models/sd` held when the fit ran: the shipped folders are
retrained (the tiny CLIP went from 800 to 2,400 steps), a local folder is replaced in place. Without this, a
resumed run or `fit.from=` would lend a fit made against other weights, silently.

A folder's identity covers its configs and weight files (names and contents). Contents are hashed for files up
to 64 MiB (the embedded world: a few MB, milliseconds); larger files are named by the Hugging Face cache blob
they link to (its file name is the content's hash) or else by size and modification time, so a 5 GB UNet is not
read at planning time.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".txt", ".model")
HASH_CONTENT_BELOW = 64 * 2**20


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    p = Path(path)
    if p.is_symlink() and "blobs" in p.resolve().parts:  # a Hugging Face cache snapshot: blob name = content hash
        return p.resolve().name
    if size > HASH_CONTENT_BELOW:
        return f"{size}:{mtime_ns}"
    return hashlib.sha256(p.read_bytes()).hexdigest()


def folder_identity(folder: str | Path) -> str:
    """16 hex digits naming the weights and configs under `folder` (see the module's docstring)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        stat = path.stat()
        digest.update(str(path.relative_to(root)).encode())
        digest.update(_file_digest(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def model_identity(model_cfg: dict) -> str:
    """The backbone's weights (`model.*`): a folder's identity, or the seed of random weights built in-process."""
    from bench.embedded import shipped_folder
    from bench.models import model_folder_path, model_kind

    if model_cfg.get("random") or model_kind(model_cfg) in ("sd21-base-arch", "sd3-medium-arch"):
        return f"random:{model_kind(model_cfg)}"
    if model_cfg.get("path") or model_cfg.get("id"):
        return folder_identity(model_folder_path(model_cfg))
    folder = shipped_folder()
    return folder_identity(folder) if folder is not None else "random:embedded"
