"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero, without a traceback."""


class RptqError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model); the message says how."""
