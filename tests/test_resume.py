"""Runs that survive: exact resume from any step, `--ckpt_path last`, SIGTERM and Ctrl-C, whole checkpoint files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
import wandb
import yaml
from conftest import write_image_folder
from lightning.pytorch.callbacks import Timer
from test_cli import CSV_LOGGER, metrics_rows, values
from wandb_offline import read_run

from cifar_cli.atomic import AtomicCheckpointIO, atomic_csv_logs, atomic_write
from cifar_cli.callbacks import START_FILES
from cifar_cli.cli import main
from cifar_cli.entry import STAGES
from cifar_cli.optim import WarmupLinearDecay
from cifar_cli.resume import config_changes, restart_config

REPO = Path(__file__).resolve().parents[1]
# The fast recipe shrunk: augmentation, EMA, a warm-up/decay schedule with a restart, bf16-mixed, as shipped.
FAST = ["--config", str(REPO / "configs" / "fast-cpu.yaml"), "--model.net.init_args.widths", "[8, 16, 16]",
        "--data.batch_size", "32", "--trainer.enable_progress_bar", "false"]  # fmt: skip
# Lightning's own ModelCheckpoint(save_last=True, every_n_train_steps=N), as a user would add it: a checkpoint
# after every step, all kept.
EVERY_STEP = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
              "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.save_last", "true",
              "--trainer.callbacks.dirpath", "steps"]  # fmt: skip


def cifar(data_dir: Path) -> list[str]:
    return ["--data.data_dir", str(data_dir), "--data.val_size", "40"]  # 160 training images: 5 steps an epoch


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor that decides where training goes: weights, EMA weights, optimizer state."""
    checkpoint = torch.load(path, weights_only=True)
    out = {f"weights.{k}": v for k, v in checkpoint["state_dict"].items()}
    out |= {f"raw.{k}": v for k, v in checkpoint.get("current_model_state", {}).items()}
    for i, state in checkpoint["optimizer_states"][0]["state"].items():
        out |= {f"optimizer.{i}.{k}": v for k, v in state.items()}
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def rows_from(folder: str, step: int = 0) -> list[dict[str, str]]:
    """The metrics.csv rows of the run under `folder` from `step` on, without the training time (`fit_time`)."""
    return [
        {k: v for k, v in row.items() if k != "fit_time"} for row in metrics_rows(folder) if int(row["step"]) >= step
    ]


def uninterrupted_last(tmp_path: Path, args: list[str], then: str) -> Path:
    """`fit` with `args`, whole, in `tmp_path/reference`: its last.ckpt. The current folder is then `tmp_path/then`,
    for the interrupted run to compare with it."""
    os.chdir(tmp_path / "reference" if (tmp_path / "reference").mkdir() is None else tmp_path)
    main(["fit", *args])
    (reference,) = Path().glob("runs/**/last.ckpt")
    os.chdir(tmp_path / then if (tmp_path / then).mkdir() is None else tmp_path)
    return (tmp_path / "reference" / reference).resolve()


# Wherever the splits are: on the device, or in host memory with each batch sent ahead of its step. Disk placement
# sends ahead through the same code (its rows read from the cache instead), and trains to the device placement's
# weights bit for bit (test_placement.py); resuming it here took 28 s more.
@pytest.mark.parametrize(
    ("resume_at", "placement"),
    [
        ("epoch=0-step=2", "device"),
        ("epoch=0-step=5", "device"),
        ("epoch=0-step=2", "host"),
    ],
    ids=["mid-epoch", "epoch-boundary", "mid-epoch-host"],
)
def test_resumed_run_ends_with_exactly_the_uninterrupted_weights(
    fake_cifar10: Path, tmp_path: Path, resume_at: str, placement: str
):
    # Logged every 3rd step: a resume in the middle of the steps between two logged ones (at step 2 of 5).
    args = [*FAST, *cifar(fake_cifar10), *EVERY_STEP, "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "3",
            "--data.placement", placement]  # fmt: skip
    os.chdir(tmp_path / "full" if (tmp_path / "full").mkdir() is None else tmp_path)
    main(["fit", *args, *CSV_LOGGER])
    full = {p.name: p.resolve() for p in Path("steps").glob("epoch=*.ckpt")}
    assert len(full) == 15  # 5 steps x 3 epochs
    os.chdir(tmp_path / "resumed" if (tmp_path / "resumed").mkdir() is None else tmp_path)
    main(["fit", *args, *CSV_LOGGER, "--ckpt_path", str(tmp_path / "full" / "steps" / f"{resume_at}.ckpt")])
    resumed = {p.name: p for p in Path("steps").glob("epoch=*.ckpt")}
    # Every step after the checkpoint was taken again, and each one's state equals the uninterrupted run's.
    start = int(resume_at.rsplit("=", 1)[1])
    assert len(resumed) == 15 - start
    for name in sorted(resumed, key=lambda n: int(n.rsplit("=", 1)[1].split(".")[0])):
        assert_identical(tensors(resumed[name]), tensors(full[name]))
    # The epoch's training metrics count the batches before the interruption too (their sums are in the checkpoint).
    first = tmp_path / "full" / "runs"
    epoch_acc = {row["epoch"]: row["train_acc_epoch"] for row in metrics_rows(str(first)) if row["train_acc_epoch"]}
    resumed_acc = {row["epoch"]: row["train_acc_epoch"] for row in metrics_rows("runs") if row["train_acc_epoch"]}
    assert resumed_acc == {e: acc for e, acc in epoch_acc.items() if int(e) >= start // 5}
    assert values(metrics_rows("runs"), "val_acc") == values(metrics_rows(str(first)), "val_acc")[start // 5 :]
    # And every row logged from the checkpoint on, but the training time: the step values too, whose first after
    # the resume covers the steps before it (the checkpoint holds their sums). Before, it covered only those since.
    logged = rows_from(str(first), start)
    assert rows_from("runs") == logged and sum(bool(row["train_loss_step"]) for row in logged) >= 3


@pytest.mark.parametrize(
    ("moment", "signum"),
    [
        (["--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", "2"], signal.SIGTERM),
        # The last batch of an epoch: the validation that follows it is finished, not cut short (with EMA the
        # module holds the averaged weights during validation).
        (["--trainer.callbacks.epoch", "0", "--trainer.callbacks.batch", "3"], signal.SIGTERM),  # of 4
        (
            [
                "--trainer.callbacks.epoch",
                "1",
                "--trainer.callbacks.batch",
                "0",
                "--trainer.callbacks.in_validation",
                "true",
            ],
            signal.SIGINT,
        ),  # fmt: skip
    ],
    ids=["mid-epoch", "last-batch", "in-validation"],
)
def test_stop_on_a_signal_then_resume_ends_with_the_uninterrupted_weights(
    fake_cifar10: Path, tmp_path: Path, moment: list[str], signum: int, capfd
) -> None:
    # With airbench's alternating flip and whitening-bias schedule, which also resume exactly (the bias freezes
    # at step 6 of 12, where the mid-epoch case stops).
    args = [*FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "3", "--data.val_size", "64",
            "--data.batch_size", "32", "--data.flip", "alternate", "--model.whiten_bias_until", "0.5",
            "--trainer.log_every_n_steps", "2"]  # fmt: skip
    reference = uninterrupted_last(tmp_path, args, then="stopped")
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.signum", str(int(signum)),
              *moment])  # fmt: skip
    assert stop.value.code == 128 + signum
    assert f"cifar-cli: stopped by {signal.Signals(signum).name} in epoch " in capfd.readouterr().err
    main(["fit", *args, "--ckpt_path", "last"])
    (last,) = Path().glob("runs/**/last.ckpt")
    assert_identical(tensors(last), tensors(reference))
    # The resumed run's metrics.csv, the rows logged before the stop kept, is the uninterrupted run's but for the
    # times, its step values too (logged every 2nd step, across the stop).
    logged = rows_from(str(reference.parents[2]))
    assert rows_from("runs") == logged and sum(bool(row["train_loss_step"]) for row in logged) >= 3


def test_a_signal_within_a_gradient_accumulation_stops_where_it_ends_and_resumes_exactly(
    fake_cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `accumulate_grad_batches 2` (5 batches an epoch: 3 optimizer steps), a SIGTERM before the first batch of
    an accumulation stops after its second, and no `last.ckpt` is saved between the two (the resumed run's first
    step-cadence save was one): a checkpoint holds no gradients, and a run resumed from there had lost a batch's."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.accumulate_grad_batches", "2", "--last_checkpoint.every_n_steps", "2"]  # fmt: skip
    reference = uninterrupted_last(tmp_path, args, then="stopped")
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.epoch", "1",
              "--trainer.callbacks.batch", "2"])  # fmt: skip
    assert stop.value.code == 143
    (last,) = Path().glob("runs/**/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 5  # batches 2 and 3 of the second epoch: step 5
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None) -> None:
        loop = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        if Path(path).name == "last.ckpt":
            saved.append((checkpoint["global_step"], loop["processed"]))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    main(["fit", *args, "--ckpt_path", "last"])
    # Each save after a batch that ended an accumulation (the 2nd or 4th of an epoch) or after the epoch's last.
    assert saved == [(6, 5), (8, 4), (9, 5)]
    assert_identical(tensors(last), tensors(reference))


def test_sigterm_saves_prints_the_resume_command_and_ckpt_path_last_continues_the_run(
    fake_cifar10: Path, capfd
) -> None:
    """With the default W&B logger: exit code 143, the resume line, and `--ckpt_path last` continuing the same run
    folder, config.yaml and W&B run. (tests/test_ddp.py does it to the real command, on two processes.)"""
    # The same command restarts the run (its signal is due at a batch the restart has passed already): config.yaml
    # stays as it was.
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "3", "--trainer.callbacks+=faults.SignalAt",
            "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", "2"]  # fmt: skip
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args])
    assert stop.value.code == 143
    (run,) = Path("runs/cifar-cli").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8  # the batch under way when the signal came
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert lines == [f"cifar-cli: stopped by SIGTERM in epoch 2/3, step 8; resume with: cifar-cli fit --config "
                     f"{run / 'config.yaml'} --ckpt_path {last}"]  # fmt: skip
    # And how to upload what the offline run logged, which nothing else said (W&B's own closing lines are off).
    (part,) = Path("runs/wandb").glob(f"offline-run-*-{run.name}")
    assert f"\nUpload to W&B: wandb sync {part}\n" in err
    config = (run / "config.yaml").read_bytes()
    # Ended by cifar-cli with the exit code, not left to W&B's exit hook, whose lines carry colour codes into logs.
    assert wandb.run is None

    main(["fit", *args, "--ckpt_path", "last"])
    assert f"cifar-cli: resuming from {last} at step 8, epoch 2/3\n" in capfd.readouterr().err
    assert list(Path("runs/cifar-cli").iterdir()) == [run] and (run / "config.yaml").read_bytes() == config
    assert {p.name.rsplit("-", 1)[1] for p in Path("runs/wandb").glob("offline-run-*")} == {run.name}
    assert torch.load(last, weights_only=True)["global_step"] == 15


def test_a_run_with_a_drawn_seed_restarted_by_the_same_command_goes_on_with_its_seed(
    fake_cifar10: Path, tmp_path: Path, caplog
) -> None:
    """`--seed_everything true` draws a seed once; the same command with `--ckpt_path last` goes on with it (a new
    draw shuffled the rest of training as another run would) and ends with the weights of an uninterrupted run of
    that seed."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--data.augment", "true"]  # fmt: skip
    os.chdir(tmp_path / "stopped" if (tmp_path / "stopped").mkdir() is None else tmp_path)
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit):
        main(["fit", *args, "--seed_everything", "true", "--trainer.callbacks+=faults.SignalAt",
              "--trainer.callbacks.epoch", "0", "--trainer.callbacks.batch", "2"])  # fmt: skip
    (config,) = Path().glob("runs/**/config.yaml")
    seed = yaml.safe_load(config.read_text())["seed_everything"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["fit", *args, "--seed_everything", "true", "--ckpt_path", "last"])
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Seed set")] == [f"Seed set to {seed}"]
    (last,) = Path().glob("runs/**/last.ckpt")
    os.chdir(tmp_path / "reference" if (tmp_path / "reference").mkdir() is None else tmp_path)
    main(["fit", *args, "--seed_everything", str(seed)])
    (reference,) = Path().glob("runs/**/last.ckpt")
    assert_identical(tensors(tmp_path / "stopped" / last), tensors(reference))


def test_a_second_ctrl_c_stops_at_once_with_exit_code_130(fake_cifar10: Path, capfd, caplog) -> None:
    """The first Ctrl-C asks for the clean stop; a second one before it interrupts at once (Lightning's shutdown),
    and the command still exits 130, not Lightning's 1; so does a Ctrl-C before training starts."""
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar",
              "false", "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.signum", "2",
              "--trainer.callbacks.batch", "2", "--trainer.callbacks.twice", "true"])  # fmt: skip
    assert stop.value.code == 130
    err = capfd.readouterr().err
    assert "cifar-cli: stopped by SIGINT" not in err and "Traceback" not in err  # at once: no clean stop
    assert err.strip().splitlines()[-1] == "cifar-cli: interrupted by Ctrl-C"
    # Lightning's line promises a graceful shutdown, which saves nothing: not shown.
    assert not [r for r in caplog.records if "attempting graceful shutdown" in r.getMessage()]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own again

    def ctrl_c(*args: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr("cifar_cli.cli.check_data", ctrl_c)  # while the data is decoded, before the trainer runs
        main(["fit", *cifar(fake_cifar10), *CSV_LOGGER])
    assert stop.value.code == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == "cifar-cli: interrupted by Ctrl-C"


def test_ctrl_c_while_the_command_imports_ends_in_one_line(monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """torch and Lightning take a second or more to import: a Ctrl-C then was the import's traceback."""
    import builtins

    from cifar_cli import entry

    real_import = builtins.__import__

    def importing(name: str, *args: object, **kwargs: object) -> object:
        if name == "cifar_cli.cli":
            raise KeyboardInterrupt  # as Python raises it in whatever the import runs at the time
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    with pytest.raises(SystemExit) as stop:
        entry.run()
    assert stop.value.code == 130
    assert capfd.readouterr().err == "cifar-cli: interrupted by Ctrl-C\n"


def test_ctrl_c_as_the_trainer_starts_leaves_no_run_folder(fake_cifar10: Path, monkeypatch, capfd) -> None:
    """A Ctrl-C after the run folder and its config.yaml were written, before training began, left them: a run
    folder with nothing trained, and the W&B run's `wandb sync` line. Removed, as after a SIGTERM then."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    def ctrl_c(self: object) -> None:
        assert list(Path("runs").glob("**/config.yaml"))  # written by now
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(_CheckpointConnector, "restore_training_state", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar(fake_cifar10), "--trainer.logger", "WandbLogger", "--trainer.logger.save_dir", "runs",
              "--trainer.logger.offline", "true"])  # fmt: skip
    assert stop.value.code == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == "cifar-cli: interrupted by Ctrl-C"
    assert not [p for p in Path("runs").rglob("*") if p.is_file() and "wandb" not in p.parts]


def test_sigterm_during_validate_says_so_and_saves_no_checkpoint(fake_cifar10: Path, capfd) -> None:
    """A SIGTERM in `validate` (or `test`) saved a last.ckpt in the command's own run folder and printed "stopped by
    SIGTERM in epoch 1/1, step 0; resume with: cifar-cli fit ...": a fit to resume that never ran, and the newest
    last.ckpt, which the next `fit --ckpt_path last` would take."""
    sys.path.insert(0, str(REPO / "tests"))
    main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (trained,) = Path("runs").glob("**/checkpoints/last.ckpt")
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["validate", *cifar(fake_cifar10), *CSV_LOGGER, "--ckpt_path", str(trained),
              "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_validation", "true",
              "--trainer.callbacks.batch", "1", "--data.batch_size", "8"])  # fmt: skip
    assert stop.value.code == 143
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[-1] == "cifar-cli: stopped by SIGTERM during validation: no results were written"
    assert list(Path("runs").glob("**/checkpoints/last.ckpt")) == [trained]


@pytest.mark.parametrize(("subcommand", "signum", "slurm"), [
    ("validate", signal.SIGUSR1, "none"), ("test", signal.SIGUSR1, "none"), ("predict", signal.SIGUSR1, "none"),
    ("predict", signal.SIGTERM, "none"), ("validate", signal.SIGTERM, "none"), ("test", signal.SIGUSR1, "requeue"),
])  # fmt: skip
def test_a_signal_during_validate_test_or_predict_stops_it_in_one_line(image_folder: Path, subcommand: str,
                                                                       signum: int, slurm: str) -> None:  # fmt: skip
    """SIGUSR1 (SLURM's warning before its time limit, `kill -USR1`) during `validate`, `test` or `predict` killed
    the process at once, the signal's default action (exit -10, not a word): Lightning takes it only for SLURM's
    requeue, and cifar-cli took it only during training. And a SIGTERM in `predict` went unheeded: Lightning's
    prediction loop never reads its SIGTERM flag, so the command wrote every prediction and exited 0. Both stop at
    the end of the batch now, as a SIGTERM in `validate` or `test` does: one line, 128 + the signal's number, no
    results and no checkpoint. Under SLURM with auto_requeue, Lightning's requeue handles SIGUSR1 as before: its
    hpc_ckpt_1.ckpt, and the command runs to its end (`scontrol`, missing here, fails with a warning)."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/: faults
    env = {**os.environ, "PYTHONPATH": path, **(SLURM_JOB if slurm == "requeue" else {})}
    plugins = ["--trainer.plugins", "SLURMEnvironment", "--trainer.plugins.auto_requeue", "true"]
    # Untrained weights (no --ckpt_path), 4 batches of the 30 images each command reads; the signal in the second.
    args = [subcommand, "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.batch_size", "8", *CSV_LOGGER, "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_validation", "true",
            "--trainer.callbacks.batch", "1", "--trainer.callbacks.signum", str(int(signum)),
            *(plugins if slurm == "requeue" else [])]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cifar_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    files = [p for p in Path("runs").rglob("*") if p.is_file()]
    if slurm == "requeue":
        assert done.returncode == 0, done.stderr[-3000:]
        assert Path("hpc_ckpt_1.ckpt").is_file() and "stopped by" not in done.stderr
        assert "summary.json" in {p.name for p in files}
        return
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert lines == [
        f"cifar-cli: stopped by {signal.Signals(signum).name} during {STAGES[subcommand]}: no results were written"
    ]
    assert "Traceback" not in done.stderr
    # Lightning's own SIGTERM handler, which these commands keep in one process, logged "[rank: 0] Received
    # SIGTERM: 15" before that line: a second line for one stop, which training's and SIGUSR1's stops never printed.
    assert "Received SIGTERM" not in done.stderr, done.stderr[-3000:]
    # What the command's start wrote, and nothing after it: no predictions.csv, summary.json or checkpoint.
    assert files and {p.name for p in files} <= set(START_FILES), files
    assert not list(Path().rglob("*.ckpt"))


@pytest.mark.parametrize(("signum", "logger"), [(signal.SIGTERM, "csv"), (signal.SIGUSR1, "wandb")])
def test_a_signal_after_training_ended_stops_in_one_line(image_folder: Path, signum: int, logger: str) -> None:
    """A SIGTERM or SIGUSR1 after training had ended (from the trainer's teardown on: W&B's checkpoint versions, the
    summary) killed the process at once, the signals' default action again there: exit -15 or -10, not a word.
    Now one line and 128 + the signal's number (and, for an offline W&B run, how to upload it, which the summary
    would have said); the checkpoints are whole, and no summary.json was written."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/: faults
    env = {**os.environ, "PYTHONPATH": path}
    args = ["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.batch_size", "8", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1",
            *(CSV_LOGGER if logger == "csv" else []),
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=faults.SignalAt",
            "--trainer.callbacks.at_fit_end", "true", "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cifar_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert lines == [
        f"cifar-cli: stopped by {signal.Signals(signum).name} after training ended (its checkpoints are saved), "
        "before its summary"
    ]
    assert "Traceback" not in done.stderr
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not list(Path("runs").rglob("summary.json")) and not list(Path("runs").rglob("*.partial"))
    if logger == "wandb":
        (part,) = Path("runs/wandb").glob(f"offline-run-*-{last.parent.parent.name}")
        assert f"\nUpload to W&B: wandb sync {part}\n" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_as_training_ends_is_taken_as_sigterm_is(image_folder: Path, signum: int) -> None:
    """From Preemption's `on_train_end` (which put back SIGUSR1's default action) to the trainer's teardown, a
    SIGUSR1 killed the process at once, where a SIGTERM goes to Lightning's handler, which notes it: training is
    over, nothing stops, and the command ends as it would have. Now SIGUSR1 too."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/: faults
    env = {**os.environ, "PYTHONPATH": path}
    args = ["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.batch_size", "8", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1", *CSV_LOGGER,
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=faults.SignalAsTrainingEnds",
            "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cifar_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by" not in done.stderr
    assert len(list(Path("runs").rglob("summary.json"))) == 1


# The sanity check's two validation batches: a signal in the first, or in the last, after which Lightning's own
# handler (Preemption's replaces it there) let the run go on into training.
SANITY = ["--data.batch_size", "8", "--trainer.num_sanity_val_steps", "2", "--trainer.limit_train_batches", "2",
          "--trainer.enable_progress_bar", "false"]  # fmt: skip


def in_sanity_check(signum: int, batch: int) -> list[str]:
    return ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_sanity_check", "true",
            "--trainer.callbacks.signum", str(int(signum)), "--trainer.callbacks.batch", str(batch)]  # fmt: skip


# Runs cifar-cli's own entry point (`cifar-cli ARGS`) and sends this process the signal SIG at one moment of its
# start-up, STAGE: as the command imports its modules, or as the trainer restores its state, the last thing before
# Lightning installs its signal handlers (or, "sanity", nothing: faults.SignalAt sends it in the sanity check).
STARTING = """
import builtins, os, signal, sys
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from cifar_cli.entry import run

signum = int(os.environ["SIG"])
if os.environ["STAGE"] == "import":
    real_import = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "cifar_cli.cli":
            os.kill(os.getpid(), signum)
        return real_import(name, *args, **kwargs)

    builtins.__import__ = importing
elif os.environ["STAGE"] == "trainer":
    restore = _CheckpointConnector.restore_training_state

    def restoring(self):
        os.kill(os.getpid(), signum)
        return restore(self)

    _CheckpointConnector.restore_training_state = restoring
sys.argv = ["cifar-cli", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize(("stage", "signum"), [("import", signal.SIGTERM), ("trainer", signal.SIGUSR1),
                                               ("trainer", signal.SIGTERM), ("sanity", signal.SIGUSR1)])  # fmt: skip
def test_a_signal_while_the_command_starts_ends_it_in_one_line(image_folder: Path, tmp_path: Path, stage: str,
                                                               signum: int) -> None:  # fmt: skip
    """SIGTERM (a scheduler's stop) or SIGUSR1 (SLURM's warning) before Lightning takes them over killed the process
    without a word. Now one line, the exit code of a stop by that signal, and no run folder that looks like a run
    with nothing in it: the folder the start made, with its config.yaml, is removed. SIGUSR1, which Lightning takes
    only for SLURM's requeue, still killed it so during the sanity check."""
    script = tmp_path / "starting.py"
    script.write_text(STARTING)
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/: faults
    env = {**os.environ, "SIG": str(int(signum)), "STAGE": stage, "PYTHONPATH": path}
    args = ["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", *CSV_LOGGER]  # fmt: skip
    if stage == "sanity":
        args += [*SANITY, *in_sanity_check(signum, 0)]
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        f"cifar-cli: stopped by {name} before training began: nothing was trained or saved"
    )
    assert "Traceback" not in done.stderr
    assert not [p for p in Path("runs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("slurm", ["none", "without-requeue", "requeue"])
def test_sigusr1_during_training_stops_as_sigterm_does_unless_slurm_requeues(image_folder: Path, slurm: str) -> None:
    """SIGUSR1 (SLURM's warning before its time limit, `--signal=SIGUSR1@90`) during training, where Lightning takes
    it for no requeue, killed the process at once (the signal's default action): no last.ckpt, no word, exit -10.
    It stops as a SIGTERM does, with 128 + 10; under SLURM with auto_requeue, Lightning's requeue handles it as
    before: its hpc_ckpt_1.ckpt, and training goes on (`scontrol`, missing here, fails with a warning)."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/: faults
    env = {**os.environ, "PYTHONPATH": path, **(SLURM_JOB if slurm != "none" else {})}
    plugins = ["--trainer.plugins", "SLURMEnvironment", "--trainer.plugins.auto_requeue", str(slurm == "requeue")]
    args = ["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.batch_size", "8", "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "2",
            *(CSV_LOGGER if slurm != "none" else []), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=faults.SignalAt",
            "--trainer.callbacks.signum", str(int(signal.SIGUSR1)),
            "--trainer.callbacks.batch", "2", *(plugins if slurm != "none" else [])]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cifar_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    if slurm == "requeue":
        assert done.returncode == 0, done.stderr[-3000:]
        assert Path("hpc_ckpt_1.ckpt").is_file() and "stopped by" not in done.stderr
        (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
        assert torch.load(last, weights_only=True)["global_step"] == 8  # trained to the end
        return
    assert done.returncode == 128 + signal.SIGUSR1, done.stderr[-3000:]
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    config = last.parent.parent / "config.yaml"
    lines = [line for line in done.stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert lines == [
        f"cifar-cli: stopped by SIGUSR1 in epoch 1/2, step 3; resume with: cifar-cli fit --config {config} "
        f"--ckpt_path {last}"
    ]
    if slurm == "none":  # with the default W&B logger, offline: how to upload what it logged, as after a SIGTERM
        (part,) = Path("runs/wandb").glob(f"offline-run-*-{last.parent.parent.name}")
        assert f"\nUpload to W&B: wandb sync {part}\n" in done.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the batch under way when the signal came
    assert not Path("hpc_ckpt_1.ckpt").exists()


@pytest.mark.parametrize(("signum", "batch"), [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGINT, 1)])
def test_a_signal_during_the_sanity_check_stops_before_training_began(fake_cifar10: Path, capfd, signum: int,
                                                                      batch: int) -> None:  # fmt: skip
    """A SIGTERM during the validation Lightning runs before training saved a step-0 last.ckpt (or trained a step
    first) and printed "stopped by SIGTERM in epoch 1/2, step 0; resume with ...": a run to resume where nothing had
    been trained. Now the stop before training began, as a Ctrl-C then: its line and exit code, no run folder."""
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2", *SANITY,
              *in_sanity_check(signum, batch)])  # fmt: skip
    assert stop.value.code == 128 + signum
    last = capfd.readouterr().err.strip().splitlines()[-1]
    if signum == signal.SIGINT:
        assert last == "cifar-cli: interrupted by Ctrl-C"
    else:
        assert last == "cifar-cli: stopped by SIGTERM before training began: nothing was trained or saved"
    assert not [p for p in Path("runs").rglob("*") if p.is_file()]


@pytest.mark.parametrize(("signum", "batch"), [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_a_signal_during_a_resumed_runs_sanity_check_keeps_the_checkpoint_it_resumed_from(
    fake_cifar10: Path, capfd, signum: int, batch: int
) -> None:
    """The same stop in a run resumed with `--ckpt_path last` saved its last.ckpt again over the one it resumed
    from (or after a step of training), and said "stopped in epoch 1/2" of a run in its second epoch."""
    sys.path.insert(0, str(REPO / "tests"))
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2", *SANITY]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    checkpoints = {p: p.read_bytes() for p in last.parent.iterdir()}
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, *in_sanity_check(signum, batch), "--ckpt_path", "last"])
    assert stop.value.code == 128 + signum
    if signum == signal.SIGTERM:
        lines = capfd.readouterr().err.strip().splitlines()
        assert lines[-1] == "cifar-cli: stopped by SIGTERM before training began: nothing was trained or saved"
    assert {p: p.read_bytes() for p in last.parent.iterdir()} == checkpoints
    assert (last.parent.parent / "config.yaml").is_file()


def test_ckpt_path_last_without_a_run_starts_one(fake_cifar10: Path, capfd) -> None:
    main(["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--ckpt_path", "last", *CSV_LOGGER])
    err = capfd.readouterr().err
    assert "cifar-cli: --ckpt_path last: no run to resume under runs; starting a new run" in err
    assert len(list(Path("runs").glob("**/checkpoints/last.ckpt"))) == 1


def test_ckpt_path_last_of_a_finished_run_says_nothing_is_left_to_train(fake_cifar10: Path, capfd) -> None:
    # A requeued job, or the same command run again, after the run ended: the line said "epoch 2/1".
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", *CSV_LOGGER]
    main(["fit", *args])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    capfd.readouterr()
    main(["fit", *args, "--ckpt_path", "last"])
    assert (
        f"cifar-cli: resuming from {last} at step 5, after its last epoch (1/1): nothing is left to train; raise "
        "--trainer.max_epochs to train on\n"
    ) in capfd.readouterr().err
    assert torch.load(last, weights_only=True)["global_step"] == 5
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert f"cifar-cli: resuming from {last} at step 5, epoch 2/2\n" in capfd.readouterr().err


def test_a_restarted_wandb_run_shows_config_yaml_settings_not_the_checkpoint_it_went_on_from(
    fake_cifar10: Path,
) -> None:
    """The W&B run's config is config.yaml's: the restart's part took the command line's `ckpt_path` and the
    logger's version (the run's id) as settings of the run, which config.yaml leaves out."""
    args = ["fit", *FAST, *cifar(fake_cifar10)]
    main([*args, "--trainer.max_epochs", "1"])
    wandb.finish()
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    wandb.finish()
    wandb.teardown()  # waits for the W&B service to write out every record
    first, restart = (read_run(part).config for part in sorted(Path("runs/wandb").glob("offline-run-*")))
    (config,) = Path("runs/cifar-cli").glob("*/config.yaml")
    saved = yaml.safe_load(config.read_text())
    assert [c["trainer"]["max_epochs"] for c in (first, restart, saved)] == [1, 2, 2]
    for part in (first, restart):
        assert part["ckpt_path"] is None and part["trainer"]["logger"]["init_args"]["version"] is None
        assert part["trainer"]["logger"] == saved["trainer"]["logger"] and part["model"] == saved["model"]


def test_ckpt_path_last_of_a_finished_wandb_run_adds_no_offline_part(fake_cifar10: Path, capfd) -> None:
    """The same command again after the run ended trains nothing: it still started an empty offline W&B part, and
    the `wandb sync` command it printed named it beside the run's own."""
    args = ["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--ckpt_path", "last"]
    main(args)
    wandb.finish()
    (part,) = Path("runs/wandb").glob("offline-run-*")
    assert f"Upload to W&B: wandb sync {part}\n" in capfd.readouterr().out
    main(args)
    wandb.finish()
    out, err = capfd.readouterr()
    assert "nothing is left to train" in err and "wandb sync" not in out
    assert list(Path("runs/wandb").glob("offline-run-*")) == [part]


def test_a_csv_logger_after_wandb_goes_on_in_its_own_folder(fake_cifar10: Path) -> None:
    """`--trainer.logger+=CSVLogger` beside W&B: the resumed run went on in its W&B run and run folder, but the
    CSVLogger started `version_1`, its metrics of the first epoch left behind in `version_0`."""
    args = ["fit", *FAST, *cifar(fake_cifar10), "--trainer.logger+=CSVLogger", "--trainer.logger.save_dir", "csv"]
    main([*args, "--trainer.max_epochs", "1"])
    wandb.finish()
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    wandb.finish()
    assert [p.name for p in Path("csv/lightning_logs").iterdir()] == ["version_0"]
    epochs = {row["epoch"] for row in metrics_rows("csv")}
    assert epochs == {"0", "1"}, epochs
    (run,) = Path("runs/cifar-cli").iterdir()
    assert {row["epoch"] for row in metrics_rows(run)} == {"0", "1"}


def test_ckpt_path_last_of_a_run_ended_by_max_steps_says_nothing_is_left_to_train(fake_cifar10: Path, capfd) -> None:
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "3", "--trainer.max_steps", "3", *CSV_LOGGER]
    main(["fit", *args])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    capfd.readouterr()
    main(["fit", *args, "--ckpt_path", "last"])
    assert (
        f"cifar-cli: resuming from {last} at step 3, after its last step (3/3): nothing is left to train; raise "
        "--trainer.max_steps to train on\n"
    ) in capfd.readouterr().err


def test_ckpt_path_last_of_a_run_whose_time_budget_is_spent_says_nothing_is_left_to_train(
    fake_cifar10: Path, capfd, caplog
) -> None:
    """The same command after `--trainer.max_time` ended the run: the line said "epoch 8/1000", the run stopped
    before its first step, and an empty offline W&B part lengthened the `wandb sync` command. Lightning's "Time
    limit reached" followed the line, as if the restart had trained to its limit: it is the first run's alone."""
    args = ["fit", *cifar(fake_cifar10), "--trainer.max_epochs", "1000", "--trainer.max_time", "00:00:00:01",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(args)
    wandb.finish()
    assert "Time limit reached. Elapsed time is " in caplog.text  # (Lightning's logging)
    caplog.clear()
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    step = torch.load(last, weights_only=True)["global_step"]
    (part,) = Path("runs/wandb").glob("offline-run-*")
    capfd.readouterr()
    main([*args, "--ckpt_path", "last"])
    wandb.finish()
    out, err = capfd.readouterr()
    assert (
        f"cifar-cli: resuming from {last} at step {step}, after its time budget (00:00:00:01): nothing is left to "
        "train; raise --trainer.max_time to train on\n"
    ) in err
    assert "Time limit reached" not in caplog.text
    assert "wandb sync" not in out and list(Path("runs/wandb").glob("offline-run-*")) == [part]
    main([*args, "--trainer.max_time", "00:00:01:00", "--trainer.max_steps", str(step + 2), "--ckpt_path", "last"])
    assert "nothing is left to train" not in capfd.readouterr().err
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


def test_ckpt_path_last_stops_at_a_damaged_last_ckpt_of_the_newest_run(fake_cifar10: Path, capfd) -> None:
    """The command asks to continue the newest run: its last.ckpt cut short was passed over with a "skipping" line,
    and the older run resumed (or a new one started) in its place."""
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", *CSV_LOGGER]
    main(["fit", *args])
    main(["fit", *args])
    older, newest = Path("runs/version_0/checkpoints/last.ckpt"), Path("runs/version_1/checkpoints/last.ckpt")
    newest.write_bytes(newest.read_bytes()[:100_000])
    os.utime(newest)  # the newest still
    before = older.read_bytes()
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert stop.value.code == 2
    assert capfd.readouterr().err == (
        f"cifar-cli: error: --ckpt_path last: the newest run's {newest} is not a Lightning checkpoint (the file is "
        f"truncated or damaged: RuntimeError): resume that run from another of its checkpoints (in {newest.parent}) "
        "with --ckpt_path FILE, or move the file away to start or resume another\n"
    )
    assert older.read_bytes() == before and not Path("runs/version_2").exists()


def test_ckpt_path_last_resumes_only_a_run_of_the_same_logger(fake_cifar10: Path, capfd) -> None:
    """W&B runs and CSV runs share `runs/`: `fit --ckpt_path last` with the W&B logger passes over the newer CSV
    run (its own folder would be lost, and the other run's weights taken into a new one) and continues the W&B run."""
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1"]
    main(["fit", *args])  # the default logger: W&B, offline
    (wandb_last,) = Path("runs/cifar-cli").glob("*/checkpoints/last.ckpt")
    wandb.finish()
    main(["fit", *args, *CSV_LOGGER])
    capfd.readouterr()
    main(["fit", *FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    err = capfd.readouterr().err
    csv_last = Path("runs/version_0/checkpoints/last.ckpt")
    assert f"passed over {csv_last}, newer but of a run with another logger" in err
    assert f"cifar-cli: resuming from {wandb_last} at step 5, epoch 2/2\n" in err  # the next epoch
    assert torch.load(wandb_last, weights_only=True)["global_step"] == 10
    assert len(list(Path("runs/cifar-cli").iterdir())) == 1  # the W&B run's folder, continued


def test_a_checkpoint_of_a_run_with_another_logger_trains_on_in_a_new_run_folder_saying_so(
    fake_cifar10: Path, capfd, recwarn
) -> None:
    """`fit --ckpt_path FILE` with another logger than the checkpoint's run had cannot continue that run's folder:
    it said "resuming" and nothing more, but for Lightning's warning that the checkpoint's ModelCheckpoint state
    was of another folder."""
    args = [*cifar(fake_cifar10), "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, *CSV_LOGGER, "--trainer.max_epochs", "1"])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    config = (last.parent.parent / "config.yaml").read_bytes()
    capfd.readouterr()
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    wandb.finish()
    assert (
        f"cifar-cli: --ckpt_path {last} comes from a run with CSVLogger, and this fit has WandbLogger: it trains on "
        "from that checkpoint in a new run folder (give --trainer.logger CSVLogger to continue the run itself)\n"
    ) in capfd.readouterr().err
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    (run,) = Path("runs/cifar-cli").iterdir()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert torch.load(last, weights_only=True)["global_step"] == 5
    assert (last.parent.parent / "config.yaml").read_bytes() == config


def test_a_restart_that_moves_the_run_to_another_project_is_refused_in_one_line(fake_cifar10: Path, capfd) -> None:
    """`--trainer.logger.project other` beside the run's checkpoint: the run went on in a second folder of its id,
    runs/other/<id>/, with a config.yaml and a metrics.csv of its own, and its W&B run in another project."""
    args = [*cifar(fake_cifar10), "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    wandb.finish()
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    capfd.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["fit", *args, "--trainer.max_epochs", "2", "--trainer.logger.project", "other", "--ckpt_path", str(last)])
    assert refused.value.code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"cifar-cli: error: --ckpt_path {last} is of a run under cifar-cli/, and this command's logger would put it "
        "under other/ (its project or name): a resumed run goes on in its own folder and W&B run; leave that "
        "setting as the run had it, or start a new run from its weights with --model.init_from"
    ]
    assert sorted(p.name for p in Path("runs").iterdir()) == ["cifar-cli", "wandb"]


def test_restart_changes_the_learning_rate_and_resumes_a_run_of_two_loggers(fake_cifar10: Path) -> None:
    """A restart's `--model.learning_rate` applies from there on (the checkpoint's is only the default), and a run
    that logs to a list of loggers continues in its own folder, named by the first."""
    Path("two.yaml").write_text(
        "trainer:\n  logger:\n    - {class_path: CSVLogger, init_args: {save_dir: runs}}\n"
        "    - {class_path: TensorBoardLogger, init_args: {save_dir: runs}}\n"
    )
    args = [*FAST, *cifar(fake_cifar10), "--config", "two.yaml"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--model.learning_rate", "0.05"])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 10 and state["hyper_parameters"]["learning_rate"] == 0.05
    # The optimizer trained on at it: the schedule's base rate, and its rate at the end of the schedule.
    assert state["lr_schedulers"][0]["base_lrs"][0] == 0.05
    group = state["optimizer_states"][0]["param_groups"][0]
    end = WarmupLinearDecay(start=0.2, peak=0.23, end=0.07, restarts=(0.4,))(1.0)
    assert group["initial_lr"] == 0.05 and group["lr"] == pytest.approx(0.05 * end)


def test_restart_changes_the_optimizer_settings(fake_cifar10: Path) -> None:
    """Without a schedule too: the optimizer state restored from the checkpoint had the first start's learning rate
    and weight decay, and the restart's flags were only written into its hyperparameters."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--model.learning_rate", "0.001",
          "--model.weight_decay", "0.01", "--model.optimizer.betas", "[0.8, 0.9]"])  # fmt: skip
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 10
    (group,) = state["optimizer_states"][0]["param_groups"]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.001, 0.01, (0.8, 0.9))


def test_a_restart_that_changes_settings_leaves_them_in_config_yaml_for_the_next_resume(
    fake_cifar10: Path, capsys
) -> None:
    """The command a stop prints resumes with the run's config.yaml. After a restart that trained on with more
    epochs and another learning rate, config.yaml still held the first start's, so the next resume went back to
    them; it now holds the restart's, and the first start's file is kept beside it. The line names the learning
    rate once, not again as the optimizer's `lr`, which follows it."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    (config,) = Path("runs").glob("*/config.yaml")
    first = config.read_text()
    main(["fit", *args, "--trainer.max_epochs", "1", "--ckpt_path", "last"])  # the same settings: nothing to keep
    assert config.read_text() == first and [p.name for p in config.parent.glob("config*")] == ["config.yaml"]
    capsys.readouterr()
    main(["fit", *args, "--trainer.max_epochs", "2", "--model.learning_rate", "0.001", "--ckpt_path", "last"])
    assert (
        "cifar-cli: this restart changes the run's settings (trainer.max_epochs 1 -> 2, model.learning_rate 0.0002 "
        "-> 0.001); config.yaml now holds them, the earlier one is kept as config-until-step-5.yaml\n"
    ) in capsys.readouterr().err
    assert (config.parent / "config-until-step-5.yaml").read_text() == first
    saved = yaml.safe_load(config.read_text())
    assert saved["ckpt_path"] is None and saved["trainer"]["logger"]["init_args"]["version"] is None
    last = config.parent / "checkpoints" / "last.ckpt"
    main(["fit", "--config", str(config), "--ckpt_path", str(last), "--trainer.max_epochs", "3"])
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 15 and state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.001
    assert sorted(p.name for p in config.parent.glob("config*")) == [
        "config-until-step-10.yaml",
        "config-until-step-5.yaml",
        "config.yaml",
    ]


def test_a_run_without_a_logger_restarted_keeps_its_config_as_a_logged_run_does(fake_cifar10: Path, capsys) -> None:
    """`--trainer.logger false`: a restart was taken for a new run in the shared folder, whose config.yaml it
    replaced, writing `ckpt_path` in (the same command again changed the file) and losing the earlier settings."""
    args = [*cifar(fake_cifar10), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    first = Path("config.yaml").read_text()
    main(["fit", *args, "--trainer.max_epochs", "1", "--ckpt_path", "last"])
    assert Path("config.yaml").read_text() == first and not list(Path().glob("config-until-*"))
    capsys.readouterr()
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert "cifar-cli: this restart changes the run's settings (trainer.max_epochs 1 -> 2)" in capsys.readouterr().err
    assert Path("config-until-step-5.yaml").read_text() == first
    saved = yaml.safe_load(Path("config.yaml").read_text())
    assert saved["ckpt_path"] is None and saved["trainer"]["max_epochs"] == 2


def test_a_restart_names_a_class_it_adds_and_values_as_flags_take_them(fake_cifar10: Path, capsys) -> None:
    """The line named a schedule added on a restart by 40 characters of its config (`model.lr_schedule None ->
    {"class_path": "cifar_cli.optim.Warmu...`), and wrote None, False and True, which no flag or config spells."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    capsys.readouterr()
    main(["fit", *args, "--trainer.max_epochs", "2", "--model.lr_schedule", "WarmupLinearDecay", "--data.augment",
          "true", "--trainer.max_time", "00:01:00:00", "--ckpt_path", "last"])  # fmt: skip
    assert (
        "cifar-cli: this restart changes the run's settings (trainer.max_epochs 1 -> 2, trainer.max_time null -> "
        "00:01:00:00, model.lr_schedule null -> WarmupLinearDecay, data.augment false -> true); config.yaml now "
        "holds them, the earlier one is kept as config-until-step-5.yaml\n"
    ) in capsys.readouterr().err
    (config,) = Path("runs").glob("*/config.yaml")
    schedule = yaml.safe_load(config.read_text())["model"]["lr_schedule"]
    assert schedule["class_path"] == "cifar_cli.optim.WarmupLinearDecay"


def test_a_run_resumed_from_another_folder_goes_on_in_its_own_folder(fake_cifar10: Path, tmp_path: Path, recwarn):
    """`fit --config /project/runs/.../config.yaml --ckpt_path /project/runs/.../last.ckpt` from another folder: the
    run went on in a second folder of its id under the current one, with a config.yaml and a metrics.csv of their
    own (the first epoch's rows left behind). Its checkpoints' best score is kept, as from the run's own folder."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    os.chdir(tmp_path / "project" if (tmp_path / "project").mkdir() is None else tmp_path)
    main(["fit", *args, "--trainer.max_epochs", "1"])
    (config,) = Path("runs").glob("*/config.yaml")
    run = config.parent.resolve()
    first = config.read_text()
    os.chdir(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.max_epochs", "2"])  # fmt: skip
    assert list(Path().iterdir()) == []
    assert (run / "config-until-step-5.yaml").read_text() == first
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["save_dir"] == "runs"
    assert {row["epoch"] for row in metrics_rows(run)} == {"0", "1"}
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_a_run_resumed_from_another_folder_keeps_its_relative_data_path(tmp_path: Path, capsys) -> None:
    """`fit --ckpt_path /project/runs/.../last.ckpt` from another folder finds the run's `--data.root images` from the
    project, as it should; but the restart said it changed `data.root images -> /project/images`, wrote that into
    config.yaml, and its checkpoints held the absolute path: the project moved whole no longer found its images."""
    project = tmp_path / "project"
    write_image_folder(project / "images" / "train", {"cat": 20, "dog": 20})
    args = [*CSV_LOGGER, "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "2"]
    os.chdir(project)
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", "images", "--data.val_size", "10", *args,
          "--trainer.max_epochs", "1"])  # fmt: skip
    (config,) = Path("runs").glob("*/config.yaml")
    run = config.parent.relative_to("runs")
    os.chdir(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    capsys.readouterr()
    main(["fit", "--ckpt_path", str(project / "runs" / run / "checkpoints" / "last.ckpt"), *args,
          "--trainer.max_epochs", "2"])  # fmt: skip
    assert "(trainer.max_epochs 1 -> 2)" in capsys.readouterr().err
    assert yaml.safe_load((project / "runs" / run / "config.yaml").read_text())["data"]["init_args"]["root"] == "images"
    saved = torch.load(project / "runs" / run / "checkpoints" / "last.ckpt", weights_only=True)["cifar_cli"]
    assert saved["data"]["init_args"]["root"] == "images" and saved["working_dir"] == str(project)
    moved = project.rename(tmp_path / "moved")
    os.chdir(moved)
    capsys.readouterr()
    main(["validate", "--ckpt_path", str(moved / "runs" / run / "checkpoints" / "last.ckpt"), *CSV_LOGGER])
    assert "val_acc" in capsys.readouterr().out
    main(["fit", "--ckpt_path", "last", *args, "--trainer.max_epochs", "3"])  # the project's runs, from its new root
    assert "(trainer.max_epochs 2 -> 3)" in capsys.readouterr().err
    assert yaml.safe_load((moved / "runs" / run / "config.yaml").read_text())["data"]["init_args"]["root"] == "images"


def test_config_changes_are_named_as_flags_and_as_classes_added_or_removed() -> None:
    def cls(name: str, **init_args: object) -> dict:
        return {"class_path": f"lightning.pytorch.callbacks.{name}", "init_args": init_args}

    earlier = {
        "trainer": {"callbacks": [cls("EarlyStopping", patience=3), cls("Timer")], "max_epochs": 2},
        "model": {"optimizer": cls("Adam", lr=0.1)},
    }
    now = {
        "trainer": {"callbacks": [cls("EarlyStopping", patience=10), cls("Timer")], "max_epochs": 2},
        "model": {"optimizer": cls("Adam", lr=0.2)},
    }
    assert config_changes(earlier, now) == [
        "trainer.callbacks.EarlyStopping.patience 3 -> 10",
        "model.optimizer.lr 0.1 -> 0.2",
    ]
    now["trainer"]["callbacks"] = [cls("EarlyStopping", patience=3), cls("SignalAt"), cls("LearningRateMonitor")]
    assert config_changes(earlier["trainer"], now["trainer"]) == ["callbacks +SignalAt +LearningRateMonitor -Timer"]


def test_a_restart_config_gives_back_what_the_checkpoint_named() -> None:
    """The checkpoint and the run's id, which a restart takes from `--ckpt_path`, are no change of settings."""
    earlier = {"trainer": {"logger": [{"class_path": "WandbLogger", "init_args": {"version": None, "id": None}},
                                      {"class_path": "CSVLogger", "init_args": {"version": None}}]},
               "ckpt_path": None}  # fmt: skip
    now = {"trainer": {"logger": [{"class_path": "WandbLogger", "init_args": {"version": "1x2y3z4w", "id": None}},
                                  {"class_path": "CSVLogger", "init_args": {"version": 0}}]},
           "ckpt_path": "runs/cifar-cli/1x2y3z4w/checkpoints/last.ckpt"}  # fmt: skip
    assert restart_config(earlier, now) == earlier and now["ckpt_path"].endswith("last.ckpt")


def test_a_run_resumed_from_its_first_best_checkpoint_keeps_its_last_ckpt_current(fake_cifar10: Path) -> None:
    """The best checkpoint of a run's first epoch is written before its first `last.ckpt`; resumed from it, the run
    wrote `last-v1.ckpt` beside a `last.ckpt` left at the first epoch, which the documented resume command
    (`--ckpt_path .../last.ckpt`) then went back to."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    (best,) = Path("runs").glob("**/checkpoints/epoch=0-step=5.ckpt")
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(best)])
    assert sorted(p.name for p in best.parent.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(best.parent / "last.ckpt", weights_only=True)["global_step"] == 10


def test_ckpt_path_last_finds_a_wandb_run_that_a_csv_logger_follows(fake_cifar10: Path, capsys) -> None:
    """With a list of loggers, W&B's first (`--trainer.logger+=CSVLogger`), `--ckpt_path last` looks in the first
    logger's folder, the run's: it looked in the current folder alone and started a new run."""
    args = [*cifar(fake_cifar10), "--trainer.logger+=CSVLogger", "--trainer.logger.save_dir", "csv",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(["fit", *args, "--trainer.max_epochs", "1"])
    wandb.finish()
    capsys.readouterr()
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    (run,) = Path("runs/cifar-cli").iterdir()
    assert (
        f"cifar-cli: resuming from runs/cifar-cli/{run.name}/checkpoints/last.ckpt at step 5" in capsys.readouterr().err
    )
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


def test_max_time_stops_training(fake_cifar10: Path) -> None:
    # Every shipped config has a FitTimer (a Lightning Timer), which made Lightning ignore max_time.
    main(["fit", *FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1000",
          "--trainer.max_time", "00:00:00:03"])  # fmt: skip
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] < 1000 * 5


def test_a_run_cut_short_within_an_epoch_resumes_there_with_a_larger_limit(fake_cifar10: Path, tmp_path: Path):
    """`max_steps` (or `max_time`) ends a run in the middle of an epoch; resumed with a larger limit, it trains that
    epoch's other batches and ends with the uninterrupted run's weights (Lightning took the cut epoch for done)."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    reference = uninterrupted_last(tmp_path, args, then="cut")
    main(["fit", *args, "--trainer.max_steps", "7"])  # 5 steps an epoch: 2 batches into the second
    (last,) = Path().glob("runs/**/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 7
    main(["fit", *args, "--trainer.max_steps", "-1", "--ckpt_path", "last"])
    stopped = torch.load(last, weights_only=True)
    assert (stopped["global_step"], stopped["epoch"]) == (10, 1)
    assert_identical(tensors(last), tensors(reference))


def test_a_restart_with_another_batch_size_trains_the_rest_of_the_epoch_once(fake_cifar10: Path) -> None:
    """Stopped 64 images into an epoch of 160 at batch size 32, restarted at 16: the epoch's other 96 images make 6
    steps. Counting batches, the restart went on at image 32 and trained 32 images twice."""
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--trainer.max_steps", "7"])  # 5 steps an epoch: 2 batches into the second
    (last,) = Path().glob("runs/**/last.ckpt")
    main(["fit", *args, "--trainer.max_steps", "-1", "--data.batch_size", "16", "--ckpt_path", "last"])
    stopped = torch.load(last, weights_only=True)
    assert (stopped["global_step"], stopped["epoch"]) == (7 + 6, 1)


def test_time_budget_drives_the_schedule_and_ends_it_when_time_runs_out(fake_cifar10: Path, monkeypatch) -> None:
    # Steps of exactly 1 s on a fake clock, a 12 s budget, and epochs for 500 steps: the schedule's progress is the
    # budget's, so training stops after 12 steps with the learning rate at the schedule's end.
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    main(["fit", *FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "100",
          "--trainer.max_time", "00:00:00:12", "--trainer.callbacks+=faults.TickClock"])  # fmt: skip
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 12
    end = WarmupLinearDecay(start=0.2, peak=0.23, end=0.07, restarts=(0.4,))(1.0)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.75 * end)
    # The run validated where the budget ended (Lightning validates when training is stopped): its last model
    # is among those the checkpoints compare.
    rows = [row for row in metrics_rows("runs") if row.get("val_acc")]
    assert rows[-1]["step"] == "11"


def test_max_time_ends_a_gradient_accumulation_before_it_stops(fake_cifar10: Path, monkeypatch) -> None:
    """Batches of exactly 1 s on a fake clock, a 3 s limit, `accumulate_grad_batches 2`: the limit comes after the
    third batch, the first of an accumulation; training stops after the fourth, which steps. Stopped after the
    third, its gradient was never applied, and a run resumed with a larger limit went on after it."""
    faults.CLOCK["now"] = 0.0
    monkeypatch.setattr(Timer, "time_elapsed", lambda self, stage="train": faults.CLOCK["now"])
    main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "10", "--trainer.max_time",
          "00:00:00:03", "--trainer.accumulate_grad_batches", "2", "--trainer.callbacks+=faults.TickClock",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4


def test_last_checkpoint_every_n_steps(fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None) -> None:
        saved.append((Path(path).name, checkpoint["global_step"]))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    main(["fit", *FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2",
          "--last_checkpoint.every_n_steps", "2"])  # fmt: skip
    # Steps 2, 4, 6 and 8, and every epoch's end (after its validation), through the atomic writer.
    assert [step for name, step in saved if name == "last.ckpt"] == [2, 4, 5, 6, 8, 10]


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda file: file.write(b"old"))

    def fails_halfway(file) -> None:
        file.write(b"new, half wri")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fails_halfway)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.ckpt"]


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    state = {"weights": torch.randn(4_000_000), "step": 0}  # 16 MB: each save takes tens of ms
    steps, cut_short = [], 0
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9):
        child = os.fork()  # a process that saves over and over, with torch already imported
        if child == 0:
            try:
                io = AtomicCheckpointIO()
                while True:
                    state["step"] += 1
                    io.save_checkpoint(state, target)
            finally:
                os._exit(1)
        time.sleep(delay)
        os.kill(child, signal.SIGKILL)  # lands during a save, or between two
        os.waitpid(child, 0)
        cut_short += len(list(target.parent.glob(".last.ckpt.*.partial")))  # a save the kill interrupted
        if target.exists():
            steps.append(torch.load(target, weights_only=True)["step"])
    assert len(steps) >= 4 and all(step >= 1 for step in steps)
    assert cut_short >= 1  # the kills did land in the middle of saves
    assert len(list(target.parent.iterdir())) <= 2  # the next save clears what a killed one left
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["last.ckpt"]


def test_default_root_dir_holds_the_runs_of_the_default_logger(fake_cifar10: Path) -> None:
    # With the default W&B logger the runs went to ./runs whatever --trainer.default_root_dir said.
    args = [*FAST, *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.default_root_dir", "experiment"]
    main(["fit", *args])
    assert not Path("runs").exists()
    (last,) = Path("experiment/runs/cifar-cli").glob("*/checkpoints/last.ckpt")
    assert (last.parent.parent / "config.yaml").is_file()
    # Finds the run there, and continues it. The W&B run still holds the first part's config, as an online run
    # resumed from the server does: the resumed config (its ckpt_path, the logger's version) updates it.
    main(["fit", *args, "--ckpt_path", "last"])
    assert list(Path("experiment/runs/cifar-cli").iterdir()) == [last.parent.parent]


def test_config_of_a_run_under_default_root_dir_runs_again_under_another(fake_cifar10: Path) -> None:
    """config.yaml holds the logger's save_dir as given, beside default_root_dir: run again with another
    --trainer.default_root_dir, the run goes under that folder's runs/, not under it joined with the first's."""
    main(["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "one"])
    (config,) = Path("one/runs").glob("*/config.yaml")
    saved = yaml.safe_load(config.read_text())["trainer"]
    assert (saved["default_root_dir"], saved["logger"]["init_args"]["save_dir"]) == ("one", "runs")
    main(["fit", "--config", str(config), "--trainer.default_root_dir", "two"])
    assert [p.relative_to("two").parts[0] for p in Path("two").rglob("config.yaml")] == ["runs"]


def test_a_logger_in_the_current_folder_under_default_root_dir_prints_plain_paths(fake_cifar10: Path, capsys) -> None:
    # A logger's `save_dir: .` (W&B's own default) under configs/debug.yaml's default_root_dir printed its run as
    # `runs/debug/./lightning_logs/<id>` (a CSVLogger's as `exp/./version_0`).
    main(["fit", *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.default_root_dir", "exp",
          "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", ".",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Run folder: exp/version_0\n" in out and "/./" not in out


def test_default_root_dir_holds_the_folders_of_every_logger_of_a_list(fake_cifar10: Path) -> None:
    # Each logger's save_dir, not only a single logger's: a list's folders were made in the current folder.
    loggers = (
        "[{class_path: CSVLogger, init_args: {save_dir: runs}}, "
        "{class_path: TensorBoardLogger, init_args: {save_dir: tb}}]"
    )
    main(["fit", *cifar(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger", loggers,
          "--trainer.default_root_dir", "exp", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert not Path("runs").exists() and not Path("tb").exists()
    assert len(list(Path("exp/runs").glob("*/checkpoints/last.ckpt"))) == 1 and any(Path("exp/tb").rglob("events.*"))


def test_resumed_run_keeps_its_csv_metrics(fake_cifar10: Path, tmp_path: Path) -> None:
    # Lightning's CSV writer deletes an existing metrics.csv when it opens the run's folder: the resumed run lost
    # every row logged before the interruption. Now its metrics.csv reads as the uninterrupted run's.
    args = [*FAST, *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "1"]

    def rows() -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "fit_time"} for row in metrics_rows("runs")]  # wall clock

    os.chdir(tmp_path / "reference" if (tmp_path / "reference").mkdir() is None else tmp_path)
    main(["fit", *args])
    reference = rows()
    os.chdir(tmp_path / "stopped" if (tmp_path / "stopped").mkdir() is None else tmp_path)
    sys.path.insert(0, str(REPO / "tests"))
    with pytest.raises(SystemExit):
        main(["fit", *args, "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.epoch", "1",
              "--trainer.callbacks.batch", "2"])  # fmt: skip
    main(["fit", *args, "--ckpt_path", "last"])
    assert len(reference) > 20 and rows() == reference


def test_a_run_killed_after_its_last_checkpoint_resumes_without_repeating_a_row(fake_cifar10: Path, tmp_path: Path):
    """A kill that saves nothing (kill -9, an out-of-memory kill, a lost node) leaves rows in metrics.csv past the
    last checkpoint, which the resumed run logs again. Lightning logs a step's metrics one step behind its count:
    the first training step after a checkpoint at step 5 logs at step 5, and that row was kept beside the resumed
    run's own, twice in metrics.csv."""
    # The tutorial recipe: no schedule over max_epochs, which the first start sets to 1.
    args = [*cifar(fake_cifar10), *CSV_LOGGER, "--data.batch_size", "32", "--trainer.log_every_n_steps", "1",
            "--trainer.callbacks+=LearningRateMonitor", "--trainer.enable_progress_bar", "false"]  # fmt: skip

    def rows() -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "fit_time"} for row in metrics_rows("runs")]  # wall clock

    os.chdir(tmp_path / "reference" if (tmp_path / "reference").mkdir() is None else tmp_path)
    main(["fit", *args, "--trainer.max_epochs", "2"])
    reference = rows()
    os.chdir(tmp_path / "killed" if (tmp_path / "killed").mkdir() is None else tmp_path)
    main(["fit", *args, "--trainer.max_epochs", "1"])
    (last,) = Path("runs").glob("**/checkpoints/last.ckpt")
    kept = tmp_path / "epoch-1.ckpt"  # last.ckpt as a kill before the second epoch's end left it
    kept.write_bytes(last.read_bytes())
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert rows() == reference
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(kept)])
    assert len(reference) > 10 and rows() == reference


def test_csv_logs_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import CSVLogger

    import cifar_cli.atomic

    logger = CSVLogger(str(tmp_path))
    atomic_csv_logs(logger)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"loss": 0.5, "acc": 0.75}, step=1)  # a new column: Lightning rewrote the file in place
    logger.save()
    path = Path(logger.experiment.metrics_file_path)
    assert path.read_text().splitlines() == ["acc,loss,step", ",1.0,0", "0.75,0.5,1"]

    def killed_halfway(target, text: str) -> None:
        def write(file) -> None:
            file.write(text[:10].encode())
            raise KeyboardInterrupt

        atomic_write(target, write)

    monkeypatch.setattr(cifar_cli.atomic, "atomic_write_text", killed_halfway)
    logger.log_metrics({"loss": 0.25}, step=2)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert path.read_text().splitlines() == ["acc,loss,step", ",1.0,0", "0.75,0.5,1"]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]


# What a one-task SLURM job sets, for Lightning to see a SLURM job (SLURMEnvironment.detect).
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "cifar", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip


def test_a_fit_in_a_slurm_job_starts_anew_beside_lightnings_slurm_checkpoint(fake_cifar10: Path, monkeypatch, capsys):
    """Lightning's requeue handler (SLURMEnvironment's auto_requeue, on SIGUSR1) saves `hpc_ckpt_N.ckpt` in the
    folder fit runs in, and Lightning resumes from it any later fit in a SLURM job that names no checkpoint: a new
    run, whatever its settings, went on silently from the weights and epoch of another."""
    args = ["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main([*args, "--trainer.max_epochs", "1"])
    (last,) = Path("runs").glob("**/last.ckpt")
    Path("hpc_ckpt_1.ckpt").write_bytes(last.read_bytes())
    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    main([*args, "--trainer.max_epochs", "2"])
    err = capsys.readouterr().err
    (new,) = [p.parent.parent for p in Path("runs").glob("**/last.ckpt") if p != last]
    assert {row["epoch"] for row in metrics_rows(str(new)) if row["train_loss_epoch"]} == {"0", "1"}  # from epoch 1
    assert "cifar-cli: hpc_ckpt_1.ckpt (Lightning's SLURM checkpoint) is not resumed" in err


def test_a_requeued_slurm_job_goes_on_from_its_last_checkpoint(fake_cifar10: Path, monkeypatch, capsys) -> None:
    """A job SLURM requeued (SLURM_RESTART_COUNT) runs its command again: without --ckpt_path, Lightning went on from
    its hpc_ckpt_N.ckpt in a new run folder, and cifar-cli, which loads none, started the run over. It goes on from
    the run's last.ckpt, in the run's own folder."""
    args = ["fit", *cifar(fake_cifar10), *CSV_LOGGER, "--trainer.enable_progress_bar", "false"]
    main([*args, "--trainer.max_epochs", "1"])
    (last,) = Path("runs").glob("**/last.ckpt")
    Path("hpc_ckpt_1.ckpt").write_bytes(last.read_bytes())
    for name, value in {**SLURM_JOB, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    main([*args, "--trainer.max_epochs", "2"])
    err = capsys.readouterr().err
    assert "cifar-cli: SLURM requeued this job (1x): going on as with --ckpt_path last" in err
    assert list(Path("runs").glob("**/last.ckpt")) == [last]  # no second run
    rows = metrics_rows(str(last.parent.parent))
    assert [row["epoch"] for row in rows if row["train_loss_epoch"]] == ["0", "1"]
    assert torch.load(last, weights_only=True)["epoch"] == 1
