"""User-facing errors: one line, no traceback, a fixed exit code."""


class MtError(Exception):
    """An error caused by the user's input (a file, a line, a config key); printed as one line."""

    exit_code = 1


class ConfigError(MtError):
    """A config file or override is invalid; names the file and the key."""

    exit_code = 2


class DataError(MtError):
    """A corpus or data file is unusable; names the file and, where known, the line."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of a library's error message, to quote in a one-line error.

    An empty message gives the exception's type name ("unknown error" for an empty string).
    """
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
