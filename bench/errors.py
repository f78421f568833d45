"""User-facing errors: one line that names the fix, caught by the CLI and turned into exit code 2."""


class BenchError(Exception):
    """A problem with the user's input (config, paths, names). The message is shown as-is on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
