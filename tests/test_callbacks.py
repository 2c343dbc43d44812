"""Callbacks: the W&B image logger without W&B, and predictions gathered from several DDP processes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_cli.cli import main


def test_image_logger_warns_once_without_wandb(image_folder: Path) -> None:
    with pytest.warns(UserWarning, match="ImagePredictionLogger does nothing") as record:
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
              "--trainer.max_epochs", "3", "--trainer.logger", "CSVLogger"])  # fmt: skip
    assert sum("ImagePredictionLogger" in str(w.message) for w in record) == 1
    assert not Path("runs/wandb").exists()


@pytest.mark.slow
def test_ddp_on_cpu_predicts_every_image_once(image_folder: Path, tmp_path: Path) -> None:
    """Two CPU processes with DDP: each takes its own shard, and predictions.csv still lists every image once."""
    cli = [str(Path(sys.executable).parent / "cifar-cli")]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    data = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    fit = subprocess.run(
        [*cli, "fit", *ddp, *data, "--trainer.max_epochs", "1", "--data.batch_size", "15"],
        capture_output=True,
        text=True,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    # Each rank trains on its own 45 of the 90 training images: 3 steps of batch 15 an epoch (one process: 6).
    assert ckpt.name == "epoch=0-step=3.ckpt"
    predict = subprocess.run([*cli, "predict", *ddp, "--ckpt_path", str(ckpt)], capture_output=True, text=True)
    assert predict.returncode == 0, predict.stderr[-2000:]
    with open("predictions.csv") as file:
        images = [row["image"] for row in csv.DictReader(file)]
    # 30 test images over 2 ranks: 15 each, none lost, none twice, in data order.
    assert images == sorted(str(p.relative_to(image_folder).as_posix()) for p in (image_folder / "test").rglob("*.png"))
