"""Where a run keeps its bytes: one `Location` type over `pyarrow.fs`, the library Ray itself uses for
`storage_path`. A local path is a `LocalFileSystem` location (the same code); `s3://`, `gs://`, `hdfs://` and
anything `pyarrow.fs.FileSystem.from_uri` resolves is an object-store location. Endpoint and credentials come
from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`; `GOOGLE_APPLICATION_CREDENTIALS`), as for Ray and boto3.

What each kind offers the run contract (bench.rundir):
    whole files         local: written under a hidden temporary name and renamed; object stores: one PUT
                        (an object appears whole or not at all)
    exclusive create    local: O_CREAT|O_EXCL; s3: a conditional PUT (`If-None-Match: *`, through boto3,
                        since pyarrow has no conditional write); gs: a generation precondition
                        (`if_generation_match=0`, through google-cloud-storage); other schemes: refused
    publication         local: a staged folder renamed whole; object stores have no rename, so a finished
                        run is the prefix holding the completion marker (`complete.json`, written last)

Only what a run keeps goes here; hot scratch (a search's trace cache, a shard being serialised) stays on the
node's own disk (`scratch_dir`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError

COMPLETE = "complete.json"  # an object-store run's completion marker (its own file list), written last
STORAGE_ENV = "DIFFSEG_STORAGE"  # where runs go without output_dir= (a path or a URI), as Ray's storage_path


def is_uri(target: str | os.PathLike | None) -> bool:
    """`scheme://...` (s3://, gs://, file://, ...), not a local path."""
    return isinstance(target, str) and "://" in target and not target.startswith("/")


class Location:
    """A file or folder on a pyarrow filesystem: `fs` and `path` (the filesystem's own path, no scheme)."""

    def __init__(self, fs, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path.rstrip("/") or path, uri.rstrip("/") or uri

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def of(cls, target: str | os.PathLike) -> Location:
        """A local path (relative: to the working directory) or a URI. An unknown scheme or a store that cannot
        be reached is a BenchError naming the fix."""
        from pyarrow import fs as pafs

        if isinstance(target, Location):
            return target
        text = os.fspath(target)
        if not is_uri(text):
            path = Path(text).expanduser().absolute()
            return cls(pafs.LocalFileSystem(), str(path), str(path))
        if text.startswith("file://"):
            return cls.of(text[len("file://"):])
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as err:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ...)
            raise BenchError(f"{text} cannot be opened as storage ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}); give a local path or an s3://, gs:// URI "
                             f"(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
        return cls(fs, path, text)

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    @property
    def scheme(self) -> str:
        return "file" if self.is_local else self.uri.split("://", 1)[0]

    @property
    def local(self) -> Path:
        """The local path (a local location only)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rsplit("/", 1)[0], self.uri.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # Ray ships locations to workers: the filesystem pickles itself (pyarrow)
        return (Location, (self.fs, self.path, self.uri))

    # -- queries ------------------------------------------------------------------------------------------------------
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        if self.is_local:
            return os.path.lexists(self.path)
        if self._info().type != FileType.NotFound:
            return True
        return self.is_dir()

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def is_dir(self) -> bool:
        """A local folder; on an object store, a prefix holding at least one object."""
        from pyarrow.fs import FileSelector, FileType

        if self.is_local:
            return os.path.isdir(self.path)
        if self._info().type == FileType.Directory:
            try:
                return bool(self.fs.get_file_info(FileSelector(self.path, recursive=False)))
            except (FileNotFoundError, OSError):
                return False
        return False

    def names(self, pattern: str = "*") -> list[str]:
        """Names of the entries directly below, matching `pattern`, sorted; [] where there is no folder."""
        from pyarrow.fs import FileSelector

        try:
            infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True, recursive=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.base_name for i in infos if fnmatch.fnmatchcase(i.base_name, pattern))

    def files(self) -> list[str]:
        """Every file below, as paths relative to this folder, sorted."""
        from pyarrow.fs import FileSelector, FileType

        try:
            infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True, recursive=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.path[len(self.path) + 1:] for i in infos if i.type == FileType.File)

    def mtime(self) -> float | None:
        info = self._info()
        return info.mtime.timestamp() if info.mtime is not None else None

    # -- whole files ----------------------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self):
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Write the file whole or not at all (local: a hidden temporary name renamed; object store: one PUT)."""
        if self.is_local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(data)
                tmp.replace(path)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk or a kill: the old file stays whole, no partial one
                raise
            return
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, data) -> None:
        self.write_bytes(json.dumps(data, indent=2, default=str).encode())

    def create_exclusive(self, data: bytes) -> bool:
        """Create the file with `data` only if it does not exist: True if this call created it, False if it
        existed. Local: O_EXCL; s3: `If-None-Match: *`; gs: `if_generation_match=0` (see the module docstring)."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        if self.scheme == "s3":
            return _s3_create_exclusive(self.path, data)
        if self.scheme in ("gs", "gcs"):
            return _gcs_create_exclusive(self.path, data)
        raise BenchError(f"{self.uri}: {self.scheme}:// offers no create-if-absent, so two runs could claim the "
                         f"same directory; use s3://, gs:// or a shared mount for output_dir=")

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except (FileNotFoundError, OSError):
            pass

    def rmtree(self) -> None:
        """Remove the folder and everything below (no error where there is none)."""
        from pyarrow.fs import FileType

        try:
            kind = self._info().type
            if kind == FileType.File:
                self.fs.delete_file(self.path)
            elif kind == FileType.Directory:
                self.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    # -- trees ----------------------------------------------------------------------------------------------------------
    def upload(self, folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
        """Copy every file below the local `folder` to the same relative paths here (each file whole);
        returns the relative paths, sorted. Top-level names in `skip` are left out."""
        done = []
        for path in sorted(Path(folder).rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel.split("/", 1)[0] not in skip:
                (self / rel).write_bytes(path.read_bytes())
                done.append(rel)
        return done

    def download(self, folder: Path, skip: tuple[str, ...] = ()) -> Path:
        """Copy every file below here into the local `folder` (created); top-level names in `skip` left out."""
        folder = Path(folder)
        for rel in self.files():
            if rel.split("/", 1)[0] in skip:
                continue
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self / rel).read_bytes())
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- Ray --------------------------------------------------------------------------------------------------------------
    def ray_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train and Tune's RunConfig: a local path as itself, an
        object-store location as its path on its pyarrow filesystem."""
        return (self.path, None) if self.is_local else (self.path, self.fs)


def scratch_dir(kind: str, key: str) -> Path:
    """A node-local folder for hot scratch (never what a run keeps): `<tmp>/diffseg-<kind>-<uid>/<hash of key>`."""
    root = Path(tempfile.gettempdir()) / f"diffseg-{kind}-{os.getuid()}"
    path = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@contextmanager
def local_copy(target: str | os.PathLike, require_complete: bool = True) -> Iterator[Path]:
    """A local path holding the run or fit folder `target`: the path itself where it is local, else a temporary
    copy (removed after the block). An object-store run without its completion marker is refused."""
    loc = Location.of(target)
    if loc.is_local:
        yield loc.local
        return
    if not loc.is_dir():
        raise BenchError(f"{loc.uri} does not exist or holds nothing; check the URI")
    if require_complete and not (loc / COMPLETE).is_file() and not (loc / "done").is_file():
        raise BenchError(f"{loc.uri} has no {COMPLETE}: the run is unfinished (or still running); resume it with "
                         f"the same command and output_dir={loc.uri}")
    with tempfile.TemporaryDirectory(prefix="diffseg-copy-") as tmp:
        yield loc.download(Path(tmp) / loc.name, skip=("work",))


# -- conditional writes ------------------------------------------------------------------------------------------------
# scheme: (the modules its conditional write needs, the package that brings them, the mechanism, what to install)
CONDITIONAL_WRITES = {
    "s3": (("boto3", "botocore.exceptions"), "boto3", "S3 conditional writes", "'diffseg-bench[cluster]'"),
    "gs": (("google.cloud.storage", "google.api_core.exceptions"), "google-cloud-storage",
           "generation preconditions", "google-cloud-storage"),
}


def _conditional_write_modules(scheme: str) -> list:
    """The modules a scheme's exclusive create needs, or a BenchError naming the package to install."""
    import importlib

    names, package, mechanism, install = CONDITIONAL_WRITES[scheme]
    try:
        return [importlib.import_module(name) for name in names]
    except ImportError:
        article = "an" if scheme == "s3" else "a"
        raise BenchError(f"{article} {scheme}:// output_dir needs {package} for its exclusive claim ({mechanism}); "
                         f"pip install {install}") from None


def _s3_create_exclusive(path: str, data: bytes) -> bool:
    boto3, exceptions = _conditional_write_modules("s3")
    bucket, key = path.split("/", 1)
    client = boto3.client("s3")  # endpoint and credentials from the environment (AWS_ENDPOINT_URL, ...)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except exceptions.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise BenchError(f"s3://{path}: the exclusive claim failed ({code or err}); check the bucket and the "
                         f"credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None


def _gcs_create_exclusive(path: str, data: bytes) -> bool:
    storage, exceptions = _conditional_write_modules("gs")
    bucket, key = path.split("/", 1)
    try:
        storage.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
        return True
    except exceptions.PreconditionFailed:
        return False
