"""The one exception type that means "bad input from the user", and the errors behind an error."""

from __future__ import annotations

from collections.abc import Iterator


class UsageError(Exception):
    """Bad flags, config, data or checkpoint: `cifar-cli` reports it in one line, without a traceback."""


class UsageValueError(UsageError, ValueError):
    """An argument value that a class refuses as it is built (a network too large for the images, say): a
    ValueError to the Python code that builds it, a one-line error from `cifar-cli`."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite: `cifar-cli` says so in one line and exits 1, before the weights
    are validated or checkpointed."""


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """`err`, then the error that caused it (or was being handled when it was raised), and so on, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
