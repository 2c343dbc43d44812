"""Splits kept on disk: a uint8 `(N, C, H, W)` array in an uncompressed `.npy` file, read a batch of rows at a time.

The image-folder caches are such files, and so is CIFAR's copy under `--data.placement disk`: with the split left
on disk, host memory holds a batch or two, whatever the data set's size.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# Rows read at once where a whole split is streamed through memory (statistics, loading a split): about 64 MB.
CHUNK_BYTES = 64 * 2**20


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cifar-cli`, or `~/.cache/cifar-cli`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar-cli"


def cache_path(cache_dir: Path, name: str, source: Path, fingerprint: str) -> Path:
    """`cache_dir/<name>-<key of source's path>-<fingerprint>.npy`. The fingerprint of the source's files is part of
    the name: a file of that name is the current cache, written whole (`atomic_file`), with no separate record to
    keep in step with it."""
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{key}-{fingerprint[:16]}.npy"


# Raised when the same file decodes to other pixels than before, so that caches decoded the old way are rebuilt.
# 2: EXIF orientation applied. 3: JPEGs at least twice the size decoded reduced (`_decode_jpeg_reduced`).
DECODING_VERSION = 3


def stat_key(path: Path) -> str:
    """`path`'s size, modification time and change time (ctime). The ctime tells a file rewritten with its size and
    modification time kept (`cp -p`, `rsync -a`, an unpacked archive) from the file it replaced: no copy can set it.
    It also moves on `chmod` or `touch`, which then cost one rebuild of a cache, never a stale one."""
    stat = path.stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def files_fingerprint(paths: list[Path], names: list[str], image_size: int) -> str:
    """A digest of the files' names, sizes, modification and change times, the side they decode to and
    DECODING_VERSION: editing, adding or removing an image changes it. Stat-ing 50,000 files takes about 0.5 s."""
    digest = hashlib.sha1(f"{image_size}|{DECODING_VERSION}".encode())
    for name, path in zip(names, paths):
        # surrogateescape: a name that is not UTF-8 (`café.jpg` in Latin-1) as its bytes, as os.fsencode gives them
        digest.update(f"{name}|{stat_key(path)}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def remove_other_versions(path: Path) -> None:
    """Remove the caches of `path`'s source but of other fingerprints, keeping `path` and its companions
    (`<stem>.*`). A process still reading a removed one keeps its open file."""
    prefix = path.stem.rsplit("-", 1)[0]
    for other in path.parent.glob(f"{prefix}*"):
        if not other.name.startswith(path.stem) and other.is_file():
            other.unlink(missing_ok=True)


def create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """Make `path` a uint8 `.npy` file of `shape`, its rows not written yet (a sparse file); return the offset of
    its first row in bytes."""
    with open(path, "wb") as file:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        offset = file.tell()
        file.truncate(offset + math.prod(shape))
    return offset


def write_at(fd: int, rows: np.ndarray, offset: int) -> None:
    """Write a C-contiguous array's bytes at `offset` of the open file `fd`."""
    view = memoryview(rows).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` with the bytes of the open file `fd` from `offset`."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"file descriptor {fd} ends before byte {offset + len(view)}")
        done += got


class DiskImages:
    """A uint8 `(N, C, H, W)` image array in a `.npy` file, or some of its rows, read from the file when indexed.

    Stands in for a split's image tensor (`TensorImageDataset.images`) where the split stays on disk: `len`,
    `shape`, `dtype` and `device` as a tensor's, and indexing by an int, a slice or an index tensor returns a tensor
    of those rows, read then.

    Rows are read with `os.preadv` into the caller's buffer, not through a memory map: the pages of a map that
    batches touch stay mapped and count in the process's RSS until the kernel reclaims them (after an epoch, the
    whole file), while read pages live only in the kernel's page cache, which no process is charged for and which
    is dropped first. `preadv` also reads straight into a page-locked buffer for the copy to a GPU, and, like any
    read, releases the GIL.

    Args:
        path: A `.npy` file holding a uint8 `(N, C, H, W)` array in C order (`create_npy`).
        rows: The file's rows this object holds, in order; None: all of them.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path: str | Path, rows: Tensor | None = None) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(file)
            self.offset = file.tell()
        if dtype != np.uint8 or fortran_order or len(shape) != 4:
            raise ValueError(f"{self.path} holds no uint8 (N, C, H, W) array in C order")
        self.file_rows = shape[0]
        self.row_shape = tuple(shape[1:])
        self.row_bytes = math.prod(self.row_shape)
        if os.path.getsize(self.path) < self.offset + self.file_rows * self.row_bytes:
            raise ValueError(f"{self.path} is shorter than its {self.file_rows} rows")
        self.rows = rows
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.file_rows if self.rows is None else len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def subset(self, index: Tensor) -> DiskImages:
        """The rows `index` of these, as another view of the same file."""
        other = copy.copy(self)
        other.rows = index.cpu() if self.rows is None else self.rows[index.cpu()]
        other._fd = None
        return other

    def read(self, index: Tensor, out: Tensor | None = None) -> Tensor:
        """The images at `index` (of these rows), read into `out` (contiguous uint8: page-locked, say) or a new one."""
        index = index.cpu()
        rows = (index if self.rows is None else self.rows[index]).numpy()
        if out is None:
            out = torch.empty((len(rows), *self.row_shape), dtype=torch.uint8)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.file_rows:
            raise IndexError(f"rows {rows.min()}..{rows.max()} are not all among the {self.file_rows} of {self.path}")
        buffer = out.numpy().reshape(len(rows), self.row_bytes)
        # Consecutive rows are read by one call: an unshuffled batch (validation, test) or a chunk is one read.
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        fd = self._file()
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)]):
            read_into(fd, memoryview(buffer[start:end]).cast("B"), self.offset + int(rows[start]) * self.row_bytes)
        return out

    def __getitem__(self, key: int | slice | Tensor) -> Tensor:
        if isinstance(key, Tensor):
            return self.read(key.long())
        if isinstance(key, slice):
            return self.read(torch.arange(len(self))[key])
        return self.read(torch.tensor([range(len(self))[key]]))[0]

    def load(self) -> Tensor:
        """All these rows, read into one tensor in memory, a chunk at a time."""
        out = torch.empty(tuple(self.shape), dtype=torch.uint8)
        for start, stop in chunk_bounds(len(self), self.row_bytes):
            self.read(torch.arange(start, stop), out=out[start:stop])
        return out

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a file descriptor means nothing in another process

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"DiskImages({str(self.path)!r}, {tuple(self.shape)})"


def chunk_bounds(n: int, row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """`(start, stop)` of consecutive runs of rows of about `chunk_bytes` each, covering `range(n)`."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def chunks(images: Tensor | DiskImages) -> Iterator[Tensor]:
    """The images, a run of about 64 MB at a time: views of a tensor, reads of a file."""
    row_bytes = math.prod(images.shape[1:])
    for start, stop in chunk_bounds(len(images), row_bytes):
        yield images[start:stop]


def rows_of(images: Tensor | DiskImages, index: Tensor) -> Tensor | DiskImages:
    """A split's rows `index`: a copy of a tensor's, or a view of a file's."""
    return images.subset(index) if isinstance(images, DiskImages) else images[index.to(images.device)]


def open_cache(path: Path, shape: tuple[int, ...]) -> DiskImages | None:
    """The decoded images in the cache file `path`, or None when there is none of that `shape`: the file's name
    holds its source's fingerprint, so a file of that name is current."""
    try:
        images = DiskImages(path)
    except (OSError, ValueError):  # absent, or not a file this code wrote
        return None
    return images if tuple(images.shape) == tuple(shape) else None
