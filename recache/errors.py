"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class RecacheError(ValueError):
    """A bad value from the user (a name, a file, a number); the message names it and what is allowed."""


class NonFiniteError(RecacheError):
    """NaN or infinite values in a sample, an output or a reward; the message names where and at which step."""
