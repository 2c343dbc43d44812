"""The one LightningModule: cross-entropy on an injected network's logits, one accuracy metric per stage."""

from __future__ import annotations

import copy
import sys
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, StochasticWeightAveraging, Timer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable, ReduceLROnPlateau
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_cli.averaging import Lookahead
from cifar_cli.callbacks import TIME_CHECK_STEPS, distributed_run
from cifar_cli.checkpoints import load_checkpoint
from cifar_cli.data import ImageDataModule
from cifar_cli.errors import TrainingDiverged, UsageError
from cifar_cli.optim import LRSchedule, build_optimizer, param_groups
from cifar_cli.pretrained import TIMM_CONFIG_KEY, NamedNet, final_layer
from cifar_cli.seeding import derived_seed, run_seed

Batch = tuple[Tensor, ...]  # (images, labels) in training; (images, labels, index in the split) elsewhere
TTA = Literal["none", "flip", "flip-shift"]
# Checkpoint entry holding the training metrics' running sums.
METRICS_KEY = "cifar_cli_train_metrics"
WINDOW_KEY = "window"  # in METRICS_KEY: the loss sum, correct count and images since the last logged step
# Optimizer settings that choose how the update is computed, not what it is: a resumed run keeps its checkpoint's.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")
# Steps before the pace of training, and with it the steps that fit in a time budget, is first estimated.
BUDGET_MIN_STEPS = 10
# Training images the whitening layer of a net with `init_whitening` is fitted to (airbench uses 5,000).
WHITENING_IMAGES = 5000
# A run without a length (max_epochs -1, nothing else) has no progress for --model.lr_schedule to follow.
SCHEDULE_NEEDS_LENGTH = "--model.lr_schedule needs a known length: set --trainer.max_epochs, max_steps or max_time"
# The metrics every stage logs through self.log, as `{stage}_{metric}` (`train_loss`, `val_acc`, ...): what fit's
# callbacks and a ReduceLROnPlateau scheduler can monitor (see `fit_metrics`).
METRICS = ("loss", "acc")


def fit_metrics() -> list[str]:
    """The names ImageClassifier puts in the trainer's callback_metrics during `fit`: the training metrics, logged
    every logged step and every epoch, under their own name and Lightning's `_step` and `_epoch` forks of it; the
    validation metrics, logged every epoch, under their own. (The per-class scores go straight to the loggers.)"""
    train = [f"train_{metric}{fork}" for metric in METRICS for fork in ("", "_step", "_epoch")]
    return [*train, *(f"val_{metric}" for metric in METRICS)]


class ImageClassifier(LightningModule):
    """Trains `net` with cross-entropy and logs the tutorial's metric names (`train_loss`, `val_acc`, ...).

    Args:
        net: The network; it returns logits. On the command line: `--model.net cifar_cli.nets.TutorialCNN`.
        class_names: Class names in label order; the CLI links them from the data module.
        learning_rate: Peak learning rate, per step, of every parameter but those of normalisation layers. An
            optimizer's own `lr` (`--optimizer.lr`, `--model.optimizer.lr`), when given, sets it.
        weight_decay: The optimizer's (coupled) weight decay; an optimizer's own `weight_decay` sets it likewise.
        label_smoothing: Cross-entropy label smoothing, 0 for none; below 1 (at 1 the targets carry no label).
        optimizer: Optimizer class and its arguments (`--model.optimizer torch.optim.SGD --model.optimizer.momentum
            0.9`, or LightningCLI's `--optimizer SGD`), built over the parameter groups below.
        lr_schedule: Learning-rate factor over training progress, updated every step; default constant.
        lr_scheduler: A `torch.optim.lr_scheduler` class and its arguments, stepped every epoch (LightningCLI's
            `--lr_scheduler StepLR --lr_scheduler.step_size 1`); not with `lr_schedule`.
        norm_lr_factor: Learning-rate multiplier for the parameters of normalisation layers (BatchNorm, GroupNorm,
            LayerNorm; the fast recipe trains FastNet's BatchNorm biases 64x faster); their weight decay is divided
            by it.
        tta: Test-time augmentation in validation, test and predict: average the logits of the image and its
            mirror image (`flip`), and also of both shifted by one pixel diagonally (`flip-shift`, 6 passes).
        channels_last: Run the network on NHWC tensors, which convolutions prefer on CPUs and tensor cores.
        compile: Compile the network with `torch.compile` (a minute or two of compiling at the first steps).
        backbone_lr_factor: Learning-rate multiplier for the backbone of a network that has one (`TorchvisionNet`,
            `TimmNet`): below 1 fine-tunes pretrained weights more gently than the new head trains. Their weight
            decay is divided by it.
        init_from: A `cifar-cli fit` checkpoint whose network weights start this fit, for transfer from another
            data set: every tensor whose name and shape match is loaded, except the head's when the checkpoint
            had other classes. Not used with `--ckpt_path`, whose weights come first.
        low_res_side: Progressive resizing: train on the images scaled down to this side (antialiased) until
            training progress reaches `low_res_until`, then at full size; evaluation is always at full size.
            The network must accept both sizes (global pooling: FastNet, torchvision and timm networks).
        low_res_until: Training progress (as the LR schedule sees it: of the steps, or of a time budget) at which
            training moves to full size: above 0, at most 1.
        whiten_bias_until: Train the bias of the network's whitening layer (FastNet's `whiten`) only until this
            point of training progress, then freeze it, as airbench94 does after 3 of its 10 epochs: in one process
            the backward pass then stops at the first block's convolution. None: train it to the end.
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str],
        learning_rate: PositiveFloat = 2e-4,
        weight_decay: NonNegativeFloat = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: LRSchedule | None = None,
        norm_lr_factor: PositiveFloat = 1.0,
        tta: TTA = "none",
        channels_last: bool = True,
        compile: bool = False,
        backbone_lr_factor: PositiveFloat = 1.0,
        init_from: str | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        low_res_side: PositiveInt | None = None,
        low_res_until: float = 0.5,
        whiten_bias_until: ClosedUnitInterval | None = None,
    ) -> None:
        super().__init__()
        # Under LightningCLI the saved `net` is its config (class_path, init_args), so `--ckpt_path` alone can
        # rebuild the model. Not `init_from`: the checkpoint's own weights replace it, and `test --ckpt_path` must
        # not need the file it started from. (config.yaml keeps it.)
        self.save_hyperparameters(ignore=["init_from"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        # Tensors of `net` that init_from loaded; the whitening layer keeps loaded filters (on_fit_start). And the
        # input normalisation they were trained with (setup).
        self.initialised: set[str] = set()
        self.init_normalization: tuple[Tensor, Tensor] | None = None
        if init_from:
            self.initialised, self.init_normalization = init_weights(self.net, init_from, class_names)
        whiten = getattr(net, "whiten", None)
        if whiten_bias_until is not None and (not isinstance(whiten, nn.Conv2d) or whiten.bias is None):
            raise UsageError(
                f"--model.whiten_bias_until needs a network whose whitening layer has a bias (FastNet); "
                f"{type(net).__name__} has none: leave it unset"
            )
        check_settings(net, label_smoothing, backbone_lr_factor, low_res_until)
        self.class_names = list(class_names)
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.lr_scheduler = lr_scheduler
        num_classes = len(self.class_names)
        # One metric object per stage: sharing one would mix training and validation counts. Metric objects also
        # keep DDP cheap: they accumulate on each rank and synchronise once, when the epoch's value is computed.
        # Training accuracy is the mean of the images' correctness (= micro accuracy), which the window sums
        # below can update in one call.
        self.train_acc = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        # (MeanMetric's check for NaN waits for the device at each update; its nan_strategy="disable", which would
        # not, ignores the weights in torchmetrics 1.9.)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        # Counts of (true class, predicted class) at validation and test, synchronised once an epoch; the per-class
        # scores come from them (`class_scores`): torchmetrics' per-class precision and recall would each keep,
        # update and synchronise their own copy of the same counts.
        self.val_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        # The last epoch's matrix of each stage, on the CPU: for the callbacks that plot it (cifar_cli.dashboard).
        self.confusion: dict[str, Tensor] = {}
        # A training step adds its loss sum and correct count to these sums, on the device (about 15 us on a CPU,
        # no host-device synchronisation); the metric objects take them whenever their values are read: at the
        # logged steps, the epoch's last step and a checkpoint. Two torchmetrics updates a step cost 140 us, and
        # on a GPU each waited for the device.
        # Not a buffer: DDP would overwrite every rank's sums with rank 0's before each step.
        self._window: Tensor | None = None
        self._window_images = 0
        # Under DDP, at a logged step: every rank's window sums and image count, being summed (`_sum_window`).
        self._window_sum: tuple[Tensor, Any] | None = None
        self._logged_stages: set[str] = set()  # stages that called self.log since their epoch began
        self._steps_total: float | None = None  # training steps and, with a time budget, the steps it holds
        self._trainer_steps: float | None = None  # the steps max_epochs or max_steps allow, without a schedule
        self._budget_steps: float | None = None
        self._budget_timer_found: Timer | None = None  # the Timer holding the time budget, found at train start
        self._budget_updated_at: int | None = None  # the step after which the budget was last re-estimated
        self._whiten_bias_frozen = False  # whiten_bias_until reached: the optimizer leaves the bias as it is

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around every hook it calls, about 40 times a training step;
        # nn.Module's __setattr__ checks parameters, buffers and submodules each time (2 us against 0.3 us).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> ImageClassifier:
        # The copy that EMA and StochasticWeightAveraging average into shares the optimizer and scheduler factories:
        # from the command line they are partials holding jsonargparse's instantiators, and through them the CLI and
        # its trainer, which under DDP holds the launched ranks' processes and cannot be copied ("cannot pickle
        # '_thread.lock' object" on rank 0). Otherwise as copy.deepcopy copies any object with __getstate__.
        for factory in (self.optimizer, self.lr_scheduler):
            memo[id(factory)] = factory
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    @property
    def backbone(self) -> nn.Module:
        """The network's backbone, where it has one: Lightning's `BackboneFinetuning` callback freezes it."""
        backbone = getattr(self.net, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(f"{type(self.net).__name__} has no backbone: use TorchvisionNet or TimmNet")
        return backbone

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def evaluate(self, x: Tensor) -> Tensor:
        """Logits for evaluation, averaged over the test-time augmentations that `tta` asks for."""
        if self.hparams.tta == "none":
            return self(x)
        views = [x, x.flip(-1)]
        if self.hparams.tta == "flip-shift":
            # One pixel up-left and one down-right, from a reflect-padded copy, each also mirrored (airbench).
            h, w = x.shape[-2:]
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
                views += [shifted, shifted.flip(-1)]
        logits = self(torch.cat(views)).unflatten(0, (len(views), len(x)))
        if len(views) == 2:
            return logits.mean(0)
        # Half the weight on the unshifted pair, as airbench's level-2 TTA.
        return 0.5 * logits[:2].mean(0) + 0.5 * logits[2:].mean(0)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(self._train_size(images))
        # Labels are class indices, or probabilities `(N, num_classes)` from MixUp/CutMix: cross_entropy takes both.
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        return self._train_metrics(loss, logits, labels, batch_idx)

    def _train_size(self, images: Tensor) -> Tensor:
        """The training images, scaled down while progressive resizing holds (a function of the step alone, so
        that a resumed run resizes as the uninterrupted one did)."""
        side = self.hparams.low_res_side
        if side is None or side >= min(images.shape[-2:]) or self._trainer is None:
            return images
        if self.progress(self.global_step) >= self.hparams.low_res_until:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    def _eval_step(self, batch: Batch, stage: str, batch_idx: int) -> dict[str, Tensor]:
        """Validation or test: updates the stage's metrics; returns the batch's logits, labels and the images'
        index in the split, for the callbacks that look at each image (cifar_cli.dashboard.EvaluationLogger)."""
        images, labels, index = batch
        logits = self.evaluate(images).detach()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self._eval_metrics(loss, logits, labels, stage, batch_idx)
        return {"logits": logits, "labels": labels, "index": index}

    def _eval_metrics(self, loss: Tensor, logits: Tensor, labels: Tensor, stage: str, batch_idx: int) -> None:
        mean_loss: MeanMetric = getattr(self, f"{stage}_loss")
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        getattr(self, f"{stage}_confusion").update(logits.argmax(dim=1), labels)
        logs = self._logs(stage, batch_idx)
        if not len(labels):
            pass  # a rank's last batch emptied of the sampler's repeat (DeviceBatches): no image, and a NaN loss
        elif not logs:
            mean_loss.update(loss, weight=len(labels))
            accuracy.update(logits, labels)
        else:
            mean_loss(loss, weight=len(labels))  # the epoch's value is the mean over images, not over batches
            accuracy(logits, labels)
        if logs:  # also after an empty batch: every rank logs the stage's metrics, and synchronises them
            for metric in METRICS:
                name = f"{stage}_{metric}"
                self.log(name, getattr(self, name), on_epoch=True, prog_bar=True)

    def _class_scores(self, stage: str) -> None:
        """Log the stage's per-class precision, recall and accuracy (`val_recall/cat`, ...) from its confusion
        matrix, synchronised over the ranks, and keep the matrix in `self.confusion[stage]`."""
        metric: MulticlassConfusionMatrix = getattr(self, f"{stage}_confusion")
        if metric.update_count == 0:
            return  # a stage that saw no batch (a sanity check cut to 0 batches, say)
        n = len(self.class_names)
        matrix = metric.compute().reshape(n, n)  # (torchmetrics gives one class's matrix as a scalar)
        metric.reset()
        self.confusion[stage] = matrix.cpu()
        if self.trainer.sanity_checking:
            return
        scores = class_scores(self.confusion[stage])
        named = {f"{stage}_{kind}/{name}": float(v) for kind, values in scores.items() for name, v in
                 zip(self.class_names, values)}  # fmt: skip
        # Straight to the loggers, not through self.log: they would fill the progress bar and the printed tables
        # of test and validate (ten rows per class), and they are synchronised already. At the step Lightning logs
        # the stage's other metrics at (its count of batches that stepped, one behind global_step at an epoch's
        # validation, 0 in test): at global_step, metrics.csv had a second row for every validation and test.
        step = getattr(self.trainer.fit_loop.epoch_loop, "_batches_that_stepped", self.global_step)
        for logger in self.loggers:
            logger.log_metrics({**named, "epoch": self.current_epoch}, step=step)

    def on_validation_epoch_end(self) -> None:
        self._class_scores("val")

    def on_test_epoch_end(self) -> None:
        self._class_scores("test")

    def _train_metrics(self, loss: Tensor, logits: Tensor, labels: Tensor, batch_idx: int) -> Tensor:
        """Add the step to the window sums; at the logged steps and the epoch's last, hand them to the metrics.

        Every batch counts towards the epoch's values. The logged step values (`train_loss_step`,
        `train_acc_step`) are the means over the steps since the previous logged step. Lightning's self.log
        costs about 1 ms a call on a CPU: logging twice a step made the tutorial recipe 10% slower.
        """
        # With probability labels (MixUp/CutMix) an image's class is the one with the larger share.
        classes = labels.argmax(dim=1) if labels.ndim == 2 else labels
        correct = (logits.detach().argmax(dim=1) == classes).sum()
        step = torch.stack((loss.detach().float() * len(labels), correct.float()))
        self._window = step if self._window_images == 0 else self._window + step
        self._window_images += len(labels)
        # The epoch's last batch logs too: where it ends training (the schedule's end), Lightning writes the step
        # values whatever log_every_n_steps says, and they would be those of the previous logged step again (see
        # on_train_batch_end).
        last = self._trainer is not None and batch_idx + 1 >= self.trainer.num_training_batches
        first = "train" not in self._logged_stages
        self._logged_stages.add("train")
        if last or self._writes_step_values():
            if self._distributed():
                self._window_means()  # a loss gone NaN stops the run here, before the optimizer step (see below)
                self._window_sum = self._sum_window()  # logged in on_train_batch_end
            else:
                self._log_window()
        elif first:
            # The epoch's first batch in this process: Lightning reports a metric's epoch value only if it was
            # logged in this process. The metrics are logged as they are; the window goes on to the next logged step,
            # so that its value covers every step since the previous one, across a resume too (on_load_checkpoint).
            self._log_train_metrics()
        return loss

    def _distributed(self) -> bool:
        return self._trainer is not None and distributed_run(self._trainer)

    def _window_row(self) -> Tensor:
        """The window as one tensor on the device: its loss sum, correct count and image count."""
        count = torch.full((1,), self._window_images, dtype=self._window.dtype, device=self._window.device)
        return torch.cat((self._window, count))  # (a kernel, no copy from the host)

    def _sum_window(self) -> tuple[Tensor, Any]:
        """Start summing the window's sums and image count over the ranks, without waiting (torch.distributed's
        async work): every rank calls it at the same batches, the logged ones (`_writes_step_values`, the epoch's
        last)."""
        sums = self._window_row()
        return sums, torch.distributed.all_reduce(sums, async_op=True)

    def _log_window(self) -> None:
        """Log the window's means as the step values of the training metrics (and add them to the epoch's).

        Under DDP the step values are the means over every rank's images: the metrics' forward returns the window
        it is given, unsynchronised, and train_loss_step and train_acc_step were rank 0's half of the images (the
        step curves of two GPUs were not those of one with the same batches). The sums started at the logged step's
        training_step are read here, in on_train_batch_end, after the step's gradient all-reduce: no step waits on a
        collective of its own. Each rank then adds the means over every rank with its own image count to its epoch
        sums, which over the ranks (the epoch's value, a checkpoint's) still hold every image once. At a step that
        stops training the sums are started here."""
        summing, self._window_sum = self._window_sum, None
        if summing is None and self._distributed() and self._window_images:
            summing = self._sum_window()
        if summing is not None:
            sums, work = summing
            work.wait()
            self._window = sums[:2] / sums[2] * self._window_images
        self._flush_window(log=True)
        self._log_train_metrics()

    def _log_train_metrics(self) -> None:
        for metric in METRICS:
            name = f"train_{metric}"
            self.log(name, getattr(self, name), on_step=True, on_epoch=True, prog_bar=True)

    def _flush_window(self, log: bool) -> None:
        """Hand the window sums to the training metrics; `log`: through their forward, whose value self.log
        reports as the step value."""
        if self._window_images == 0:
            return
        mean_loss, accuracy = self._window_means()
        for metric, value in ((self.train_loss, mean_loss), (self.train_acc, accuracy)):
            (metric if log else metric.update)(value, weight=self._window_images)
        self._window_images = 0

    def _window_means(self) -> Tensor:
        """The window's mean loss and accuracy over its images; a loss gone NaN or infinite stops the run."""
        mean_loss, accuracy = means = self._window / self._window_images
        # A loss gone NaN or infinite would be dropped by the metrics (with a warning), the epoch reported finite
        # and its NaN weights checkpointed as the best: the run stops here instead. The metrics wait for the device
        # at each update (their NaN check), so this read of it costs no wait of its own.
        if not bool(torch.isfinite(mean_loss)):
            lr = self.hparams.learning_rate
            raise TrainingDiverged(
                f"training diverged: train_loss is {float(mean_loss)} by step {self.global_step + 1}; lower "
                f"--model.learning_rate (now {lr:g}) or clip the gradients (--trainer.gradient_clip_val 1.0)"
            )
        return means

    def _logs(self, stage: str, batch_idx: int) -> bool:
        """Whether this evaluation batch logs: the first of every epoch (Lightning reports a metric's epoch value
        only if it was logged in this process); the others only update the metrics."""
        if batch_idx == 0 or self._trainer is None or stage not in self._logged_stages:
            self._logged_stages.add(stage)
            return True
        return False

    def _writes_step_values(self) -> bool:
        """Whether the logger writes this training step's values: every `log_every_n_steps`, as Lightning counts
        them. With accumulate_grad_batches at the batch that ends the step's accumulation: the step's other batches
        keep adding to the window, or the written value would be that last batch's alone."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (self.global_step + 1) % trainer.log_every_n_steps == 0 and not trainer.fit_loop._should_accumulate()

    def on_train_start(self) -> None:
        # Lightning hands a resumed run's loader state to the loader in `fit_loop.setup_data`, but only while it is
        # restarting; `estimated_stepping_batches` (asked for by configure_optimizers for the schedule) runs
        # setup_data before the checkpoint is restored, so the state would be dropped and the epoch would start
        # over at batch 0. Handing it over here, before the first batch is drawn, resumes at the next batch.
        self.trainer.fit_loop._load_combined_loader_states()
        if self._window is not None:  # restored from a checkpoint before the module moved to its device
            self._window = self._window.to(self.device)
        # Whatever follows training progress follows a time budget too: the schedule, progressive resizing, the
        # whitening bias and lookahead (which, without a schedule, kept counting the steps of max_epochs that the
        # budget cut off).
        hp = self.hparams
        follows_progress = (
            self.lr_schedule is not None
            or hp.low_res_side is not None
            or hp.whiten_bias_until is not None
            or any(isinstance(callback, Lookahead) for callback in self.trainer.callbacks)
        )
        self._budget_timer_found = self._budget_timer() if follows_progress else None
        if self.trainer.fit_loop.restarted_mid_epoch:
            self._unfreeze_optimized()
            for callback in self.trainer.callbacks:
                if isinstance(callback, StochasticWeightAveraging):
                    # It installs its schedule (SWALR, from the state the checkpoint restored) and its count of
                    # averaged epochs in on_train_epoch_start, which Lightning does not call for an epoch resumed
                    # midway: that epoch trained on without the schedule, and lost its step at the epoch's end.
                    # The average is not updated twice: the callback records the epoch it last averaged.
                    callback.on_train_epoch_start(self.trainer, self)
        self._schedule_added_groups(rebase=False)  # a resumed run's optimizer has the groups its callbacks added

    def _unfreeze_optimized(self) -> None:
        """Make every parameter the optimizer holds trainable again, after a resume in the middle of an epoch.

        Lightning's finetuning callbacks (BackboneFinetuning) freeze the backbone at setup and unfreeze it in
        on_train_epoch_start, which Lightning does not call for an epoch resumed midway: the restored optimizer
        would hold a backbone without gradients until the next epoch. A parameter in the optimizer is being trained.
        """
        if not any(isinstance(c, BaseFinetuning) for c in self.trainer.callbacks):
            return
        held = {id(p) for optimizer in self.trainer.optimizers for g in optimizer.param_groups for p in g["params"]}
        for module in self.modules():
            own = list(module.parameters(recurse=False))
            if own and all(id(p) in held for p in own):  # as BaseFinetuning.make_trainable, this module alone
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.track_running_stats = True
                for param in own:
                    param.requires_grad_(True)

    def on_train_epoch_start(self) -> None:
        self._logged_stages.discard("train")
        factor = self.hparams.backbone_lr_factor
        for callback in self.trainer.callbacks:
            # Lightning's BackboneFinetuning has just set the learning rate of the backbone it added (the optimizer's
            # last group), rising to the head's; the backbone trains at backbone_lr_factor times that. The callback
            # keeps its own unscaled value, so scaling once an epoch scales every epoch's rate once.
            if isinstance(callback, BackboneFinetuning) and self.current_epoch >= callback.unfreeze_backbone_at_epoch:
                for optimizer in self.trainer.optimizers:
                    group = optimizer.param_groups[-1]
                    group["lr"] *= factor
                    # Added with the optimizer's weight decay: divided by the factor, as for the backbone's other
                    # groups (param_groups), the decay per step is the head's.
                    if "weight_decay" in group:
                        group["weight_decay"] = self.hparams.weight_decay / factor
                self._schedule_added_groups(rebase=True)

    def _schedule_added_groups(self, rebase: bool) -> None:
        """Take the parameter groups that a finetuning callback added to the optimizer into its scheduler, which
        knows only the groups it was built with (torch's schedulers then fail at their next step). `rebase`: the
        callback has just set the last group's rate; the schedule goes on from it, shaped as for the others."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            base_lrs = getattr(scheduler, "base_lrs", None)
            if base_lrs is None:
                continue  # ReduceLROnPlateau: it takes every group as it finds it
            groups = scheduler.optimizer.param_groups
            base_lrs.extend(group["lr"] for group in groups[len(base_lrs) :])
            factor = 1.0
            if isinstance(scheduler, LambdaLR):  # --model.lr_schedule: one factor for every group
                lambdas = scheduler.lr_lambdas
                lambdas.extend(lambdas[0] for _ in groups[len(lambdas) :])
                factor = lambdas[-1](scheduler.last_epoch)
            if rebase and factor > 0:
                base_lrs[-1] = groups[-1]["lr"] / factor

    def on_train_epoch_end(self) -> None:
        # An epoch cut short (max_steps, max_time, a stop signal) ends before its last batch flushed the window;
        # Lightning computes the epoch's values after this hook.
        self._flush_window(log=False)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # Whatever the network draws from the global generator (dropout, say) is seeded by the position in
        # training, so a resumed run draws what the uninterrupted one did. Data augmentation has its own generator.
        # Only this device's generator: torch.manual_seed visits every backend and costs 150 us a call on a CPU,
        # against 3 us here.
        seed = derived_seed(run_seed(), self.current_epoch, batch_idx, self.global_rank)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
        if self.hparams.whiten_bias_until is not None:
            self._freeze_whiten_bias()

    def _freeze_whiten_bias(self) -> None:
        """Freeze the whitening layer's bias from `whiten_bias_until` on: a function of the step, so a resumed run
        freezes it where the uninterrupted one did."""
        frozen = self.progress(self.global_step) >= self.hparams.whiten_bias_until
        if frozen == self._whiten_bias_frozen:
            return
        self._whiten_bias_frozen = frozen
        # DDP (even in one process) expects a gradient at every step for every parameter that required one when
        # it wrapped the module; there the bias keeps its gradient and on_before_optimizer_step drops it instead.
        if not isinstance(self.trainer.strategy.model, DistributedDataParallel):
            self.net.whiten.bias.requires_grad_(not frozen)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._whiten_bias_frozen:
            # An optimizer skips a parameter without a gradient: no momentum, no weight decay, the bias stays.
            self.net.whiten.bias.grad = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        timm_config = getattr(self.net, "timm_config", None)
        if timm_config is not None:  # a network timm built from a config.json, which the checkpoint then carries
            checkpoint[TIMM_CONFIG_KEY] = {"name": self.net.name, "config": timm_config}
        # The training metrics' sums so far this epoch, when the checkpoint falls within an epoch: a run resumed
        # there reports the whole epoch's values. Kept beside the weights rather than in the state_dict, which
        # stays the network's alone.
        trainer = self._trainer
        if (
            trainer is None
            or trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches
        ):
            return  # the epoch's batches are done: a resumed run starts the next epoch from zero
        # Under DDP each rank holds the sums of its own batches: the checkpoint keeps their totals over the ranks,
        # which rank 0 alone takes back (on_load_checkpoint). Every rank saves a checkpoint at the same step
        # (Lightning's save_checkpoint ends in a barrier), so these collectives are met by all.
        synced = trainer.world_size > 1
        # Under DDP a logged step hands its window to the metrics in on_train_batch_end, after the callbacks' (a
        # checkpoint saved at that step): it goes into copies of the sums, as the next moment will have it.
        flushing = self._window_sum is not None and self._window_images
        means = self._window_means() if flushing else None
        saved: dict[str, Any] = {}
        for name, index in (("train_acc", 1), ("train_loss", 0)):
            metric = getattr(self, name)
            if means is not None:
                metric = copy.deepcopy(metric)
                metric.update(means[index], weight=self._window_images)
            with metric.sync_context(should_sync=synced):
                state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in metric.metric_state.items()}
            saved[name] = {"state": state, "updates": metric._update_count}
        # Otherwise the window is kept whole: the steps since the last logged one, whose sums the next logged
        # step's values include (after a resume too).
        window = self._window_row() if self._window_images and not flushing else torch.zeros(3, device=self.device)
        if synced:
            torch.distributed.all_reduce(window)
        saved[WINDOW_KEY] = window.cpu()
        checkpoint[METRICS_KEY] = saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._resumed_from = checkpoint  # its optimizer state is restored after on_fit_start
        if self._trainer is not None and self.global_rank != 0:
            return  # rank 0 takes the sums of every rank's batches so far; the others count on from zero
        saved_metrics = dict(checkpoint.get(METRICS_KEY, {}))
        window = saved_metrics.pop(WINDOW_KEY, None)  # (absent from checkpoints that added it to the sums)
        if window is not None and window[2] > 0:
            self._window, self._window_images = window[:2].clone(), int(window[2])
        for name, saved in saved_metrics.items():
            metric = getattr(self, name)
            if set(saved["state"]) != set(metric._defaults):
                continue  # saved by an earlier version, whose training accuracy kept other sums
            for attr, value in saved["state"].items():
                setattr(metric, attr, value.to(metric.device) if isinstance(value, Tensor) else value)
            metric._update_count = saved["updates"]  # torchmetrics keeps the count privately; compute() reads it

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test", batch_idx)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        images, labels, index = batch
        confidence, predicted = self.evaluate(images).float().softmax(dim=1).max(dim=1)
        return {"index": index, "predicted": predicted, "confidence": confidence, "label": labels}

    def setup(self, stage: str) -> None:
        # Under ddp_spawn on a CPU the module reaches each rank through torch.multiprocessing, which puts every CPU
        # tensor in memory the ranks share; Lightning copies the parameters and buffers back apart
        # (`_disable_module_memory_sharing`), not the metrics' states. A state only update()d from its start (the
        # confusion matrices) was one tensor for both ranks: `validate` and `test` counted every image twice.
        for metric in self.modules():
            if isinstance(metric, Metric):
                for name, value in metric.metric_state.items():
                    # (is_shared() is always True of a CUDA tensor: the GPU's states are each rank's own)
                    if isinstance(value, Tensor) and not value.is_cuda and value.is_shared():
                        setattr(metric, name, value.clone())
        mean, std = getattr(self.net, "input_mean", None), getattr(self.net, "input_std", None)
        data = self.trainer.datamodule if self._trainer is not None else None
        if self.init_normalization is not None and isinstance(data, ImageDataModule):
            # The weights init_from loaded expect the images normalised as in the run they come from (its data's
            # statistics, or its pretrained network's): this data's statistics fed them other inputs, and the
            # whitening filters they keep were fitted to the earlier ones. A resumed fit's checkpoint restores
            # the data's normalisation after this, as the run had it.
            data.set_normalization(*self.init_normalization)
        elif mean is not None and std is not None and isinstance(data, ImageDataModule):
            # Pretrained weights expect the images normalised as in their training, not by this data's statistics.
            data.set_normalization(torch.tensor(mean) * 255, torch.tensor(std) * 255)
        # In place, so the state_dict keeps its keys; after the callbacks' setup, whose weight averaging copies
        # the module and would otherwise copy the compiled wrapper too.
        if self.hparams.compile:
            self.net.compile()

    def on_fit_start(self) -> None:
        checkpoint, self._resumed_from = getattr(self, "_resumed_from", None), None
        if checkpoint is not None:
            self._optimizer_settings_over(checkpoint)
        # A fresh run fits the whitening layer to the data; a resumed one has it in its checkpoint already.
        whitening = hasattr(self.net, "init_whitening") and not any(k.startswith("whiten.") for k in self.initialised)
        if whitening and self.trainer.ckpt_path is None:
            data = self.trainer.datamodule
            train = data.splits["train"].images
            # A seeded random sample: the split is in file order, and an image folder's first files are one class.
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:WHITENING_IMAGES]
            images = train[pick.to(train.device)].to(self.device)
            self.net.init_whitening(data.preprocess(images))
            # The same images give every rank the same filters; broadcasting rules out numerical differences,
            # which DDP would never reconcile in a frozen layer. One broadcast, from host memory: Lightning's
            # broadcast pickles its object, and a GPU tensor unpickles onto the same GPU number on every rank.
            state = self.net.state_dict()
            sent = self.trainer.strategy.broadcast({name: tensor.cpu() for name, tensor in state.items()})
            for name, tensor in state.items():
                tensor.copy_(sent[name])

    def _optimizer_settings_over(self, checkpoint: dict[str, Any]) -> None:
        """Put the settings of the optimizer just built (learning rate, weight decay, momentum, ...) over those in
        the checkpoint's optimizer state, which Lightning restores next: a restart's `--model.learning_rate` trained
        on at the checkpoint's rate. A scheduled learning rate keeps its place in the schedule, rescaled to the new
        base rate. The implementation (fused, foreach) stays the checkpoint's, so that resuming stays exact."""
        states = checkpoint.get("optimizer_states") or []
        schedulers = checkpoint.get("lr_schedulers") or []
        for optimizer, state in zip(self.trainer.optimizers, states):
            ratios = []
            for new, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
                for key, value in new.items():
                    if key not in ("params", "lr", "initial_lr", *IMPLEMENTATION_KEYS) and key in saved:
                        saved[key] = value
                ratio = 1.0
                # StochasticWeightAveraging's SWALR, which marks the groups it anneals (`swa_lr`), is installed by
                # the callback at the next epoch start, after this: no scheduler is seen, but the rate is scheduled.
                if not self.trainer.lr_scheduler_configs and "swa_lr" not in saved:
                    saved["lr"] = new["lr"]
                elif new.get("initial_lr") and saved.get("initial_lr"):  # a torch scheduler's base rate
                    ratio = new["initial_lr"] / saved["initial_lr"]
                    saved["initial_lr"] = new["initial_lr"]
                else:  # ReduceLROnPlateau: its reductions so far go on; SWALR: its annealing
                    ratio = self.hparams.learning_rate / checkpoint.get("hyper_parameters", {}).get(
                        "learning_rate", self.hparams.learning_rate
                    )
                if ratio != 1:
                    saved["lr"] *= ratio
                ratios.append(ratio)
            for config, scheduler in zip(self.trainer.lr_scheduler_configs, schedulers):
                if getattr(config.scheduler, "optimizer", None) is not optimizer:
                    continue
                for key in ("base_lrs", "_last_lr"):  # (groups a finetuning callback added keep theirs)
                    if isinstance(rates := scheduler.get(key), list):
                        scheduler[key] = [rate * r for rate, r in zip(rates, ratios)] + rates[len(ratios) :]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        backbone = getattr(self.net, "backbone", None)
        groups = param_groups(
            self.net, hp.learning_rate, hp.weight_decay, hp.norm_lr_factor, backbone, hp.backbone_lr_factor
        )
        precision = getattr(self._trainer, "precision_plugin", None)
        # Lightning's mixed precision (bf16-mixed too, the default on a CPU with native bf16) refuses to clip a
        # fused optimizer's gradients at the first step: `--trainer.gradient_clip_val`, which a diverged run is
        # told to try, failed.
        clipped = isinstance(precision, MixedPrecision) and bool(self._trainer.gradient_clip_val)
        unscaled_outside = getattr(precision, "scaler", None) is not None or clipped
        optimizer = build_optimizer(self.optimizer, groups, unscaled_outside=unscaled_outside)
        if self.lr_scheduler is not None:
            # Per epoch, as LightningCLI steps its --lr_scheduler; ReduceLROnPlateau with the metric it names.
            torch_scheduler = self.lr_scheduler(optimizer)
            config = {"scheduler": torch_scheduler, "interval": "epoch"}
            if isinstance(torch_scheduler, ReduceLROnPlateau):
                config["monitor"] = torch_scheduler.monitor
            return {"optimizer": optimizer, "lr_scheduler": config}
        if self.lr_schedule is None:
            return optimizer
        self._steps_total = self.trainer.estimated_stepping_batches
        self._budget_steps = None
        if self._steps_total == float("inf") and self._budget_timer() is None:
            raise UsageError(SCHEDULE_NEEDS_LENGTH)
        schedule = self.lr_schedule
        scheduler = LambdaLR(optimizer, lambda step: schedule(self.progress(step)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def progress(self, step: int) -> float:
        """The fraction of training done after `step` optimizer steps, which drives the LR schedule: of the steps
        that max_epochs (or max_steps) allow, or of the time budget (`--trainer.max_time`), whichever is further.

        Time is counted in steps: the steps that fit in the budget are estimated from the pace so far, so that
        every rank of a DDP run sees the same progress at the same step. The budget counts where something follows
        progress (the schedule, `low_res_side`, `whiten_bias_until`, Lookahead); else progress is of the steps
        max_epochs or max_steps allow (0 when neither bounds training)."""
        total = self._steps_total
        if total is None:
            if self._trainer_steps is None:
                self._trainer_steps = self.trainer.estimated_stepping_batches
            total = self._trainer_steps
        done = step / total
        if self._budget_steps:
            done = max(done, step / self._budget_steps)
        return min(done, 1.0)

    def update_budget(self) -> None:
        """With a time budget and something that follows progress: re-estimate the steps that fit in the budget from
        the pace so far, once after each step (under DDP at the steps the clock is read, every TIME_CHECK_STEPS, from
        rank 0's clock, broadcast).

        Lightning calls the callbacks' on_train_batch_end before the module's: one that reads the progress there
        (Lookahead) calls this first, or it would go by the pace before the step, and miss the step at which the
        budget ends the run when that step was slower than the ones before."""
        timer = self._budget_timer_found
        step = self.global_step
        if timer is None or step == self._budget_updated_at:
            return
        self._budget_updated_at = step
        if step >= BUDGET_MIN_STEPS and not (self.trainer.world_size > 1 and step % TIME_CHECK_STEPS):
            elapsed = timer.time_elapsed("train")
            if self.trainer.world_size > 1:
                elapsed = self.trainer.strategy.broadcast(elapsed)
            if elapsed > 0:
                self._budget_steps = step * (timer.time_elapsed() + timer.time_remaining()) / elapsed

    def _budget_timer(self) -> Timer | None:
        """The trainer's Timer, where it has a time limit (FitTimer takes `--trainer.max_time`)."""
        timers = (c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None)
        return next(timers, None)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if self._window_sum is not None:  # under DDP: the step values of a logged step, summed over the ranks
            self._log_window()
        # Stop when the schedule has run its course. A run cut off by the budget instead validates at once (Lightning
        # validates when a Timer stops it), so its last model can still be the best.
        self.update_budget()
        step = self.global_step
        # Also at the last of max_epochs' steps: Lightning then validates at once, which a config that validates
        # only at the end (configs/budget.yaml) relies on.
        if self._steps_total is not None and self.progress(step) >= 1.0:
            self.trainer.should_stop = True
            # And whatever the epoch: configs/fast.yaml validates every 10th epoch, its end with its 10 epochs, and
            # with --trainer.max_epochs 8 the run ended unvalidated, with no best checkpoint.
            self.trainer.check_val_every_n_epoch = None
        if self.trainer.should_stop and self._window_images:
            # Lightning writes the step values of the step that stops training (a time limit, a signal; after the
            # callbacks' hooks and this one), whatever log_every_n_steps says: the steps' since the last logged one.
            self._log_window()


def check_settings(net: nn.Module, label_smoothing: float, backbone_lr_factor: float, low_res_until: float) -> None:
    """Refuse settings that would fail mid-run or do nothing, in one line before anything runs."""
    # torch takes 0 to 1: at 1 every target is the uniform distribution, whatever the label, and nothing is learned;
    # above 1 cross_entropy fails at the first step, below 0 it pushes the wrong classes up.
    if not 0 <= label_smoothing < 1:
        raise UsageError(
            f"--model.label_smoothing {label_smoothing:g}: must be at least 0 and below 1 (at 1 every target is "
            "uniform and the labels are lost); 0.1 is usual"
        )
    backbone = getattr(net, "backbone", None)
    if backbone_lr_factor != 1 and not isinstance(backbone, nn.Module):
        raise UsageError(
            f"--model.backbone_lr_factor {backbone_lr_factor:g} needs a network with a backbone, such as "
            f"TorchvisionNet or TimmNet; {type(net).__name__} has none: leave it at 1"
        )
    # Training progress runs from 0 to 1: at 0 or below no step is at low resolution, above 1 every step is, as at 1.
    if not 0 < low_res_until <= 1:
        raise UsageError(
            f"--model.low_res_until {low_res_until:g}: a fraction of training progress, above 0 and at most 1 "
            "(0.5: the first half of training at --model.low_res_side)"
        )


def class_scores(matrix: Tensor) -> dict[str, Tensor]:
    """Per-class `precision`, `recall` and `acc` from a confusion matrix (rows: true class, columns: predicted).

    A class's accuracy is the share of its images classified correctly: with one label per image that is its
    recall, given under both names because users look for both. A class never predicted has precision 0, one
    absent from the split recall 0, as torchmetrics reports them.
    """
    matrix = matrix.double()
    correct = matrix.diagonal()
    precision = correct / matrix.sum(dim=0).clamp(min=1)
    recall = correct / matrix.sum(dim=1).clamp(min=1)
    return {"precision": precision.float(), "recall": recall.float(), "acc": recall.float()}


def head_prefix(net: nn.Module, num_classes: int) -> tuple[str, ...]:
    """The state_dict prefixes of the layers that produce the logits (a distilled DeiT has two)."""
    if isinstance(net, NamedNet):
        return tuple(f"model.{path}." for path in net.head_paths)
    return (f"{final_layer(net, num_classes)}.",)


def init_weights(net: nn.Module, path: str, class_names: list[str]) -> tuple[set[str], tuple[Tensor, Tensor] | None]:
    """Load the network weights of the cifar-cli checkpoint at `path` whose names and shapes match `net`'s; the
    head's only when the checkpoint was trained on the same classes. Reports what was loaded in one line. Returns
    the names loaded, and the per-channel mean and std (0-255 scale) its run normalised the images with, which the
    checkpoint's data state holds (None in a checkpoint without one)."""
    flag = "--model.init_from"
    checkpoint = load_checkpoint(path, flag=f"{flag} {path}")
    saved = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    own = net.state_dict()
    head = head_prefix(net, len(class_names))
    same_classes = list(checkpoint["hyper_parameters"].get("class_names", [])) == list(class_names)
    loaded = {k for k, v in saved.items() if k in own and v.shape == own[k].shape}
    if not same_classes:
        loaded = {k for k in loaded if not k.startswith(head)}
    if not loaded:
        raise UsageError(
            f"{flag} {path}: none of its network weights fits this network (its net is "
            f"{checkpoint['hyper_parameters']['net'].get('class_path', '?')}): pass a checkpoint of the same network"
        )
    net.load_state_dict({k: saved[k] for k in loaded}, strict=False)
    new = sorted(own.keys() - loaded)
    new_part = f"; new: {', '.join(new[:4])}{', ...' if len(new) > 4 else ''}" if new else ""
    # The data module's state, under its class's name, which need not be this fit's (CIFAR10DataModule's for a
    # folder's fine-tuning): the one whose keys ImageDataModule.state_dict writes.
    normalization = next(
        (
            (torch.as_tensor(state["mean"]).float(), torch.as_tensor(state["std"]).float())
            for state in checkpoint.values()
            if isinstance(state, dict) and {"class_names", "mean", "std"} <= state.keys()
        ),
        None,
    )
    inputs = "; images normalised as its run's were" if normalization is not None else ""
    print(
        f"cifar-cli: {flag} {path}: loaded {len(loaded)} of {len(own)} network tensors{new_part}{inputs}",
        file=sys.stderr,
    )
    return loaded, normalization
