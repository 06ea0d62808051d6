"""The one exception type the command line turns into a one-line message."""


class TinygenError(Exception):
    """A problem with the user's input (model files, flags, prompt): reported in one line, exit code 1."""
