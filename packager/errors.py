"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class PackagerError(Exception):
    """A failure with a message a user can act on; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(PackagerError):
    """Bad input on the command line (unknown model, bad option value)."""

    exit_code = 2


class GateFailed(PackagerError):
    """An accuracy gate refused a graph."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can be pages long)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
