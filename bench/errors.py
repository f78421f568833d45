"""User-facing errors: one line that names the fix, caught by the CLI and turned into exit code 2."""

import sys
from typing import Callable


class BenchError(Exception):
    """A problem with the user's input (config, paths, names). The message is shown as-is on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def cli_exit(work: Callable[[], object]) -> int:
    """Run a command's work: print its result (a path) as the last stdout line and return 0; a BenchError
    becomes one `error:` line on stderr and 2; Ctrl-C returns 130."""
    try:
        out = work()
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(out)
    return 0
