"""The one exception type users see.

A ``KdcacheError`` is a refusal caused by the user's input (a missing path, a bad option, a cache
that does not fit the student). The CLI prints its message on one line and exits with code 2;
every other exception is a bug and keeps its traceback.
"""


class KdcacheError(Exception):
    """Bad input or state: reported in one line, exit code 2, no traceback unless ``--debug``."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors can span pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
