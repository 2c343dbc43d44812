"""Files that are whole or absent: checkpoints, configs and CSVs are written beside their target, flushed to disk
and renamed over it, so a kill at any moment leaves the old file or the new one, never a truncated one.

Written by hand because Lightning's checkpoint writer stages the file in the system's temporary folder and moves
it: across file systems that move is a copy, and a kill during the copy leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_cli.errors import UsageError, causes

# torch ignores weights_only=True when this variable is set: loading would unpickle arbitrary objects.
UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# Suffix of a file being written; never `.ckpt`, so no search for checkpoints finds one.
PARTIAL = ".partial"
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota


def _mode() -> int:
    """The permission bits a plain `open(..., "w")` would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: _PATH, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a new file beside `path`, fsync it, rename it to `path`, and fsync the folder."""
    with atomic_file(path) as partial, open(partial, "wb") as file:
        write(file)


def missing_folders(path: Path) -> list[Path]:
    """`path` and the folders above it that do not exist, deepest first: those that making `path` makes."""
    return [folder for folder in [path, *path.parents] if not folder.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first, as `missing_folders` lists them) while they are empty: one that holds
    anything stays, and so do those above it. One that was never made (a make that failed part-way) is passed over."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            if os.path.exists(folder):  # (not Path.exists, which raises for a name too long to have been made)
                break


@contextlib.contextmanager
def atomic_file(path: _PATH) -> Iterator[Path]:
    """A new empty file beside `path`, to fill by its name (other processes too: the decoding workers); when the
    block ends, it is fsynced and renamed to `path`, and the folder fsynced. When the block raises, the file is
    removed, and so are the folders made for it that are still empty: a failed write leaves nothing behind."""
    path = Path(path)
    missing = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    prefix = f".{path.name}.{socket.gethostname()}.{os.getpid()}."
    try:
        fd, partial = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL, dir=path.parent)
    except OSError as err:  # (a read-only disk, a folder without permission)
        # Its error names the hidden file it could not make; the folder is what cannot be written in.
        raise OSError(err.errno, err.strerror, str(path.parent)) from err
    try:
        os.fchmod(fd, _mode())
        os.close(fd)
        yield Path(partial)
        fd = os.open(partial, os.O_RDONLY)  # fsync flushes the file's data whichever way it is opened
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        remove_empty_folders(missing)  # one another writer has filled stays
        full = next((e for e in causes(err) if isinstance(e, OSError) and e.errno in FULL), None)
        if full is not None and not full.filename:
            # torch.save's error for a full disk, and the OSError under it, name no file: the one-line error does.
            raise OSError(full.errno, full.strerror, str(path)) from err
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_stale_partials(path: Path) -> None:
    """Remove what killed writers of `path` left behind: partial files of this machine's dead processes. Another
    live process's, or another machine's (a cache on a shared file system), are left alone."""
    host = socket.gethostname()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}.*{PARTIAL}"):
        pid = stale.name[len(f".{path.name}.{host}.") :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: _PATH, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def atomic_write_csv(path: _PATH, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    """A CSV file with a header and `rows` (dicts; missing keys left empty), written whole."""
    text = io.StringIO(newline="")
    out = csv.DictWriter(text, fieldnames=fieldnames)
    out.writeheader()
    out.writerows(rows)
    atomic_write_text(path, text.getvalue())


def torch_load(path: _PATH, map_location: Any = "cpu") -> Any:
    """`torch.load` with `weights_only=True`: tensors, numbers, strings and containers, never arbitrary objects.

    A checkpoint whose pickle would build other objects (or run code through `__reduce__`) fails to load.
    """
    refuse_unsafe_load(f"--ckpt_path {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def refuse_unsafe_load(what: str) -> None:
    """Fail in one line when UNSAFE_LOAD_ENV is set; checked before torch.load is called, since under this
    variable torch may load the pickle unrestricted."""
    if os.environ.get(UNSAFE_LOAD_ENV, "").strip().lower() not in ("", "0", "false", "no", "n"):
        raise UsageError(
            f"{what}: refusing to load a checkpoint while {UNSAFE_LOAD_ENV} is set, as it can turn off "
            "weights-only loading and let the file run code; unset it"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each local checkpoint whole or not at all, and loading weights only."""

    # The entries every checkpoint gets (the run's data config: cifar_cli.cli.RunConfigSaver sets it), also one of
    # weights alone (a ModelCheckpoint's save_weights_only), for which Lightning calls no callback's
    # on_save_checkpoint: `predict --ckpt_path` on it took the default data module's classes.
    entries: Callable[[], dict[str, Any]] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        for key, value in (self.entries() if self.entries is not None else {}).items():
            checkpoint.setdefault(key, value)
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: fsspec's own way
        atomic_write(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if not Path(path).is_file():  # remote paths: Lightning's loader, still weights only
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return torch_load(path, map_location=map_location or (lambda storage, loc: storage))


def atomic_csv_logs(logger: Any) -> None:
    """Make a Lightning CSVLogger write its `metrics.csv` whole at every flush, through `atomic_write`.

    Lightning's writer appends rows, and rewrites the file in place when a new column appears: a kill during
    either leaves a cut row or a half-written file. Here every flush writes the earlier rows and the new ones to
    a new file that replaces the old. The file stays small (one row per logged step), so the rewrite is cheap.
    """
    writer = logger.experiment
    if type(writer) is ExperimentWriter:
        # A class, not a function set on the writer: ddp_spawn pickles the logger to the ranks, and a local
        # function stopped `--trainer.strategy ddp_spawn --trainer.logger CSVLogger` with "Can't pickle".
        writer.__class__ = WholeCSVWriter


class WholeCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, each flush writing `metrics.csv` whole (atomic_csv_logs)."""

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        rows: list[dict[str, Any]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                rows = list(csv.DictReader(file))
        atomic_write_csv(self.metrics_file_path, self.metrics_keys, rows + self.metrics)
        self.metrics = []
