"""The one exception type of the project: the CLI prints its message and exits with code 1."""


class ParScaleError(Exception):
    """A problem the user can fix (bad input, bad option, unsupported model): one clear line."""
