"""A context variable set for the length of a block.

CifarCLI tells the classes LightningCLI builds what they are built for (a checkpoint whose weights and data state
replace their own) through context variables: LightningCLI builds them deep inside the model's and the data's
arguments, where no argument of cifar-cli's reaches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def set_during(var: ContextVar[T], value: T) -> Iterator[None]:
    """`var` holds `value` in the block, and what it held before after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
