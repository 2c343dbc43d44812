"""What a run shows beyond its scalars on W&B: every evaluated image's prediction (a W&B table, the confusion matrix,
the worst mistakes kept in the run folder for `cifar-cli report`), the checkpoints as W&B model artifacts, the
network's gradients and weights; and the metrics as CSV in the run folder, with or without W&B."""

from __future__ import annotations

import csv
import io
import os
import warnings
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import DummyExperiment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cifar_cli.atomic import atomic_csv_logs, atomic_write, atomic_write_text
from cifar_cli.callbacks import (
    NO_DATA_MODULE,
    NO_WANDB,
    last_checkpoint,
    logged_step,
    run_dir,
    table_rows,
    wandb_loggers,
    warn_idle,
)
from cifar_cli.data import ImageDataModule
from cifar_cli.terminal import epoch_metrics

STAGE_NAMES = {"val": "validation", "test": "test"}


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger beside another logger (W&B's), writing `metrics.csv` and `hparams.yaml` into that
    logger's run folder, beside its checkpoints and `config.yaml`: every run keeps its metrics as plain CSV, for
    `cifar-cli report` and for those who never open W&B. The CLI adds it to any logger but a CSVLogger.

    Its folder is known only once the other logger's run has started (a W&B run's id), so the file writer is
    made at first use, which Lightning's setup reaches after the other logger's.
    """

    def __init__(self, run: Logger) -> None:
        super().__init__(save_dir=run.save_dir or ".", name=run.name or "")
        self._run = run

    @property
    def version(self) -> int | str:
        return self._run.version

    @property
    def experiment(self) -> Any:
        fresh = self._experiment is None
        with warnings.catch_warnings():
            metrics = ExperimentWriter.NAME_METRICS_FILE
            if fresh and rank_zero_only.rank == 0 and not os.path.isfile(os.path.join(self.log_dir, metrics)):
                # The other logger's folder, which holds its files already (TensorBoard's event file): Lightning
                # warned at every such run that "previous log files" there would be deleted, where there were none.
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = super().experiment
        if fresh and not isinstance(writer, DummyExperiment):
            atomic_csv_logs(self)  # every flush writes the file whole (cifar_cli.atomic)
        return writer


def with_csv_logger(logger: Any) -> Any:
    """The trainer's `logger` value with a RunCSVLogger added, where it holds loggers and the first, whose folder is
    the run's, does not write CSV. A CSVLogger later in the list (`--trainer.logger+=CSVLogger` beside W&B) writes
    into a folder of its own, and the run's folder lacked the metrics.csv that `cifar-cli report` reads."""
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger] if isinstance(logger, Logger) else []
    if not loggers or isinstance(loggers[0], CSVLogger):
        return logger
    return [*loggers, RunCSVLogger(loggers[0])]


class _Stage:
    """One evaluation pass's predictions, one slot per image of the split, written in place on the device: no
    host-device synchronisation per batch, and under DDP one all-reduce (max) completes every rank's slots."""

    def __init__(self, size: int, table: Tensor, num_classes: int, device: torch.device) -> None:
        self.predicted = torch.full((size,), -1, dtype=torch.long, device=device)
        self.confidence = torch.full((size,), -1.0, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        # Every class's probability only for the table's images; the other images share the dump row at the end.
        self.table = table.to(device)
        self.slot = torch.full((size,), len(table), dtype=torch.long, device=device)
        self.slot[self.table] = torch.arange(len(table), device=device)
        self.probabilities = torch.full((len(table) + 1, num_classes), -1.0, device=device)

    def add(self, logits: Tensor, labels: Tensor, index: Tensor) -> None:
        probabilities = logits.float().softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        self.predicted[index] = predicted
        self.confidence[index] = confidence
        self.labels[index] = labels
        self.probabilities.index_copy_(0, self.slot[index], probabilities)

    def complete(self, trainer: Trainer) -> None:
        """Every rank's predictions in every rank's copy (under DDP each rank evaluated its own share)."""
        if trainer.world_size > 1:
            for name in ("predicted", "confidence", "labels", "probabilities"):
                setattr(self, name, trainer.strategy.reduce(getattr(self, name), reduce_op="max"))
        for name in ("predicted", "confidence", "labels", "probabilities", "table", "slot"):
            setattr(self, name, getattr(self, name).cpu())


class EvaluationLogger(Callback):
    """Looks at every image of validation and test, once the stage ends:

    - on W&B, the confusion matrix (W&B's own plot) after every validation and test, and a table with one row per
      image (the image, its true and predicted class, the confidence, every class's probability) at the end of
      `fit` (of its last validation), `validate` and `test`, where the UI filters and sorts the mistakes;
    - in the run folder, for `cifar-cli report` with or without W&B: `confusion_val.csv` / `confusion_test.csv`
      (rows: true class, columns: predicted) and `mistakes_val.pt` / `mistakes_test.pt`, the most confident
      mistakes with their images.

    Per-class precision, recall and accuracy are logged by the model itself (`val_recall/cat`, ...).

    Args:
        table_rows: Images in the prediction table. None: the whole split for images of up to 64x64 pixels,
            else 1,000 drawn at random (the same ones every time); 0: no table. At most 200,000, W&B's limit for
            a table: of a larger split, 200,000 drawn at random.
        mistakes: How many of the most confident mistakes to keep in the run folder.
    """

    def __init__(self, table_rows: NonNegativeInt | None = None, mistakes: NonNegativeInt = 64) -> None:
        self.table_rows = table_rows
        self.mistakes = mistakes
        self._stage: _Stage | None = None
        self._pending_table: tuple[str, _Stage, int] | None = None  # the last validation's, logged when fit ends

    def _data(self, trainer: Trainer) -> ImageDataModule | None:
        data = trainer.datamodule
        if isinstance(data, ImageDataModule):
            return data
        warn_idle(self, NO_DATA_MODULE)
        return None

    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stage = None
        data = self._data(trainer)
        if trainer.sanity_checking or data is None or stage not in data.splits:
            return
        size = len(data.splits[stage])
        table = table_rows(size, data.image_shape, self.table_rows)
        self._stage = _Stage(size, table, data.num_classes, pl_module.device)

    def _add(self, outputs: Any) -> None:
        if self._stage is not None and isinstance(outputs, dict) and "index" in outputs:
            self._stage.add(outputs["logits"], outputs["labels"], outputs["index"])

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        done, self._stage = self._stage, None
        if done is None:
            return
        done.complete(trainer)
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        folder = run_dir(trainer)
        matrix = pl_module.confusion.get(stage)
        if matrix is not None:
            write_confusion_csv(os.path.join(folder, f"confusion_{stage}.csv"), matrix, pl_module.class_names)
        self._write_mistakes(os.path.join(folder, f"mistakes_{stage}.pt"), done, data, stage, pl_module.class_names)
        for logger in wandb_loggers(trainer):
            if matrix is not None:
                title = f"Confusion matrix, {STAGE_NAMES[stage]}"
                plot = confusion_plot(matrix, pl_module.class_names, title)
                logger.log_metrics({f"{stage}_confusion_matrix": plot}, step=logged_step(trainer))
        if stage == "val" and trainer.state.fn == TrainerFn.FITTING:
            # The table of the last validation, when fit ends, at that validation's step.
            self._pending_table = (stage, done, logged_step(trainer))
        else:
            self._log_table(trainer, pl_module, stage, done, logged_step(trainer))

    def _write_mistakes(self, path: str, done: _Stage, data: ImageDataModule, stage: str, names: list[str]) -> None:
        if not self.mistakes:
            return
        wrong = (done.predicted >= 0) & (done.labels >= 0) & (done.predicted != done.labels)
        index = wrong.nonzero().flatten()
        index = index[done.confidence[index].argsort(descending=True, stable=True)[: self.mistakes]]
        split = data.splits[stage]
        images, _ = split.take(index.to(split.device))
        saved = {
            "images": images.cpu(),
            "labels": done.labels[index],
            "predicted": done.predicted[index],
            "confidence": done.confidence[index],
            "index": index,
            "class_names": list(names),
        }
        atomic_write(path, lambda file: torch.save(saved, file))

    def _log_table(self, trainer: Trainer, pl_module: LightningModule, stage: str, done: _Stage, step: int) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or len(done.table) == 0:
            return
        import wandb

        data = trainer.datamodule
        index = done.table[done.predicted[done.table] >= 0]  # images this pass saw (all, unless cut short)
        split = data.splits[stage]
        images, _ = split.take(index.to(split.device))
        pictures = images.cpu().permute(0, 2, 3, 1).numpy()  # HWC uint8, as W&B expects
        names = pl_module.class_names
        columns = ["index", "image", "label", "predicted", "confidence", "correct", *[f"p_{n}" for n in names]]
        rows = []
        probabilities = done.probabilities[done.slot[index]].tolist()
        for i, picture, p in zip(index.tolist(), pictures, probabilities):
            label, predicted = int(done.labels[i]), int(done.predicted[i])
            true_name = names[label] if label >= 0 else ""
            rows.append(
                [i, wandb.Image(picture), true_name, names[predicted], round(float(done.confidence[i]), 4),
                 predicted == label, *[round(x, 4) for x in p]]
            )  # fmt: skip
        for logger in loggers:
            logger.log_table(key=f"{stage}_predictions", columns=columns, data=rows, step=step)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, *args: Any, **kwargs: Any) -> None:
        self._add(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, *args: Any, **kwargs: Any) -> None:
        self._add(outputs)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending_table = self._pending_table, None
        if pending is not None and trainer.is_global_zero:
            self._log_table(trainer, pl_module, *pending)


def write_confusion_csv(path: str, matrix: Tensor, names: list[str]) -> None:
    """The confusion matrix as CSV: a header `label,<class>,...`, then one row per true class with its counts."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["label", *names])
    for name, counts in zip(names, matrix.tolist()):
        writer.writerow([name, *counts])
    atomic_write_text(path, text.getvalue())


def confusion_plot(matrix: Tensor, names: list[str], title: str) -> Any:
    """W&B's confusion-matrix chart (the one `wandb.plot.confusion_matrix` draws) from counts already made.

    `wandb.plot.confusion_matrix` counts per-image lists itself, in a Python loop on one process; the matrix
    here is torchmetrics', counted on the device and synchronised over the ranks.
    """
    import wandb

    data = [[names[i], names[j], count] for i, row in enumerate(matrix.tolist()) for j, count in enumerate(row)]
    if len(data) > wandb.Table.MAX_ROWS:
        # Past 100 classes: wandb writes the first MAX_ROWS (10,000) rows of a table into the run's files and drops
        # the rest, the last classes' counts. The empty cells are left out instead (at most one row per image).
        data = [row for row in data if row[2]]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=data)
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": title})


class ModelArtifacts(Callback):
    """When `fit` ends, the run's best and last checkpoints become versions of one W&B model artifact,
    `model-<run id>`, with the aliases `best` and `latest` (one version with both when they are the same file),
    and the metrics, the epochs done and the step of each one in its metadata. Offline runs too: `wandb sync`
    uploads them with the run.

    Lightning's WandbLogger(log_model=True) does this only online; it refuses an offline run. A run stopped by a
    signal logs nothing: its artifacts come when the resumed run ends, in the same W&B run.

    Args:
        name: Artifact name; default `model-<run id>`.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        # The epoch-end metrics, epochs done and step of the best checkpoint, noted when ModelCheckpoint moves it;
        # in the checkpoints too (state_dict), so that a resumed run still knows them.
        self.best_path: str | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_at: dict[str, int] = {}
        self._trainer: Trainer | None = None
        self._noted_now = False  # the best was noted at this step, before the epoch's training metrics were in
        self._trained = False  # whether this fit trained (a resumed run that had ended does not)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Called as every checkpoint is written, the best's too, once ModelCheckpoint has moved its best to it: the
        # metrics, epoch and step of now are the best's, also for a validation within an epoch
        # (`--trainer.val_check_interval 0.5`), whose metrics the next epoch's start had replaced by its end's.
        if self._trainer is not None:
            self._note_best(self._trainer)
        return {"best_path": self.best_path, "best_metrics": self.best_metrics, "best_at": self.best_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_path = state_dict.get("best_path")
        self.best_metrics = dict(state_dict.get("best_metrics") or {})
        self.best_at = dict(state_dict.get("best_at") or {})

    def _note_best(self, trainer: Trainer, epoch_done: bool = False) -> None:
        best = trainer.checkpoint_callback
        if not isinstance(best, ModelCheckpoint) or not best.best_model_path:
            return
        moved = best.best_model_path != self.best_path
        # A best saved by the validation at an epoch's end is noted again at the next epoch's start (or fit's end),
        # at the same step: by then the epoch's training metrics are in, and the epochs done count it.
        again = epoch_done and self._noted_now and self.best_at.get("step") == trainer.global_step
        if moved or again:
            self.best_path = best.best_model_path
            metrics = epoch_metrics(trainer.callback_metrics)
            if not epoch_done:  # the training metrics are still the previous epoch's
                metrics = {k: v for k, v in metrics.items() if not k.startswith("train_")}
            self.best_metrics = metrics
            self.best_at = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        self._noted_now = (moved or self._noted_now) and not epoch_done

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained = True  # not called where `--ckpt_path last` resumes a run that had ended

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._note_best(trainer, epoch_done=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._note_best(trainer, epoch_done=True)
        # `--ckpt_path last` on a run that had ended trains nothing: it logged the versions again, `latest` without
        # metrics.
        if not trainer.is_global_zero or not self._trained:
            return
        loggers = wandb_loggers(trainer)
        if not loggers:
            warn_idle(self, NO_WANDB)
            return
        best = trainer.checkpoint_callback
        last = last_checkpoint(trainer)
        # Best first: W&B gives `latest` to every version it is given, and the last one logged keeps it.
        files: dict[str, tuple[list[str], dict[str, Any]]] = {}
        if self.best_path and os.path.isfile(self.best_path) and isinstance(best, ModelCheckpoint):
            score = float(best.best_model_score) if best.best_model_score is not None else None
            meta = {"metrics": self.best_metrics, "monitor": best.monitor, "mode": best.mode, "score": score,
                    **self.best_at}  # fmt: skip
            files[self.best_path] = (["best"], meta)
        if last and os.path.isfile(last):
            aliases, meta = files.pop(last, ([], {}))  # the same file: one version, both aliases
            now = {"epoch": trainer.current_epoch, "step": trainer.global_step}
            files[last] = ([*aliases, "latest"], {"metrics": epoch_metrics(trainer.callback_metrics), **meta, **now})
        import wandb

        for logger in loggers:
            run = logger.experiment
            for path, (aliases, metadata) in files.items():
                artifact = wandb.Artifact(
                    self.name or f"model-{run.id}",
                    type="model",
                    metadata={"epoch": trainer.current_epoch, "step": trainer.global_step, **metadata,
                              "file": os.path.basename(path)},
                )  # fmt: skip
                artifact.add_file(path, name="model.ckpt")
                run.log_artifact(artifact, aliases=aliases)


class WatchModel(Callback):
    """The network's gradients, weights or both as histograms on W&B every `log_freq` training steps, at those
    steps, from the start of `fit` to its end.

    Drawn here, not by `wandb.watch`: its hooks count passes, not steps (the weights' forward passes, validation's
    included), and hand W&B each histogram without a row of its own, which W&B keeps only with the next row
    Lightning logs (every `--trainer.log_every_n_steps`), each histogram in between replacing the one before: with
    `log_freq` 2 and that interval 5, histograms showed at steps 4 and 9 alone.

    Args:
        log: What to show: `gradients`, `parameters` or `all`.
        log_freq: Steps between two histograms (each costs a pass over every parameter on the host).
        log_graph: Also log the network's graph (`wandb.watch`'s).
        bins: Bins of each histogram (`wandb.watch` draws 64).
    """

    def __init__(
        self,
        log: Literal["gradients", "parameters", "all"] = "gradients",
        log_freq: PositiveInt = 100,
        log_graph: bool = False,
        bins: PositiveInt = 64,
    ) -> None:
        self.histograms = log  # (not `self.log`: Lightning sets that on every callback, to the module's `log`)
        self.log_freq = log_freq
        self.log_graph = log_graph
        self.bins = bins

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            warn_idle(self, NO_WANDB)
        if self.log_graph:
            for logger in loggers:
                logger.watch(pl_module, log=None, log_graph=True)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # The gradients as the optimizer takes them: accumulated, all-reduced under DDP, unscaled under fp16 AMP.
        # Checked before the loggers are looked for: this hook runs at every step.
        if trainer.global_step % self.log_freq or not trainer.is_global_zero or not (loggers := wandb_loggers(trainer)):
            return
        import wandb

        rows: dict[str, Any] = {}
        for name, parameter in pl_module.named_parameters():
            tensors = {"gradients": parameter.grad, "parameters": parameter.detach()}
            for kind, tensor in tensors.items():
                if self.histograms in (kind, "all") and tensor is not None:
                    counts, edges = histogram(tensor, self.bins)
                    rows[f"{kind}/{name}"] = wandb.Histogram(np_histogram=(counts, edges))
        for logger in loggers:
            logger.log_metrics(rows, step=trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_graph and trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                logger.experiment.unwatch(pl_module)


def histogram(tensor: Tensor, bins: int) -> tuple[list[float], list[float]]:
    """Counts and bin edges of the finite values of `tensor`, computed where the tensor is: one transfer of `bins`
    counts, not of the tensor."""
    values = tensor.detach().float().flatten()
    values = values[values.isfinite()]
    if values.numel() == 0:
        return [0.0] * bins, torch.linspace(0, 1, bins + 1).tolist()
    low, high = torch.stack(values.aminmax()).tolist()  # one wait for the device, not two
    if low == high:  # one value: a bin around it, as numpy.histogram draws it
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values, bins=bins, min=low, max=high)
    return counts.tolist(), torch.linspace(low, high, bins + 1).tolist()
