"""The one exception type a user can cause. The CLI prints its message as one line and exits 1."""


class BalspecError(Exception):
    """Bad input from the user: a flag value, a file, a model or checkpoint that does not fit."""
