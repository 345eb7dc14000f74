"""The one exception type that the CLIs turn into a one-line error and exit code 2."""


class QvlError(Exception):
    """A whole-run problem (missing file, invalid JSON, unknown dataset...): stop with a clear message."""
