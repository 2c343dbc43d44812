"""What a run shows: a rich progress bar in a terminal and one line per epoch in a log file, the model summary,
upstream messages the user can do nothing about silenced by their text, and the summary that ends a command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import time
import warnings
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichModelSummary
from lightning.pytorch.loggers import WandbLogger
from rich import get_console
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cifar_cli.atomic import atomic_write_text
from cifar_cli.callbacks import (
    FitTimer,
    RichBar,
    last_checkpoint,
    model_checkpoint,
    run_dir,
    swa_batchnorm_pass,
    trainer_epoch_label,
)

# Columns of the end summary when stdout is a file: wide enough for a metric table, narrow enough for a log viewer.
LOG_COLUMNS = 100


class _DropMessages(logging.Filter):
    """Drops the log records whose message matches one of the patterns; passes every other."""

    def __init__(self, *patterns: str) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in self.patterns)


# Lightning's advertisements for its paid services (litlogger, litmodels), logged at every trainer's creation
# through `rank_zero_info`, whose logger is this one; it also carries the GPU/TPU lines, which stay. And its line
# on a Ctrl-C that interrupts training at once, which promises a shutdown that saves nothing: cifar-cli's own line
# says what happened (cli.ctrl_c_exits_130).
_TIPS = _DropMessages(r"^💡 Tip: For seamless cloud ", r"Detected KeyboardInterrupt, attempting graceful shutdown")
_TIPS_LOGGER = "lightning.pytorch.utilities.rank_zero"

# Lightning's SIGTERM handler, which `validate`, `test` and `predict` keep in one process, logs "[rank: 0] Received
# SIGTERM: 15" as the signal arrives: a second line for one stop, before cifar-cli's own, which says what stopped
# and what was kept (callbacks.Preemption). Training's stop, whose handler is cifar-cli's, never printed it.
_SIGTERM_LINE = _DropMessages(r"Received SIGTERM: ")
_SIGNAL_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"


# Lightning's advice, at the first run on an Ampere or later GPU while torch's float32 matmul precision is the default
# ("highest"), to lower it (`_check_cuda_matmul_precision`, Lightning 2.6): right for a run in fp32. Under mixed or
# 16-bit precision the matmuls and convolutions already run in 16 bits, which that setting does not touch: noise.
_TENSOR_CORE_TIP = _DropMessages(r"^You are using a CUDA device \(.*\) that has Tensor Cores\. To properly utilize")
SIXTEEN_BIT = ("16-mixed", "bf16-mixed", "16-true", "bf16-true")


def tensor_core_tip(precision: str) -> None:
    """Let Lightning's tensor-core tip show for a run in `precision` (the trainer's, as Lightning names it) in fp32,
    not in 16 bits; torch's float32 matmul precision is left as it is."""
    logger = logging.getLogger(_TIPS_LOGGER)
    if str(precision) not in SIXTEEN_BIT:
        logger.removeFilter(_TENSOR_CORE_TIP)
    elif _TENSOR_CORE_TIP not in logger.filters:
        logger.addFilter(_TENSOR_CORE_TIP)


class _TrueStopLine(logging.Filter):
    """Lightning's "`Trainer.fit` stopped: `max_epochs=N` reached." as it is true of the trainer's run.

    StochasticWeightAveraging raises max_epochs by one for its BatchNorm pass while it trains: a run of 2 epochs
    read "max_epochs=3". And Lightning counts an epoch cut short for done: a time limit that ran out in the last
    epoch read as its end, after Lightning's own "Time limit reached" (a line that says why, as a callback that
    stops a run says its own, comes before it).
    """

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer

    def filter(self, record: logging.LogRecord) -> bool:
        message, trainer = record.getMessage(), self.trainer
        if message.startswith("`Trainer.fit` stopped:") and isinstance(trainer.progress_bar_callback, EpochLines):
            # Lightning says it as it checks whether to start another epoch, after the last one's metrics are
            # computed but before `on_train_end`, where that epoch's line would come: the log read "stopped", then
            # one more epoch.
            trainer.progress_bar_callback.print_pending(trainer, trainer.lightning_module)
        if not message.startswith("`Trainer.fit` stopped: `max_epochs="):
            return True
        asked = swa_batchnorm_pass(trainer)
        if asked is not None:  # its pass counts one batch more than it trains: it is never cut short
            record.msg = f"`Trainer.fit` stopped: `max_epochs={asked}` reached, then StochasticWeightAveraging's "
            record.msg += "BatchNorm pass."
            record.args = ()
            return True
        return trainer.fit_loop.epoch_loop.batch_progress.current.completed >= trainer.num_training_batches


@contextlib.contextmanager
def true_stop_line(trainer: Trainer) -> Iterator[None]:
    """Lightning's stop line made true (`_TrueStopLine`) while `trainer` fits."""
    logger, line = logging.getLogger(_TIPS_LOGGER), _TrueStopLine(trainer)
    logger.addFilter(line)
    try:
        yield
    finally:
        logger.removeFilter(line)


# The messages a command ignores for what it read on its command line (a resumed run's folders exist already): a
# rank that ddp_spawn starts is a new interpreter, which ignores them again (cifar_cli.distributed).
IGNORED_FOR_THIS_RUN: list[str] = []


def ignore_for_this_run(message: str) -> None:
    """Ignore the warnings matching `message` in this process and in the ranks it spawns."""
    warnings.filterwarnings("ignore", message=message)
    IGNORED_FOR_THIS_RUN.append(message)


def silence_noise() -> None:
    """Silence, by their text, the upstream messages that tell a user of cifar-cli nothing they can act on."""
    logger = logging.getLogger(_TIPS_LOGGER)
    if _TIPS not in logger.filters:
        logger.addFilter(_TIPS)
    logger = logging.getLogger(_SIGNAL_LOGGER)
    if _SIGTERM_LINE not in logger.filters:
        logger.addFilter(_SIGTERM_LINE)
    # torch 2.9 deprecated `LeafSpec`, which Lightning's own `_pytree` still builds at every fit.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # Mixed precision keeps the weights in 32 bits, which is what the summary then counts: it is right as it is.
    warnings.filterwarnings("ignore", message=r"Precision (bf)?16-mixed is not supported by the model summary")
    # FitTimer logs rank 0's clock from rank 0 alone (rank_zero_only): there is nothing to synchronise.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('fit_time'")
    # torch 2.14 deprecated the all_gather that Lightning's (2.6) `strategy.all_gather` calls, once per process:
    # `predict` under DDP gathers its rows with it.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    # fp16 mixed precision asked for on a CPU, run as bf16-mixed: cifar-cli's precision line says so.
    warnings.filterwarnings("ignore", message=r"You passed `Trainer\(accelerator='cpu', precision='16-mixed'\)`")
    # An epoch shorter than `log_every_n_steps` (a short fit, a small folder): the warning says to lower it "to see
    # logs for the training epoch", but the epoch's train_loss and train_acc are logged at its end whatever the
    # interval, and the step values every `log_every_n_steps` steps counted across epochs.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")


def quiet_wandb(trainer: Trainer) -> None:
    """Remove the causes of two W&B warnings, before the W&B run starts (at the first use of the logger).

    "The anonymous setting has no effect": Lightning's WandbLogger passes `anonymous=None` to `wandb.init`, and
    wandb warns whenever the setting is given at all. "git root runs does not exist": wandb looks for the git
    commit from its folder (the logger's `save_dir`, or WANDB_DIR), which is created only later; created now, the
    run records the commit of the code it ran, instead of a warning.
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            init = logger._wandb_init  # private to Lightning (2.6): the keyword arguments of `wandb.init`
            if init.get("anonymous", "") is None:
                del init["anonymous"]
            if init.get("dir") and trainer.is_global_zero:
                os.makedirs(init["dir"], exist_ok=True)


def is_terminal() -> bool:
    """Whether stdout, where rich draws, is a terminal (or a notebook) rather than a file or a pipe."""
    console = get_console()
    return console.is_terminal or console.is_jupyter


def progress_bar() -> ProgressBar:
    """The rich bar in a terminal; one line per epoch in a log (nohup, SLURM, CI), where the rich bar shows
    nothing until the run ends, then one frame wrapped over a dozen lines."""
    return RichBar() if is_terminal() else EpochLines()


def _seconds(elapsed: float) -> str:
    if elapsed < 60:
        return f"{elapsed:.1f} s"
    minutes, seconds = divmod(int(elapsed), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics as of an epoch's end: `X_epoch` named `X`, and `X_step` dropped where `X_epoch` exists;
    training metrics first, then validation, then the others, each in logging order."""
    numbers = {k: float(v) for k, v in metrics.items() if k != "v_num" and not isinstance(v, (str, dict))}
    named = {
        k.removesuffix("_epoch"): v
        for k, v in numbers.items()
        if not (k.endswith("_step") and k.removesuffix("_step") + "_epoch" in numbers)
    }
    rank = {"train": 0, "val": 1}
    order = sorted(named, key=lambda k: rank.get(k.split("_")[0], 2))  # stable: logging order within each
    return {k: named[k] for k in order}


class EpochLines(ProgressBar):
    """One plain line per training epoch, after its validation (an epoch without one shows no validation metrics),
    flushed; nothing within an epoch, and nothing for the sanity check, `validate` or `test` (their summary ends the
    command):

        epoch 3/10  step 1,407  train_loss 0.5121  train_acc 0.8304  val_loss 0.6104  val_acc 0.7902  12.3 s

    A ProgressBar rather than a plain Callback: Lightning then treats it as the trainer's one progress bar
    (`trainer.progress_bar_callback`, whose `print` other code may use; a second bar in a config is refused;
    `--trainer.enable_progress_bar false` refuses it rather than showing it), disables it on ranks other than 0,
    and its `get_metrics` gives the metrics logged with `prog_bar=True`, as the rich bar shows them.

    The training metrics of an epoch (`train_loss_epoch`) are computed after every `on_train_epoch_end` hook has
    run, so the line is printed at the next epoch's start, or at the end of training.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._start = time.monotonic()
        self._pending: tuple[int, float, bool] | None = None  # (epoch, seconds since training began, validated)
        self._validated = False  # whether the epoch under way has validated

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # FitTimer's count where the run has one: it goes on over a resume, as fit_time does.
        timer = next((c for c in trainer.callbacks if isinstance(c, FitTimer)), None)
        elapsed = timer.time_elapsed("train") if timer is not None else time.monotonic() - self._start
        self._pending = (trainer.current_epoch, elapsed, self._validated)
        self._validated = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.print_pending(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.print_pending(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.print_pending(trainer, pl_module)  # a stop by SIGTERM comes after the epoch's metrics are computed

    def print_pending(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is None or not self._enabled:
            return
        epoch, elapsed, validated = self._pending
        self._pending = None
        shown = epoch_metrics(self.get_metrics(trainer, pl_module))
        if not validated:  # `--trainer.check_val_every_n_epoch 2`: the values are an earlier epoch's validation's
            shown = {k: v for k, v in shown.items() if not k.startswith("val_")}
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        print(
            f"{trainer_epoch_label(trainer, epoch)}  step {trainer.global_step:,}  {metrics}  {_seconds(elapsed)}",
            flush=True,
        )


class FlopsSummary(RichModelSummary):
    """Lightning's rich model summary without its "Total FLOPs: 0" line: Lightning counts FLOPs only for a model
    with an `example_input_array`, and prints 0 for every other."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        args = (summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops)
        if total_flops:
            RichModelSummary.summarize(*args, **summarize_kwargs)
            return
        console = get_console()
        with console.capture() as captured:
            RichModelSummary.summarize(*args, **summarize_kwargs)
        lines = captured.get().splitlines(keepends=True)
        console.file.write("".join(line for line in lines if "Total FLOPs" not in line))
        console.file.flush()


def quiet_model_summary(trainer: Trainer) -> None:
    """Replace the rich model summary Lightning added by default with FlopsSummary, with the same settings."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichModelSummary:
            trainer.callbacks[i] = FlopsSummary(callback._max_depth, **callback._summarize_kwargs)


def print_summary(trainer: Trainer, stage: str) -> None:
    """The end of `fit`, `test` and `validate` on rank 0: the final metrics, the best checkpoint, the run's folder
    and, for an offline W&B run, the command that uploads it.

    The paths are printed whole on lines of their own, never wrapped, so that they can be copied and parsed
    (`bench.common.best_checkpoint` reads the "Best checkpoint (...): PATH" line).
    """
    if not trainer.is_global_zero:
        return
    console = get_console() if is_terminal() else Console(width=LOG_COLUMNS)
    metrics = epoch_metrics(trainer.callback_metrics)
    best = model_checkpoint(trainer) if stage == "fit" else None
    scored = best is not None and best.best_model_path and best.best_model_score is not None
    # A checkpoint evaluated by test or validate restores no loop state: its epoch and step would read 0.
    epochs = trainer.current_epoch
    asked = swa_batchnorm_pass(trainer)
    swa = " and SWA BatchNorm pass" if asked is not None and epochs > asked else ""
    epochs = asked if swa else epochs
    where = f": {epochs} epoch{'' if epochs == 1 else 's'}{swa}, step {trainer.global_step:,}" if stage == "fit" else ""
    title = f"cifar-cli {stage}{where}"
    table = Table(title=title, min_width=len(title))  # a narrower table (no validation metrics) wrapped its title
    table.add_column("metric")
    table.add_column("final", justify="right")
    if scored:
        table.add_column(f"best ({best.mode})", justify="right")
    for name, value in metrics.items():
        row = [name, f"{value:.4f}"]
        if scored:
            row.append(f"{float(best.best_model_score):.4f}" if name == best.monitor else "")
        table.add_row(*row)
    if metrics and stage == "fit":  # test and validate print Lightning's table of their metrics already
        console.print(table)
    lines = [f"Run folder: {run_dir(trainer)}"]
    if stage != "fit" and trainer.ckpt_path:
        lines.append(f"Checkpoint: {trainer.ckpt_path}")
    if best is not None and best.best_model_path:
        score = f" ({best.monitor} {float(best.best_model_score):.4f})" if best.best_model_score is not None else ""
        lines.append(f"Best checkpoint{score}: {best.best_model_path}")
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if (line := sync_line(run)) is not None:
            lines.append(line)
    for line in lines:
        console.print(Text(line), soft_wrap=True, highlight=False)
    if stage != "predict":  # predictions.csv is a predict run's summary
        write_summary(trainer, stage, metrics)


def sync_line(run: Any) -> str | None:
    """`Upload to W&B: wandb sync ...` for an offline W&B run (every part of it); None for an online run or none."""
    if run is None or not getattr(run, "offline", False):
        return None
    # run.settings.sync_dir: run.sync_dir is newer than wandb 0.18, which pyproject.toml admits
    return f"Upload to W&B: wandb sync {shlex.join(offline_parts(run.settings.sync_dir, run.id))}"


def offline_parts(sync_dir: str, run_id: str) -> list[str]:
    """The offline folders of W&B run `run_id`, oldest first, ending with this process's `sync_dir`: a run resumed
    with `--ckpt_path last` writes one per start, beside the first. `wandb sync` uploads the parts of one run in
    the order of their start when given together; the newest alone would leave out the epochs before the resume
    (and the command a stopped part printed names it and the parts before it only)."""
    folder, own = os.path.split(sync_dir)
    parts = {name for name in os.listdir(folder or ".") if name.startswith("offline-run-")
             and name.endswith(f"-{run_id}") and name < own}  # fmt: skip
    return [os.path.join(folder, name) for name in sorted(parts)] + [sync_dir]


def write_summary(trainer: Trainer, stage: str, metrics: dict[str, float]) -> None:
    """`summary.json` in the run's folder: what the summary printed, for `cifar-cli report` and for scripts."""
    if not trainer.loggers:
        return  # the shared default_root_dir is no run's own folder
    path = os.path.join(run_dir(trainer), "summary.json")
    if stage == "fit" and not metrics and os.path.exists(path):
        # `--ckpt_path last` on a run that had already ended trains nothing and logs nothing: its summary stays.
        return
    best = model_checkpoint(trainer) if stage == "fit" else None
    last = last_checkpoint(trainer)
    score = best.best_model_score if best is not None else None
    summary = {
        "stage": stage,
        "metrics": metrics,
        "best_checkpoint": (best.best_model_path or None) if best is not None else None,
        "monitor": best.monitor if best is not None else None,
        "best_score": float(score) if score is not None else None,
        "mode": best.mode if best is not None else None,
        "last_checkpoint": last if stage == "fit" else None,
        "checkpoint": trainer.ckpt_path if stage != "fit" else None,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
    }
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
