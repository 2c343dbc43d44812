"""What a run prints when its output goes to a file (nohup, SLURM, CI): one line per epoch, no upstream noise, and
a summary at the end whose paths exist. `capfd` reads file descriptors 1 and 2, which are not terminals, and sees
what Lightning's log handlers and W&B write there."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
import types
from pathlib import Path

import faults
import pytest
from lightning.pytorch.callbacks import Timer

from cifar_cli.cli import main

FIT = ["fit", "--data", "ImageFolderDataModule", "--data.val_size", "30", "--trainer.max_epochs", "2",
       "--trainer.limit_train_batches", "2"]  # fmt: skip
NOISE = ("Tip:", "litlogger", "litmodels", "Total FLOPs", "LeafSpec", "anonymous setting", "git root")


def test_log_shows_one_line_per_epoch_no_noise_and_a_summary(
    image_folder: Path, capfd, recwarn, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_SILENT")  # as a user runs: W&B's own warnings shown
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    main([*FIT, "--data.root", str(image_folder)])  # the default logger: W&B, offline
    out, err = capfd.readouterr()
    # Lightning's log lines go to the stderr of when it was imported, which pytest holds: read them from caplog.
    printed = out + err + "\n".join(r.getMessage() for r in caplog.records)
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in epochs] == [["epoch 1/2", "step 2"], ["epoch 2/2", "step 4"]]
    for line in epochs:
        names = re.findall(r"  ([a-z_]+) \d+\.\d{4}", line)
        assert names == ["train_loss", "train_acc", "val_loss", "val_acc"], line
        assert re.search(r"  \d+\.\d s$", line)
    assert "Epoch " not in printed and "it/s" not in printed and "\r" not in printed  # no rich bar
    for noise in NOISE:
        assert noise not in printed, noise
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert "GPU available:" in printed and "Seed set to 42" in printed  # what informs stays
    # W&B's closing block would repeat the summary below; its exit hook's lines carried colour codes into files.
    assert "Run history:" not in printed and "Run summary:" not in printed and "\x1b" not in printed
    assert "Trainable params" in printed  # and the rest of the model summary

    ckpt = Path(re.search(r"Best checkpoint \(val_loss \d\.\d{4}\): (\S+\.ckpt)", out)[1])
    sync = Path(re.search(r"^Upload to W&B: wandb sync (\S+)$", out, re.MULTILINE)[1])
    folder = Path(re.search(r"^Run folder: (\S+)$", out, re.MULTILINE)[1])
    assert ckpt.is_file() and sync.is_dir() and (folder / "config.yaml").is_file()
    assert ckpt.is_relative_to(folder)
    summary = out[out.index("cifar-cli fit: 2 epochs, step 4") :].splitlines()
    assert all(len(line) <= 100 for line in summary if "/" not in line)  # the table, within a log's columns
    assert re.search(r"val_loss\s+│\s+\d\.\d{4}\s+│\s+\d\.\d{4}", out)  # final and best

    recwarn.clear()
    main(["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    out = capfd.readouterr().out
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]  # the fit's ModelCheckpoint folder
    assert "Test metric" in out and "Run folder: " in out  # Lightning's table of the metrics, then the paths
    assert f"Checkpoint: {ckpt}" in out and "Best checkpoint" not in out and "epoch " not in out


def test_summary_says_one_epoch(image_folder: Path, capfd) -> None:
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    assert re.search(r"cifar-cli fit: 1 epoch, step 2 *\n", capfd.readouterr().out)


def test_summary_title_is_one_line_above_a_narrow_table(image_folder: Path, capfd) -> None:
    """Without validation the table has two short columns: its title was wrapped onto two lines."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]"])  # fmt: skip
    out = capfd.readouterr().out
    assert re.search(r"cifar-cli fit: 1 epoch, step 2 *\n", out), out
    assert re.search(r"train_loss\s+│\s+\d\.\d{4}", out)


def test_epoch_lines_of_a_resumed_run_go_on_counting_its_training_time(
    image_folder: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time at the end of each line is the run's training time, as fit_time counts it: a resumed run's lines
    went on from its own start, 0 s. The clocks of the lines and of the Timer read a fake clock that moves 1 s at
    every reading, so that the two runs' times differ by far more than the lines' 0.1 s."""
    readings = itertools.count()
    clock = types.SimpleNamespace(monotonic=lambda: float(next(readings)))
    monkeypatch.setattr("lightning.pytorch.callbacks.timer.time", clock)
    monkeypatch.setattr("cifar_cli.terminal.time", clock)
    args = [*FIT, "--data.root", str(image_folder), "--trainer.logger", "CSVLogger"]
    main([*args, "--trainer.max_epochs", "1"])
    first = [line for line in capfd.readouterr().out.splitlines() if line.startswith("epoch 1/1")]
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    second = [line for line in capfd.readouterr().out.splitlines() if line.startswith("epoch 2/2")]
    times = [_seconds_of(line) for line in first + second]
    with open(next(Path("runs").rglob("metrics.csv")), newline="") as file:
        fit_time = [float(row["fit_time"]) for row in csv.DictReader(file) if row.get("fit_time")]
    # The resumed run's line counts on from the first run's training time (its last fit_time, as the checkpoint
    # holds it), as its own fit_time does: every reading of the clock is a second later than the one before.
    first_run = [t for t in fit_time if t <= times[0] + 1]
    assert len(times) == 2 and first_run and times[1] > max(first_run) and times[1] >= fit_time[-2], (times, fit_time)


def _seconds_of(line: str) -> float:
    """The time at the end of an epoch line (`7.1 s`, or `0:01:05` from a minute on) in seconds."""
    if match := re.search(r"  (\d+):(\d\d):(\d\d)$", line):
        return 3600 * int(match[1]) + 60 * int(match[2]) + int(match[3])
    match = re.search(r"  (\d+\.\d) s$", line)
    assert match, line
    return float(match[1])


def test_epoch_lines_show_validation_metrics_only_for_epochs_that_validated(image_folder: Path, capfd) -> None:
    """`--trainer.check_val_every_n_epoch 2`: the third epoch's line showed the second's val_loss and val_acc, as if
    the third had validated."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2",
          "--trainer.logger", "CSVLogger"])  # fmt: skip
    epochs = [line for line in capfd.readouterr().out.splitlines() if line.startswith("epoch ")]
    names = [re.findall(r"  ([a-z_]+) \d+\.\d{4}", line) for line in epochs]
    assert names == [["train_loss", "train_acc"], ["train_loss", "train_acc", "val_loss", "val_acc"],
                     ["train_loss", "train_acc"]]  # fmt: skip


def test_the_last_epoch_s_line_comes_before_lightning_s_stop_line(image_folder: Path, capfd) -> None:
    """A log read "epoch 1/2 ...", "`Trainer.fit` stopped: `max_epochs=2` reached.", then "epoch 2/2 ...": the
    stop line came before the line of the epoch that it ended on."""
    said = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = logging.Handler()
    handler.emit = lambda record: print(record.getMessage(), flush=True)  # in the order of the epoch lines
    said.addHandler(handler)
    try:
        main([*FIT, "--data.root", str(image_folder), "--trainer.logger", "CSVLogger"])
    finally:
        said.removeHandler(handler)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith(("epoch ", "`Trainer.fit`"))]
    assert [line.split("  ")[0] for line in lines] == [
        "epoch 1/2",
        "epoch 2/2",
        "`Trainer.fit` stopped: `max_epochs=2` reached.",
    ]


def test_swa_batchnorm_pass_is_named_and_the_epochs_count_as_given(image_folder: Path, capfd, caplog) -> None:
    """StochasticWeightAveraging on a network with BatchNorm adds a pass after the given epochs (Lightning raises
    max_epochs by one while it trains): the lines read "epoch 1/3", "epoch 2/3", then "epoch 3/2", the summary
    "3 epochs", and Lightning's stop line "max_epochs=3"."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.logger", "CSVLogger", "--model.net", "FastNet",
          "--model.net.widths", "[8, 16, 16]", "--trainer.callbacks+=StochasticWeightAveraging",
          "--trainer.callbacks.swa_lrs", "0.01"])  # fmt: skip
    out = capfd.readouterr().out
    lines = [line.split("  ")[:2] for line in out.splitlines() if line.startswith(("epoch ", "SWA "))]
    assert lines == [["epoch 1/2", "step 2"], ["epoch 2/2", "step 4"], ["SWA BatchNorm pass after epoch 2/2", "step 5"]]
    assert "cifar-cli fit: 2 epochs and SWA BatchNorm pass, step 5" in out
    stops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("`Trainer.fit` stopped")]
    assert stops == ["`Trainer.fit` stopped: `max_epochs=2` reached, then StochasticWeightAveraging's BatchNorm pass."]


def test_a_time_limit_in_the_last_epoch_is_not_said_to_be_its_end(fake_cifar10: Path, caplog, monkeypatch) -> None:
    """Steps of 1 s on a fake clock, a 7 s limit, 2 epochs of 5 steps: the limit stops training 2 steps into the
    second epoch. Lightning counts a cut epoch as done, and said "`max_epochs=2` reached" after its "Time limit
    reached", as if the run had trained every epoch."""
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.max_epochs", "2",
          "--trainer.max_time", "00:00:00:07", "--trainer.callbacks+=faults.TickClock", "--trainer.logger",
          "CSVLogger", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Time limit reached.") for m in said)
    assert not [m for m in said if m.startswith("`Trainer.fit` stopped")]


def test_progress_bar_false_turns_the_lines_off(image_folder: Path, capfd) -> None:
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1", "--trainer.logger", "CSVLogger",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    out = capfd.readouterr().out
    assert not [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "Best checkpoint (val_loss " in out and "wandb sync" not in out


def test_mixed_precision_named_in_the_config_gives_no_model_summary_warning(image_folder: Path, recwarn) -> None:
    """A config that names bf16-mixed (every run's saved config.yaml does, so every resume): Lightning's model
    summary warned that it sizes the weights at 32 bits, which is what mixed precision keeps them in."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1", "--trainer.logger", "CSVLogger",
          "--trainer.precision", "bf16-mixed"])  # fmt: skip
    assert not [w for w in recwarn if "not supported by the model summary" in str(w.message)]


def test_resumed_offline_wandb_run_prints_one_sync_command_for_all_its_parts(image_folder: Path, capfd) -> None:
    """A run resumed with --ckpt_path last continues its W&B run in a second offline folder: the command printed
    at its end uploads both, oldest first (wandb syncs the parts of one run in that order); the second alone
    would leave out the epochs before the resume, whose own command a preempted run never printed."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1"])
    main([*FIT, "--data.root", str(image_folder), "--ckpt_path", "last"])
    out = capfd.readouterr().out
    parts = sorted(Path("runs/wandb").glob("offline-run-*"))
    assert len(parts) == 2 and len({p.name.rsplit("-", 1)[1] for p in parts}) == 1
    lines = re.findall(r"^Upload to W&B: wandb sync (.+)$", out, re.MULTILINE)
    assert lines == [str(parts[0]), f"{parts[0]} {parts[1]}"]


def test_wandb_dir_holds_the_wandb_files_and_the_resumed_run_s_parts(
    image_folder: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    """WANDB_DIR, as W&B documents it, holds W&B's own `wandb/` folder: the logger's save_dir overrode it, and the
    files went into runs/wandb/ without a word. The run's folder stays under runs/, so `--ckpt_path last` finds the
    run and continues its W&B run, whose parts are both in WANDB_DIR and both in the sync command."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1"])
    main([*FIT, "--data.root", str(image_folder), "--ckpt_path", "last"])
    (run,) = Path("runs/cifar-cli").iterdir()
    assert (run / "checkpoints" / "last.ckpt").exists() and not Path("runs/wandb").exists()
    parts = sorted((tmp_path / "scratch" / "wandb").glob(f"offline-run-*-{run.name}"))
    assert len(parts) == 2
    lines = re.findall(r"^Upload to W&B: wandb sync (.+)$", capfd.readouterr().out, re.MULTILINE)
    assert lines == [str(parts[0]), f"{parts[0]} {parts[1]}"]


def test_resuming_a_run_that_had_ended_keeps_its_summary(image_folder: Path, capfd) -> None:
    """The same command again (a job requeued after its run ended) resumes at the end and trains nothing: summary.json
    lost the run's metrics, replaced by none."""
    run = [*FIT, "--data.root", str(image_folder), "--trainer.logger", "CSVLogger", "--ckpt_path", "last"]
    main(run)
    (summary,) = Path("runs").glob("*/summary.json")
    ended = json.loads(summary.read_text())
    assert set(ended["metrics"]) >= {"train_loss", "val_acc"} and ended["steps"] == 4
    main(run)
    assert "resuming from" in capfd.readouterr().err
    assert json.loads(summary.read_text()) == ended


def test_epoch_shorter_than_the_logging_interval_gives_no_warning(image_folder: Path, recwarn) -> None:
    """Two batches an epoch, under log_every_n_steps 50: Lightning warned, with its site-packages path, to lower the
    interval "to see logs for the training epoch", which metrics.csv holds all the same."""
    main([*FIT, "--data.root", str(image_folder), "--trainer.max_epochs", "1", "--trainer.logger", "CSVLogger"])
    assert not [w for w in recwarn if "smaller than the logging interval" in str(w.message)]
    with open(next(Path("runs").rglob("metrics.csv")), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["train_loss_epoch"] for row in rows if row.get("train_loss_epoch")]
