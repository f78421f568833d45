"""User-facing errors: one line that names the fix, caught by the CLI and turned into exit code 2."""

import sys
from typing import Callable


class BenchError(Exception):
    """A problem with the user's input (config, paths, names). The message is shown as-is on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RunFailed(BenchError):
    """A failure while a run was working (not the user's input): one line, the original error's text, exit 1."""

    exit_code = 1


def cli_exit(work: Callable[[], object]) -> int:
    """Run a command's work: print its result (a path) as the last stdout line and return 0; a BenchError
    becomes one `error:` line on stderr and 2 (a RunFailed: 1); Ctrl-C returns 130."""
    try:
        out = work()
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    print(out)
    return 0
