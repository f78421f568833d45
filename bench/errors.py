"""User-facing errors: one line that names the fix, caught by the CLI and turned into exit code 2.

A refusal is the only line on stderr: log lines written before the run starts working (preflight's warnings,
anything a library logs while the input is checked) are held back, shown once the run has claimed its directory
(`run_started`) and dropped when the command is refused instead. SIGTERM (what schedulers, Kubernetes and
`timeout` send) is handled like Ctrl-C: the run keeps its finished work and says how to resume."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable


class BenchError(Exception):
    """A problem with the user's input (config, paths, names). The message is shown as-is on one line."""

    exit_code = 2

    def __init__(self, message: str):
        self.message = " ".join(str(message).split())
        super().__init__(self.message)

    def __reduce__(self):
        # pickled (into a Ray worker's RayTaskError) as its own message: Ray Data appends a retry note to a
        # raised exception's args, which must not become part of the line the user reads
        return type(self), (self.message,)


class RunFailed(BenchError):
    """A failure while a run was working (not the user's input): one line, the original error's text, exit 1."""

    exit_code = 1


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C or SIGTERM


class _HeldLines(logging.Filter):
    """Holds the records of the handlers it is attached to until `release` (shown) or `drop` (discarded)."""

    def __init__(self):
        super().__init__()
        self.holding, self.records, self.handlers = True, [], []

    def attach(self) -> "_HeldLines":
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr,
                                                                                                  sys.__stderr__):
                handler.addFilter(self)
                self.handlers.append(handler)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding:
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        if self.holding:
            self.holding = False
            for record in self.records:
                for handler in self.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)
            self.records = []

    def drop(self) -> None:
        self.records = []
        self.holding = False

    def detach(self) -> None:
        for handler in self.handlers:
            handler.removeFilter(self)


_held: _HeldLines | None = None
_terminate_installed = False


def run_started() -> None:
    """The run has claimed its directory: the log lines held back since the command started are shown."""
    if _held is not None:
        _held.release()


def _terminated(signum, frame):
    raise KeyboardInterrupt


def handle_terminate() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does. Called again after `ray.init`, which
    installs its own handler (a bare `sys.exit`: no message, no record of the finished work)."""
    global _terminate_installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        _terminate_installed = True


def restore_terminate() -> None:
    """Re-install the command's SIGTERM handling where a library replaced it (only inside `cli_exit`)."""
    if _terminate_installed:
        handle_terminate()


def cli_exit(work: Callable[[], object], hold_logs: bool = False, prints_result: bool = False) -> int:
    """Run a command's work: print its result (a path) as the last stdout line and return 0; a BenchError
    becomes one `error:` line on stderr and 2 (a RunFailed: 1); Ctrl-C and SIGTERM return 130. With
    `hold_logs`, log lines wait for `run_started` (a command that claims a run directory calls it). With
    `prints_result`, the work prints its own last line and returns the exit status."""
    global _held, _terminate_installed
    _held = _HeldLines().attach() if hold_logs else _HeldLines()
    if not hold_logs:
        _held.holding = False
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    handle_terminate()
    try:
        try:
            out = work()
        except BenchError as err:
            if isinstance(err, RunFailed):
                _held.release()
            else:
                _held.drop()
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            _held.release()
            return INTERRUPTED
        _held.release()
        if prints_result:
            return int(out or 0)
        print(out)
        return 0
    finally:
        _held.detach()
        _held = None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            _terminate_installed = False
