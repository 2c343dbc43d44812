"""The W&B tutorial "Image Classification using PyTorch Lightning", as written, for the benchmarks.

Its data module, callback and model are the tutorial's code, defects included (a shared Accuracy object,
log_softmax with nll_loss, a Variable probe pass, normalisation with 0.5, an unseeded split). Changes, each the
least that runs it here:
- CIFAR10(download=True) cannot reach its server: the data module takes the training images as the in-memory
  uint8 array torchvision's CIFAR10 holds, and serves them through CIFAR10's own `__getitem__` (PIL image,
  ToTensor, Normalize per sample), the same per-sample path.
- The test set is a held-out part of the training images; the 45,000/5,000 split becomes (rest)/5,000.
- Lightning 2 APIs: Accuracy(task=...), TQDMProgressBar(refresh_rate=20) for `progress_bar_refresh_rate=20`,
  the accelerator found and one device of it for `gpus=1`; the logger runs offline.
- Where wandb is not installed (the GPU check's machine may lack it), the logger is a CSVLogger and the image
  callback computes its predictions but has nowhere to log them.
- A callback times training as cifar-cli's FitTimer does (first step to the end of the last validation), for the
  GPU check's like-for-like epoch time; the fit's whole time is reported too.

Run as `python -m bench.tutorial ARRAYS.pt [EPOCHS [VAL_SIZE [LIMIT_BATCHES]]]` (2 epochs, 5,000 validation images,
every batch): prints one JSON line with the fit's seconds and the test accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics import Accuracy
from torchvision import transforms
from torchvision.datasets import CIFAR10

try:
    import wandb
except ImportError:
    wandb = None


def in_memory_cifar10(images: np.ndarray, labels: list[int], transform) -> CIFAR10:
    """torchvision's CIFAR10 over given arrays: its `__getitem__` makes a PIL image and applies `transform`."""
    dataset = CIFAR10.__new__(CIFAR10)
    dataset.data, dataset.targets = images, labels
    dataset.transform, dataset.target_transform = transform, None
    return dataset


class CIFAR10DataModule(pl.LightningDataModule):
    def __init__(self, arrays: dict, batch_size, val_size: int = 5000):
        super().__init__()
        self.arrays = arrays
        self.val_size = val_size
        self.batch_size = batch_size
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        )
        self.num_classes = 10

    def setup(self, stage=None):
        if stage == "fit" or stage is None:
            cifar_full = in_memory_cifar10(self.arrays["train_images"], self.arrays["train_labels"], self.transform)
            n = len(cifar_full)
            self.cifar_train, self.cifar_val = random_split(cifar_full, [n - self.val_size, self.val_size])
        if stage == "test" or stage is None:
            self.cifar_test = in_memory_cifar10(self.arrays["test_images"], self.arrays["test_labels"], self.transform)

    def train_dataloader(self):
        return DataLoader(self.cifar_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.cifar_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.cifar_test, batch_size=self.batch_size)


class ImagePredictionLogger(pl.Callback):
    def __init__(self, val_samples, num_samples=32):
        super().__init__()
        self.num_samples = num_samples
        self.val_imgs, self.val_labels = val_samples

    def on_validation_epoch_end(self, trainer, pl_module):
        val_imgs = self.val_imgs.to(device=pl_module.device)
        val_labels = self.val_labels.to(device=pl_module.device)
        logits = pl_module(val_imgs)
        preds = torch.argmax(logits, -1)
        if wandb is None:
            return
        trainer.logger.experiment.log(
            {
                "examples": [
                    wandb.Image(x, caption=f"Pred:{pred}, Label:{y}")
                    for x, pred, y in zip(
                        val_imgs[: self.num_samples], preds[: self.num_samples], val_labels[: self.num_samples]
                    )
                ]
            }
        )


class TrainClock(pl.Callback):
    """Seconds from the start of training to its end, the span of cifar-cli's FitTimer (not the tutorial's)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


class LitModel(pl.LightningModule):
    def __init__(self, input_shape, num_classes, learning_rate=2e-4):
        super().__init__()
        self.save_hyperparameters()
        self.learning_rate = learning_rate
        self.conv1 = nn.Conv2d(3, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 32, 3, 1)
        self.conv3 = nn.Conv2d(32, 64, 3, 1)
        self.conv4 = nn.Conv2d(64, 64, 3, 1)
        self.pool1 = torch.nn.MaxPool2d(2)
        self.pool2 = torch.nn.MaxPool2d(2)
        n_sizes = self._get_conv_output(input_shape)
        self.fc1 = nn.Linear(n_sizes, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.accuracy = Accuracy(task="multiclass", num_classes=num_classes)

    def _get_conv_output(self, shape):
        batch_size = 1
        input = torch.autograd.Variable(torch.rand(batch_size, *shape))
        output_feat = self._forward_features(input)
        n_size = output_feat.data.view(batch_size, -1).size(1)
        return n_size

    def _forward_features(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.pool2(F.relu(self.conv4(x)))
        return x

    def forward(self, x):
        x = self._forward_features(x)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.log_softmax(self.fc3(x), dim=1)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = self.accuracy(preds, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, logger=True)
        self.log("train_acc", acc, on_step=True, on_epoch=True, logger=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = self.accuracy(preds, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = self.accuracy(preds, y)
        self.log("test_loss", loss, prog_bar=True)
        self.log("test_acc", acc, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        return optimizer


def main(arrays_path: str, max_epochs: int = 2, val_size: int = 5000, limit_batches: int | None = None) -> dict:
    arrays = torch.load(arrays_path, weights_only=False)
    dm = CIFAR10DataModule(arrays, batch_size=32, val_size=val_size)
    dm.setup()
    val_samples = next(iter(dm.val_dataloader()))
    model = LitModel((3, 32, 32), dm.num_classes)
    if wandb is not None:
        wandb_logger = WandbLogger(project="wandb-lightning", job_type="train", save_dir="runs/bench/tutorial")
    else:
        wandb_logger = CSVLogger(save_dir="runs/bench/tutorial")
    clock = TrainClock()
    early_stop_callback = EarlyStopping(monitor="val_loss")
    checkpoint_callback = ModelCheckpoint(dirpath="runs/bench/tutorial/checkpoints")
    limits = {} if limit_batches is None else {"limit_train_batches": limit_batches, "limit_val_batches": limit_batches}
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        devices=1,  # the tutorial's gpus=1: on a machine with several GPUs, "auto" took them all under DDP
        logger=wandb_logger,
        callbacks=[
            early_stop_callback,
            ImagePredictionLogger(val_samples),
            checkpoint_callback,
            TQDMProgressBar(refresh_rate=20),
            clock,
        ],
        **limits,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    fit_seconds = time.perf_counter() - start
    results = trainer.test(datamodule=dm, ckpt_path="best", verbose=False)
    if wandb is not None:
        wandb.finish()
    return {
        "fit_seconds": fit_seconds,
        "train_seconds": clock.seconds,
        "test_acc": results[0]["test_acc"],
        "test_loss": results[0]["test_loss"],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 4 or args[0].startswith("-") or not all(a.isdigit() for a in args[1:]):
        sys.exit("usage: python -m bench.tutorial ARRAYS.pt [EPOCHS [VAL_SIZE [LIMIT_BATCHES]]]")
    if not Path(args[0]).is_file():
        sys.exit(f"bench.tutorial: {args[0]} is not a file (bench/common.py's tutorial_arrays writes one)")
    print(json.dumps(main(args[0], *map(int, args[1:]))))
