"""Callbacks: the W&B image logger without W&B. (Predictions gathered from several DDP processes: test_ddp.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_cli.cli import main


def test_image_logger_warns_once_without_wandb(image_folder: Path) -> None:
    with pytest.warns(UserWarning, match="ImagePredictionLogger does nothing") as record:
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
              "--trainer.max_epochs", "3", "--trainer.logger", "CSVLogger"])  # fmt: skip
    assert sum("ImagePredictionLogger" in str(w.message) for w in record) == 1
    assert not Path("runs/wandb").exists()
