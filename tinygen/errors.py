"""The one exception type the command line turns into a one-line message."""


def first_line(e: Exception) -> str:
    """An exception's first line (its type's name if it has no message): a fallback's one line on stderr."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class TinygenError(Exception):
    """A problem with the user's input (model files, flags, prompt): reported in one line, exit code 1."""
