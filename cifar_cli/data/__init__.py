"""Data modules: CIFAR-10/100 and class-folder image sets, held as uint8 tensors on the training device.

Every split is decoded once into a `(N, 3, H, W)` uint8 tensor and moved to the training device once, when its
loader is first asked for (CIFAR-10's 60,000 images take 184 MB). A batch is then one index operation on that
device (`DeviceBatches`), turned there into normalised floats and, for training, randomly cropped and flipped as a
whole batch (`ImageDataModule.preprocess`). No worker processes, per-sample Python work or host-to-device copies
happen on the hot path.

Data larger than the device's memory stays in host memory or on disk instead (`--data.placement`, placement.py):
each batch is then gathered there, or read from a `.npy` file (storage.py), and copied to the device one batch
ahead. Image folders are decoded by a process per core (images.py).
"""

from cifar_cli.data.augment import BatchAugment, random_crop, random_crop_flip, random_flip
from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import DeviceBatches, TensorImageDataset, split_indices
from cifar_cli.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from cifar_cli.data.folder import ImageFolderDataModule
from cifar_cli.data.images import IMAGE_SUFFIXES, decode_images, image_suffixes, list_images
from cifar_cli.data.photo import PhotoAugment
from cifar_cli.data.storage import DiskImages

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchAugment",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceBatches",
    "DiskImages",
    "ImageDataModule",
    "ImageFolderDataModule",
    "PhotoAugment",
    "TensorImageDataset",
    "decode_images",
    "image_suffixes",
    "list_images",
    "random_crop",
    "random_crop_flip",
    "random_flip",
    "split_indices",
]
