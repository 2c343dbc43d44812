"""The `cifar-cli` command's entry point, light to import: torch and Lightning load in a second or more, and a
Ctrl-C then ends the command as one later does, in one line with exit code 130, not with Python's traceback of
the import under way."""

from __future__ import annotations

import signal
import sys


def run() -> None:
    try:
        from cifar_cli.cli import run as run_command
    except KeyboardInterrupt:
        print("cifar-cli: interrupted by Ctrl-C", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    run_command()
