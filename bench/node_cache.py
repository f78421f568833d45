"""Model folders and dataset files on object storage (`model.path=s3://...`, `data.root=s3://...`), copied once
per node into a node-local cache and read from there by the ordinary local-path code.

Nodes of a cluster share no filesystem, so every node (the driver, each tracing actor's, each Ray Train worker's)
needs its own copy. The copy is keyed by the stored folder's fingerprint, computed from its listing without
reading any content (bench.fingerprint.listing_fingerprint: every object's relative path, size and version, the
version being S3's ETag where boto3 lists it, else the store's modification time): a changed folder is a new
key, so a new copy, and a stale copy is never read. Where it lives:

    $DIFFSEG_CACHE (default $XDG_CACHE_HOME/diffseg-bench, i.e. ~/.cache/diffseg-bench)
        models/<key>/       a model folder, as stored
        models/<key>.json   its manifest (the URI, the listing): written last, so a copy without it is unfinished
        data/<key>/ ...     a dataset root (or one file: captions, image_list), the same way

Concurrent processes of one node (several actors starting at once) copy once: the copy is made under an
exclusive lock (`<key>.lock`, flock) into a staging folder, verified (every listed file at its listed size, and
with its MD5 where the listed ETag is one) and renamed into place whole; a second process waits for the lock and
then finds the finished copy. Nothing is ever removed from the cache: eviction is the user's (delete folders
under it; a missing one is fetched again).

Datasets are mirrored whole (the root's every file), like models, and not file by file as a run opens them:
the layouts list folders and read split files before they open an image, preflight opens every image of the
evaluated split, a fit reads the training split, and one key over the whole listing tells in one listing call
whether the node's copy is current; a root holding much more than the run reads is better pointed at a prefix
holding only what it needs (docs: Running on a cluster).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.errors import BenchError
from bench.storage import Location, is_uri

log = logging.getLogger(__name__)
CACHE_ENV = "DIFFSEG_CACHE"
COPY_THREADS = 8  # objects fetched at once (a dataset is many small objects: latency, not bandwidth, bounds it)
CHUNK = 8 << 20
MD5_ETAG = re.compile(r"[0-9a-f]{32}")  # a multipart upload's ETag ends in -<parts>: not the content's MD5
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}  # the cache's disk, not the store


def cache_root() -> Path:
    """The node-local cache folder ($DIFFSEG_CACHE, else $XDG_CACHE_HOME/diffseg-bench)."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffseg-bench"


def _unreachable(option: str, uri: str, err: Exception) -> BenchError:
    return BenchError(f"{option}={uri} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:160]}); "
                      f"check the URI, the endpoint and the credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")


def _s3_versions(loc: Location) -> dict[str, str] | None:
    """ETag of every object under an s3:// prefix (boto3, endpoint and credentials from the environment); None
    where boto3 is missing or the URI carries its own options (`?endpoint_override=`), which boto3 would not read."""
    if loc.scheme != "s3" or "?" in loc.uri:
        return None
    try:
        import boto3
    except ImportError:
        return None
    bucket, _, prefix = loc.path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out = {}
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix):]] = item["ETag"].strip('"')
    return out


def read_listing(uri: str) -> dict[str, list]:
    """{relative path: [size, version, mtime]} of every object under `uri` (a folder; or one file, keyed "");
    {} where nothing is there. The store's own errors propagate (see stored_listing)."""
    from pyarrow.fs import FileSelector, FileType

    loc = Location.of(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == FileType.File:
        infos, base, versions = [info], None, None
    else:
        infos = loc.fs.get_file_info(FileSelector(loc.path, allow_not_found=True, recursive=True))
        base, versions = loc.path, _s3_versions(loc)
    listing = {}
    for item in infos:
        if item.type == FileType.File:
            rel = "" if base is None else item.path[len(base) + 1:]
            version = (versions or {}).get(rel) if base is not None else None
            mtime = item.mtime.timestamp() if item.mtime is not None else None
            listing[rel] = [item.size, version or item.mtime_ns, mtime]
    return listing


def stored_listing(uri: str, option: str) -> dict[str, list]:
    """read_listing, or a BenchError naming `option`, the URI and the fix where nothing is there or the store
    does not answer."""
    try:
        listing = read_listing(uri)
    except BenchError:
        raise
    except Exception as err:  # noqa: BLE001 (pyarrow and boto3 raise OSError, ClientError, ...: one line)
        raise _unreachable(option, uri, err) from None
    if not listing:
        raise BenchError(f"{option}={uri} holds nothing (no such bucket, folder or file); check the URI, or upload "
                         f"the folder there first")
    return listing


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # held while one process copies; the others wait here, then reuse
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _copy_one(loc: Location, target: Path, size: int, version, mtime: float | None) -> None:
    """One object into `target`, checked against its listing: its size, and its content where the version is
    S3's ETag of a single-part upload (the MD5 of the content)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5(usedforsecurity=False)
    with loc.fs.open_input_stream(loc.path) as src, open(target, "wb") as dst:
        while block := src.read(CHUNK):
            md5.update(block)
            dst.write(block)
    got = target.stat().st_size
    if got != size:
        raise OSError(f"{loc.uri} arrived with {got} bytes, listed as {size}")
    if isinstance(version, str) and MD5_ETAG.fullmatch(version) and md5.hexdigest() != version:
        raise OSError(f"{loc.uri} arrived with another content than its ETag {version} (changed while copied?)")
    if mtime is not None:  # the store's time: a copy's files look alike on every node (bench.models.identity)
        os.utime(target, (mtime, mtime))


def _same(a: dict, b: dict) -> bool:
    """Two listings of the same content: paths, sizes and versions (a rewrite with the same ETag is the same)."""
    return {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}


def _complete(folder: Path, manifest: Path, listing: dict) -> bool:
    """A finished copy: its manifest (written last) names this listing, and every file has its listed size."""
    try:
        if not _same(json.loads(manifest.read_text()).get("listing") or {}, listing):
            return False
        return all((folder / rel if rel else folder / "file").stat().st_size == entry[0]
                   for rel, entry in listing.items())
    except (OSError, ValueError):
        return False


def node_copy(uri: str, kind: str, option: str) -> Path:
    """The node-local copy of the stored folder (or file) `uri`, fetched on first use on this node (see the
    module docstring); `kind` is the cache's subfolder (models, data), `option` names the setting in errors.
    A single file comes back as its path inside the copy's folder."""
    from bench.fingerprint import listing_fingerprint

    listing = stored_listing(uri, option)
    key = listing_fingerprint(listing)["key"]
    root = cache_root() / kind
    folder, manifest = root / key, root / f"{key}.json"
    single = list(listing) == [""]
    result = folder / "file" if single else folder
    if _complete(folder, manifest, listing):
        return result
    try:
        with _locked(root / f"{key}.lock"):
            if _complete(folder, manifest, listing):  # another process of this node copied it meanwhile
                return result
            staging = root / f".{key}.staging-{os.getpid()}"
            loc = Location.of(uri)
            log.info("copying %s (%d files) into the node cache %s", uri, len(listing), folder)
            for stale in root.glob(f".{key}.staging-*"):  # of processes killed while copying (the lock is ours)
                shutil.rmtree(stale, ignore_errors=True)
            jobs = [(loc if single else loc / rel, staging / ("file" if single else rel), *entry)
                    for rel, entry in listing.items()]
            try:
                with ThreadPoolExecutor(COPY_THREADS) as pool:
                    list(pool.map(lambda job: _copy_one(*job), jobs))
                shutil.rmtree(folder, ignore_errors=True)  # an unfinished copy of an earlier, killed process
                os.replace(staging, folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            tmp = root / f".{key}.json.{os.getpid()}"
            tmp.write_text(json.dumps({"uri": uri, "listing": listing}))
            os.replace(tmp, manifest)
    except BenchError:
        raise
    except Exception as err:  # noqa: BLE001 (pyarrow raises OSError, ArrowInvalid ...: one line either way)
        where = str(getattr(err, "filename", None) or "")
        local = isinstance(err, OSError) and (err.errno in LOCAL_ERRNOS or bool(where) and (
            where.startswith(str(root)) or str(root).startswith(where)))  # in the cache, or above it
        if local:
            raise BenchError(f"{option}={uri}: cannot copy it into the node cache {root} ({err.strerror or err}); "
                             f"free space there or point {CACHE_ENV} at a writable local disk") from None
        raise _unreachable(option, uri, err) from None
    return result


def local_path(value: str | os.PathLike, kind: str, option: str) -> Path:
    """A setting's local path: itself where it is one (`~` expanded), its node-local copy where it is a URI."""
    text = os.fspath(value)
    if is_uri(text) and not Location.of(text).is_local:
        return node_copy(text, kind, option)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser()
