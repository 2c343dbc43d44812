"""Callbacks: the W&B image logger without W&B, hooks called only where implemented, the progress bar.
(Predictions gathered from several DDP processes: test_ddp.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer import call

from cifar_cli import hooks
from cifar_cli.callbacks import RichBar
from cifar_cli.classifier import ImageClassifier
from cifar_cli.cli import main
from cifar_cli.data import ImageFolderDataModule
from cifar_cli.nets import TutorialCNN


def test_image_logger_warns_once_without_wandb(image_folder: Path) -> None:
    with pytest.warns(UserWarning, match="ImagePredictionLogger does nothing") as record:
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
              "--trainer.max_epochs", "3", "--trainer.logger", "CSVLogger"])  # fmt: skip
    assert sum("ImagePredictionLogger" in str(w.message) for w in record) == 1
    assert not Path("runs/wandb").exists()


class Recorder(Callback):
    """Records every per-step hook call it gets, in order, into a shared list."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def on_train_batch_start(self, *args) -> None:
        self.calls.append((self.name, "on_train_batch_start"))

    def on_before_backward(self, *args) -> None:
        self.calls.append((self.name, "on_before_backward"))

    def on_train_batch_end(self, *args) -> None:
        self.calls.append((self.name, "on_train_batch_end"))


def fit_with(callbacks: list[Callback], image_folder: Path) -> None:
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=16)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    Trainer(max_steps=3, callbacks=callbacks, accelerator="cpu", **quiet).fit(model, data)


def test_hooks_reach_the_callbacks_that_implement_them_in_lightnings_order(image_folder: Path) -> None:
    def run(function) -> list:
        calls: list = []
        one_off = Callback()  # implements a hook on the instance, not the class
        one_off.on_after_backward = lambda *args: calls.append(("one-off", "on_after_backward"))
        installed, call._call_callback_hooks = call._call_callback_hooks, function
        try:
            fit_with([Recorder(calls, "first"), Callback(), one_off, Recorder(calls, "second")], image_folder)
        finally:
            call._call_callback_hooks = installed
        return calls

    lightning, ours = run(hooks._ORIGINAL), run(hooks._call_callback_hooks)
    assert ours == lightning and len(ours) == 3 * 7  # 3 steps, 7 calls a step
    assert hooks.implementers([Callback(), Recorder([], "r")], "on_train_batch_end")[0].name == "r"


def test_install_keeps_lightnings_function_if_its_parameters_differ(monkeypatch) -> None:
    monkeypatch.setattr(call, "_call_callback_hooks", hooks._ORIGINAL)
    monkeypatch.setattr(hooks, "_ORIGINAL", lambda trainer, hook_name, *args, **kwargs: None)
    assert hooks.install() is False and call._call_callback_hooks is not hooks._call_callback_hooks


def test_progress_bar_reads_the_metrics_at_most_once_an_interval(image_folder: Path, monkeypatch) -> None:
    reads: list[int] = []
    real = RichBar._update_metrics

    def counted(self, trainer, pl_module) -> None:
        reads.append(trainer.global_step)
        real(self, trainer, pl_module)

    monkeypatch.setattr(RichBar, "_update_metrics", counted)
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=4)
    model = ImageClassifier(TutorialCNN(3), class_names=["cat", "dog", "frog"])
    trainer = Trainer(max_epochs=1, limit_val_batches=0, callbacks=[RichBar(metrics_interval=3600)], logger=False,
                      enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, data)
    steps = trainer.global_step
    assert steps >= 10 and reads.count(1) == 1 and len(reads) <= 3  # the first step, and the epoch's end


def test_cuda_check_answers_without_nvml_only_where_no_gpu_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's NVML-based CUDA check goes where no GPU answers (it reloads NVML at every Adam step on a CPU);
    where one does, it stays, so that nothing initialises CUDA before a fork."""
    monkeypatch.setenv(hooks.NVML_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hooks.plain_cuda_check_without_gpu()
    assert os.environ[hooks.NVML_CHECK] == "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hooks.plain_cuda_check_without_gpu()
    assert hooks.NVML_CHECK not in os.environ
