"""CIFAR-10 and CIFAR-100, read with torchvision (downloaded and checksum-verified on first use)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100

from cifar_cli.atomic import atomic_file
from cifar_cli.data.augment import BatchAugment, Flip
from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import TensorImageDataset, split_indices
from cifar_cli.data.placement import Placement
from cifar_cli.data.storage import (
    DiskImages,
    cache_path,
    chunk_bounds,
    create_npy,
    default_cache_dir,
    remove_other_versions,
    rows_of,
    stat_key,
    write_at,
)
from cifar_cli.errors import UsageError


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training images (split into train and validation) and 10,000 test images, 32x32 RGB.

    Args:
        data_dir: Folder of `cifar-10-batches-py/` (or where to download it).
        download: Download the data set (checksum verified) when it is not in `data_dir` yet.
        batch_size: Images per batch, per device.
        val_size: Training images held out for validation.
        split_seed: Seed of the train/validation split; the same seed gives the same split on every run and rank.
        augment: Augment training images, batched on the device: `true` crops and flips them (CIFAR style), a
            class such as `PhotoAugment` does what it says (`--data.augment PhotoAugment --data.augment.mixup 0.2`).
        crop_padding: With `augment` true, the most pixels a crop shifts the image by (reflect padding), per side.
        flip: With `augment` true, which images are mirrored: `random`, each with probability 1/2 every epoch;
            `alternate` (airbench), a random half in the first epoch and each image the other way in every epoch
            after that.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
        cache_dir: Where `placement` disk keeps its copy of the data set, as `.npy` files; default
            `$XDG_CACHE_HOME/cifar-cli` or `~/.cache/cifar-cli`.
        placement: Where the uint8 splits live while training: `device` (moved to it once), `host` (host memory,
            each batch copied to the device one batch ahead), `disk` (a copy in `cache_dir`, each batch reading its
            rows: host memory stays bounded), `auto` (the first of these the splits fit in half the free memory of).
    """

    dataset_class: type[CIFAR10] = CIFAR10
    names: tuple[str, ...] = (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    )  # fmt: skip

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: PositiveInt = 32,
        val_size: PositiveInt = 5000,
        split_seed: int = 42,
        augment: bool | BatchAugment = False,
        crop_padding: PositiveInt = 4,
        predict_root: str | None = None,
        cache_dir: str | None = None,
        placement: Placement = "auto",
        flip: Flip = "random",
    ) -> None:
        super().__init__(batch_size, val_size, split_seed, augment, crop_padding, predict_root, placement, flip)
        self.data_dir = data_dir
        self.download = download
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.save_hyperparameters()

    @property
    def class_names(self) -> list[str]:
        return list(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _load(self, train: bool, download: bool = False) -> CIFAR10:
        cls = self.dataset_class
        existed = os.path.isdir(self.data_dir)
        try:
            return cls(self.data_dir, train=train, download=download)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if not existed and os.path.isdir(self.data_dir) and not os.listdir(self.data_dir):
                os.rmdir(self.data_dir)  # the download made it and wrote nothing: leave no empty folder behind
            raise UsageError(
                f"could not download {cls.__name__} from {cls.url} ({reason}): download {cls.filename} by hand and "
                f"put it in {os.path.abspath(self.data_dir)}/, or train on an image folder with "
                "--data ImageFolderDataModule --data.root DIR"
            ) from err
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise UsageError(
                f"{cls.__name__} is missing or corrupted in {os.path.abspath(self.data_dir)}/{cls.base_folder}: "
                f"drop --data.download false to download it, or put {cls.filename} from {cls.url} there"
            ) from err

    def prepare_files(self, stage: str) -> None:
        copy = self._disk_copy(train=True) if self.placement == "disk" else None
        if copy is not None and self._disk_copy(train=False) is not None:
            # Checked when the copy was made (a changed file changes its name): reading the data set again would
            # load it whole into memory, which disk placement keeps bounded.
            self._check_split(len(copy[0]))  # before the trainer is built, not in `setup`
            return
        # Download once per node; torchvision verifies the MD5 sums.
        train = self._load(train=True, download=self.download)
        self._load(train=False, download=self.download)
        self._check_split(len(train.data))

    def _check_split(self, images: int) -> None:
        """Refuse a --data.val_size that leaves nothing to train on (`check_split_sizes`), and record what decides
        which training images validation holds out (`split_indices`), for `check_held_out`: a checkpoint validated
        with a larger --data.val_size or another --data.split_seed was scored, without a word, on images it had
        trained on. Plain ints: weights-only loading of the checkpoint refuses PositiveInt."""
        self.check_split_sizes(images, self.val_size)
        self.held_out_from = {"images": images, "names": self.dataset_class.__name__, "val_size": int(self.val_size),
                              "test_size": 0, "split_seed": int(self.split_seed)}  # fmt: skip

    def _held_out_source(self) -> str:
        return os.path.join(self.data_dir, self.dataset_class.base_folder)

    def _files(self, train: bool) -> list[Path]:
        listed = self.dataset_class.train_list if train else self.dataset_class.test_list
        return [Path(self.data_dir) / self.dataset_class.base_folder / name for name, _ in listed]

    def _disk_copy_path(self, train: bool) -> Path:
        # Named by the archive files' sizes and times, as ImageFolderDataModule's caches are.
        digest = hashlib.sha1()
        for path in self._files(train):
            digest.update(f"{path.name}|{stat_key(path)}\n".encode())
        name = f"{self.dataset_class.__name__.lower()}-{'train' if train else 'test'}"
        return cache_path(
            self.cache_dir, name, Path(self.data_dir) / self.dataset_class.base_folder, digest.hexdigest()
        )

    def _disk_copy(self, train: bool) -> tuple[DiskImages, Path] | None:
        """The split's images and the path of its labels in the disk copy, or None when there is none yet."""
        try:
            images = self._disk_copy_path(train)
            labels = images.with_suffix(".labels.npy")
            return (DiskImages(images), labels) if labels.is_file() else None
        except (OSError, ValueError):
            return None

    def _disk_split(self, train: bool) -> tuple[DiskImages, Tensor]:
        """The training or test images as a `.npy` file in `cache_dir` (made on first use), and their labels."""
        copy = self._disk_copy(train)
        if copy is None:
            data = self._load(train)  # 150 MB of CIFAR-10 in memory, once
            path = self._disk_copy_path(train)
            with atomic_file(path) as partial, atomic_file(path.with_suffix(".labels.npy")) as labels_partial:
                offset = create_npy(partial, (len(data.data), 3, 32, 32))
                fd = os.open(partial, os.O_WRONLY)
                try:
                    for start, stop in chunk_bounds(len(data.data), 3 * 32 * 32):
                        rows = np.ascontiguousarray(data.data[start:stop].transpose(0, 3, 1, 2))  # NHWC -> NCHW
                        write_at(fd, rows, offset + start * rows[0].nbytes)
                finally:
                    os.close(fd)
                with open(labels_partial, "wb") as file:
                    np.save(file, np.asarray(data.targets, dtype=np.int64))
            remove_other_versions(path)
            copy = self._disk_copy(train)
            assert copy is not None
        images, labels = copy
        return images, torch.from_numpy(np.load(labels))

    def load_splits(self) -> None:
        # About the bytes of the images: the pickled batches hold them with a few bytes of labels and names.
        nbytes = sum(path.stat().st_size for path in [*self._files(True), *self._files(False)])
        if self.choose_placement(nbytes) == "disk":
            images, labels = self._disk_split(train=True)
            test_images, test_labels = self._disk_split(train=False)
        else:
            train, test = self._load(train=True), self._load(train=False)
            images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, still uint8
            labels = torch.tensor(train.targets, dtype=torch.long)
            test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
            test_labels = torch.tensor(test.targets, dtype=torch.long)
        self._check_split(len(images))
        val_index, train_index = split_indices(len(images), [self.val_size], self.split_seed)
        self.splits = {
            "train": TensorImageDataset(rows_of(images, train_index), labels[train_index]),
            "val": TensorImageDataset(rows_of(images, val_index), labels[val_index]),
            "test": TensorImageDataset(test_images, test_labels),
        }
        self.set_statistics(self.splits["train"].images)
        self.splits["predict"] = self.splits["test"]
        self.predict_names = [str(i) for i in range(len(test_images))]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: like CIFAR-10, with 100 classes of 500 training and 100 test images each.

    Args:
        data_dir: Folder of `cifar-100-python/` (or where to download it).
        download: Download the data set (checksum verified) when it is not in `data_dir` yet.
        batch_size: Images per batch, per device.
        val_size: Training images held out for validation.
        split_seed: Seed of the train/validation split; the same seed gives the same split on every run and rank.
        augment: Augment training images, batched on the device: `true` crops and flips them (CIFAR style), a
            class such as `PhotoAugment` does what it says (`--data.augment PhotoAugment --data.augment.mixup 0.2`).
        crop_padding: With `augment` true, the most pixels a crop shifts the image by (reflect padding), per side.
        flip: With `augment` true, which images are mirrored: `random`, each with probability 1/2 every epoch;
            `alternate` (airbench), a random half in the first epoch and each image the other way in every epoch
            after that.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
        cache_dir: Where `placement` disk keeps its copy of the data set, as `.npy` files; default
            `$XDG_CACHE_HOME/cifar-cli` or `~/.cache/cifar-cli`.
        placement: Where the uint8 splits live while training: `device` (moved to it once), `host` (host memory,
            each batch copied to the device one batch ahead), `disk` (a copy in `cache_dir`, each batch reading its
            rows: host memory stays bounded), `auto` (the first of these the splits fit in half the free memory of).
    """

    dataset_class = CIFAR100
    # The fine label names, in label order, as in the archive's `meta` file; known before the download so the
    # CLI can link them into the model.
    names = (
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
        "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
        "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
        "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
        "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
        "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
        "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
        "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
        "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    )  # fmt: skip
