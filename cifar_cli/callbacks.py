"""Callbacks: validation images with their predictions on W&B, the `predict` CSV writer, a fit clock, and the
checkpoint that keeps a run resumable (`LastCheckpoint`) with the clean stop on SIGTERM or Ctrl-C (`Preemption`)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from cifar_cli.atomic import atomic_write, remove_empty_folders
from cifar_cli.data import ImageDataModule
from cifar_cli.entry import (
    STAGES,
    START_SIGNALS,
    StoppedBeforeStart,
    after_stage_handler,
    hand_signals_to_lightning,
    keep_stopping_cleanly,
    stop_cleanly_after_stage,
)
from cifar_cli.errors import UsageError


def run_dir(trainer: Trainer) -> str:
    """The run's own folder: `save_dir/name/version` of the first logger, as ModelCheckpoint derives it."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


NO_WANDB = "it logs to W&B and the trainer has no WandbLogger"
NO_DATA_MODULE = "it needs one of cifar_cli's data modules"
NO_LOGGER = "it logs to the trainer's loggers and the trainer has none"
# Lightning's callbacks that refuse a trainer without a logger, once it trains (its config.yaml written by then).
LOGGER_ONLY = (LearningRateMonitor, DeviceStatsMonitor)


def warn_idle(callback: Callback, reason: str) -> None:
    """Say, once per callback, that it does nothing in this run and why: one line, as cifar-cli's other notices. A
    Python warning added its source path and line (two lines more) to every run without W&B, the README's own
    `--trainer.logger CSVLogger` included. Nothing for a default callback idle without W&B (cifar_cli.cli's
    mark_defaults): the user chose the run's logger and never asked for it."""
    if reason == NO_WANDB and getattr(callback, "listed_by_default", False):
        return
    if not getattr(callback, "_warned_idle", False):
        rank_zero_only(print)(f"cifar-cli: {type(callback).__name__} does nothing: {reason}", file=sys.stderr)
        callback._warned_idle = True


def drop_logger_only(trainer: Trainer, training: bool) -> None:
    """Take the callbacks that need a logger out of a trainer that has none (`logger: false`, as configs/debug.yaml
    sets), saying so once where it will train: the run goes on without them, as it does without the W&B-only
    callbacks when there is no W&B logger."""
    if trainer.loggers:
        return
    for callback in [c for c in trainer.callbacks if isinstance(c, LOGGER_ONLY)]:
        trainer.callbacks.remove(callback)
        if training:
            warn_idle(callback, NO_LOGGER)


def one_per_state_key(callbacks: list[Callback]) -> tuple[list[Callback], list[int]]:
    """`callbacks` with one callback for each state key, saying so where two shared one: the later takes the
    earlier's place, as a later config or flag replaces an earlier value. `--trainer.callbacks+=EarlyStopping
    --trainer.callbacks.monitor val_loss --trainer.callbacks.patience 10`, beside the default EarlyStopping on
    val_loss, gives it another patience; Lightning refused the pair in a traceback, as a checkpoint keeps one state
    a key (Lightning's own test of a callback's state, `_validate_callbacks_list`). Also returns the positions in
    `callbacks` of those kept, in their new order, for the config's list to follow.

    LearningRateMonitor and DeviceStatsMonitor keep no state, but two of them log the same metrics under the same
    names: a recipe's LearningRateMonitor and one added with `+=` logged every learning rate twice (two rows a step
    in metrics.csv). They are one per run too."""
    kept: list[int] = []
    place: dict[str, int] = {}
    for i, callback in enumerate(callbacks):
        stateful = is_overridden("state_dict", instance=callback, parent=Callback)
        key = callback.state_key if stateful or isinstance(callback, LOGGER_ONLY) else None
        if key is None or key not in place:
            if key is not None:
                place[key] = len(kept)
            kept.append(i)
            continue
        kept[place[key]] = i
        rank_zero_only(print)(
            f"cifar-cli: --trainer.callbacks lists {key} twice: the later one's settings replace the earlier's",
            file=sys.stderr,
        )
    return [callbacks[i] for i in kept], kept


# Images of up to this many pixels go into the prediction tables whole split (CIFAR's 32x32, 64x64 thumbnails);
# larger ones, a sample of TABLE_SAMPLE: a W&B table row holds a PNG of its image.
TABLE_WHOLE_PIXELS = 64 * 64
TABLE_SAMPLE = 1000
# wandb.Table.MAX_ARTIFACT_ROWS: a table logged to a run is kept as an artifact, which the W&B app shows, of at
# most this many rows; wandb drops the rest (a larger split's last images, often whole classes of an image folder).
# Past it, the rows are drawn at random. (The run's own media copy, which the app does not read, keeps 10,000.)
TABLE_MAX_ROWS = 200_000


def table_rows(size: int, image_shape: tuple[int, ...], rows: int | None = None) -> Tensor:
    """The positions, in order, of the images of a split of `size` that go into a W&B prediction table: `rows` of
    them (None: all where the images are small, else TABLE_SAMPLE; never more than TABLE_MAX_ROWS), drawn the same
    every time."""
    if rows is None:
        rows = size if image_shape[-2] * image_shape[-1] <= TABLE_WHOLE_PIXELS else TABLE_SAMPLE
    rows = min(rows, TABLE_MAX_ROWS)
    if rows >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:rows].sort().values


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def logged_step(trainer: Trainer) -> int:
    """The step Lightning logs the current stage's metrics at (W&B's `trainer/global_step`): its count of batches
    that stepped, one behind global_step at an epoch's validation. What a callback logs beside a validation
    (its images, its confusion matrix) goes there too, beside the val_acc it shows."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def last_checkpoint(trainer: Trainer) -> str | None:
    """The path of the run's `last.ckpt` (or of any ModelCheckpoint's last checkpoint), once one is saved. (A
    Checkpoint of another kind, a user's own, has no `last_model_path`: the summary failed on it.)"""
    paths = (getattr(c, "last_model_path", None) for c in trainer.checkpoint_callbacks)
    return next((path for path in paths if path), None)


def model_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    """The first ModelCheckpoint, whose best checkpoint the summary names. Lightning's `trainer.checkpoint_callback`
    is the first Checkpoint of any kind: a user's own, listed first, has no best path or score."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


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
        self._captions: list[str] | None = None  # of the validation under way

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # Predicted during the validation, not at its end: by then a callback listed before this one may have put
        # the trained weights back (EMA and SWA swap their average in for the validation only, as in
        # configs/fast.yaml), and the captions were the trained network's, not the predictions the validation scored.
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = wandb_loggers(trainer)
        if not loggers:
            warn_idle(self, NO_WANDB)
            return
        data = trainer.datamodule
        if not isinstance(data, ImageDataModule):
            warn_idle(self, NO_DATA_MODULE)
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
            # With its test-time augmentation (`--model.tta`), as the validation scored them: plain logits captioned
            # other classes than the prediction table and the confusion matrix beside the panel gave.
            # ImageClassifier's `evaluate`, by name: cifar_cli.classifier imports this module.
            predicted = getattr(pl_module, "evaluate", pl_module)(inputs).argmax(dim=1).cpu()
        names = pl_module.class_names
        self._captions = [f"Pred: {names[p]}, Label: {names[y]}" for p, y in zip(predicted.tolist(), labels.tolist())]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        captions, self._captions = self._captions, None
        if captions is None:
            return
        pictures = list(self._sample[0].permute(0, 2, 3, 1).numpy())  # HWC uint8, as W&B expects
        for logger in wandb_loggers(trainer):
            logger.log_image(key=self.key, images=pictures, caption=captions, step=logged_step(trainer))


class PredictionWriter(Callback):
    """Writes `predict`'s results to a CSV file in the run's folder and prints where; with W&B, logs them as a table
    with the images too.

    Columns: `image` (path relative to the image folder, or index in the split), `predicted` class name,
    `confidence` (softmax probability of that class), and `label`, the true class name where the split has labels.
    Rows follow the order of the split, whichever rank predicted them.

    Args:
        filename: Name of the CSV file.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._rows: list[dict[str, Tensor]] = []

    HEADER = ["image", "predicted", "confidence", "label"]

    def check_folder(self, trainer: Trainer) -> None:
        """Without a logger every predict writes into default_root_dir (the current folder): there it replaces an
        earlier predict's file, never a file of the user's of that name. Checked before predicting."""
        path = os.path.join(run_dir(trainer), self.filename)
        if trainer.loggers or not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as file:
                ours = file.readline().rstrip("\r\n") == ",".join(self.HEADER)
        except OSError:
            ours = False
        if not ours:
            raise UsageError(
                f"{os.path.relpath(path)} is not the predictions of an earlier predict, and predict without a logger "
                "writes there: run in another folder, or pass --trainer.default_root_dir"
            )

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
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(self.HEADER)
        for i, row in zip(index.tolist(), keep.tolist()):
            y = int(label[row])
            true_name = names[y] if y >= 0 else ""
            writer.writerow([image_names[i], names[int(predicted[row])], f"{float(confidence[row]):.4f}", true_name])
        # Complete or absent, never half-written. A file name that is not UTF-8 (a Latin-1 `café.jpg` from an archive)
        # is written as the file system holds it, as `ls` shows it.
        atomic_write(path, lambda file: file.write(text.getvalue().encode(errors="surrogateescape")))
        print(f"Predictions for {len(index)} images written to {path}")
        rows = [(i, image_names[i], names[int(predicted[r])], round(float(confidence[r]), 4), int(label[r]))
                for i, r in zip(index.tolist(), keep.tolist())]  # fmt: skip
        self._log_table(trainer, data, rows, names)

    def _log_table(
        self, trainer: Trainer, data: Any, rows: list[tuple[int, str, str, float, int]], names: list[str]
    ) -> None:
        """On W&B, the images with their predictions (`predictions`, a table the UI filters and sorts), as many as
        the evaluation tables hold (`table_rows`)."""
        loggers = wandb_loggers(trainer)
        split = getattr(data, "splits", {}).get("predict") if isinstance(data, ImageDataModule) else None
        if not loggers or split is None or not rows:
            return
        import wandb

        rows = [rows[i] for i in table_rows(len(rows), data.image_shape).tolist()]
        images, _ = split.take(torch.tensor([row[0] for row in rows], device=split.device))
        pictures = images.cpu().permute(0, 2, 3, 1).numpy()  # HWC uint8, as W&B expects
        labelled = any(row[4] >= 0 for row in rows)
        columns = ["image", "file", "predicted", "confidence", *(["label"] if labelled else [])]
        data_rows = [
            [wandb.Image(picture), name, predicted, confidence, *([names[y] if y >= 0 else ""] if labelled else [])]
            for picture, (_, name, predicted, confidence, y) in zip(pictures, rows)
        ]
        for logger in loggers:
            logger.log_table(key="predictions", columns=columns, data=data_rows)


# Under DDP the clocks of the time limit and of `last.ckpt`'s saves are read on rank 0 and its verdict broadcast
# every this many steps: a broadcast per step would make every step wait for all ranks (and the host for the GPU).
TIME_CHECK_STEPS = 10
# The metric FitTimer logs: seconds of training so far.
FIT_TIME = "fit_time"


class FitTimer(Timer):
    """Lightning's Timer that also logs `fit_time`: seconds since training began, at the end of every validation
    and of every training epoch.

    Plots accuracy against wall-clock time on W&B, and gives the benchmarks their time to accuracy. The time
    counts training and validation, not the setup before the first step; a resumed run continues its count.

    Args:
        duration: Stop training after this long (`"DD:HH:MM:SS"` or a dict such as `{"minutes": 30}`).
    """

    def __init__(self, duration: str | dict[str, int] | None = None) -> None:
        super().__init__(duration=duration, interval="step")

    def on_fit_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        # A restart whose checkpoint had spent the budget stops here, before its first step; the command's resume
        # line says so ("nothing is left to train"), and Lightning's "Time limit reached" after it read as if this
        # run had trained to its limit.
        verbose, self._verbose = self._verbose, self._verbose and not self._offset
        try:
            super().on_fit_start(trainer, *args, **kwargs)
        finally:
            self._verbose = verbose

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning's Timer broadcasts rank 0's verdict after every batch, a blocking collective each step under
        # DDP; there the clock is read every TIME_CHECK_STEPS steps, so a run may end up to 9 steps past its limit.
        # Not within a gradient accumulation: stopped there, the batches accumulated so far would go untrained.
        if trainer.fit_loop._should_accumulate():
            return
        if trainer.world_size == 1 or trainer.global_step % TIME_CHECK_STEPS == 0:
            super().on_train_batch_end(trainer, *args, **kwargs)

    def limit(self, duration: str | dict[str, int]) -> None:
        """Stop training after `duration`: `--trainer.max_time`, which Lightning ignores when the callbacks already
        hold a Timer, as they do with this one. Called before training starts."""
        super().__init__(duration=duration, interval="step", verbose=self._verbose)

    def _log_time(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self.time_elapsed("train")
        # In `fit` only: `validate --ckpt_path` reported the seconds of the checkpoint's training as its own.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and elapsed > 0:
            pl_module.log(FIT_TIME, elapsed, sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_time(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Also every epoch's end, validated or not (fast.yaml validates once): the time axis of `cifar-cli report`.
        super().on_train_epoch_end(trainer, pl_module)
        self._log_time(trainer, pl_module)


def gather_rows(trainer: Trainer, pl_module: LightningModule, columns: list[Tensor]) -> list[Tensor]:
    """Concatenate equally long columns (rows along the first dimension) over all ranks; ranks may hold different
    row counts. The first column is 1-D and never negative (an index): padding rows are told by its -1."""
    if trainer.world_size == 1:
        return columns
    device = pl_module.device
    count = torch.tensor([len(columns[0])], device=device)
    longest = int(trainer.strategy.all_gather(count).max())
    gathered = []
    for column in columns:
        padded = torch.full((longest, *column.shape[1:]), -1, dtype=column.dtype, device=device)
        padded[: len(column)] = column.to(device)
        gathered.append(trainer.strategy.all_gather(padded).reshape(-1, *column.shape[1:]).cpu())
    valid = gathered[0] >= 0  # padding rows carry index -1
    return [column[valid] for column in gathered]


class LastCheckpoint(ModelCheckpoint):
    """Keeps `last.ckpt` current in the run's checkpoint folder: what `fit --ckpt_path last` resumes from.

    Saved at the end of every training epoch (after its validation, so the resumed run knows the epoch's
    results) and, within an epoch, once `every_n_minutes` of training have passed since the last save, or every
    `every_n_steps` steps. The file is replaced whole (see `cifar_cli.atomic`), so a kill during a save leaves the
    previous one.

    Args:
        every_n_minutes: Longest stretch of training between two saves, in minutes; 0 saves only at epoch ends.
        every_n_steps: Also save every this many optimizer steps; 0: no step cadence.
    """

    def __init__(self, every_n_minutes: NonNegativeFloat = 10.0, every_n_steps: NonNegativeInt = 0) -> None:
        super().__init__(save_last=True, save_top_k=0, save_on_train_epoch_end=True)
        self.every_n_minutes = every_n_minutes
        self.every_n_steps = every_n_steps
        self._last_save = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_minutes=self.every_n_minutes, every_n_steps=self.every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()
        if trainer.ckpt_path and not self.last_model_path and trainer.loggers:
            # Resumed from a checkpoint written before the run's first last.ckpt (its first epoch's best): the run's
            # folder is its own, and its last.ckpt goes on being replaced, not left behind beside a last-v1.ckpt.
            path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
            if self.file_exists(path, trainer):
                self.last_model_path = path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._should_skip_saving_checkpoint(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # (the epoch's end saves after the last batch)
        if trainer.fit_loop._should_accumulate():
            return  # a checkpoint holds no gradients: one saved within an accumulation would lose its batches
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_n_minutes and (trainer.world_size == 1 or trainer.global_step % TIME_CHECK_STEPS == 0):
            late = time.monotonic() - self._last_save >= 60 * self.every_n_minutes
            # Rank 0's clock for every rank; with one rank (DDP in a world of one too) there is no one to tell, and
            # Lightning's broadcast would still send a pickled object through the GPU and back every step.
            due = (trainer.strategy.broadcast(late) if trainer.world_size > 1 else late) or due
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Also when a step save came at this same step: validation has run since, and its results belong in it.
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        progress = trainer.fit_loop.epoch_progress
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        # StochasticWeightAveraging's BatchNorm pass counts one batch more than the epoch has (its optimizer step
        # waits for it), and is never cut short: saved as cut, a restart of the ended run went on with its end.
        swa = swa_batchnorm_pass(trainer)
        if batches >= trainer.num_training_batches or (swa is not None and trainer.current_epoch >= swa):
            self.save(trainer)
            return
        # An epoch cut short (`max_time`, `max_steps`, a callback's stop): saved as Lightning saves after a
        # validation within an epoch, the epoch not yet processed, so that a run resumed with a larger limit trains
        # the epoch's other batches. Saved as processed, Lightning takes the epoch for done and starts the next.
        progress.total.processed -= 1
        progress.current.processed -= 1
        try:
            self.save(trainer)
        finally:
            progress.total.processed += 1
            progress.current.processed += 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # saved at the epoch's end instead, after every other callback has seen the validation

    def save(self, trainer: Trainer) -> str:
        """Write `last.ckpt` now; returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_save = time.monotonic()
        return self.last_model_path


def epoch_label(index: int, max_epochs: int | None) -> str:
    """`epoch 4/25` for the epoch of 0-based `index` (Lightning's `current_epoch`): every line cifar-cli prints
    counts epochs from 1, as the progress bar does, and names the total where there is one."""
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    return f"epoch {index + 1}{total}"


def swa_batchnorm_pass(trainer: Trainer) -> int | None:
    """The epochs the run was given, where StochasticWeightAveraging adds a pass of its own after them: on a network
    with BatchNorm it raises Lightning's `max_epochs` by one as training starts, for an epoch that recomputes the
    BatchNorm statistics of the averaged weights (no optimizer step), and lowers it again at the end. Lines read
    "epoch 1/3" for a run of 2 epochs, then "epoch 3/2"."""
    for callback in trainer.callbacks:
        if isinstance(callback, StochasticWeightAveraging) and getattr(callback, "_model_contains_batch_norm", False):
            asked = getattr(callback, "_max_epochs", None)
            return asked if isinstance(asked, int) and asked > 0 else None
    return None


def trainer_epoch_label(trainer: Trainer, index: int) -> str:
    """`epoch_label` of the trainer's epoch `index`, its pass after the given epochs named as SWA's."""
    asked = swa_batchnorm_pass(trainer)
    if asked is not None and index >= asked:
        return f"SWA BatchNorm pass after epoch {asked}/{asked}"
    return epoch_label(index, trainer.max_epochs if asked is None else asked)


class RichBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged metrics at most twice a second in training.

    Lightning's bar reads them after every step: about 0.1 ms of host time on a CPU, and on a GPU an `.item()`
    per shown metric, each of which waits for the GPU to finish its queued work. The bar itself still moves
    every step.

    Args:
        metrics_interval: Seconds between two reads of the metrics during training.
    """

    def __init__(self, metrics_interval: NonNegativeFloat = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_interval = metrics_interval
        self._metrics_read = float("-inf")

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(items.get("v_num"), int):  # a logger's version number, which the bar showed as `v_num: 3.000`
            items["v_num"] = str(items["v_num"])
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's bar reads `Epoch 3/24` in the fourth of 25 epochs; cifar-cli's lines say `epoch 4/25`.
        label = trainer_epoch_label(self.trainer, current_epoch)
        return f"{label[0].upper()}{label[1:]:{len(self.validation_description) - 1}}"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a run resumed mid-epoch, as Lightning's bar does
        self._update(self.train_progress_bar_id, batch_idx + 1)
        now = time.monotonic()
        if now - self._metrics_read >= self.metrics_interval:
            self._metrics_read = now
            self._update_metrics(trainer, pl_module)


def distributed_run(trainer: Trainer) -> bool:
    """Whether the trainer's ranks are more than one, in a process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1


def _unhandled_sigusr1() -> tuple[int, ...]:
    """SIGUSR1, where it is at its default action (which ends the process at once, without a word): not where
    Lightning has SLURM's requeue handler on it, nor a user's."""
    return (signal.SIGUSR1,) if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL else ()


class _StopVote:
    """An all-reduce (max) of the ranks' signals (their numbers, 0 for none), started at one batch end and read at the
    next, so that neither the host nor the training stream waits for it (torch.distributed's async work; Lightning
    has no such collective). Every rank learns which signal stops it, whichever rank it came to.

    On a GPU the result is copied into pinned host memory on a side stream, behind the all-reduce, and an event marks
    the copy: waiting for that event at the next batch end waits for the previous step's kernels and the vote
    only, never for the ones queued since (reading the device tensor would wait for those too), and the training
    stream never waits for the other ranks' vote.
    """

    def __init__(self, signum: int, device: torch.device, side: torch.cuda.Stream | None = None) -> None:
        self.flag = torch.full((1,), int(signum), dtype=torch.int32, device=device)  # a kernel, no copy
        self.work = torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self.event: torch.cuda.Event | None = None
        if self.flag.is_cuda:
            side = side or torch.cuda.current_stream(device)
            with torch.cuda.stream(side):
                self.work.wait()  # this stream waits for the all-reduce; the host goes on
                self.host = torch.empty(1, dtype=torch.int32, pin_memory=True)
                self.host.copy_(self.flag, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(side)
            self.flag.record_stream(side)  # used there: the allocator keeps it until the copy is done

    def result(self) -> int:
        """The signal a rank had been sent when the vote started (the highest number of those), or 0."""
        if self.event is not None:
            self.event.synchronize()
            return int(self.host.item())
        self.work.wait()
        return int(self.flag.item())


_LIGHTNING_REGISTER = _SignalConnector.register_signal_handlers


def _register_after_start(self: _SignalConnector) -> None:
    handed = hand_signals_to_lightning()
    _LIGHTNING_REGISTER(self)
    preemption = next((c for c in self.trainer.callbacks if isinstance(c, Preemption)), None)
    if self.trainer.state.fn == TrainerFn.FITTING:
        if preemption is not None and distributed_run(self.trainer):
            preemption.note_signals_before_training()
            return
        # SIGUSR1, which Lightning takes only for SLURM's requeue, ended the process at once, without a word, in the
        # sanity check: until training begins (Preemption.on_train_start) it is the stop before training too.
        keep_stopping_cleanly(handed)
        return
    # validate, test, predict: SIGUSR1 ended the process there too, from here to the trainer's teardown (which puts
    # back its default action).
    if preemption is not None:
        preemption.take_evaluation_signals(self.trainer)


_LIGHTNING_TEARDOWN = _SignalConnector.teardown


# Set in a rank that ddp_spawn started (lightning_takes_signals): after its stage, the signals are ignored there.
_IGNORED_AFTER_STAGE: list[bool] = []


def _teardown_then_stop_cleanly(self: _SignalConnector) -> None:
    if self.trainer.state.status != TrainerStatus.RUNNING:  # on the way out of a stop or a failure (INTERRUPTED)
        _LIGHTNING_TEARDOWN(self)
        return
    stage, ignore = self.trainer.state.fn.value, bool(_IGNORED_AFTER_STAGE)
    # The stop after the stage goes in as the trainer puts back the default action it found, in its place: put in
    # after it, a signal in between met the default action and killed the process (a ddp_spawn rank, as its peer
    # passed the signal on at the same moment).
    after = after_stage_handler(stage, ignore)
    for signum in START_SIGNALS:
        if self._original_handlers.get(signum) == signal.SIG_DFL:
            self._original_handlers[signum] = after
    _LIGHTNING_TEARDOWN(self)
    stop_cleanly_after_stage(stage, ignore=ignore)  # (where the trainer recorded none: a teardown without a start)


def lightning_takes_signals(spawned_rank: bool = False) -> None:
    """The start-up's stop on SIGTERM and SIGUSR1 (cifar_cli.entry) ends where the trainer installs its own handlers,
    just before it runs its stage (its sanity check, training, testing), and the stop after the stage begins where
    the trainer puts back the handlers it found (the default action), after its stage: Lightning's
    `_SignalConnector` (private, 2.6) has no hook there. In a `spawned_rank` (ddp_spawn) the signals are ignored
    after the stage instead: its results go home, and the spawning process, which passed the signal on, says so and
    ends the command. A handler that raised there could fire as the rank was putting it away, outside any `try`:
    the rank failed, and the command with it (with the teardown's race: 3 runs in 19 with the CPUs busy)."""
    _SignalConnector.register_signal_handlers = _register_after_start
    _SignalConnector.teardown = _teardown_then_stop_cleanly
    if spawned_rank:
        _IGNORED_AFTER_STAGE.append(True)


# What a command's start writes in a new run's folder before anything is trained: config.yaml (RunConfigSaver),
# hparams.yaml and metrics.csv (CSVLogger).
START_FILES = ("config.yaml", "hparams.yaml", "metrics.csv")


# Set where a command stopped before it began (remove_unstarted_run); cleared as a command starts (cli.main).
UNSTARTED_RUN: list[bool] = []


def remove_unstarted_run(trainer: Trainer, since: float) -> None:
    """Remove the run folder of a command stopped before it began (StoppedBeforeStart, or a Ctrl-C then), where this
    command made it and it holds only what the start wrote: a folder that looked like a run, with a config.yaml and
    no checkpoint. Never the shared folder of a run without a logger, nor a folder with anything older than `since`
    (the command's start, less 2 s for file systems with a coarse clock) or another file in it (a resumed run's)."""
    if not trainer.loggers or not trainer.is_global_zero:
        return
    UNSTARTED_RUN.append(True)  # its W&B run logged nothing either: no `wandb sync` line for it
    folder = run_dir(trainer)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    if any(
        not e.is_file(follow_symlinks=False) or e.name not in START_FILES or e.stat().st_mtime < since - 2
        for e in entries
    ):
        return
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    remove_empty_folders([Path(folder)])


class Preemption(Callback):
    """A clean stop on SIGTERM (schedulers, spot instances, `kill`) and SIGINT (Ctrl-C) during training, and on
    SIGUSR1 (SLURM's warning before its time limit) where Lightning's SLURM requeue does not take it.

    The signal is noted, and training stops at the end of the current training batch; a validation under way is
    finished first, never cut short (with weight averaging, the module holds the averaged weights during
    validation: a checkpoint taken there would lose the raw ones). `last.ckpt` is saved there, one line on
    stderr gives the command that resumes, and the process exits with 128 + the signal's number (143, 130, 138), as a
    shell reports a process stopped by it. A second Ctrl-C stops at once, without saving.

    Under DDP a signal to any rank stops every rank at the same step, one batch later than a single process stops:
    each batch end starts an all-reduce of the ranks' flags and reads the one started at the batch end before
    (`_StopVote`), so no step waits for the others or for the GPU. A blocking all-reduce at every batch end, and
    Lightning's own broadcast of rank 0's flag before every batch (which this callback makes redundant, and
    `cifar_cli.hooks` skips), held two CPU processes training a 1x1 convolution at 4.8 ms a step, against 3.3 ms
    with the vote; on GPUs each also made the host wait for the step's last kernel before queuing the next.

    Lightning already stops at a batch end on SIGTERM (its SIGTERMException), but exits with code 0 as if
    training had finished, saves nothing, stops in the middle of a validation, and ignores SIGINT until it
    interrupts the step wherever it is.

    In `validate`, `test` and `predict`, Lightning's SIGTERM stop at a batch end stands (the line here says that
    nothing was written); SIGUSR1 stops them the same way, and so does a SIGTERM in `predict`, whose loop Lightning
    never stops (`on_predict_batch_end`). Under DDP the ranks vote there too (`take_evaluation_signals`).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.created = time.time()  # as the trainer is built: before the run's folder
        self.training = False  # whether training has begun
        self._previous: dict[int, Any] = {}
        self._vote: _StopVote | None = None  # under DDP: the all-reduce started at the last batch end
        self._side: torch.cuda.Stream | None = None  # on a GPU: the stream that reads the votes

    def note_signals_before_training(self) -> None:
        """Under DDP in `fit`, as the trainer installs its signal handlers: SIGTERM, and SIGUSR1 where Lightning left
        it (not SLURM's requeue), are noted from here, and the ranks agree on the stop at the sanity check's end (or,
        without one, at the first batch end's vote). Lightning's SIGTERM handler broadcast from within it, and the
        start-up's SIGUSR1 stop ended the signalled rank alone: a signal to one rank as the trainer restored a
        checkpoint or set up the model failed the run ("rank 1 failed: exited with code 143 without a report")."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._install((signal.SIGTERM, *_unhandled_sigusr1()))

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's SIGTERM handler would stop the sanity check at a batch end, under DDP on the signalled rank
        # alone, after a broadcast within the handler that the other ranks never join: the run hung. This one notes
        # the signal; the sanity check ends, and the ranks agree on the stop there (a Ctrl-C interrupts at once).
        if not distributed_run(trainer):  # (under DDP noted already, since the trainer's start)
            self._install((signal.SIGTERM,))
        if trainer.received_sigterm:  # one that came as Lightning's handler went in
            self.signal = self.signal or signal.SIGTERM
            trainer._signal_connector.received_sigterm = False

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not distributed_run(trainer):  # (under DDP the signals stay noted until training takes them)
            self._restore()
        signum = self.signal or 0
        if distributed_run(trainer):  # every rank stops, with the signal one was sent
            signum = _StopVote(signum, trainer.strategy.root_device).result()
        if signum:
            raise StoppedBeforeStart(self.signal or signum)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A SIGTERM since Lightning installed its handler (with no sanity check, or after it) came before anything
        # was trained: the same stop as one before, not a step of training and a checkpoint. Under DDP it may have
        # come to one rank only: the ranks agree on it as on a signal during training (a vote read at a batch end),
        # with no collective here.
        if trainer.received_sigterm:
            if trainer.world_size == 1:
                raise StoppedBeforeStart(signal.SIGTERM)
            self.signal = self.signal or signal.SIGTERM
            trainer._signal_connector.received_sigterm = False  # Lightning's check would stop this rank alone
        self.training = True
        hand_signals_to_lightning()  # (SIGUSR1, kept as the start-up's stop through the sanity check)
        # Installed here, after Lightning has installed its own SIGTERM handler, which this one replaces for the
        # training (Lightning's would also stop validations halfway). Both are restored when training ends.
        # SIGUSR1 too where Lightning left it at its default action, which ended the process at once, with no
        # last.ckpt and no word: Lightning takes it only for SLURM's requeue (SLURMEnvironment's auto_requeue),
        # whose handler stays.
        self._install((signal.SIGTERM, signal.SIGINT, *_unhandled_sigusr1()))

    def take_evaluation_signals(self, trainer: Trainer) -> None:
        """In `validate`, `test` and `predict`, as their trainer installs its signal handlers.

        One process: SIGUSR1 stops them as Lightning's SIGTERM handler does, at the end of a batch, where Lightning
        left it at its default action (which ended the process at once, without a word): not where SLURM's requeue
        handler has it.

        Under DDP, SIGTERM and SIGUSR1 are only noted, and the ranks vote at every batch end, as during training
        (`_vote_to_stop_evaluating`): Lightning's handler broadcast from within it, which the other ranks never
        joined, and stopped the signalled rank alone: a signal to one rank hung every rank.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        usr1 = _unhandled_sigusr1()
        if distributed_run(trainer):
            self._install((signal.SIGTERM, *usr1))
            return
        if not usr1:
            return

        def stop(signum: int, frame: Any) -> None:
            # What Lightning's SIGTERM handler does (its `_sigterm_notifier_fn`), without its line "Received SIGTERM"
            # and its broadcast from within the handler, which the other ranks never join (see on_sanity_check_start).
            if self.signal is None:
                self.signal = signum
                launcher = trainer.strategy.launcher
                if launcher is not None:
                    launcher.kill(signum)  # the ranks this process started: Lightning's DDP launcher
            trainer._signal_connector.received_sigterm = True

        self._previous[signal.SIGUSR1] = signal.SIG_DFL
        signal.signal(signal.SIGUSR1, stop)

    def _vote_to_stop_evaluating(self, trainer: Trainer) -> None:
        """Under DDP in `validate`, `test` and `predict`, at a batch end: read the vote started at the batch end
        before, and stop here (Lightning's flag) if any rank had been signalled, or start the next vote. Every rank
        has as many batches (the distributed sampler pads the shards), so all stop at the same batch."""
        if trainer.state.fn == TrainerFn.FITTING or not distributed_run(trainer):
            return  # (fit's validations: the training's vote, read at their end)
        if not self._stop_on_vote(trainer):
            self._start_vote(trainer)

    def _end_evaluation_vote(self, trainer: Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # (fit's: at the end of training)
            self._finish_vote()

    def _finish_vote(self) -> None:
        vote, self._vote = self._vote, None
        if vote is not None:  # every rank started it: let it finish before the next collective, or the group's end
            vote.result()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._vote_to_stop_evaluating(trainer)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._vote_to_stop_evaluating(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_evaluation_vote(trainer)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_evaluation_vote(trainer)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        # Lightning's evaluation loop stops at a batch end once its SIGTERM flag is set (but after the last batch,
        # where the results are all there); its prediction loop (2.6) never reads the flag: a SIGTERM in `predict`
        # wrote every prediction and exited with 0.
        self._vote_to_stop_evaluating(trainer)
        if trainer.received_sigterm and not trainer.predict_loop.batch_progress.is_last_batch:
            raise SIGTERMException

    def _install(self, signums: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or signum
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once, as Python's default does
            previous = self._previous.get(signum)
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        """Set Lightning's stop flag (it raises SIGTERMException at the next batch end or epoch end) once a signal
        has come to any rank; every rank takes the same decision at the same point. Under DDP this waits for every
        rank (at validation and epoch ends), counting the vote started at the last batch end."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.fit_loop._should_accumulate():
            return  # stopped there, the checkpoint would lose the gradients of the accumulation's batches so far
        if distributed_run(trainer):
            self._stop_on_vote(trainer)
            # Every rank waits here for the others, with the signal one was sent (as at a batch end, but blocking)
            signum = _StopVote(self.signal or 0, trainer.strategy.root_device).result()
            self.signal = self.signal or signum or None
        if self.signal is not None:
            trainer._signal_connector.received_sigterm = True

    def _stop_on_vote(self, trainer: Trainer) -> bool:
        """Read the vote started at the last batch end: a signal that any rank had then stops this one too, at this
        point (Lightning's flag), and is the one this rank reports unless it had its own."""
        vote, self._vote = self._vote, None
        signum = vote.result() if vote is not None else 0
        if signum:
            self.signal = self.signal or signum
            trainer._signal_connector.received_sigterm = True
        return bool(signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not distributed_run(trainer):
            self._stop_if_signalled(trainer)
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.fit_loop._should_accumulate():
            return  # (every rank accumulates alike: all read the vote at the batch that ends the accumulation)
        # The vote started at the last batch end has had a whole step to finish on every rank; every rank reads
        # the same result, so all stop here, or all start the next vote.
        if not self._stop_on_vote(trainer):
            self._start_vote(trainer)

    def _start_vote(self, trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda" and self._side is None:
            self._side = torch.cuda.Stream(device)
        self._vote = _StopVote(self.signal or 0, device, self._side)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Held during a validation: Lightning checks the flag after every validation batch.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_evaluation_vote(trainer)
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_vote()
        # SIGTERM and SIGUSR1 keep this callback's handler (noted, no longer heeded) until the trainer's teardown,
        # which puts back what the trainer found, then cifar_cli.entry's stop after the stage. Put back here,
        # SIGUSR1's default action killed the process, and Lightning's SIGTERM handler, under DDP, broadcast from
        # within it to ranks that had ended their stage: under ddp_spawn a SIGTERM passed on as rank 0 logged its
        # checkpoints to W&B failed rank 1 ("Connection closed by peer").
        self._previous.pop(signal.SIGUSR1, None)
        self._previous.pop(signal.SIGTERM, None)
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._vote = None  # never waited for: another rank may be gone
        self._restore()
        if isinstance(exception, StoppedBeforeStart):
            launcher = trainer.strategy.launcher
            # (In the sanity check every rank stops alike: they agreed on it.)
            if launcher is not None and hasattr(launcher, "procs") and not trainer.sanity_checking:
                # The ranks this process started (Lightning's DDP launcher), which would wait for it: the same stop,
                # as Lightning's own SIGTERM handler passes the signal on.
                launcher.kill(exception.signum)
            remove_unstarted_run(trainer, self.created)
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == TrainerFn.FITTING and not self.training:
            remove_unstarted_run(trainer, self.created)  # a Ctrl-C before training began: as a SIGTERM then
            return
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signal or signal.SIGTERM  # (Lightning's own stop at a batch end, without a vote)
        # A SystemExit's code is the process's exit status.
        exception.code = 128 + signum
        if trainer.state.fn == TrainerFn.FITTING and not self.training:
            # During the sanity check (Lightning's handler stops it at a batch end): nothing was trained, and the
            # checkpoint saved below would be step 0's, or a resumed run's own, over the one it resumed from.
            remove_unstarted_run(trainer, self.created)
            if trainer.is_global_zero:
                print(StoppedBeforeStart(signum).line(["fit"]), file=sys.stderr, flush=True)
            return
        if trainer.state.fn != TrainerFn.FITTING:
            # validate, test, predict (Lightning's handler stops them at a batch end): nothing to resume, and a
            # last.ckpt in their run folder would be the newest, for the next `fit --ckpt_path last` to take.
            if trainer.is_global_zero:
                stage = STAGES[trainer.state.fn.value]  # TrainerFn's values are the subcommands' names
                print(f"cifar-cli: stopped by {signal.Signals(signum).name} during {stage}: no results were written",
                      file=sys.stderr, flush=True)  # fmt: skip
            return
        last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
        if last is not None:
            path = last.save(trainer)
        else:
            path = os.path.join(run_dir(trainer), "checkpoints", "last.ckpt")
            trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            config = os.path.join(run_dir(trainer), "config.yaml")
            command = f"cifar-cli fit --config {config}" if os.path.isfile(config) else "cifar-cli fit ..."
            print(
                f"cifar-cli: stopped by {signal.Signals(signum).name} in "
                f"{trainer_epoch_label(trainer, trainer.current_epoch)}, step {trainer.global_step:,}; "
                f"resume with: {command} --ckpt_path {path}",
                file=sys.stderr,
                flush=True,
            )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}
