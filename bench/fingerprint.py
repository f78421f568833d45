"""Fingerprints of a run's inputs, so that a resume (and `fit.from=`) never mixes results of different weights or
data: the model folder, the evaluated images and masks, and the data fits learn from.

    {"model": {"kind": "files", "files": {"unet/diffusion_pytorch_model.safetensors": [size, hash], ...}},
     "data": {"kind": "files", "mode": "full", "files": {"JPEGImages/2007_000001.jpg": [size, hash], ...}},
     "train_data": {...}}                                  (only where the sweep fits)

What is hashed:
  - model: every file of the diffusers folder (weights, configs, tokenizer), by content. A `model.id` from the
    Hugging Face cache is its snapshot's commit hash instead ({"kind": "hf", "commit": ...}): hashing gigabytes
    of hub weights would cost more than the run's start, and the hub's commit names the content already.
  - data: the files the dataset opens (every image and mask; `record_opened` while preflight reads each image
    once), plus the files its options name (`captions`, `image_list`). A generated dataset (shapes) opens none:
    its options are in the configuration, which is checked already.
  - train_data: every file under the training data's `root` and the files its options name (fits read the
    training split inside Ray Train workers, so the files are listed, not recorded).

A file's hash is blake2b-128 over its whole content ("full"). Where a set of files holds more than
SAMPLE_ABOVE_BYTES in all, each file's hash covers only its size and three SAMPLE_BYTES blocks (head, middle,
tail) ("sampled"): what catches an in-place edit there is that replacing an image or a mask by another one
rewrites the head (a JPEG's quantisation tables and first scan, a PNG's header and first IDAT chunk; a
re-encoded mask recompresses the whole IDAT stream) and almost always the size; a same-size byte patch confined
to the unsampled middle of one file is what it misses.

Hashes are cached node-locally (FINGERPRINT_CACHE_ENV, default `$XDG_CACHE_HOME/diffseg-bench/fingerprints.db`)
by (path, size, mtime_ns, ctime_ns, inode): the ctime and inode change on every write and every replacement,
also where a copy keeps the old mtime (`cp -p`, `rsync -a`); a file changed within the last 2 s is never cached
(a second write within the clock's granularity could keep all five). `node_fingerprint` is what a per-node
probe calls: the same fingerprint computed on the node it runs on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

from bench.errors import BenchError

log = logging.getLogger(__name__)
FINGERPRINT_CACHE_ENV = "BENCH_FINGERPRINT_CACHE"
SAMPLE_ABOVE_BYTES = 4 << 30  # a set of files larger than this is hashed by samples of each file
SAMPLE_BYTES = 64 << 10
CHUNK = 1 << 20
RECENT_SECONDS = 2.0  # a file changed more recently than this is hashed but not cached
DATA_PATH_OPTIONS = ("captions", "image_list")  # dataset options that name one file
HF_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


# -- hashing one file, cached -----------------------------------------------------------------------------------------
def _cache_path() -> Path:
    given = os.environ.get(FINGERPRINT_CACHE_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffseg-bench" / "fingerprints.db"


class HashCache:
    """The node-local cache of file hashes (sqlite: safe under concurrent processes); unusable -> no caching."""

    def __init__(self, path: Path | None = None):
        self.db = None
        try:
            path = path or _cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=5.0)
            self.db.execute("CREATE TABLE IF NOT EXISTS hashes (key TEXT PRIMARY KEY, digest TEXT)")
        except (OSError, sqlite3.Error):
            self.db = None

    def get(self, key: str) -> str | None:
        if self.db is None:
            return None
        try:
            row = self.db.execute("SELECT digest FROM hashes WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row else None

    def put(self, key: str, digest: str) -> None:
        if self.db is None:
            return
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?)", (key, digest))
        except sqlite3.Error:
            pass  # a full disk or a locked database: the hash is simply not cached

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def _digest(path: Path, size: int, sampled: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if sampled and size > 3 * SAMPLE_BYTES:
            h.update(size.to_bytes(8, "little"))
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BYTES))
        else:
            while block := fh.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def file_hash(path: Path, sampled: bool = False, cache: HashCache | None = None) -> tuple[int, str]:
    """(size, hash) of one file, from the cache where the file is unchanged since it was hashed."""
    st = os.stat(path)
    key = json.dumps([str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sampled])
    digest = cache.get(key) if cache else None
    if digest is None:
        digest = _digest(Path(path), st.st_size, sampled)
        if cache and time.time() - max(st.st_mtime, st.st_ctime) > RECENT_SECONDS:
            cache.put(key, digest)
    return st.st_size, digest


def files_fingerprint(files: dict[str, Path], cache: HashCache | None = None) -> dict:
    """{"kind": "files", "mode": "full" | "sampled", "files": {name: [size, hash]}} of named files."""
    sizes = {}
    for name, path in files.items():
        try:
            sizes[name] = os.stat(path).st_size
        except OSError:
            sizes[name] = None
    sampled = sum(s or 0 for s in sizes.values()) > SAMPLE_ABOVE_BYTES
    own = cache is None
    cache = cache or HashCache()
    try:
        out = {}
        for name in sorted(files):
            if sizes[name] is None:
                out[name] = [None, "missing"]
                continue
            size, digest = file_hash(files[name], sampled, cache)
            out[name] = [size, digest]
    finally:
        if own:
            cache.close()
    return {"kind": "files", "mode": "sampled" if sampled else "full", "files": out}


def folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file under `folder` (hidden files and folders left out), by its path relative to it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                out[path.relative_to(folder).as_posix()] = path
    return out


# -- the inputs of a run -----------------------------------------------------------------------------------------------
def model_fingerprint(folder: Path | None, cache: HashCache | None = None) -> dict:
    """The model folder's fingerprint (see the module docstring); the random in-process model has none."""
    if folder is None:
        return {"kind": "none"}
    resolved = Path(folder).resolve() if Path(folder).exists() else Path(folder)
    match = HF_SNAPSHOT.search(Path(folder).as_posix()) or HF_SNAPSHOT.search(resolved.as_posix())
    if match:
        return {"kind": "hf", "repo": match["repo"].replace("--", "/"), "commit": match["commit"]}
    return files_fingerprint(folder_files(Path(folder)), cache)


def _relative(paths: list[Path]) -> dict[str, Path]:
    """Files named relative to their common folder (a dataset moved as a whole keeps its fingerprint)."""
    unique = sorted({Path(p).absolute() for p in paths})
    if not unique:
        return {}
    base = Path(os.path.commonpath([p.parent for p in unique]))
    return {p.relative_to(base).as_posix(): p for p in unique}


def _local_options(options: dict) -> dict:
    """Stored (URI) paths among the options as their node-local copies: the files the dataset read
    (bench.data.local_options)."""
    from bench.data import local_options

    return local_options(options)


def data_fingerprint(opened: list[Path], data_cfg: dict, cache: HashCache | None = None) -> dict:
    """The evaluated dataset's fingerprint: the files it opened and the files its options name."""
    files = _relative(list(opened))
    data_cfg = _local_options(data_cfg)
    for key in DATA_PATH_OPTIONS:
        value = data_cfg.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().is_file():
            files[f"<{key}>"] = Path(value).expanduser()
    if not files:
        return {"kind": "generated"}
    return files_fingerprint(files, cache)


def train_data_fingerprint(train_cfg: dict, cache: HashCache | None = None) -> dict:
    """The training data's fingerprint: every file under its `root` and the files its options name."""
    files = {}
    train_cfg = _local_options(train_cfg)
    root = train_cfg.get("root")
    if isinstance(root, str) and root and Path(root).expanduser().is_dir():
        files.update(folder_files(Path(root).expanduser()))
    for key in DATA_PATH_OPTIONS:
        value = train_cfg.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().is_file():
            files[f"<{key}>"] = Path(value).expanduser()
    return files_fingerprint(files, cache) if files else {"kind": "generated"}


@contextlib.contextmanager
def record_opened():
    """Collect the paths PIL opens meanwhile (the dataset's images and masks, read once by preflight)."""
    from PIL import Image

    opened: list[Path] = []
    original = Image.open

    def recording(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            opened.append(Path(fp))
        return original(fp, *args, **kwargs)

    Image.open = recording
    try:
        yield opened
    finally:
        Image.open = original


def input_fingerprints(model_folder: Path | None, data_cfg: dict, opened: list[Path],
                       train_cfg: dict | None = None) -> dict:
    """Everything a run's results depend on besides its configuration (see the module docstring)."""
    cache = HashCache()
    try:
        out = {"model": model_fingerprint(model_folder, cache), "data": data_fingerprint(opened, data_cfg, cache)}
        if train_cfg is not None:
            out["train_data"] = train_data_fingerprint(train_cfg, cache)
        return out
    finally:
        cache.close()


def node_fingerprint(model_folder: str | None, data_files: list[str] | None = None, data_cfg: dict | None = None,
                     train_cfg: dict | None = None) -> dict:
    """For a per-node probe (a Ray task on each node): the inputs' fingerprints as that node sees them, keyed as
    `input_fingerprints` keys them: the model folder's; the dataset's where `data_files` (the absolute paths the
    driver's dataset opened) are given, with `data_cfg`'s named files; the training data's where `train_cfg` is
    given. Compare them with `changed_inputs` against the driver's."""
    cache = HashCache()
    try:
        out = {"model": model_fingerprint(Path(model_folder) if model_folder else None, cache)}
        if data_files is not None:
            out["data"] = data_fingerprint([Path(p) for p in data_files], data_cfg or {}, cache)
        if train_cfg is not None:
            out["train_data"] = train_data_fingerprint(train_cfg, cache)
        return out
    finally:
        cache.close()


def absolute_options(options: dict, keys=("root", *DATA_PATH_OPTIONS)) -> dict:
    """A dataset's options with its local paths (root, captions, image_list) made absolute, so that a process
    with another working directory (a task on another node) finds the same files."""
    out = dict(options)
    for key in keys:
        value = out.get(key)
        if isinstance(value, str) and value and "://" not in value:
            out[key] = str(Path(value).expanduser().absolute())
    return out


def listing_fingerprint(listing: dict[str, list]) -> dict:
    """A stored folder's fingerprint from its listing alone ({relative path: [size, version, ...]}, the version
    being an ETag or a modification time: bench.node_cache.stored_listing), no content read: what keys its
    node-local copy, and what every node compares before the run (a node seeing another version of it)."""
    entries = {rel: list(entry[:2]) for rel, entry in sorted(listing.items())}
    key = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:32]
    return {"kind": "listing", "key": key, "files": len(entries)}


# -- comparing ---------------------------------------------------------------------------------------------------------
LABELS = {"model": "the model", "data": "the dataset", "train_data": "the training data"}


def _component_changes(before: dict, now: dict) -> str | None:
    if before == now:
        return None
    if before.get("kind") != "files" or now.get("kind") != "files":
        if before.get("kind") == now.get("kind") == "listing":
            return f"stored version {before.get('key', '?')[:12]} -> {now.get('key', '?')[:12]}"
        if before.get("kind") == now.get("kind") == "hf":
            return f"snapshot {before.get('commit', '?')[:12]} -> {now.get('commit', '?')[:12]}"
        return f"{before.get('kind')} -> {now.get('kind')}"
    a, b = before.get("files", {}), now.get("files", {})
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    parts = []
    for label, names in (("changed", changed), ("added", added), ("removed", removed)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{label} {', '.join(names[:3])}{more}")
    return "; ".join(parts) or "hashed another way"


def changed_inputs(before: dict | None, now: dict, keys=("model", "data", "train_data")) -> list[str]:
    """What differs between two fingerprints, one phrase per input ("the model: changed unet/x.safetensors");
    inputs recorded on one side only are not compared (an older record, or a sweep without fits)."""
    out = []
    if not isinstance(before, dict):
        return out
    for key in keys:
        if key in before and key in now and isinstance(before[key], dict):
            change = _component_changes(before[key], now[key])
            if change:
                out.append(f"{LABELS[key]}: {change}")
    return out


def refuse_changed_resume(recorded: dict | None, now: dict | None, work: Path) -> None:
    """A resume whose inputs changed since the run started: one line naming what changed."""
    if now is None:
        return
    changes = changed_inputs(recorded, now)
    if changes:
        raise BenchError(f"the inputs of the interrupted run in {work} changed since it started "
                         f"({'; '.join(changes)}); restore them, or choose another output_dir= to start afresh")


def recorded_inputs(run_dir) -> dict | None:
    """The input fingerprints a run recorded: run.json of a finished run, work/started.json of an unfinished one
    (`run_dir` a local path or a URI: bench.storage)."""
    from bench.storage import Location

    run = Location.of(run_dir)
    for path, key in ((run / "run.json", "inputs"), (run / "work" / "started.json", "inputs")):
        try:
            value = json.loads(path.read_bytes()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def refuse_changed_fit_source(source, now: dict | None) -> None:
    """`fit.from=` reuses fits only where they learned from the same model and training data as this run
    (`source` a run or one of its fit directories, a local path or a URI)."""
    from bench.storage import Location

    if now is None:
        return
    loc = Location.of(source)
    run_dir = loc if not (loc / "done").is_file() else loc.parent.parent
    recorded = recorded_inputs(run_dir)
    changes = changed_inputs(recorded, now, keys=("model", "train_data"))
    if changes:
        raise BenchError(f"fit.from={source} was fitted on other inputs than this run's ({'; '.join(changes)}); "
                         f"fit again without fit.from, or restore the inputs")
