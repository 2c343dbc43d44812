"""Run folders that one command at a time writes in. Runs without a logger all write into `default_root_dir`, and two
at once overwrote each other's checkpoints of the same name, `last.ckpt` and config.yaml (Lightning's `-v1` suffix is
chosen as each file is saved, from the files there then), each printing the other's file as its best. A CSV or
TensorBoard logger counts its next `version_N` as the command starts, and makes that folder only once the data is
ready: two runs started together took the same one."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from cifar_cli.atomic import missing_folders, remove_empty_folders
from cifar_cli.errors import UsageError

# The folders this process holds (a lock's file descriptor, or None), each with the folders made for it: released
# when the command ends.
_HELD: list[tuple[int | None, list[Path]]] = []


def hold_run_folder(logger: Any, folder: str) -> None:
    """For a run without a logger (`logger` False, or an empty list), hold its `folder` (made where missing) until
    `release_folders`, or fail in one line where another process holds it. An advisory lock (flock) on the folder
    itself, so nothing is written there for it; a file system without flock (some network ones) holds nothing, as
    before. Only the run's first process holds it: the other ranks of a DDP run write there with it (a node's
    first process knows its node from NODE_RANK, as Lightning's environment reads it, before the trainer exists)."""
    if logger not in (False, []) or (_get_rank() or 0) != 0:
        return
    if int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0) != 0:
        return
    path = Path(folder)
    made = missing_folders(path)
    os.makedirs(path, exist_ok=True)  # (not Path.mkdir: its error below a file names the deepest folder, not the first)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        remove_empty_folders(made)
        if isinstance(err, BlockingIOError):
            raise UsageError(
                f"another cifar-cli command without a logger is running in {folder}: this one would overwrite its "
                "checkpoints and config.yaml; wait until it ends, or give this one another --trainer.default_root_dir "
                "(or a logger)"
            ) from None
        return
    _HELD.append((fd, made))


def claim_version_folder(logger: CSVLogger | TensorBoardLogger) -> None:
    """Make the folder of a logger's counted `version_N` (a version it was not given) at once, atomically; where
    another run made it since it was counted, count the next. It is removed at `release_folders` if the command
    wrote nothing in it."""
    for _ in range(100):  # (a file named version_N, which Lightning does not count, would be met every time)
        version = logger.version
        folder = Path(logger.root_dir, version if isinstance(version, str) else f"version_{version}")
        made = missing_folders(folder.parent)
        os.makedirs(folder.parent, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            logger._version = None  # private to Lightning (2.6): counted again, from the folders there now
            continue
        _HELD.append((None, [folder, *made]))
        return


def release_folders() -> None:
    """Let go of the folders held, and remove those made for a command that then wrote nothing in them."""
    while _HELD:
        fd, made = _HELD.pop()
        if fd is not None:
            os.close(fd)
        remove_empty_folders(made)
