"""Image data sets in class folders, decoded once and cached as uint8 tensors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor

from cifar_cli.atomic import atomic_write
from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import TensorImageDataset, split_indices
from cifar_cli.data.images import IMAGE_SUFFIXES, decode_images, list_images
from cifar_cli.errors import UsageError


class _Listing(NamedTuple):
    """A split folder's image files, before decoding."""

    cache: Path
    paths: list[Path]
    names: list[str]  # relative to the data set's root: <split>/<class>/<file>
    labels: Tensor
    fingerprint: str


class ImageFolderDataModule(ImageDataModule):
    """Any image data set in class folders: `root/train/<class>/*.jpg|png`, optionally `root/val/` and `root/test/`.

    Without `root/val/`, `val_size` training images are held out for validation; without `root/test/`,
    `test_size` more (0: no test split). Each folder is decoded once and cached as a uint8 tensor file, which is
    rebuilt when any image file is added, removed or changed.

    Args:
        root: Folder holding `train/<class>/` (and optionally `val/<class>/`, `test/<class>/`).
        image_size: Side of the square images the model sees, in pixels; other sizes are resized and centre-cropped.
        batch_size: Images per batch, per device.
        val_size: Training images held out for validation when there is no `root/val/`.
        test_size: Training images held out for testing when there is no `root/test/`.
        split_seed: Seed of the held-out splits; the same seed gives the same split on every run and rank.
        augment: Randomly crop and flip training images, batched on the device.
        crop_padding: With `augment`, the most pixels a crop shifts the image by (reflect padding), per side.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
        cache_dir: Where decoded folders are cached; default `$XDG_CACHE_HOME/cifar-cli` or `~/.cache/cifar-cli`.
    """

    def __init__(
        self,
        root: str,
        image_size: PositiveInt = 32,
        batch_size: PositiveInt = 32,
        val_size: PositiveInt = 5000,
        test_size: NonNegativeInt = 0,
        split_seed: int = 42,
        augment: bool = False,
        crop_padding: PositiveInt = 4,
        predict_root: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, split_seed, augment, crop_padding, predict_root)
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.test_size = test_size
        xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else Path(xdg_cache) / "cifar-cli"
        self._classes = self._find_classes()
        self.save_hyperparameters()

    def _find_classes(self) -> list[str]:
        train = self.root / "train"
        layout = "expected ROOT/train/<class>/<image>.jpg (or .png)"
        if not self.root.is_dir():
            raise UsageError(f"image folder {self.root} does not exist: {layout}")
        if not train.is_dir():
            raise UsageError(f"image folder {self.root} has no train/ folder: {layout}")
        classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise UsageError(f"{train} has no class folders: {layout}")
        return classes

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _missing_split_hint(self, split: str) -> str:
        if split == "test":
            return f"add {self.root}/test/<class>/ or hold out training images with --data.test_size N"
        return super()._missing_split_hint(split)

    def _cache_path(self, folder: Path) -> Path:
        key = hashlib.sha1(f"{folder.resolve()}|{self.image_size}".encode()).hexdigest()[:16]
        return self.cache_dir / f"{folder.name}-{self.image_size}px-{key}.pt"

    def _list_folder(self, split: str) -> _Listing:
        """A labelled split folder's images, checked against the class folders of `train/`."""
        folder = self.root / split
        paths = list_images(folder)
        names = [p.relative_to(self.root).as_posix() for p in paths]
        stray = [name for name in names if len(Path(name).parts) < 3]
        if stray:
            raise UsageError(
                f"{self.root / stray[0]} is not in a class folder of {folder}: move it into {split}/<class>/ or "
                "remove it"
            )
        classes = [Path(name).parts[1] for name in names]
        unknown = sorted(set(classes) - set(self._classes))
        if unknown:
            raise UsageError(f"{folder} has classes that train/ lacks: {', '.join(unknown)}")
        if split == "train" and not paths:
            raise UsageError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if split == "train":
            empty = sorted(set(self._classes) - set(classes))
            if empty:
                # A class without training images would be an output the network never learns.
                raise UsageError(
                    f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {folder} "
                    f"{'have' if len(empty) > 1 else 'has'} no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                    "add images or remove the folder"
                )
        # The fingerprint covers every file's name, size and modification time: editing, adding or removing an
        # image rebuilds the cache. Stat-ing 50,000 files takes about 0.5 s.
        digest = hashlib.sha1(str(self.image_size).encode())
        for name, path in zip(names, paths):
            stat = path.stat()
            digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        index = {name: i for i, name in enumerate(self._classes)}
        labels = torch.tensor([index[c] for c in classes], dtype=torch.long)
        return _Listing(self._cache_path(folder), paths, names, labels, digest.hexdigest())

    def _cached(self, listing: _Listing) -> Tensor | None:
        """The listing's decoded images from the cache, or None when there is none or it is out of date."""
        if listing.cache.is_file():
            # Memory-mapped: prepare_data only checks the fingerprint, and setup copies out just the splits it
            # indexes.
            cached = torch.load(listing.cache, weights_only=True, mmap=True)
            if cached["fingerprint"] == listing.fingerprint:
                return cached["images"]
        return None

    def _write_cache(self, listing: _Listing, images: Tensor) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so an interrupted build never leaves a truncated cache behind.
        state = {"fingerprint": listing.fingerprint, "images": images, "labels": listing.labels}
        atomic_write(listing.cache, lambda file: torch.save(state, file))

    def _read_folder(self, split: str) -> tuple[Tensor, Tensor, list[str]]:
        """A labelled split folder as (images, labels, paths relative to root), from the cache when it is current."""
        listing = self._list_folder(split)
        images = self._cached(listing)
        if images is None:
            images = decode_images(listing.paths, self.image_size)
            self._write_cache(listing, images)
        return images, listing.labels, listing.names

    def _held_out(self) -> int:
        val = 0 if (self.root / "val").is_dir() else self.val_size
        test = 0 if (self.root / "test").is_dir() else self.test_size
        return val + test

    def prepare_files(self, stage: str) -> None:
        # Every check before any decoding, and every folder decoded before any cache is written: bad data stops
        # the command with nothing written.
        listings = [self._list_folder(split) for split in ("train", "val", "test") if (self.root / split).is_dir()]
        self.check_split_sizes(len(listings[0].paths), self._held_out())
        needs_test = stage == "test" or (stage == "predict" and self.predict_root is None)
        if needs_test and not (self.root / "test").is_dir() and not self.test_size:
            raise UsageError(f"{type(self).__name__} has no test split: {self._missing_split_hint('test')}")
        stale = [listing for listing in listings if self._cached(listing) is None]
        decoded = [(listing, decode_images(listing.paths, self.image_size)) for listing in stale]
        for listing, images in decoded:
            self._write_cache(listing, images)

    def load_splits(self) -> None:
        images, labels, names = self._read_folder("train")
        self.check_split_sizes(len(images), self._held_out())
        self.set_statistics(images)
        has_val, has_test = (self.root / "val").is_dir(), (self.root / "test").is_dir()
        sizes = [0 if has_val else self.val_size, 0 if has_test else self.test_size]
        val_index, test_index, train_index = split_indices(len(images), sizes, self.split_seed)

        def part(index: Tensor) -> tuple[Tensor, Tensor, list[str]]:
            return images[index], labels[index], [names[i] for i in index.tolist()]

        # Only the test split keeps its image names (for predictions.csv); train gets none built.
        self.splits = {"train": TensorImageDataset(images[train_index], labels[train_index])}
        val_images, val_labels, _ = self._read_folder("val") if has_val else part(val_index)
        self.splits["val"] = TensorImageDataset(val_images, val_labels)
        if has_test or self.test_size:
            test_images, test_labels, self.predict_names = self._read_folder("test") if has_test else part(test_index)
            self.splits["test"] = self.splits["predict"] = TensorImageDataset(test_images, test_labels)
