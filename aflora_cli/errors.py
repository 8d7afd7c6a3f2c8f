"""The one error type a user sees: a clear one-line message and exit code 2."""


class AfloraError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits with code 2."""


def first_line(err: BaseException) -> str:
    """The first line of what a library raised (its class name if it said nothing), for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
