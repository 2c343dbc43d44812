"""Data modules: CIFAR-10/100 and class-folder image sets, held as uint8 tensors on the training device.

Every split is decoded once into a `(N, 3, H, W)` uint8 tensor and moved to the training device once, when its
loader is first asked for (CIFAR-10's 60,000 images take 184 MB). A batch is then one index operation on that
device (`DeviceBatches`), turned there into normalised floats and, for training, randomly cropped and flipped as a
whole batch (`ImageDataModule.preprocess`). No worker processes, per-sample Python work or host-to-device copies
happen on the hot path.
"""

from cifar_cli.data.augment import random_crop, random_flip
from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import DeviceBatches, TensorImageDataset, split_indices
from cifar_cli.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from cifar_cli.data.folder import ImageFolderDataModule
from cifar_cli.data.images import IMAGE_SUFFIXES, decode_images, list_images

__all__ = [
    "IMAGE_SUFFIXES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceBatches",
    "ImageDataModule",
    "ImageFolderDataModule",
    "TensorImageDataset",
    "decode_images",
    "list_images",
    "random_crop",
    "random_flip",
    "split_indices",
]
