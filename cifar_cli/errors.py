"""The one exception type that means "bad input from the user"."""


class UsageError(Exception):
    """Bad flags, config, data or checkpoint: `cifar-cli` reports it in one line, without a traceback."""
