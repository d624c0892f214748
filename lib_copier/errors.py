"""The one exception type that reaches a user as a single clear sentence."""


class CopierError(Exception):
    """Bad input or a failed run, explained in one sentence that names the input and what is wrong."""
