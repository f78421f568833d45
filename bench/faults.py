"""Test-only fault injection for the trace stage: `BENCH_TRACE_FAULT=<image index>` makes the Ray Data actor that
first receives that image exit at once (`os._exit`, as a crashed or killed worker), exactly once per run (a
marker file in the run's work folder, created with O_EXCL, says it happened). The run must then heal: the
actor is restarted, the batch retried, and the results equal an undisturbed run's. Never set by the engine;
the fit stage's counterpart is `BENCH_FAULT` (bench.stages.fit)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

TRACE_FAULT_ENV = "BENCH_TRACE_FAULT"


@dataclass(frozen=True)
class TraceFault:
    index: int  # the image whose first batch kills its actor
    marker: str  # created once, by the actor that exits


def trace_fault(work: Path | None) -> TraceFault | None:
    """The fault the environment asks for (driver side), or None; a malformed value is a one-line error."""
    text = os.environ.get(TRACE_FAULT_ENV)
    if not text:
        return None
    if not text.strip().isdigit():
        raise BenchError(f"{TRACE_FAULT_ENV}={text!r} is not an image index; unset it (it is for tests only)")
    return TraceFault(int(text), str((work or Path(".")).resolve() / "trace-fault-injected"))


def maybe_exit(fault: TraceFault | None, indices: list[int]) -> None:
    """In an actor: exit the process (no cleanup, like a crash) the first time the faulty image arrives."""
    if fault is None or fault.index not in indices:
        return
    try:
        os.close(os.open(fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    os._exit(1)
