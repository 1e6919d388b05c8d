"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class RecacheError(ValueError):
    """A bad value from the user (a name, a file, a number); the message names it and what is allowed."""


def is_whole(value, lo: int, hi: int | None = None) -> bool:
    """Whether ``value`` is an int (a bool is not) from ``lo`` to ``hi``: the check of every count read from a file."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)


class NonFiniteError(RecacheError):
    """NaN or infinite values in a sample, an output or a reward; the message names where and at which step."""


class RecacheWarning(UserWarning):
    """Something ran, but not as planned (a generation that ran fewer steps than its plan was made for)."""
