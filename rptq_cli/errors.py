"""User-facing errors: the CLI prints ``str(error)`` as one line and exits non-zero, without a traceback."""


class RptqError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model); the message says how."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none), to quote in ours."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
