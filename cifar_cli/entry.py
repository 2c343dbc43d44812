"""The `cifar-cli` command's entry point, light to import: torch and Lightning load in a second or more, and a
Ctrl-C then ends the command as one later does, in one line with exit code 130, not with Python's traceback of
the import under way."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def run() -> None:
    matplotlib_folder()
    current_folder_modules()
    try:
        from cifar_cli.cli import run as run_command
    except KeyboardInterrupt:
        print("cifar-cli: interrupted by Ctrl-C", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    run_command()


def current_folder_modules() -> None:
    """Let class paths name modules of the current folder (`--model.net mynet.Net` for a `mynet.py` there), as under
    `python -m cifar_cli`, which puts the folder first on the import path; the `cifar-cli` script put it nowhere, and
    the same command said `No module named 'mynet'`. Last here, so that a file there named like a package cifar-cli
    imports (`wandb.py`) does not replace it."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def matplotlib_folder() -> None:
    """Set MPLCONFIGDIR where it is unset and Matplotlib's own folders cannot be made (a home that is read-only or
    missing): torchmetrics imports Matplotlib as every command starts, which then said so in two long lines before
    anything of the command's own. Its files (the font list) go into cifar-cli's cache folder instead, kept from run to
    run, or where that cannot be made either, into a temporary folder removed at exit, as Matplotlib's own fallback.
    Linux's folders only (~/.config/matplotlib and ~/.cache/matplotlib, or under XDG_CONFIG_HOME and XDG_CACHE_HOME)."""
    if os.environ.get("MPLCONFIGDIR") or not sys.platform.startswith(("linux", "freebsd")):
        return
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME, and no entry in the password database
        home = None
    config = os.environ.get("XDG_CONFIG_HOME") or (home and home / ".config")
    cache = os.environ.get("XDG_CACHE_HOME") or (home and home / ".cache")
    if config and cache and writable(Path(config, "matplotlib")) and writable(Path(cache, "matplotlib")):
        return
    ours = Path(cache, "cifar-cli", "matplotlib") if cache else None  # data.storage.default_cache_dir's folder
    if ours is not None and writable(ours):
        os.environ["MPLCONFIGDIR"] = str(ours)
        return
    try:
        folder = tempfile.mkdtemp(prefix="matplotlib-")
    except OSError:
        return  # Matplotlib says what to do
    atexit.register(shutil.rmtree, folder, True)
    os.environ["MPLCONFIGDIR"] = folder


def writable(folder: Path) -> bool:
    """Whether `folder` is, or can be made, a folder to write in (made, as Matplotlib makes it)."""
    try:
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return folder.is_dir() and os.access(folder, os.W_OK)
