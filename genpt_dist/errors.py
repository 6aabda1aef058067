"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else is a bug or an
environment failure (exit 1, with a traceback)."""


class UserError(Exception):
    """Bad input or configuration: the message names the problem in one line."""
