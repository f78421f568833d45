"""Folders that appear whole or not at all: write into a temporary folder beside the target, rename when done."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError


@contextmanager
def staged_dir(target: Path, option: str, tag: str = "") -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends without an error it becomes
    `target` (which must be absent or an empty folder), otherwise it is removed. The parent is created; if it
    cannot be, a one-line BenchError names `option` (e.g. "--out DIR") as the fix."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}", dir=target.parent))
    except OSError as err:
        raise BenchError(f"cannot write to {target.parent}: {err.strerror}; choose a writable {option}") from None
    try:
        yield work
        if target.exists():
            target.rmdir()  # empty: callers check before they start
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a hidden temporary name beside it, renamed when written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
