"""The one error type a user sees: a clear one-line message and exit code 2."""


class AfloraError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits with code 2."""
