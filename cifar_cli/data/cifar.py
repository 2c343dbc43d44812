"""CIFAR-10 and CIFAR-100, read with torchvision (downloaded and checksum-verified on first use)."""

from __future__ import annotations

import os
import urllib.error

import torch
from jsonargparse.typing import PositiveInt
from torchvision.datasets import CIFAR10, CIFAR100

from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import TensorImageDataset, split_indices
from cifar_cli.errors import UsageError


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training images (split into train and validation) and 10,000 test images, 32x32 RGB.

    Args:
        data_dir: Folder of `cifar-10-batches-py/` (or where to download it).
        download: Download the data set (checksum verified) when it is not in `data_dir` yet.
        batch_size: Images per batch, per device.
        val_size: Training images held out for validation.
        split_seed: Seed of the train/validation split; the same seed gives the same split on every run and rank.
        augment: Randomly crop and flip training images, batched on the device.
        crop_padding: With `augment`, the most pixels a crop shifts the image by (reflect padding), per side.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
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
        augment: bool = False,
        crop_padding: PositiveInt = 4,
        predict_root: str | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, split_seed, augment, crop_padding, predict_root)
        self.data_dir = data_dir
        self.download = download
        self.save_hyperparameters()

    @property
    def class_names(self) -> list[str]:
        return list(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _load(self, train: bool, download: bool = False) -> CIFAR10:
        cls = self.dataset_class
        try:
            return cls(self.data_dir, train=train, download=download)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
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
        # Download once per node; torchvision verifies the MD5 sums.
        train = self._load(train=True, download=self.download)
        self._load(train=False, download=self.download)
        self.check_split_sizes(len(train.data), self.val_size)

    def load_splits(self) -> None:
        train = self._load(train=True)
        images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, still uint8
        labels = torch.tensor(train.targets, dtype=torch.long)
        self.check_split_sizes(len(images), self.val_size)
        self.set_statistics(images)
        val_index, train_index = split_indices(len(images), [self.val_size], self.split_seed)
        test = self._load(train=False)
        test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
        self.splits = {
            "train": TensorImageDataset(images[train_index], labels[train_index]),
            "val": TensorImageDataset(images[val_index], labels[val_index]),
            "test": TensorImageDataset(test_images, torch.tensor(test.targets, dtype=torch.long)),
        }
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
        augment: Randomly crop and flip training images, batched on the device.
        crop_padding: With `augment`, the most pixels a crop shifts the image by (reflect padding), per side.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
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
