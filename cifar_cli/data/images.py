"""Image files: finding them, and decoding them on every core into one uint8 tensor or `.npy` file."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from cifar_cli.data.storage import create_npy, write_at
from cifar_cli.errors import UsageError

if TYPE_CHECKING:
    from PIL.Image import Image

# Suffixes torchvision.io.decode_image reads (and Pillow, for the files it cannot), and those Pillow alone reads.
# Not TIFF: Pillow reads it, but clips 16-bit and float TIFFs to 0-255 (a 16-bit grey image came out near white).
PILLOW_SUFFIXES = frozenset({".bmp"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", *PILLOW_SUFFIXES})
# Phone photos (HEIC, iPhones' default) and AVIF, which Pillow alone reads where it can: `image_suffixes()` holds
# them then. Not torchvision's decode_heic/decode_avif: decode_image does not detect either format, they take no
# EXIF orientation, and need torchvision-extra-decoders, whose 0.0.2 fails to load beside torch 2.14 (`undefined
# symbol: _ZN5torch3jit17parseSchemaOrNameERKSsb`); torchvision 0.29 deprecates its decoders besides. Pillow reads
# AVIF itself (its wheels from 11.3), HEIC once pillow-heif registers its opener; both turn 10-bit images to 8-bit
# RGB, and pillow-heif applies the HEIF rotation (`irot`, which viewers show) and resets the EXIF tag that iPhones
# repeat it in, so that `ImageOps.exif_transpose` does not turn the photo twice.
HEIF_SUFFIXES = frozenset({".heic", ".heif"})
AVIF_SUFFIXES = frozenset({".avif"})

# One skipped file: its path components below the listed folder, and what it is ("broken link", ".txt", ...).
Skipped = tuple[list[str], str]


@functools.cache
def reads_heif() -> bool:
    """Whether pillow-heif 1.1 or later is installed; its Pillow opener is registered then (HEIC and HEIF files).
    1.0 misplaces the pixels of a turned photo (see pyproject.toml): its files are skipped as without it, and
    `how_to_read` says to install 1.1."""
    try:
        import pillow_heif
    except ImportError:
        return False
    if tuple(int(part) for part in re.findall(r"\d+", pillow_heif.__version__)[:2]) < (1, 1):
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def reads_avif() -> bool:
    """Whether this Pillow reads AVIF (wheels from 11.3 do; a Pillow built without libavif does not)."""
    from PIL import features

    # Looked up among the modules, not by features.check, which warns of an unknown feature in a Pillow before 11.3
    # (the GPU check installs cifar-cli without its dependencies, beside the machine's Pillow).
    return "avif" in features.modules and bool(features.check_module("avif"))


def image_suffixes() -> frozenset[str]:
    """The suffixes of the files read as images: IMAGE_SUFFIXES, and HEIC/HEIF and AVIF where Pillow reads them."""
    return (
        IMAGE_SUFFIXES
        | (HEIF_SUFFIXES if reads_heif() else frozenset())
        | (AVIF_SUFFIXES if reads_avif() else frozenset())
    )


def read_formats() -> str:
    """The formats read, in words: `JPEG, PNG, GIF, WebP, BMP, HEIC or AVIF`."""
    formats = ["JPEG", "PNG", "GIF", "WebP", "BMP"]
    formats += ["HEIC"] if reads_heif() else []
    formats += ["AVIF"] if reads_avif() else []
    return f"{', '.join(formats[:-1])} or {formats[-1]}"


def list_images(folder: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """Image files below `folder`, in sorted order, skipping hidden files and folders (`.ipynb_checkpoints/`).

    The other files skipped are appended to `skipped` when it is given (see `image_parts`)."""
    return [folder.joinpath(*parts) for parts in image_parts(folder, skipped)]


def image_parts(folder: Path, skipped: list[Skipped] | None = None, class_folders: bool = False) -> list[list[str]]:
    """The path components below `folder` of each of `list_images(folder)`, in the same order.

    As `Path.rglob` lists them (sorted by path components; links to files followed, links to folders not, folders
    it may not read skipped, `folder` itself and class folders refused), but through `os.scandir`: every run lists
    its folders at start-up, and 50,000 files took 1.6 to 2.1 s through pathlib against 0.7 s this way, Path objects
    included (2-core Xeon). With `class_folders`, links to folders directly in `folder` are followed: they are class
    folders, counted as such.

    Files that are not images of `image_suffixes()`, broken links, links to folders and folders it may not read are
    appended to `skipped`, when it is given, with what they are (`skipped_line` says so); hidden files are not.
    """
    found: list[list[str]] = []
    suffixes = image_suffixes()

    def walk(directory: str, parts: list[str]) -> None:
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except PermissionError:
            if not parts or (class_folders and len(parts) == 1):  # said as what it is, not as a folder without images
                raise UsageError(
                    f"cannot read folder {directory} (permission denied): make it readable (chmod a+rx)"
                ) from None
            if skipped is not None:  # another user's folder: its images are not trained on, which is said
                skipped.append((parts, "folder you may not read"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=class_folders and not parts):
                walk(entry.path, [*parts, entry.name])
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in suffixes and entry.is_file():
                found.append([*parts, entry.name])
            elif skipped is not None:
                skipped.append(([*parts, entry.name], _kind(entry, suffix)))

    walk(str(folder), [])
    found.sort()
    if skipped is not None:
        skipped.sort()
    return found


def _kind(entry: os.DirEntry, suffix: str) -> str:
    """What a file that is not an image is, for `skipped_line`."""
    if entry.is_symlink():
        if entry.is_dir():
            return "link to a folder"
        if not entry.is_file():
            return "broken link"
    if suffix in image_suffixes():
        return "not a regular file"  # a named pipe or a socket named like an image
    return suffix or "no suffix"


def skipped_line(folder: Path, skipped: Sequence[Skipped]) -> str | None:
    """One line on the files of `folder` that `image_parts` skipped: how many, of what kind, and one of them;
    None when there are none.

    `skipped 16 files of data/x/train that are not .bmp/.gif/.jpeg/.jpg/.png/.webp images (.tif: 12, .txt: 4; e.g.
    data/x/train/cat/001.tif)`
    """
    if not skipped:
        return None
    kinds = Counter(kind for _, kind in skipped)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items(), key=lambda item: (-item[1], item[0])))
    suffixes = "/".join(sorted(image_suffixes()))
    if len(skipped) == 1:
        what = f"1 file of {folder} that is not a {suffixes} image"
    else:
        what = f"{len(skipped)} files of {folder} that are not {suffixes} images"
    advice = how_to_read(skipped)
    return f"skipped {what} ({counts}; e.g. {folder.joinpath(*min(skipped)[0])}){f'; {advice}' if advice else ''}"


def no_images(skipped: Sequence[Skipped]) -> str:
    """`no images (.bmp, .gif, ...)`, for a folder without any, with `how_to_read` its skipped photos."""
    advice = how_to_read(skipped)
    return f"no images ({', '.join(sorted(image_suffixes()))}{f'; {advice}' if advice else ''})"


def how_to_read(skipped: Sequence[Skipped]) -> str | None:
    """How to read the skipped HEIC/HEIF and AVIF files, which a package would read; None when there are none.

    `to read the .heic files, pip install 'pillow-heif>=1.1' (or in cifar-cli's folder pip install -e '.[heic]'),
    or convert them to JPEG`. Not `pip install 'cifar-cli[heic]'`: PyPI has no cifar-cli (see TimmNet's advice)."""
    kinds = {kind for _, kind in skipped}
    ways = []
    heif = sorted(kinds & HEIF_SUFFIXES)
    if heif:
        ways.append(
            f"the {'/'.join(heif)} files, pip install 'pillow-heif>=1.1' (or in cifar-cli's folder pip install -e "
            "'.[heic]')"
        )
    if kinds & AVIF_SUFFIXES:
        ways.append("the .avif files, a Pillow that reads AVIF (pip install -U pillow)")
    if not ways:
        return None
    return f"to read {' and '.join(ways)}, or convert them to JPEG"


def decode_rgb(path: Path) -> Tensor:
    """One image file as a `(3, H, W)` uint8 RGB tensor, upright as viewers show it (its EXIF orientation applied):
    grayscale, palette and alpha images, 16-bit PNGs, CMYK JPEGs and animated GIFs (their first frame) included. A
    file that is no image ends in a UsageError naming it."""
    if path.stat().st_size == 0:
        raise UsageError(f"image {path} is empty (0 bytes): remove or replace the file")
    # Read here, not by torchvision's read_file, which takes no file name that is not UTF-8 (a Latin-1 `café.jpg`).
    suffix = path.suffix.lower()
    if suffix in HEIF_SUFFIXES:
        reads_heif()  # registers pillow-heif's opener in this process (a spawned worker's too)
    try:
        pillow_only = suffix in PILLOW_SUFFIXES or suffix in HEIF_SUFFIXES or suffix in AVIF_SUFFIXES
        data = None if pillow_only else np.fromfile(path, dtype=np.uint8)
    except PermissionError as err:
        # Said here: the command's own handler reads a denied path as a folder it cannot write in.
        raise UsageError(
            f"cannot read image {path} (permission denied): make it readable (chmod a+r) or remove it"
        ) from err
    if data is None or _webp_with_exif(data):
        image = _decode_with_pillow(path, None)
    else:
        try:
            # A phone stores a portrait photo as landscape pixels with an EXIF orientation tag: without it applied,
            # such photos trained and were predicted lying on their side.
            image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as err:
            image = _decode_with_pillow(path, err)
    if image.ndim == 4:  # an animated GIF: all its frames; Pillow, and every viewer's thumbnail, show the first
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: scaled, not truncated, to 0-255
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _webp_with_exif(data: np.ndarray) -> bool:
    """Whether the file is a WebP with EXIF metadata (the VP8X header's flag 0x08): torchvision applies the EXIF
    orientation of JPEGs and PNGs only, Pillow of these too."""
    return data[8:16].tobytes() == b"WEBPVP8X" and len(data) > 20 and bool(data[20] & 0x08)


def _decode_with_pillow(path: Path, error: RuntimeError | None) -> Tensor:
    # torchvision refuses some valid files that Pillow reads, such as animated WebP ("Animated webp files are not
    # supported"); Pillow is the fallback only, as it is slower and loads lazily (errors surface at convert). It
    # reads PILLOW_SUFFIXES (BMP), HEIC and AVIF, and WebPs with EXIF, alone (`error` None): torchvision reads none
    # of the former (see HEIF_SUFFIXES) and ignores the latter's orientation.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = _upright_rgb(image)
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError for bad files
        cause = err if error is None else error
        reason = " ".join(str(cause).split()) or type(cause).__name__
        # torchvision's errors begin with the function and the line of its C++ source that raised them; the
        # function of a cut-short PNG's error is a lambda, `operator()`.
        reason = re.sub(r"^\S+, \S+\.(?:cpp|cc|cu|h):\d+, ", "", reason)
        if isinstance(err, UnidentifiedImageError) and (error is None or reason.startswith("Unsupported image file")):
            # Neither knows the format (a web server's error page saved as .jpg): torchvision's reason listed its own
            # formats and pointed to its Python functions for AVIF and HEIC.
            reason = f"not an image: its contents are no {read_formats()}"
            family = _heif_family(path)
            if family is not None:  # Pillow drops libavif's reason, and pillow-heif's for a file cut short early
                reason = f"a damaged or cut-short {family} file: no image could be read from it"
        raise UsageError(f"cannot decode image {path} ({reason}): remove or replace the file") from err
    return rgb


def _upright_rgb(image: Image) -> Tensor:
    """A Pillow image as a `(3, H, W)` uint8 RGB tensor, turned by its EXIF orientation as viewers show it."""
    from PIL import ImageOps

    rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


# The brands of an ISO base media file's `ftyp` box that name HEIF images (HEIC, iPhones' photos) and AVIF images.
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}


def _heif_family(path: Path) -> str | None:
    """`HEIC` or `AVIF` for a file that begins as one (its `ftyp` box and brand), None for any other."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        return None
    if head[4:8] != b"ftyp":
        return None
    return "AVIF" if head[8:12] in AVIF_BRANDS else "HEIC" if head[8:12] in HEIF_BRANDS else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a batch job's share), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_square(path: Path, size: int) -> Tensor:
    """One image file as a `(3, size, size)` uint8 tensor: shorter side resized to `size` (antialiased), then
    centre-cropped, keeping the aspect ratio."""
    large = path.suffix.lower() in (".jpg", ".jpeg") and path.stat().st_size >= REDUCE_FROM_BYTES
    image = _decode_jpeg_reduced(path, size) if large else None
    if image is None:
        image = decode_rgb(path)
    if image.shape[1:] != (size, size):
        image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
    return image


# The JPEGs, by their bytes, that `_decode_jpeg_reduced` tries: Pillow's look at the header costs 30 to 60 us a file,
# which halved the rate of CIFAR's 32x32 JPEGs (15,000 to 8,000 a second, one core); a photo twice a size worth
# reducing to is larger (a 640x480 photo takes about 50 KB), and its full decoding takes milliseconds.
REDUCE_FROM_BYTES = 32 * 1024


def _decode_jpeg_reduced(path: Path, size: int) -> Tensor | None:
    """A JPEG at least twice `size` on its shorter side, decoded at 1/2, 1/4 or 1/8 of its size, the smallest that
    keeps that side at `size` or more (libjpeg's DCT scaling, through Pillow's `draft`; torchvision decodes at full
    size only), upright; None for any other file, which `decode_rgb` decodes (and names if it cannot). A 12-MP
    photo took 56 ms to decode in full and 21 ms so, for 32 px (64 and 25 ms for 224 px; one core); the pixels at
    224 px differ by 2 levels on average from the full decode's, resized alike. RGB and grayscale JPEGs only: CMYK
    ones keep torchvision's conversion."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or min(image.size) < 2 * size:
                return None
            image.draft(image.mode, (size, size))
            return _upright_rgb(image)
    except Exception:  # a file Pillow cannot read: decode_rgb says why, as for every image
        return None


def decode_images(paths: Sequence[Path], size: int, workers: int = 1, label: str = "") -> Tensor:
    """Decode image files to one `(N, 3, size, size)` uint8 tensor (`decode_square` each), with `workers`
    processes. 32x32 JPEGs decode at about 3,700 images/s on one core.

    `label` names the images on the progress bar, which large sets show (`progress`).
    """
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def keep(start: int, rows: np.ndarray | None) -> None:
        if rows is not None:  # None: a chunk with a bad image, which `_decode` refuses once all are decoded
            out[start : start + len(rows)] = torch.from_numpy(rows)

    _decode(paths, size, workers, label, keep, None, 0)
    return out


def decode_images_to_npy(paths: Sequence[Path], size: int, path: Path, workers: int = 1, label: str = "") -> None:
    """Decode image files into a new uint8 `.npy` file of `(N, 3, size, size)` at `path`, as `decode_images` does.

    Each worker writes its images into the file itself: the data set is never held in memory, nor sent between
    processes (at 224 px, 150 KB per image to pickle, pass through a pipe and copy again).
    """
    offset = create_npy(path, (len(paths), 3, size, size))
    _decode(paths, size, workers, label, lambda start, rows: None, str(path), offset)


# Below this many images one process decodes them: a quarter of a second at most for small images (3,700/s), of
# which a pool would save little, and small folders (a few predictions, the tests) fork no workers.
PARALLEL_FROM = 1000
# Images per task sent to a worker: small enough to spread the work and move the progress bar, large enough that
# sending a task stays a small part of its work (64 images take 17 ms at 32 px, 50 ms at 224 px).
CHUNK = 64
# The progress bar shows from this many images on a terminal, and from PROGRESS_LOG_FROM in a log (where rich
# prints it once, at the end).
PROGRESS_FROM = 1000
PROGRESS_LOG_FROM = 20_000


def _decode(
    paths: Sequence[Path],
    size: int,
    workers: int,
    label: str,
    keep: Callable[[int, np.ndarray | None], None],
    file: str | None,
    offset: int,
) -> None:
    """Decode `paths` in chunks: each chunk's rows go to `keep(start, rows)`, or, with `file`, into that file at
    `offset` (then `keep` gets None). Files that are no usable images end it in one UsageError naming them all, once
    every chunk is decoded."""
    row_bytes = 3 * size * size
    tasks = [(start, list(paths[start : start + CHUNK])) for start in range(0, len(paths), CHUNK)]
    bad: list[tuple[int, str]] = []  # (index, UsageError's line) of each file that is no usable image
    with progress(len(paths), label or "decoding images") as advance:
        if workers <= 1 or len(paths) < PARALLEL_FROM:
            with _one_thread():
                for start, chunk in tasks:
                    rows, failed = _decode_chunk(chunk, size, file, offset + start * row_bytes)
                    keep(start, rows)
                    bad += [(start + i, line) for i, line in failed]
                    advance(len(chunk))
            _refuse_bad(paths, bad)
            return
        # fork, as torch's DataLoader workers on Linux: a pool of workers started in 60 ms here, with torch imported
        # already, where forkserver took 3.9 s and spawn 13 s (both import torch in a new process).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(
            min(workers, len(tasks)), mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
        ) as pool:
            running = {
                pool.submit(_decode_chunk, chunk, size, file, offset + start * row_bytes): (start, len(chunk))
                for start, chunk in tasks
            }
            try:
                for done in as_completed(running):
                    # Popped, so that the finished task's rows are freed once kept: a future holds its result, and
                    # all of them held, decoding into memory took twice the decoded size at its peak.
                    start, count = running.pop(done)
                    rows, failed = done.result()
                    keep(start, rows)
                    bad += [(start + i, line) for i, line in failed]
                    advance(count)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    _refuse_bad(paths, bad)


def _refuse_bad(paths: Sequence[Path], bad: list[tuple[int, str]]) -> None:
    """One line on the files that are no usable images, if any: the first's reason, and every other's path (up to
    five). Stopping at the first, a collection with a few broken photos took a run, decoding the folder again, per
    file."""
    if not bad:
        return
    bad.sort()  # the folder's order, as the workers' chunks finish in any
    first, others = bad[0][1], [str(paths[i]) for i, _ in bad[1:]]
    if not others:
        raise UsageError(first)
    listed = ", ".join(others[:5]) + (f", ... ({len(others) - 5} more)" if len(others) > 5 else "")
    raise UsageError(f"{first}; {len(others)} more of the {len(paths)} images cannot be used either: {listed}")


def _start_worker(parent: int) -> None:
    """Set up a decoding process: one torch thread (the processes share the cores out, see `_one_thread`), and
    killed with the command that started it. A command killed while its folder decoded (`kill`, `timeout`, `docker
    stop`, the OOM killer) left its workers behind for ever: reparented, each waiting for work that never came, with
    its copy of the command's memory."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>: the signal this process gets when the thread that forked it ends
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the command ended before the line above
            os._exit(1)


def _decode_chunk(
    paths: list[Path], size: int, file: str | None, offset: int
) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    """Decode images into a `(n, 3, size, size)` array; return it, or write it into `file` at `offset` (and return
    None), with the index and reason of each file that is no usable image (its row left unwritten: the command stops
    with nothing kept)."""
    rows = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    failed: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            rows[i] = decode_square(path, size).numpy()
        except UsageError as err:
            failed.append((i, str(err)))
    if file is None or failed:
        return (None if failed else rows), failed
    fd = os.open(file, os.O_WRONLY)
    try:
        write_at(fd, rows, offset)
    finally:
        os.close(fd)
    return None, failed


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # One torch thread per decoding process: the processes share the cores out (256 px JPEGs to 224 px: 1,945
    # images/s with 2 processes on 2 cores, 990 with one). Within one process, a second thread gained at most 10% on
    # an idle machine (1,440 against 1,290 images/s) and lost 8x on a busy one (130 against 1,100): small images
    # split across threads cost more in synchronisation than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr for `total` images, for large sets only (`PROGRESS_FROM` on a terminal,
    `PROGRESS_LOG_FROM` in a log); yields `advance(n)`."""
    if total < (PROGRESS_FROM if sys.stderr.isatty() else PROGRESS_LOG_FROM):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
