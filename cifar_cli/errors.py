"""The one exception type that means "bad input from the user", and the errors behind an error."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Set to true to get the full traceback of an error instead of its one-line summary (jsonargparse reads it too).
DEBUG_ENV = "JSONARGPARSE_DEBUG"
_DEBUG_VALUES = {"true": "true", "1": "true", "yes": "true", "on": "true", "false": "false", "0": "false",
                 "no": "false", "off": "false", "": ""}  # fmt: skip


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


def debug_switch() -> None:
    """Read DEBUG_ENV as `1`, `yes` or `on` too, and write it back as jsonargparse takes it (true or false: it ended
    in a ValueError on anything else); another value is refused. Once, at start-up."""
    value = os.environ.get(DEBUG_ENV)
    if value is None:
        return
    if value.strip().lower() not in _DEBUG_VALUES:
        raise UsageError(f"{DEBUG_ENV}={value}: set it to true, or false")
    os.environ[DEBUG_ENV] = _DEBUG_VALUES[value.strip().lower()]


def debugging() -> bool:
    """Whether DEBUG_ENV asks for full tracebacks."""
    return _DEBUG_VALUES.get(os.environ.get(DEBUG_ENV, "").strip().lower()) == "true"
