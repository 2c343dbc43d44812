"""Callbacks: validation images with their predictions on W&B, the `predict` CSV writer, a fit clock."""

from __future__ import annotations

import csv
import os
from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from cifar_cli.data import ImageDataModule


def run_dir(trainer: Trainer) -> str:
    """The run's own folder: `save_dir/name/version` of the first logger, as ModelCheckpoint derives it."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


class ImagePredictionLogger(Callback):
    """After every validation epoch, logs the same validation images to W&B, captioned "Pred: cat, Label: dog".

    The sample is drawn once, with a fixed seed, from the whole validation split (whose first images may all be
    of one class), so the panel shows how the predictions on the same images change as training goes on.

    Args:
        num_samples: Number of validation images to log.
        key: Name of the W&B media panel.
    """

    def __init__(self, num_samples: PositiveInt = 32, key: str = "examples") -> None:
        self.num_samples = num_samples
        self.key = key
        self._sample: tuple[Tensor, Tensor] | None = None
        self._warned = False

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(f"ImagePredictionLogger does nothing: {message}")
            self._warned = True

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            self._warn_once("it logs to W&B and the trainer has no WandbLogger")
            return
        data = trainer.datamodule
        if not isinstance(data, ImageDataModule):
            self._warn_once("it needs one of cifar_cli's data modules")
            return
        if self._sample is None:
            val = data.splits["val"]
            pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[: self.num_samples]
            images, labels = val[pick.to(val.device)]
            self._sample = images.cpu(), labels.cpu()
        images, labels = self._sample
        precision = trainer.precision_plugin
        with torch.no_grad(), precision.forward_context():
            inputs = precision.convert_input(data.preprocess(images.to(pl_module.device)))
            predicted = pl_module(inputs).argmax(dim=1).cpu()
        names = pl_module.class_names
        captions = [f"Pred: {names[p]}, Label: {names[y]}" for p, y in zip(predicted.tolist(), labels.tolist())]
        pictures = list(images.permute(0, 2, 3, 1).numpy())  # HWC uint8, as W&B expects
        for logger in loggers:
            logger.log_image(key=self.key, images=pictures, caption=captions, step=trainer.global_step)


class PredictionWriter(Callback):
    """Writes `predict`'s results to a CSV file in the run's folder and prints where.

    Columns: `image` (path relative to the image folder, or index in the split), `predicted` class name,
    `confidence` (softmax probability of that class), and `label`, the true class name where the split has labels.
    Rows follow the order of the split, whichever rank predicted them.

    Args:
        filename: Name of the CSV file.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._rows: list[dict[str, Tensor]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Each batch's rows carry their images' index in the split (`predict_step`), so no sampler bookkeeping.
        self._rows.append(outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        keys = ("index", "predicted", "confidence", "label")
        columns = [torch.cat([row[k] for row in self._rows]) if self._rows else torch.empty(0) for k in keys]
        self._rows = []
        index, predicted, confidence, label = (c.cpu() for c in gather_rows(trainer, pl_module, columns))
        if not trainer.is_global_zero:
            return
        # Under DDP the sampler hands a few images to two ranks; keep each image once, in data order.
        index, first = torch.unique(index, return_inverse=True)
        keep = torch.empty(len(index), dtype=torch.long).scatter_(0, first, torch.arange(len(first)))
        names = pl_module.class_names
        data = trainer.datamodule
        image_names = getattr(data, "predict_names", None) or [str(i) for i in range(int(index.max()) + 1)]
        folder = run_dir(trainer)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "predicted", "confidence", "label"])
            for i, row in zip(index.tolist(), keep.tolist()):
                y = int(label[row])
                true_name = names[y] if y >= 0 else ""
                writer.writerow(
                    [image_names[i], names[int(predicted[row])], f"{float(confidence[row]):.4f}", true_name]
                )
        os.replace(partial, path)  # complete or absent, never half-written
        print(f"Predictions for {len(index)} images written to {path}")


class FitTimer(Timer):
    """Lightning's Timer that also logs `fit_time`: seconds since training began, at the end of every validation.

    Plots accuracy against wall-clock time on W&B, and gives the benchmarks their time to accuracy. The time
    counts training and validation, not the setup before the first step; a resumed run continues its count.

    Args:
        duration: Stop training after this long (`"DD:HH:MM:SS"` or a dict such as `{"minutes": 30}`).
    """

    def __init__(self, duration: str | dict[str, int] | None = None) -> None:
        super().__init__(duration=duration, interval="step")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self.time_elapsed("train")
        if not trainer.sanity_checking and elapsed > 0:
            pl_module.log("fit_time", elapsed, sync_dist=False, rank_zero_only=True)


def gather_rows(trainer: Trainer, pl_module: LightningModule, columns: list[Tensor]) -> list[Tensor]:
    """Concatenate equally long 1-D columns over all ranks; ranks may hold different row counts."""
    if trainer.world_size == 1:
        return columns
    device = pl_module.device
    count = torch.tensor([len(columns[0])], device=device)
    longest = int(trainer.strategy.all_gather(count).max())
    gathered = []
    for column in columns:
        padded = torch.full((longest,), -1, dtype=column.dtype, device=device)
        padded[: len(column)] = column.to(device)
        gathered.append(trainer.strategy.all_gather(padded).reshape(-1).cpu())
    valid = gathered[0] >= 0  # padding rows carry index -1
    return [column[valid] for column in gathered]
