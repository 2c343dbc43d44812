"""The one LightningModule: cross-entropy on an injected network's logits, one accuracy metric per stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

Batch = tuple[Tensor, Tensor]


class ImageClassifier(LightningModule):
    """Trains `net` with cross-entropy and logs the tutorial's metric names (`train_loss`, `val_acc`, ...).

    Args:
        net: The network; it returns logits. On the command line: `--model.net cifar_cli.nets.TutorialCNN`.
        class_names: Class names in label order; the CLI links them from the data module.
        learning_rate: Adam's learning rate, used unless `--optimizer` picks another optimizer.
        label_smoothing: Cross-entropy label smoothing, 0 for none.
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str],
        learning_rate: float = 2e-4,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        # Under LightningCLI the saved `net` is its config (class_path, init_args), so `--ckpt_path` alone can
        # rebuild the model.
        self.save_hyperparameters()
        self.net = net
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        # One metric object per stage: sharing one would mix training and validation counts. Metric objects also
        # keep DDP cheap: they accumulate on each rank and synchronise once, when the epoch's value is computed.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Batch, stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        mean_loss: MeanMetric = getattr(self, f"{stage}_loss")
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        mean_loss(loss, weight=len(labels))  # the epoch's value is the mean over images, not over batches
        accuracy(logits, labels)
        # Logged as metric objects: Lightning reads them only every log_every_n_steps, so no host sync per step.
        training = stage == "train"
        self.log(f"{stage}_loss", mean_loss, on_step=training, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", accuracy, on_step=training, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        confidence, predicted = self(images).float().softmax(dim=1).max(dim=1)
        return {"predicted": predicted, "confidence": confidence, "label": labels}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Replaced by LightningCLI when --optimizer / --lr_scheduler are given.
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
