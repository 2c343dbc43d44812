"""The command line, driven through `main([...])` (and the console script) on tiny offline data."""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
import wandb
import yaml
from conftest import write_image_folder
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from wandb_offline import read_run

from cifar_cli import cli, precision
from cifar_cli.cli import main
from cifar_cli.data import CIFAR10DataModule
from cifar_cli.optim import WarmupLinearDecay

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "sweep.yaml")  # (a W&B sweep's)
CSV_LOGGER = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"]


def cifar_args(data_dir: Path) -> list[str]:
    return ["--data.data_dir", str(data_dir), "--data.val_size", "40", "--trainer.enable_progress_bar", "false"]


def checkpoints() -> list[Path]:
    """The checkpoints ModelCheckpoint kept (the best ones), without the `last.ckpt` kept for resuming."""
    return sorted(p for p in Path().glob("**/checkpoints/*.ckpt") if not p.name.startswith("last"))


def run_folders() -> list[Path]:
    return sorted(p.parent for p in Path("runs").glob("*/*/config.yaml"))


def metrics_rows(save_dir: str) -> list[dict[str, str]]:
    """The rows of the one CSVLogger run under `save_dir`."""
    (path,) = Path(save_dir).glob("**/metrics.csv")
    with open(path) as file:
        return list(csv.DictReader(file))


def values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI expecting bad input: a non-zero exit and one line on stderr, with no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifar-cli: error: "), err
    return err[0]


def test_fit_then_validate_test_predict_with_ckpt_path_alone(fake_cifar10: Path, capsys) -> None:
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "8", "--model.learning_rate", "1e-3"])
    (ckpt,) = checkpoints()
    assert "Best checkpoint (val_loss " in capsys.readouterr().out
    fit_rows = metrics_rows("runs")
    # Class-coloured images are easy: training must beat chance (0.1) by far.
    assert max(values(fit_rows, "val_acc")) >= 0.8
    losses = values(fit_rows, "train_loss_epoch")
    assert losses[-1] < 0.5 * losses[0]

    # validate on the checkpoint reproduces the val_loss that ModelCheckpoint recorded for it.
    best_score = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in best_score.items() if k.startswith("ModelCheckpoint")]
    main(["validate", "--ckpt_path", str(ckpt), "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "v"])
    assert values(metrics_rows("v"), "val_loss")[-1] == pytest.approx(float(state["best_model_score"]), abs=1e-5)

    # test and predict need nothing but the checkpoint: model and data settings come from it.
    main(["test", "--ckpt_path", str(ckpt), "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "t"])
    test_acc = values(metrics_rows("t"), "test_acc")[-1]
    main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    out = capsys.readouterr()
    assert "Predictions for 50 images written to" in out.out + out.err
    with open("predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == [str(i) for i in range(50)]
    names = set(CIFAR10DataModule.names)
    assert all(row["predicted"] in names and row["label"] in names for row in rows)
    assert all(0.0 < float(row["confidence"]) <= 1.0 for row in rows)
    # The CSV's predictions agree with test: its accuracy is test_acc.
    hits = sum(row["predicted"] == row["label"] for row in rows)
    assert hits / len(rows) == pytest.approx(test_acc, abs=1e-6)


def test_a_net_of_the_users_own_module_by_class_path(fake_cifar10: Path, tmp_path: Path, monkeypatch) -> None:
    # Declares plain `int` where TutorialCNN, the default net, declares PositiveInt: the values jsonargparse
    # carried over from the default used to stop the run when its config was saved.
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n\n\n"
        "class OneConv(nn.Module):\n"
        "    def __init__(self, num_classes: int = 10, image_shape: tuple[int, int, int] = (3, 32, 32)) -> None:\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(image_shape[0], num_classes, 1)\n\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).mean((2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    main(["fit", *cifar_args(fake_cifar10), "--model.net", "mynets.OneConv", "--trainer.max_epochs", "1"])
    (folder,) = run_folders()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["net"]["class_path"] == "mynets.OneConv"  # its init_args are linked from the data
    ckpt = torch.load(checkpoints()[0], weights_only=True)
    assert ckpt["state_dict"]["net.conv.weight"].shape == (10, 3, 1, 1)


def test_overrides_reach_config_hparams_and_optimizer(fake_cifar10: Path) -> None:
    main(
        [
            "fit",
            *cifar_args(fake_cifar10),
            "--trainer.max_epochs", "1",
            "--data.batch_size", "16",
            "--model.learning_rate", "0.05",
            "--model.optimizer", "SGD",
            "--model.optimizer.momentum", "0.9",
            "--model.lr_schedule", "WarmupLinearDecay",
            "--model.lr_schedule.end", "0.1",
            "--trainer.callbacks+=LearningRateMonitor",
        ]
    )  # fmt: skip
    (folder,) = run_folders()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["data"]["init_args"]["batch_size"] == 16
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.SGD"
    callbacks = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    assert callbacks[-1] == "LearningRateMonitor" and "ModelCheckpoint" in callbacks
    ckpt = torch.load(checkpoints()[0], weights_only=True)
    assert ckpt["hyper_parameters"]["learning_rate"] == 0.05
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.05 and group["momentum"] == 0.9
    assert group["lr"] == pytest.approx(0.05 * 0.1)  # the schedule's end, after the last of the 10 steps
    assert ckpt["global_step"] == 10  # 160 training images / batch 16


def test_fast_cpu_recipe_end_to_end(fake_cifar10: Path) -> None:
    main(["fit", "--config", str(REPO / "configs" / "fast-cpu.yaml"), *cifar_args(fake_cifar10), *CSV_LOGGER,
          "--data.batch_size", "32", "--trainer.max_epochs", "2", "--model.net.init_args.widths", "[8, 16, 16]",
          "--trainer.log_every_n_steps", "1"])  # fmt: skip
    rows = metrics_rows("runs")
    fit_times = [float(row["fit_time"]) for row in rows if row.get("val_acc")]
    assert len(fit_times) == 2 and 0 < fit_times[0] < fit_times[1]  # one per validation, on a running clock
    epoch_ends = [float(row["fit_time"]) for row in rows if row.get("train_loss_epoch")]
    assert len(epoch_ends) == 2 and fit_times[0] <= epoch_ends[0] < fit_times[1] <= epoch_ends[1]
    # `validate` trains nothing: no fit_time of its own (it reported the checkpoint's training seconds).
    (last,) = Path("runs").glob("**/last.ckpt")
    main(["validate", "--ckpt_path", str(last), "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "again"])
    (validated,) = [row for row in metrics_rows("again") if row.get("val_acc")]
    assert not validated.get("fit_time")
    # 160 images / batch 32 x 2 epochs = 10 steps: two cycles of warm-up and decay, the second from step 4 on;
    # BatchNorm parameters at 64x.
    by_step = sorted((int(row["step"]), row) for row in rows if row.get("lr-SGD/pg1"))
    lr, lr_norm = [float(r["lr-SGD/pg1"]) for _, r in by_step], [float(r["lr-SGD/pg2"]) for _, r in by_step]
    schedule = WarmupLinearDecay(restarts=(0.4,))
    assert lr == pytest.approx([0.75 * schedule(step / 10) for step in range(10)])
    assert lr[0] == lr[4] == pytest.approx(0.75 * 0.2)
    assert lr_norm == pytest.approx([64 * x for x in lr])
    (ckpt_path,) = checkpoints()
    ckpt = torch.load(ckpt_path, weights_only=True)
    # EMA weight averaging: the checkpoint's weights are the average; the raw ones are kept beside them.
    assert "current_model_state" in ckpt
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert not torch.equal(averaged["net.head.weight"], raw["net.head.weight"])
    # The frozen whitening filters were fitted to the training images before the first step: their responses to
    # the images' 2x2 patches are uncorrelated, with unit variance (eigenvectors are only unique up to rotation
    # where eigenvalues are close, so the filters themselves are not compared).
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40, download=False)
    data.setup("fit")
    responses = F.conv2d(data.preprocess(data.splits["train"].images), averaged["net.whiten.weight"])
    features = responses[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = features.T @ features / len(features)
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.02, rtol=0)


def test_error_two_learning_rates(capsys) -> None:
    message = fails(
        capsys, "fit", "--model.optimizer", "SGD", "--model.optimizer.lr", "0.1", "--model.learning_rate", "0.2"
    )
    assert message == (
        "cifar-cli: error: --model.optimizer.lr 0.1 and --model.learning_rate 0.2 disagree: give the learning rate once"
    )
    assert not Path("runs").exists()


def test_error_validation_off_with_early_stopping(capsys) -> None:
    message = fails(capsys, "fit", "--trainer.limit_val_batches", "0")
    assert "turns validation off, but EarlyStopping monitors val_loss" in message
    assert not Path("runs").exists()


def test_stacked_configs_last_wins(fake_cifar10: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer:\n  max_epochs: 3\ndata:\n  init_args:\n    batch_size: 8\n")
    second.write_text("trainer:\n  max_epochs: 1\n")
    main(["fit", "--config", str(first), "--config", str(second), *cifar_args(fake_cifar10)])
    (folder,) = run_folders()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["trainer"]["max_epochs"] == 1
    assert config["data"]["init_args"]["batch_size"] == 8
    assert torch.load(checkpoints()[0], weights_only=True)["epoch"] == 0


def print_config(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_configs_of_cifar_cli_are_found_from_any_folder(capsys, fake_cifar10: Path, tmp_path: Path) -> None:
    """`--config configs/NAME.yaml`, as the README and cifar-cli's messages write it, works outside the repository:
    it names cifar-cli's own config where the current folder has no such file. Before, it was a missing file."""
    assert not Path("configs").exists()  # the test's own folder
    printed = yaml.safe_load(print_config(capsys, "--config", "configs/cpu.yaml", "--config=configs/debug.yaml"))
    assert printed["trainer"]["accelerator"] == "cpu" and printed["trainer"]["limit_train_batches"] == 10
    main(["fit", "-c", "configs/debug.yaml", *cifar_args(fake_cifar10)])
    assert Path("runs/debug/checkpoints/last.ckpt").is_file()  # debug.yaml's folder, in the current one
    capsys.readouterr()
    # A file of the current folder's configs/ is the user's, and comes first.
    Path("configs").mkdir()
    Path("configs/cpu.yaml").write_text("trainer:\n  max_epochs: 9\n")
    printed = yaml.safe_load(print_config(capsys, "--config", "configs/cpu.yaml"))
    assert printed["trainer"]["max_epochs"] == 9 and printed["trainer"]["accelerator"] == "auto"
    err = fails(capsys, "fit", "--config", "configs/cpu2.yaml")
    assert err == (
        f"cifar-cli: error: --config configs/cpu2.yaml: no such file in {tmp_path}, nor among cifar-cli's own configs "
        f"({', '.join(p.name for p in sorted((REPO / 'configs').glob('*.yaml')))})"
    )


def test_wheel_holds_the_configs_and_every_package(tmp_path: Path) -> None:
    """A wheel (`pip install .`, or from an index) installs the configs inside the package, where `--config
    configs/NAME.yaml` finds them, and every package of the source tree (pyproject.toml lists them by name)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("cifar_cli", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "."], cwd=source, check=True)
    (wheel,) = (source / "dist").glob("cifar_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = set(archive.namelist())
    configs = {f"cifar_cli/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "cifar_cli").glob("**/*.py")}
    assert "cifar_cli/configs/gpu.yaml" in configs and configs <= held and modules <= held
    # Installed, the package finds its own copy (not the repository's beside the source).
    subprocess.run([*pip, "install", "--no-deps", "--target", "site", str(wheel)], cwd=tmp_path, check=True)
    found = subprocess.run(
        [sys.executable, "-c", "from cifar_cli.presets import presets_folder; print(presets_folder())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
    )  # fmt: skip
    assert found.stdout.strip() == str(tmp_path / "site" / "cifar_cli" / "configs")


def test_print_config_round_trip(capsys, tmp_path: Path) -> None:
    printed = print_config(capsys, "--trainer.max_epochs", "7", "--data.batch_size", "64")
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert print_config(capsys, "--config", str(saved)) == printed
    assert yaml.safe_load(printed)["trainer"]["max_epochs"] == 7


def test_print_config_writes_a_callbacks_device_as_its_name(capsys, tmp_path: Path, recwarn) -> None:
    """StochasticWeightAveraging's `device` defaults to a torch.device, which jsonargparse wrote as `Unable to
    serialize instance cpu`, with a warning: the printed config (and a run's config.yaml) then failed mid-run."""
    swa = ["--trainer.callbacks+=StochasticWeightAveraging", "--trainer.callbacks.swa_lrs", "0.05"]
    printed = print_config(capsys, *swa)
    (callback,) = [c for c in yaml.safe_load(printed)["trainer"]["callbacks"] if "StochasticWeight" in c["class_path"]]
    assert callback["init_args"]["device"] == "cpu"
    assert not [str(w.message) for w in recwarn if "serialize" in str(w.message)]
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert print_config(capsys, "--config", str(saved)) == printed


def test_a_callback_whose_default_is_an_enum_runs_and_prints(image_folder: Path, capsys, tmp_path: Path) -> None:
    """Lightning's Timer defaults `interval: str` to the enum `Interval.step`, which YAML could not write:
    `--trainer.callbacks+=Timer` ended in a traceback ("cannot represent an object"), with --print_config too."""
    timer = ["--trainer.callbacks+=Timer", "--trainer.callbacks.duration", "00:00:10:00"]
    printed = print_config(capsys, *timer)
    (callback,) = [c for c in yaml.safe_load(printed)["trainer"]["callbacks"] if c["class_path"].endswith(".Timer")]
    assert callback["init_args"]["interval"] == "step"
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert print_config(capsys, "--config", str(saved)) == printed
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          *timer, "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    assert "interval: step" in Path("config.yaml").read_text()


def test_print_config_shows_the_learning_rate_the_run_uses(capsys) -> None:
    model = yaml.safe_load(print_config(capsys))["model"]
    assert model["learning_rate"] == 2e-4 and model["optimizer"]["init_args"]["lr"] == 2e-4  # not Adam's own 1e-3
    printed = yaml.safe_load(print_config(capsys, "--optimizer", "SGD", "--model.learning_rate", "0.05"))
    assert printed["optimizer"] is None  # --optimizer is the model's optimizer (cifar_cli.optimizer_flags)
    assert printed["model"]["optimizer"]["class_path"] == "torch.optim.SGD"
    assert printed["model"]["optimizer"]["init_args"]["lr"] == printed["model"]["learning_rate"] == 0.05
    # A template with a required argument left to fill in is printed as jsonargparse prints it.
    template = yaml.safe_load(print_config(capsys, "--data", "ImageFolderDataModule"))
    assert template["data"]["init_args"]["root"] is None
    # A command line the run would refuse is refused, not printed.
    err = fails(capsys, "fit", "--optimizer", "SGD", "--model.optimizer", "RMSprop", "--print_config")
    assert err.endswith("--optimizer and --model.optimizer both choose the optimizer: give one of them")


def test_printed_config_takes_a_new_learning_rate(capsys, tmp_path: Path) -> None:
    """A printed config (or a run's config.yaml) holds the learning rate and weight decay twice, in the model and in
    its optimizer's arguments, equal: one value, which a flag beside the file changes like any other setting."""
    saved = tmp_path / "printed.yaml"
    saved.write_text(print_config(capsys, "--optimizer", "SGD", "--model.learning_rate", "0.05"))
    for args, lr, decay in (
        (["--model.learning_rate", "0.1"], 0.1, 0.0),
        (["--model.optimizer.lr", "0.1"], 0.1, 0.0),
        (["--model.weight_decay", "0.01"], 0.05, 0.01),
        (["--model.learning_rate", "0.1", "--model.optimizer.momentum", "0.9"], 0.1, 0.0),
        ([], 0.05, 0.0),
    ):
        model = yaml.safe_load(print_config(capsys, "--config", str(saved), *args))["model"]
        assert model["optimizer"]["class_path"] == "torch.optim.SGD"
        assert model["learning_rate"] == model["optimizer"]["init_args"]["lr"] == lr, args
        assert model["weight_decay"] == model["optimizer"]["init_args"]["weight_decay"] == decay, args
    # Two values given in one file still disagree.
    mixed = yaml.safe_load(saved.read_text())
    mixed["model"]["optimizer"]["init_args"]["lr"] = 0.2
    saved.write_text(yaml.safe_dump(mixed))
    err = fails(capsys, "fit", "--config", str(saved))
    assert err.endswith("--model.optimizer.lr 0.2 and --model.learning_rate 0.05 disagree: give the learning rate once")


def test_config_printed_without_defaults_takes_a_new_learning_rate(capsys, tmp_path: Path) -> None:
    """`--print_config=skip_default` (which `cifar-cli --help` offers) left out the model's learning rate, equal to its
    default, and kept the optimizer's copy of it: the file read as one that gives the optimizer's `lr`, and
    `--config FILE --model.learning_rate 1e-3` was refused ("--model.optimizer.lr 0.0002 and --model.learning_rate
    0.001 disagree"), as was `--model.weight_decay` beside the printed `--optimizer AdamW`."""
    saved = tmp_path / "short.yaml"
    for args, change, key, value in (
        ([], ["--model.learning_rate", "1e-3"], "learning_rate", 1e-3),
        (["--optimizer", "AdamW"], ["--model.weight_decay", "0.1"], "weight_decay", 0.1),
        (["--optimizer", "SGD", "--optimizer.lr", "0.05"], ["--model.learning_rate", "0.1"], "learning_rate", 0.1),
    ):
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config=skip_default"])
        saved.write_text(capsys.readouterr().out)
        model = yaml.safe_load(print_config(capsys, "--config", str(saved)))["model"]
        full = yaml.safe_load(print_config(capsys, *args))["model"]
        assert model == full, args  # the file runs as the command it was printed from
        model = yaml.safe_load(print_config(capsys, "--config", str(saved), *change))["model"]
        assert model[key] == value, (args, change)
        assert model["optimizer"]["init_args"]["lr" if key == "learning_rate" else key] == value, (args, change)


def test_config_printed_without_defaults_before_the_subcommand_is_one_line(capsys) -> None:
    """`cifar-cli --print_config=skip_default fit` ended in a traceback of jsonargparse's (4.53: the defaults it
    compares with name no subcommand); the same flag after the subcommand prints."""
    said = fails(capsys, "--print_config=skip_default", "fit")
    assert said == (
        "cifar-cli: error: --print_config=skip_default before the subcommand: this jsonargparse cannot print "
        "it there; give it after the subcommand: cifar-cli fit --print_config=skip_default"
    )
    with pytest.raises(SystemExit):
        main(["--print_config", "fit"])  # without skip_default, the form prints as before
    assert yaml.safe_load(capsys.readouterr().out)["fit"]["model"]["learning_rate"] == 2e-4


def test_printed_default_config_takes_another_optimizer(capsys, tmp_path: Path) -> None:
    """The default recipe's printed config spells out Adam, ImageClassifier's default: `--optimizer SGD` beside it
    chooses SGD, as it does without the file; an optimizer the file chose is still not replaced silently."""
    default, chosen = tmp_path / "default.yaml", tmp_path / "sgd.yaml"
    default.write_text(print_config(capsys))
    chosen.write_text(print_config(capsys, "--model.optimizer", "SGD", "--model.optimizer.momentum", "0.9"))
    model = yaml.safe_load(print_config(capsys, "--config", str(default), "--optimizer", "SGD"))["model"]
    assert model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["learning_rate"] == model["optimizer"]["init_args"]["lr"] == 2e-4
    err = fails(capsys, "fit", "--config", str(chosen), "--optimizer", "AdamW")
    assert err.endswith(f"{chosen}'s model.optimizer (torch.optim.SGD) both choose the optimizer: give one of them "
                        "(--model.optimizer AdamW replaces the config's)")  # fmt: skip


def test_print_config_beside_a_checkpoint_shows_its_settings(image_folder: Path, tmp_path: Path, capsys) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--model.learning_rate", "1e-3", "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = checkpoints()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(ckpt), "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["data"]["class_path"] == "cifar_cli.data.ImageFolderDataModule"  # not the default CIFAR-10
    assert config["data"]["init_args"]["root"] == str(image_folder)
    assert config["model"]["learning_rate"] == config["model"]["optimizer"]["init_args"]["lr"] == 1e-3
    # The printed config tests the checkpoint as the command did.
    (tmp_path / "test.yaml").write_text(printed)
    for save_dir, args in (("a", ["--ckpt_path", str(ckpt)]), ("b", ["--config", str(tmp_path / "test.yaml")])):
        main(["test", *args, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", save_dir])
    assert values(metrics_rows("a"), "test_acc") == values(metrics_rows("b"), "test_acc")
    assert values(metrics_rows("a"), "test_loss") == values(metrics_rows("b"), "test_loss")


def test_default_config_file_is_the_builtin_default(capsys) -> None:
    assert print_config(capsys, "--config", str(REPO / "configs" / "default.yaml")) == print_config(capsys)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config: Path, capsys) -> None:
    printed = yaml.safe_load(print_config(capsys, "--config", str(config)))
    stated = yaml.safe_load(config.read_text())
    for key, value in (stated.get("trainer") or {}).items():
        if not isinstance(value, (dict, list)):
            assert printed["trainer"][key] == value, key


def test_wandb_mode_disabled_writes_no_wandb_run(fake_cifar10: Path, monkeypatch, capsys) -> None:
    """WANDB_MODE=disabled, as CI jobs set it: no W&B run, the run's folder still whole. Lightning's offline logger
    replaced the variable, and an offline W&B run was written all the same."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
    assert not Path("runs/wandb").exists()
    (run,) = Path("runs/cifar-cli").iterdir()
    assert (run / "metrics.csv").exists() and list((run / "checkpoints").glob("epoch=*.ckpt"))
    assert "wandb sync" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "flags", "wandb_runs"), [("disabled", [], 0), ("offline", ["--trainer.logger.offline", "false"], 2)]
)
def test_run_config_runs_again_as_wandb_mode_ran(
    mode: str, flags: list[str], wandb_runs: int, fake_cifar10: Path, monkeypatch, capsys
) -> None:
    """config.yaml records the mode W&B took from WANDB_MODE where the logger's `offline: false` left it to the
    variable: it said `offline: false` alone, and the same config run again without the variable logged live (here,
    with no W&B login, it failed)."""
    monkeypatch.setenv("WANDB_MODE", mode)
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", *flags])
    (run,) = Path("runs/cifar-cli").iterdir()
    monkeypatch.delenv("WANDB_MODE")
    wandb.teardown()  # W&B keeps the settings it read from the environment for the process: read them again
    main(["fit", "--config", str(run / "config.yaml")])
    assert len(list(Path("runs/cifar-cli").iterdir())) == 2
    assert len(list(Path("runs/wandb").glob("offline-run-*"))) == wandb_runs
    # A mode asked for live: config.yaml says offline: false alone, as before.
    monkeypatch.setenv("WANDB_MODE", "online")
    capsys.readouterr()
    logger = yaml.safe_load(print_config(capsys))["trainer"]["logger"]["init_args"]
    assert (logger["offline"], logger["mode"]) == (False, None)


@pytest.mark.parametrize(("mode", "offline"), [("online", False), ("disabled", False), ("offline", True)])
def test_wandb_mode_sets_the_default_of_offline(mode: str, offline: bool, monkeypatch, capsys) -> None:
    """WANDB_MODE=online, which W&B's own `syncing is set to offline` line advises, logs online (it stayed offline);
    a flag that sets `offline` wins over it."""
    monkeypatch.setenv("WANDB_MODE", mode)
    assert yaml.safe_load(print_config(capsys))["trainer"]["logger"]["init_args"]["offline"] is offline
    given = yaml.safe_load(print_config(capsys, "--trainer.logger.offline", "true"))
    assert given["trainer"]["logger"]["init_args"]["offline"] is True


def test_wandb_project_names_the_run_s_project_and_folder(fake_cifar10: Path, monkeypatch, capsys) -> None:
    """WANDB_PROJECT, which W&B reads, names the project the run goes to (`wandb sync` uploads it there) and its
    folder: the logger's own project, cifar-cli, overrode it. A flag that sets the project wins."""
    monkeypatch.setenv("WANDB_PROJECT", "flowers")
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
    (run,) = Path("runs/flowers").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["project"] == "flowers"
    capsys.readouterr()
    given = yaml.safe_load(print_config(capsys, "--trainer.logger.project", "birds"))
    assert given["trainer"]["logger"]["init_args"]["project"] == "birds"


def test_settings_from_the_environment_with_jsonargparse_s_default_env(fake_cifar10: Path, monkeypatch, capsys) -> None:
    """Lightning's PL_TRAINER_* variables do nothing under LightningCLI, which passes every Trainer argument; the
    README's way, jsonargparse's JSONARGPARSE_DEFAULT_ENV=true, reads PL_FIT__TRAINER__MAX_EPOCHS, under the flags."""
    monkeypatch.setenv("PL_TRAINER_MAX_EPOCHS", "3")
    assert yaml.safe_load(print_config(capsys))["trainer"]["max_epochs"] == 2
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
    monkeypatch.setenv("PL_FIT__TRAINER__MAX_EPOCHS", "1")
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER])
    (config,) = Path("runs").glob("*/config.yaml")
    assert yaml.safe_load(config.read_text())["trainer"]["max_epochs"] == 1
    assert max(values(metrics_rows("runs"), "epoch")) == 0
    capsys.readouterr()
    assert yaml.safe_load(print_config(capsys, "--trainer.max_epochs", "4"))["trainer"]["max_epochs"] == 4
    # A config of cifar-cli's own by the name the README gives it, from any folder, as --config takes it.
    assert not Path("configs").exists()
    monkeypatch.setenv("PL_FIT__CONFIG", "configs/debug.yaml")
    assert yaml.safe_load(print_config(capsys))["trainer"]["limit_train_batches"] == 10


def test_pl_config_refused_names_the_variable_and_where_the_config_goes(monkeypatch, capsys) -> None:
    """Lightning documents "A full configuration yaml would be parsed from PL_CONFIG if set": with subcommands, the
    config before the subcommand, a section per subcommand. A fit config there, or one with another subcommand's
    section (which jsonargparse refuses from the variable, not from `--config FILE fit`), was refused as a `--config
    FILE` before the subcommand, which the command line did not hold, and the second as "(fit: {test: ...})"."""
    Path("my.yaml").write_text("trainer:\n  max_epochs: 1\n")
    Path("all.yaml").write_text("fit:\n  trainer:\n    max_epochs: 1\ntest:\n  trainer:\n    logger: false\n")
    monkeypatch.setenv("JSONARGPARSE_DEFAULT_ENV", "true")
    monkeypatch.setenv("PL_CONFIG", "my.yaml")
    assert fails(capsys, "fit") == (
        "cifar-cli: error: PL_CONFIG=my.yaml: the config before the subcommand holds a section per subcommand (fit: "
        "{trainer: ...}), and 'trainer.max_epochs' is not one; give fit's config as PL_FIT__CONFIG=my.yaml (or "
        "cifar-cli fit --config my.yaml)"
    )
    monkeypatch.setenv("PL_CONFIG", "all.yaml")
    assert fails(capsys, "fit") == (
        "cifar-cli: error: PL_CONFIG=all.yaml: read from the variable, the config's sections other than fit's are "
        "refused (test:); give it on the command line, cifar-cli --config all.yaml fit, or its fit: section alone"
    )


@pytest.mark.parametrize("named_by", ["WANDB_RUN_ID", "--trainer.logger.version"])
def test_a_new_run_named_as_an_earlier_one_is_refused_before_it_starts(
    named_by: str, fake_cifar10: Path, monkeypatch, capsys
) -> None:
    """A second `fit` with the run name of the first (W&B's WANDB_RUN_ID, as in a job script, or the flag) was refused
    only as it wrote config.yaml: after it had begun an offline W&B part with the first run's id (and W&B's closing
    lines, with their colour codes, after the error) and emptied the first run's metrics.csv. Now one line before
    anything starts; `--ckpt_path last` still continues that run."""
    args = ["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"]
    if named_by == "WANDB_RUN_ID":
        monkeypatch.setenv("WANDB_RUN_ID", "first")
    else:
        args += ["--trainer.logger.version", "first"]
    main(args)
    metrics = Path("runs/cifar-cli/first/metrics.csv")
    before = metrics.read_text()
    capsys.readouterr()
    message = fails(capsys, *args)
    assert message.startswith("cifar-cli: error: runs/cifar-cli/first/config.yaml exists already: ")
    assert metrics.read_text() == before
    assert len(list(Path("runs/wandb").glob("offline-run-*-first"))) == 1
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert max(values(metrics_rows("runs/cifar-cli"), "epoch")) == 1


def test_wandb_offline_run_holds_metrics_config_and_images(fake_cifar10: Path) -> None:
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "2", "--data.batch_size", "64"])
    import wandb

    wandb.finish()
    wandb.teardown()  # waits for the W&B service to write out every record and media file
    (folder,) = Path("runs/wandb").glob("offline-run-*")
    run = read_run(folder)
    # The resolved CLI config, under its own keys, beside the model's hyperparameters.
    assert run.config["trainer"]["max_epochs"] == 2
    assert run.config["data"]["init_args"]["batch_size"] == 64
    assert run.config["class_names"] == list(CIFAR10DataModule.names)
    epochs = [row for row in run.history if "val_acc" in row]
    assert [row["epoch"] for row in epochs] == [0, 1]
    assert 0.0 <= run.summary["val_acc"] <= 1.0 and run.summary["val_loss"] > 0
    # 32 validation images a validation epoch (the sanity check logs none), with class-name captions.
    assert len(run.images) == 2 * 32
    captions = run.summary["examples/captions"]
    assert len(captions) == 32 and all(c.startswith("Pred: ") and ", Label: " in c for c in captions)
    # config.yaml beside the checkpoints of the same run.
    assert run_folders() == [Path("runs/cifar-cli") / folder.name.rsplit("-", 1)[1]]


def test_second_fit_in_the_same_folder(fake_cifar10: Path) -> None:
    import wandb

    for _ in range(2):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
        wandb.finish()  # as at the end of a cifar-cli process
    assert len(run_folders()) == 2 and len(checkpoints()) == 2


def test_image_folder_data_links_classes_and_shape(image_folder: Path) -> None:
    main(
        [
            "fit",
            "--data", "ImageFolderDataModule",
            "--data.root", str(image_folder),
            "--data.val_size", "30",
            "--data.image_size", "24",
            "--trainer.max_epochs", "1",
            "--trainer.logger", "false",
        ]
    )  # fmt: skip
    ckpt = torch.load(checkpoints()[0], weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == ["cat", "dog", "frog"]
    assert ckpt["hyper_parameters"]["net"]["init_args"] == {"num_classes": 3, "image_shape": (3, 24, 24)}
    assert ckpt["state_dict"]["net.fc3.weight"].shape == (3, 128)


def test_predict_folder_of_unlabelled_images(image_folder: Path, tmp_path: Path, capsys) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    unlabelled = tmp_path / "new"
    (unlabelled / "sub").mkdir(parents=True)
    for source, target in zip(sorted((image_folder / "test" / "dog").iterdir())[:3], ["a.png", "b.png", "sub/c.png"]):
        (unlabelled / target).write_bytes(source.read_bytes())
    capsys.readouterr()
    main(["predict", "--ckpt_path", str(checkpoints()[0]), "--data.predict_root", str(unlabelled)])
    written = capsys.readouterr().out.split("Predictions for 3 images written to ")[1].split()[0]
    assert Path(written).parent.parent.name == "cifar-cli"  # the W&B run's folder: runs/cifar-cli/<run id>/
    with open(written) as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == ["a.png", "b.png", "sub/c.png"]
    assert all(row["label"] == "" and row["predicted"] in {"cat", "dog", "frog"} for row in rows)


def test_predict_with_a_config_whose_callbacks_lack_the_writer_still_writes(image_folder: Path, tmp_path: Path) -> None:
    """A config's callbacks list replaces the default one, PredictionWriter with it; `predict --config` with the run's
    own config.yaml computed every prediction and wrote none, without a word."""
    config = tmp_path / "callbacks.yaml"
    config.write_text("trainer:\n  callbacks:\n  - {class_path: ModelCheckpoint, init_args: {monitor: val_loss}}\n")
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--config", str(config), *CSV_LOGGER])  # fmt: skip
    (run_config,) = Path("runs").glob("**/config.yaml")
    main(["predict", "--config", str(run_config), "--ckpt_path", str(checkpoints()[0])])
    (written,) = Path("runs").glob("**/predictions.csv")
    with open(written) as file:
        assert len(list(csv.DictReader(file))) == 30  # the test split


def test_predict_a_folder_needs_only_the_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    """On a machine without the training images: the checkpoint's classes and normalisation, no data read."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", *CSV_LOGGER])  # fmt: skip
    (ckpt,) = checkpoints()
    saved = torch.load(ckpt, weights_only=True)["ImageFolderDataModule"]
    assert saved["class_names"] == ["cat", "dog", "frog"]
    # The statistics of the 90 images it trained on (the split's seeded 30 held out), in the 0-255 scale.
    assert saved["mean"].shape == (3,) and 20 < float(saved["std"].min()) and float(saved["mean"].max()) < 235
    # Predict the test split while the data is there: the reference predictions of its dog images.
    main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    with open("predictions.csv") as file:
        reference = {row["image"]: row for row in csv.DictReader(file)}
    photos = tmp_path / "photos"
    photos.mkdir()
    dogs = sorted((image_folder / "test" / "dog").iterdir())[:4]
    for source in dogs:
        shutil.copy(source, photos / source.name)
    shutil.rmtree(image_folder)  # the training folder, and the cache decoded from it
    shutil.rmtree(tmp_path / "cache")
    Path("predictions.csv").unlink()
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--trainer.logger", "false"])
    with open("predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == [p.name for p in dogs]
    for row, source in zip(rows, dogs):
        before = reference[f"test/dog/{source.name}"]
        assert row["predicted"] == before["predicted"]
        assert float(row["confidence"]) == pytest.approx(float(before["confidence"]), abs=1e-6)
    assert not image_folder.exists() and not any((tmp_path / "cache").glob("**/train-*"))


def test_predict_photos_from_a_cifar_checkpoint_without_cifar(fake_cifar10: Path, tmp_path: Path) -> None:
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    (ckpt,) = checkpoints()
    photos = tmp_path / "photos"
    write_image_folder(photos, {"any": 3}, size=48)  # photos of another size: resized to the network's 32 px
    shutil.rmtree(fake_cifar10)  # nothing to download from here: the data module must not try
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--trainer.logger", "false"])
    with open("predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == ["any/0000.jpg", "any/0001.jpg", "any/0002.jpg"]
    assert all(row["predicted"] in CIFAR10DataModule.names for row in rows)
    assert not fake_cifar10.exists()


def test_flags_of_the_checkpoints_own_data_module_beside_ckpt_path(image_folder: Path, tmp_path: Path) -> None:
    """`--data.root` is a flag of ImageFolderDataModule, not of the default CIFAR-10 module: beside a checkpoint of
    an image-folder run it is read as the checkpoint's data module's flag."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = checkpoints()
    other = tmp_path / "other"
    shutil.copytree(image_folder / "train", other / "train")
    write_image_folder(other / "test", {"cat": 2, "dog": 1, "frog": 1}, seed=3, jpeg=False)
    main(["predict", "--ckpt_path", str(ckpt), "--data.root", str(other), "--trainer.logger", "false"])
    with open("predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == ["test/cat/0000.png", "test/cat/0001.png", "test/dog/0002.png",
                                              "test/frog/0003.png"]  # fmt: skip
    assert [row["label"] for row in rows] == ["cat", "cat", "dog", "frog"]


def test_a_checkpoint_of_other_classes_is_refused(image_folder: Path, capsys) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = checkpoints()
    capsys.readouterr()
    for split in ("train", "test"):  # a class renamed since training: as many outputs, read as other classes
        (image_folder / split / "cat").rename(image_folder / split / "kitten")
    err = fails(capsys, "test", "--ckpt_path", str(ckpt), "--trainer.logger", "false")
    assert err.endswith(f"checkpoint {ckpt} was trained on other classes: its class 0 is 'cat', the data's 'dog' "
                        "(the data lacks cat; adds kitten); pass the data it was trained on")  # fmt: skip
    err = fails(capsys, "predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false")
    assert err.endswith("pass the data it was trained on, or predict a folder of images with --data.predict_root DIR")
    for split in ("train", "test"):
        (image_folder / split / "kitten").rename(image_folder / split / "cat")
    (image_folder / "train" / "newt").mkdir()
    shutil.copy(next((image_folder / "train" / "frog").iterdir()), image_folder / "train" / "newt" / "a.jpg")
    err = fails(capsys, "fit", "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2", "--trainer.logger", "false")
    assert (
        "was trained on other classes: it has 3 classes, the data 4 (the data adds newt); pass the data it was "
        "trained on, or start a new run from its weights with --model.init_from" in err
    )


def test_predict_with_a_config_of_another_data_module_says_to_leave_it_out(image_folder: Path, capsys) -> None:
    # configs/default.yaml names CIFAR10DataModule: the advice was --data.predict_root DIR, which was given.
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = checkpoints()
    capsys.readouterr()
    default = str(REPO / "configs" / "default.yaml")
    err = fails(capsys, "predict", "--config", default, "--ckpt_path", str(ckpt), "--data.predict_root",
                str(image_folder / "test"), "--trainer.logger", "false")  # fmt: skip
    assert err.endswith(
        "it was trained with ImageFolderDataModule, and this command's data is CIFAR10DataModule (a --data flag or a "
        "config's data: section): leave that out"
    )
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(image_folder / "test"),
          "--trainer.logger", "false"])  # fmt: skip
    assert len(Path("predictions.csv").read_text().splitlines()) == 31


def test_the_command_runs_with_the_imports_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cifar-cli` and `python -m cifar_cli` (cli.run) keep the garbage collector off what the imports made; `main`,
    which a program may call many times, freezes nothing."""
    import gc

    from cifar_cli import cli

    frozen = []
    real_main = cli.main
    monkeypatch.setattr(cli, "main", lambda: frozen.append(gc.get_freeze_count()))
    before = gc.get_freeze_count()  # 375 as Python 3.12.1 starts; 0 in 3.11 and 3.13
    try:
        cli.run()
    finally:
        gc.unfreeze()
    assert frozen[0] > before + 100_000  # torch and Lightning alone make several hundred thousand objects
    with pytest.raises(SystemExit):
        real_main(["fit", "--help"])
    assert gc.get_freeze_count() == 0


def test_python_m_and_console_script(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    helped = subprocess.run([sys.executable, "-m", "cifar_cli", "fit", "--help"], capture_output=True, text=True)
    assert (
        helped.returncode == 0 and "--data.batch_size" not in helped.stdout and "--model.learning_rate" in helped.stdout
    )
    bad = subprocess.run([bin_dir / "cifar-cli", "fit", "--config", "missing.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"cifar-cli: error: Parser key \"config\": File does not exist: "
                                               f"'{tmp_path / 'missing.yaml'}'"]  # fmt: skip
    # A network of the user's, in a module of the current folder, by its class path: as under `python -m cifar_cli`.
    (tmp_path / "mynet.py").write_text(
        "from cifar_cli.nets import TutorialCNN\n\nclass MyNet(TutorialCNN):\n    pass\n"
    )
    printed = subprocess.run([bin_dir / "cifar-cli", "fit", "--model.net", "mynet.MyNet", "--print_config"],
                             capture_output=True, text=True)  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["model"]["net"]["class_path"] == "mynet.MyNet"


def test_help_lists_every_subcommand_and_a_top_level_config_reaches_the_subcommand(
    fake_cifar10: Path, tmp_path: Path, capsys
) -> None:
    """A command line that starts with its subcommand builds only that parser; the other forms still see all."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    helped = capsys.readouterr().out
    assert exit_info.value.code == 0 and "{fit,validate,test,predict}" in helped
    # The same under `python -m cifar_cli`, whose argv[0] is __main__.py, which the usage line named.
    module = subprocess.run([sys.executable, "-m", "cifar_cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert module.returncode == 0 and module.stdout.startswith("usage: cifar-cli "), module.stdout[:80]
    # And in a class's help, which jsonargparse prints from a parser of its own.
    module = subprocess.run([sys.executable, "-m", "cifar_cli", "fit", "--model.net.help", "FastNet"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert module.returncode == 0 and module.stdout.startswith("usage: cifar-cli [--model.net."), module.stdout[:80]
    assert "Help for --model.net.help=cifar_cli.nets.FastNet" in module.stdout
    config = tmp_path / "top.yaml"
    config.write_text(yaml.safe_dump({"fit": {"trainer": {"max_epochs": 1, "limit_train_batches": 2}}}))
    main(["--config", str(config), "fit", *cifar_args(fake_cifar10), *CSV_LOGGER])
    assert [p.name for p in checkpoints()] == ["epoch=0-step=2.ckpt"]


def test_help_describes_each_subcommand_in_whole_sentences(capsys) -> None:
    """Lightning takes each subcommand's description from its Trainer method's docstring, cut at the first line
    break: `cifar-cli --help` read "... It's separated from fit to make sure you never run on your" for `test`, and
    "... Useful to" for `predict`, as did their own `--help`."""
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = " ".join(capsys.readouterr().out.split("Available subcommands:")[1].split())
    assert "never run on your" not in listed and "Useful to" not in listed, listed
    assert "test Perform one evaluation epoch over the test set." in listed, listed
    for subcommand in ("test", "predict"):
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        helped = capsys.readouterr().out
        assert helped.split("\n\n")[1].rstrip().endswith("."), helped
        assert "never run on your" not in helped and "Useful to" not in helped, helped  # (the flags' group too)


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_help_of_ckpt_path_says_what_cifar_cli_takes(subcommand: str, capsys) -> None:
    """`--help` gave Lightning's text for --ckpt_path: the keywords "best", "hpc" and "registry", which cifar-cli
    refuses, and `last` as "the previous trainer.fit call's", where it is the newest run's last.ckpt."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    helped = capsys.readouterr().out
    text = " ".join(helped[helped.index("  --ckpt_path CKPT_PATH") :].split("\n  --")[0].split())
    assert "hpc" not in text and "registry" not in text and "best" not in text and "trainer.fit" not in text, text
    assert "written by `cifar-cli fit`" in text and "`last`: the newest run's last.ckpt" in text, text


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_help_of_weights_only_says_that_checkpoints_load_weights_only(subcommand: str, capsys) -> None:
    """Lightning's help of --weights_only offered `false` for trusted checkpoints, which cifar-cli never does."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    helped = capsys.readouterr().out
    text = " ".join(helped[helped.index("  --weights_only") :].split("\n  --")[0].split())
    assert "weights_only=False" not in text and "always loads checkpoints weights-only" in text, text


def test_weights_only_true_changes_nothing(image_folder: Path, capsys) -> None:
    args = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--weights_only", "true"]  # fmt: skip
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["test", *args, "--ckpt_path", "checkpoints/last.ckpt"])
    assert "test_acc" in capsys.readouterr().out


def test_help_of_a_class_inside_the_data_module_names_its_flags_whole(image_folder: Path, capsys) -> None:
    """`--data.augment.help PhotoAugment` listed `--augment.erasing` and the like, which the command line refuses:
    the flags it lists are the ones that set the augmentation."""
    data = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data, "--data.augment.help", "PhotoAugment"])
    helped = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Help for --data.augment.help=cifar_cli.data.PhotoAugment" in helped
    listed = re.findall(r"^  (--\S+)", helped, re.MULTILINE)
    assert "--data.augment.erasing" in listed and all(flag.startswith("--data.augment.") for flag in listed), listed
    with pytest.raises(SystemExit):
        main(["fit", *data, "--data.augment", "PhotoAugment", "--data.augment.erasing", "0.5", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["augment"]["init_args"]["erasing"] == 0.5


# Bad input: one line naming the problem, exit code 2, and nothing written.
def test_error_unknown_key(capsys) -> None:
    assert "unrecognized arguments: --trainer.max_epochs_x" in fails(capsys, "fit", "--trainer.max_epochs_x", "3")


@pytest.mark.parametrize("args", [["fit", "--model.help"], ["test", "--model.help=ImageClassifier"]])
def test_model_help_says_where_the_model_settings_are(args: list[str], capsys) -> None:
    """LightningCLI's `--model.help` of a model chosen by class: it was refused as an unrecognized argument."""
    said = fails(capsys, *args)
    assert said.startswith(f"cifar-cli: error: --model.help: the model is always ImageClassifier; its settings are "
                           f"the --model.* flags of `cifar-cli {args[0]} --help`")  # fmt: skip
    assert "--model.net.help TutorialCNN" in said


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # jsonargparse showed the empty help of torch.nn.Module, the networks' base.
        (
            ["--model.net.help"],
            "--model.net.help takes the class to describe: --model.net.help TutorialCNN "
            "(cifar-cli's: TutorialCNN, FastNet, TorchvisionNet, TimmNet; any nn.Module by its import path)",
        ),
        # "argument --data: expected one argument", naming another flag.
        (
            ["--data", "ImageFolderDataModule", "--data.augment.help"],
            "--data.augment.help takes the class to "
            "describe: --data.augment.help PhotoAugment (cifar-cli's: PhotoAugment)",
        ),
        (
            ["--trainer.callbacks.help", "--trainer.max_epochs", "1"],
            "--trainer.callbacks.help takes the class to describe: --trainer.callbacks.help CLASS",
        ),
        # "Expected a dot import path string: Nope", naming no class that is.
        (
            ["--model.net.help", "Nope"],
            "--model.net.help: Expected a dot import path string: Nope; cifar-cli's: "
            "TutorialCNN, FastNet, TorchvisionNet, TimmNet (--model.net.help TutorialCNN)",
        ),
        (
            ["--data.help=Nope"],
            "--data.help: Expected a dot import path string: Nope; cifar-cli's: "
            "CIFAR10DataModule, CIFAR100DataModule, ImageFolderDataModule (--data.help CIFAR10DataModule)",
        ),
    ],
    ids=["net-no-class", "augment-no-class", "callbacks-no-class", "net-unknown", "data-unknown"],
)
def test_help_of_a_class_without_a_known_class_names_the_classes(args: list[str], said: str, capsys) -> None:
    assert fails(capsys, "fit", *args) == f"cifar-cli: error: {said}"


def test_error_line_says_each_problem_once(capsys) -> None:
    """jsonargparse reports every branch of a Union: LightningCLI's --lr_scheduler is an LRScheduler or its own
    ReduceLROnPlateau (which is both, so its problem came twice), a callbacks entry a list or one callback."""
    required = "cifar-cli: error: Parser key \"{}\": '{}': the following arguments are required: {}"
    plateau = "lightning.pytorch.cli.ReduceLROnPlateau"
    assert fails(capsys, "fit", "--lr_scheduler", "ReduceLROnPlateau") == required.format(
        "lr_scheduler", plateau, "monitor"
    )
    assert fails(capsys, "fit", "--lr_scheduler", "StepLR") == required.format(
        "lr_scheduler", "torch.optim.lr_scheduler.StepLR", "step_size"
    )  # (not also "Import path torch.optim.lr_scheduler.StepLR does not correspond to a subclass of ...")
    assert fails(capsys, "fit", "--trainer.callbacks+=EarlyStopping") == required.format(
        "trainer.callbacks", "lightning.pytorch.callbacks.EarlyStopping", "monitor"
    )
    assert fails(capsys, "fit", "--trainer.callbacks+=EarlyStop") == (
        "cifar-cli: error: --trainer.callbacks+=EarlyStop: no callback class is named EarlyStop; did you mean "
        "EarlyStopping? (a class by its name, or by its import path: mymodule.MyClass)"
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--optimizer", "adam"], "--optimizer adam: no optimizer class is named adam; did you mean Adam?"),
        (["--model.optimizer=sgd"], "--model.optimizer sgd: no optimizer class is named sgd; did you mean SGD?"),
        (
            ["--lr_scheduler", "StepLr"],
            "--lr_scheduler StepLr: no scheduler class is named StepLr; did you mean StepLR?",
        ),
        (
            ["--trainer.logger", "csvlogger"],
            "--trainer.logger csvlogger: no logger class is named csvlogger; did you mean CSVLogger?",
        ),
        (
            ["--trainer.logger+=WandLogger"],
            "--trainer.logger+=WandLogger: no logger class is named WandLogger; did you mean WandbLogger?",
        ),
        (
            ["--data", "ImageFolder"],
            "--data ImageFolder: no data module class is named ImageFolder; did you mean ImageFolderDataModule?",
        ),
        (["--model.net", "Fastnet"], "--model.net Fastnet: no network class is named Fastnet; did you mean FastNet?"),
        (
            ["--trainer.callbacks+=torch.nn.Linear"],
            "--trainer.callbacks+=torch.nn.Linear: torch.nn.Linear is not a callback "
            "(lightning.pytorch.callbacks.Callback)",
        ),
    ],
)
def test_error_unknown_class_name_says_what_it_is_not(args: list[str], said: str, capsys) -> None:
    """A class name jsonargparse cannot resolve for a flag that takes a class: its line read "Expected a path but
    adam either not accessible or invalid Expected a dot import path string: adam", for `--optimizer adam`."""
    assert fails(capsys, "fit", *args).startswith(f"cifar-cli: error: {said}")


def test_error_argument_of_the_last_callback_or_logger_names_that_class(capsys) -> None:
    """`--trainer.callbacks.KEY` (and `.logger.KEY`) sets an argument of the list's last entry, as LightningCLI
    documents. Without a `+=` before it, that entry is the default list's last, FitTimer, which the user never named:
    jsonargparse's line named it, then "'lightning.Callback':" and nothing after the colon."""
    assert fails(capsys, "fit", "--trainer.callbacks.monitor", "val_acc") == (
        "cifar-cli: error: --trainer.callbacks.monitor val_acc: the last callback of the list, FitTimer (of the "
        "default list or a config's), has no argument monitor; add the callback it is for first, then its arguments: "
        "--trainer.callbacks+=CLASS --trainer.callbacks.monitor val_acc"
    )
    assert fails(capsys, "fit", "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitr=val_acc") == (
        "cifar-cli: error: --trainer.callbacks.monitr val_acc: the last callback of the list, EarlyStopping, has no "
        "argument monitr; did you mean monitor?"
    )
    # A value the class refuses keeps jsonargparse's line, not the base class's refusal of every argument after it.
    said = fails(capsys, "fit", "--trainer.callbacks+=cifar_cli.averaging.EMA", "--trainer.callbacks.decay", "2")
    assert 'Parser key "decay": Not of type ClosedUnitInterval: 2 does not conform' in said, said
    said = fails(capsys, "fit", "--trainer.logger", "CSVLogger", "--trainer.logger.project", "x")
    assert said.startswith(
        "cifar-cli: error: --trainer.logger.project x: the logger, CSVLogger, has no argument project; its arguments: "
        "save_dir, name, version, prefix, flush_logs_every_n_steps"
    ), said


def test_error_wrong_type_in_flag_and_config(capsys, tmp_path: Path) -> None:
    assert 'Parser key "model.learning_rate"' in fails(capsys, "fit", "--model.learning_rate", "fast")
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_epochs: two\n")
    assert "max_epochs" in fails(capsys, "fit", "--config", str(config))
    config.write_text("model:\n  dropout: 0.5\n")
    assert "dropout" in fails(capsys, "fit", "--config", str(config))


def test_error_missing_config(capsys) -> None:
    assert "File does not exist" in fails(capsys, "fit", "--config", "nope.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_error_gpu_without_gpu(capsys, fake_cifar10: Path) -> None:
    message = fails(capsys, "fit", *cifar_args(fake_cifar10), "--config", str(REPO / "configs" / "gpu.yaml"))
    assert "no CUDA GPU" in message and "configs/cpu.yaml" in message
    assert not Path("runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_error_fast_recipe_without_gpu_points_to_the_cpu_recipe(capsys, fake_cifar10: Path) -> None:
    # fast.yaml has its CPU twin; configs/cpu.yaml in its place would train the tutorial recipe instead.
    configs = ["--config", str(REPO / "configs" / "cifar10-jpg.yaml"), "--config", str(REPO / "configs" / "fast.yaml")]
    message = fails(capsys, "fit", *configs)
    assert message.endswith(
        "this machine has no CUDA GPU that PyTorch can use; run with --config configs/fast-cpu.yaml in place of "
        "configs/fast.yaml, or --trainer.accelerator cpu"
    )
    assert not Path("runs").exists()


def test_error_batch_size_not_positive(capsys) -> None:
    assert "batch_size" in fails(capsys, "fit", "--data.batch_size", "0")


def test_error_val_size_outside_train(capsys, fake_cifar10: Path) -> None:
    message = fails(capsys, "fit", *cifar_args(fake_cifar10), "--data.val_size", "200")
    assert "200 of 200 training images" in message
    assert "val_size" in fails(capsys, "fit", *cifar_args(fake_cifar10), "--data.val_size", "0")
    assert not Path("runs").exists()


def test_error_image_folder_without_class_folders(capsys, tmp_path: Path) -> None:
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.jpg").write_bytes(b"")
    message = fails(capsys, "fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "flat"))
    assert "has no class folders" in message
    assert not Path("runs").exists()


def test_error_no_network_for_download(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.utils._get_redirect_url", offline)
    monkeypatch.setattr("torchvision.datasets.utils._urlretrieve", offline)
    message = fails(capsys, "fit", "--data.data_dir", str(tmp_path / "empty"))
    assert "could not download CIFAR10" in message and "cifar-10-python.tar.gz" in message
    assert not Path("runs").exists() and not (tmp_path / "empty").exists()  # no empty folder left by the download


def test_error_ckpt_path_missing_or_not_a_checkpoint(capsys, tmp_path: Path) -> None:
    assert "no such file" in fails(capsys, "test", "--ckpt_path", "nothing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert "is not a Lightning checkpoint" in fails(capsys, "test", "--ckpt_path", str(junk))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden_dim": 64}}, other)
    assert "was not written by cifar-cli" in fails(capsys, "test", "--ckpt_path", str(other))


def test_model_flags_beside_ckpt_path_override_the_checkpoints(capsys, fake_cifar10: Path) -> None:
    """The checkpoint's hyperparameters are the defaults of `test --ckpt_path`: a flag beside it wins (test-time
    augmentation for an old checkpoint), and a network other than the checkpoint's is refused, not ignored."""
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1", "--model.learning_rate", "1e-3"])
    (ckpt,) = checkpoints()
    main(["test", "--ckpt_path", str(ckpt), "--model.tta", "flip", "--trainer.logger", "CSVLogger",
          "--trainer.logger.save_dir", "t"])  # fmt: skip
    (config,) = Path("t").glob("*/config.yaml")
    model = yaml.safe_load(config.read_text())["model"]
    assert model["tta"] == "flip" and model["learning_rate"] == 1e-3  # the flag, and the checkpoint's own value
    # The learning rate and the optimizer as well: the checkpoint's are defaults, not a second, disagreeing value.
    main(["test", "--ckpt_path", str(ckpt), "--model.learning_rate", "0.01", "--optimizer", "SGD",
          "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "t2"])  # fmt: skip
    (config,) = Path("t2").glob("*/config.yaml")
    model = yaml.safe_load(config.read_text())["model"]
    assert model["learning_rate"] == 0.01 and model["optimizer"]["class_path"] == "torch.optim.SGD"
    assert model["optimizer"]["init_args"]["lr"] == 0.01
    capsys.readouterr()
    message = fails(capsys, "test", "--ckpt_path", str(ckpt), "--model.net", "FastNet")
    assert (
        f"--model.net cifar_cli.nets.FastNet: --ckpt_path {ckpt} holds the weights of a cifar_cli.nets.TutorialCNN"
        in message
    )
    # fit goes on with the checkpoint's optimizer state: another optimizer class is refused in one line.
    message = fails(capsys, "fit", "--ckpt_path", str(ckpt), "--optimizer", "SGD", *CSV_LOGGER)
    assert "--optimizer torch.optim.SGD: the checkpoint's run trains with torch.optim.Adam" in message


def test_checkpoint_finds_its_relative_data_root_from_another_folder(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`fit --data.root images` records the relative path; `test --ckpt_path` run from another folder still finds
    the images, from the folder fit ran in."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", "images", "--data.val_size", "30",
          "--trainer.max_epochs", "1", *CSV_LOGGER])  # fmt: skip
    (ckpt,) = checkpoints()
    ckpt = ckpt.resolve()
    elsewhere = image_folder.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    main(["test", "--ckpt_path", str(ckpt), *CSV_LOGGER])
    assert "test_acc" in capsys.readouterr().out
    assert values(metrics_rows("runs"), "test_acc")  # tested on the 30 images of images/test/


def test_run_without_logger_replaces_only_an_earlier_runs_config(capsys, fake_cifar10: Path) -> None:
    """Without a logger the run's folder is the current one: the second run's config.yaml replaces the first's, but
    a config.yaml of the user's own (here the very file passed to --config) is refused before training."""
    quick = [*cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]  # fmt: skip
    main(["fit", *quick])
    main(["fit", *quick, "--model.learning_rate", "0.01"])
    assert yaml.safe_load(Path("config.yaml").read_text())["model"]["learning_rate"] == 0.01
    capsys.readouterr()
    Path("config.yaml").write_text(own := "# my settings\nmodel:\n  learning_rate: 0.003\n")
    shutil.rmtree("checkpoints")
    message = fails(capsys, "fit", *quick, "--config", "config.yaml")
    assert "config.yaml is not the config.yaml of an earlier run" in message
    assert Path("config.yaml").read_text() == own and not Path("checkpoints").exists()


def test_two_runs_without_logger_at_once_in_one_folder(capsys, fake_cifar10: Path) -> None:
    """Runs without a logger share their folder: a second one started while the first runs (here the first's hold on
    the folder, taken from this process) stops in one line, before writing there. They overwrote each other's
    checkpoints of the same name, `last.ckpt` and config.yaml, and each printed its best checkpoint as its own."""
    quick = [*cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
             "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
             "--trainer.default_root_dir", "shared"]  # fmt: skip
    Path("shared").mkdir()
    first = os.open("shared", os.O_RDONLY)
    fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    capsys.readouterr()
    message = fails(capsys, "fit", *quick)
    assert message.startswith("cifar-cli: error: another cifar-cli command without a logger is running in shared:")
    assert not list(Path("shared").iterdir())
    os.close(first)  # the first run ended
    main(["fit", *quick])
    main(["fit", *quick])  # the folder is free again once a run ends
    assert sorted(p.name for p in Path("shared/checkpoints").glob("epoch*.ckpt")) == [
        "epoch=0-step=1-v1.ckpt",
        "epoch=0-step=1.ckpt",
    ]


def test_two_csv_logger_runs_started_at_once_get_a_folder_each(
    capsys, fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSVLogger's next version is counted as the command starts, and its folder made once the data is ready: a
    second run started meanwhile took the same version, and stopped on the first's config.yaml, telling the user to
    pass a --trainer.logger.version they never gave (or, a moment earlier, wrote into the first's folder). Here the
    other run makes that folder while this one checks its data."""
    check_data = cli.check_data

    def other_run_starts(*args: object) -> None:
        check_data(*args)
        other = Path("runs/version_0")
        other.mkdir(parents=True)
        (other / "config.yaml").write_text(cli.RUN_CONFIG_MARK + "trainer: {}\n")

    monkeypatch.setattr(cli, "check_data", other_run_starts)
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1", *CSV_LOGGER])  # fmt: skip
    assert "Run folder: runs/version_1" in capsys.readouterr().out
    assert sorted(p.name for p in Path("runs/version_0").iterdir()) == ["config.yaml"]


def test_predict_without_logger_replaces_only_an_earlier_runs_predictions(capsys, fake_cifar10: Path) -> None:
    """Without a logger predictions.csv goes to the current folder: an earlier predict's is replaced, a file of the
    user's of that name is refused before predicting."""
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    (ckpt,) = checkpoints()
    predict = ["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"]
    main(predict)
    Path("predictions.csv").write_text("image,predicted,confidence,label\n0,cat,0.5,cat\n")  # an earlier run's
    main(predict)
    assert len(Path("predictions.csv").read_text().splitlines()) == 51
    Path("predictions.csv").write_text(own := "sample,my label\n1,dog\n")
    capsys.readouterr()
    message = fails(capsys, *predict)
    assert message == (
        "cifar-cli: error: predictions.csv is not the predictions of an earlier predict, and predict without a "
        "logger writes there: run in another folder, or pass --trainer.default_root_dir"
    )
    assert Path("predictions.csv").read_text() == own


def test_error_ckpt_from_another_model(capsys, fake_cifar10: Path, fake_cifar100: Path) -> None:
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    (ckpt,) = checkpoints()
    capsys.readouterr()  # the fit's own lines (its data placement)
    message = fails(capsys, "test", "--ckpt_path", str(ckpt), "--data", "CIFAR100DataModule",
                    "--data.data_dir", str(fake_cifar100))  # fmt: skip
    assert (
        "was trained on other classes: it has 10 classes, the data 100 (the data lacks airplane, automobile," in message
    )


@pytest.mark.parametrize("value", ["true", "1", "Yes"])
def test_debug_env_brings_the_traceback_back(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """jsonargparse reads the switch too, and took only true and false: `1` ended in its ValueError."""
    from cifar_cli.errors import UsageError

    monkeypatch.setenv("JSONARGPARSE_DEBUG", value)
    with pytest.raises(UsageError, match="no such file"):
        main(["test", "--ckpt_path", "nothing.ckpt"])


def test_debug_env_of_another_value_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "verbose")
    assert fails(capsys, "fit") == "cifar-cli: error: JSONARGPARSE_DEBUG=verbose: set it to true, or false"


def test_error_test_without_test_split(capsys, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images" / "train", {"a": 20, "b": 20})
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "images"), "--data.val_size", "10",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    import wandb

    wandb.finish()
    runs_before = sorted(Path("runs/wandb").glob("offline-run-*"))
    capsys.readouterr()
    message = fails(capsys, "test", "--ckpt_path", str(checkpoints()[0]))
    folder = tmp_path / "images" / "test"
    assert message.endswith(f"has no test split: add {folder}/<class>/ with images the model has not trained on, "
                            "or hold out training images when you fit (--data.test_size N)")  # fmt: skip
    assert sorted(Path("runs/wandb").glob("offline-run-*")) == runs_before  # no W&B run for the failed test


@pytest.mark.parametrize(
    ("cuda", "gpu_bf16", "cpu_bf16", "accelerator", "expected"),
    [
        (False, False, "AMX", "cpu", "bf16-mixed"),
        (False, False, "AVX512-BF16", None, "bf16-mixed"),
        (False, False, None, "auto", "32-true"),
        (True, True, "AMX", "gpu", "bf16-mixed"),
        (True, False, None, "auto", "16-mixed"),
        (True, True, "AMX", "cpu", "bf16-mixed"),
        (False, False, "AMX", "mps", None),
    ],
)
def test_default_precision_follows_the_hardware(monkeypatch, cuda, gpu_bf16, cpu_bf16, accelerator, expected) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(precision, "cpu_bf16", lambda: cpu_bf16)
    chosen = precision.default_precision(accelerator)
    assert (chosen and chosen[0]) == expected


@pytest.mark.parametrize(("major", "name", "expected"), [(7, "Tesla T4", "16-mixed"), (9, "NVIDIA H100", "bf16-mixed")])
def test_gpu_precision_is_bf16_only_where_the_gpu_computes_it(monkeypatch, major, name, expected) -> None:
    """torch's `is_bf16_supported()` also says yes where bf16 is only emulated (a T4, a V100: a bf16 tensor can be
    made there), about as slow as fp32; those GPUs have fp16 tensor cores, so 16-mixed. torch's own check runs here,
    over a GPU of compute capability `major` whose bf16 tensors can be made."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(major=major, name=name))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert precision.default_precision("gpu") == (expected, f"{name} {'has no' if major < 8 else 'supports'} bf16")


# What initialises CUDA in this process (torch/cuda/__init__.py, torch 2.14): after it, ranks forked from this process
# cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess").
CUDA_INIT = ("_lazy_init", "get_device_name", "get_device_properties", "get_device_capability", "is_bf16_supported")


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int = 2) -> list[str]:
    """`count` CUDA GPUs on this machine, as torch and Lightning count them; the calls that would initialise CUDA
    in this process are listed, and raise."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    called: list[str] = []
    for name in CUDA_INIT:

        def init(*args: object, _name: str = name, **kwargs: object) -> None:
            called.append(_name)
            raise RuntimeError(f"torch.cuda.{_name} initialised CUDA in the process that forks")

        monkeypatch.setattr(torch.cuda, name, init)
    return called


@pytest.fixture
def fresh_gpu_probe() -> Iterator[None]:
    """`precision.gpu_apart` asked anew: it keeps its answer for the process."""
    precision.gpu_apart.cache_clear()
    yield
    precision.gpu_apart.cache_clear()


class Launched(Exception):
    """Raised by the launcher in place of forking the ranks."""


@pytest.mark.parametrize(
    "strategy",
    [
        ["ddp_fork"],
        ["ddp_notebook"],
        ["ddp_fork_find_unused_parameters_true"],
        ["lightning.pytorch.strategies.DDPStrategy", "--trainer.strategy.start_method", "fork"],
    ],  # fmt: skip
)
def test_a_strategy_that_forks_has_the_gpu_read_in_a_child_process(
    fake_cifar10: Path, monkeypatch, caplog, strategy: list[str]
) -> None:
    """On a GPU with a strategy that forks its ranks, the precision is chosen without initialising CUDA in the
    process that forks (the name and bf16 of the GPU read in a child process): the ranks could not use CUDA. Nor
    does the optimizer's check, whose Adam step asked torch for the current CUDA stream."""
    called = fake_gpus(monkeypatch)
    monkeypatch.setattr(precision, "gpu_apart", lambda: ("Some GPU", True))
    launched = {}

    def launch(self: _MultiProcessingLauncher, function: object, *args: object, trainer: Trainer, **kwargs: object):
        launched.update(start_method=self._start_method, precision=trainer.precision)
        raise Launched

    monkeypatch.setattr(_MultiProcessingLauncher, "launch", launch)
    with caplog.at_level(logging.INFO), pytest.raises(Launched):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.strategy", *strategy])
    assert not called
    assert launched == {"start_method": "fork", "precision": "bf16-mixed"}
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Precision")]
    assert said == ["Precision bf16-mixed (Some GPU supports bf16); --trainer.precision overrides"]


def test_other_strategies_read_the_gpu_in_this_process(monkeypatch) -> None:
    """The child process costs a start of torch and of CUDA: only where the strategy forks."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(precision, "gpu_apart", lambda: pytest.fail("read in a child process"))
    for strategy in (None, "auto", "ddp", "ddp_spawn", "fsdp", DDPStrategy(start_method="forkserver")):
        assert precision.default_precision("gpu", strategy) == ("16-mixed", "Some GPU has no bf16")
    # In a notebook Lightning's "auto" forks (ddp_fork) for several GPUs.
    monkeypatch.setattr(precision, "_IS_INTERACTIVE", True)
    assert precision.forks("auto") and precision.forks(None) and not precision.forks("ddp_spawn")


def test_the_gpu_probe_answers_in_a_child_process(fresh_gpu_probe) -> None:
    """The child process that reads the GPU, for real: without a GPU it says so, and quickly."""
    found = precision.gpu_apart()
    if torch.cuda.device_count() == 0:
        assert found == "a child process sees no CUDA GPU"
    else:  # its name and bf16 compared with torch's in tests/test_gpu.py, where CUDA may start in this process
        assert isinstance(found, tuple) and isinstance(found[0], str) and isinstance(found[1], bool), found


@pytest.mark.parametrize(
    ("probe", "timeout", "why"),
    [
        ("raise RuntimeError('No CUDA GPUs are available')", 60, "RuntimeError: No CUDA GPUs are available"),
        ("import sys; sys.exit(3)", 60, "exit code 3"),
        ("import time; time.sleep(60)", 1, "it took over 1 s"),
        ("print('Some GPU')", 60, "it printed 'Some GPU'"),
        ("print('[\"Some GPU\", false]')", 60, None),
    ],
)
def test_a_gpu_probe_that_fails_leaves_16_mixed_and_says_why(fresh_gpu_probe, monkeypatch, probe, timeout, why):
    """Where the child process cannot read the GPU, fp16 mixed precision, which every CUDA GPU runs, and the
    precision line says why; no traceback."""
    called = fake_gpus(monkeypatch)
    monkeypatch.setattr(precision, "GPU_PROBE", probe)
    monkeypatch.setattr(precision, "PROBE_TIMEOUT_S", timeout)
    config = {"strategy": "ddp_fork", "accelerator": "auto"}
    chosen = precision.choose_precision(config)
    unread = "could not tell whether the GPU supports bf16 without initialising CUDA in the process that forks"
    said = "Some GPU has no bf16" if why is None else f"{unread}: {why}"  # (None: a probe that answers)
    assert chosen == ("16-mixed", f"Precision 16-mixed ({said}); --trainer.precision overrides")
    assert config["precision"] == "16-mixed" and not called


def test_a_gpu_is_counted_without_initialising_cuda(monkeypatch) -> None:
    """`torch.cuda.is_available()` asks the CUDA runtime (cudaGetDeviceCount, which initialises the driver in this
    process) unless PYTORCH_NVML_BASED_CUDA_CHECK=1; `torch.cuda.device_count()`, as Lightning counts, asks NVML."""
    if not torch.cuda._is_compiled() or torch.cuda.is_initialized():
        pytest.skip("needs torch built with CUDA, not yet initialised in this process")
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    asked = []
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", lambda: asked.append("the CUDA runtime") or 1)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 1)
    assert precision.on_cuda("gpu") and precision.on_cuda(None) and not precision.on_cuda("cpu")
    assert not asked


@pytest.mark.parametrize(
    ("given", "shown"),
    [([], False), (["--trainer.precision", "16-mixed"], False), (["--trainer.precision", "32-true"], True)],
)
def test_lightnings_tensor_core_tip_is_shown_for_fp32_runs_only(
    fake_cifar10: Path, monkeypatch, caplog, given: list[str], shown: bool
) -> None:
    """Lightning's advice to lower torch's float32 matmul precision, on an Ampere GPU, is for fp32 runs: under
    bf16-mixed (chosen here) or 16-mixed the matmuls run in 16 bits already. It was shown at every GPU run. The run
    stops where Lightning sets up the GPU, right after its check; torch's setting is left as it is."""
    from lightning.fabric.accelerators.cuda import _check_cuda_matmul_precision

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))

    def set_device(device: object) -> None:
        raise Launched  # what CUDAAccelerator.setup_device does after the check

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert torch.get_float32_matmul_precision() == "highest"
    _check_cuda_matmul_precision.cache_clear()  # Lightning's, once per process
    try:
        with caplog.at_level(logging.INFO), pytest.raises(Launched):
            main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", *given])
    finally:
        _check_cuda_matmul_precision.cache_clear()
    said = [r.getMessage() for r in caplog.records]
    tip = [m for m in said if m.startswith("You are using a CUDA device ('Some GPU') that has Tensor Cores")]
    assert len(tip) == int(shown), said
    precision_line = "Precision bf16-mixed (Some GPU supports bf16); --trainer.precision overrides"
    assert (precision_line in said) == (not given)
    assert torch.get_float32_matmul_precision() == "highest"


def test_precision_is_chosen_once_said_in_one_line_and_recorded(fake_cifar10: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX")
    with caplog.at_level(logging.INFO):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Precision")]
    assert said == ["Precision bf16-mixed (this CPU has AMX); --trainer.precision overrides"]
    (folder,) = run_folders()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    assert any(r.getMessage().startswith("Using bfloat16 Automatic Mixed Precision") for r in caplog.records)


def test_a_runs_config_yaml_trains_the_same_weights_again(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """`fit --config runs/.../config.yaml` repeats the run bit for bit: stacked configs, flags, `--optimizer` and
    `--lr_scheduler`, and the seed `--seed_everything true` drew, all in the saved config as it is; whatever
    `--data.placement` and `--data.decode_workers`, with the image cache built anew or read. Another seed trains
    other weights."""
    monkeypatch.setattr("cifar_cli.data.images.PARALLEL_FROM", 1)  # the tiny folder decoded by a pool too
    folder = {"root": str(image_folder), "val_size": 30, "decode_workers": 2}
    data = {"class_path": "cifar_cli.data.ImageFolderDataModule", "init_args": folder}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": data}))
    (tmp_path / "recipe.yaml").write_text("model:\n  label_smoothing: 0.1\ndata:\n  init_args: {augment: true}\n")
    main(["fit", "--config", "data.yaml", "--config", "recipe.yaml", "--data.batch_size", "16",
          "--optimizer", "SGD", "--optimizer.lr", "0.05", "--optimizer.momentum", "0.9",
          "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--seed_everything", "true",
          "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", *CSV_LOGGER])  # fmt: skip
    saved = Path("runs/version_0/config.yaml")
    seed = yaml.safe_load(saved.read_text())["seed_everything"]
    # The versions the arithmetic depends on, beside the config that repeats the run.
    header = [line for line in saved.read_text().splitlines() if line.startswith("# ")]
    assert {f"# torch=={torch.__version__}", f"# torchvision=={torchvision.__version__}"} <= set(header), header
    main(["fit", "--config", str(saved)])  # the cache the run built, read
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    main(["fit", "--config", str(saved), "--data.placement", "disk", "--data.decode_workers", "1"])
    main(["fit", "--config", str(saved), "--seed_everything", str(seed + 1)])

    def weights(run: str) -> dict[str, torch.Tensor]:
        return torch.load(Path("runs", run, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]

    def metrics(run: str) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "fit_time"} for row in metrics_rows(f"runs/{run}")]

    first = weights("version_0")
    for run in ("version_1", "version_2"):
        again = weights(run)
        assert first.keys() == again.keys()
        assert all(torch.equal(tensor, again[name]) for name, tensor in first.items()), run
        assert metrics("version_0") == metrics(run)
    assert not torch.equal(first["net.conv1.weight"], weights("version_3")["net.conv1.weight"])


def test_seed_everything_true_draws_a_seed_said_and_recorded(image_folder: Path, caplog) -> None:
    """`--seed_everything true` is a random seed, as --help says (Lightning's seed_everything() alone takes 0): said
    in the seed line and written into config.yaml, so that the run can be repeated."""
    seeds = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                  "--trainer.logger", "false", "--seed_everything", "true"])  # fmt: skip
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Seed set to")]
        seed = yaml.safe_load(Path("config.yaml").read_text())["seed_everything"]
        assert said == [f"Seed set to {seed}"]
        seeds.append(seed)
    assert seeds[0] != seeds[1] and all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in seeds), seeds


def test_an_evaluation_cut_short_sees_the_same_images_whatever_the_seed(image_folder: Path) -> None:
    """With `--trainer.limit_val_batches` (configs/debug.yaml), `validate --ckpt_path` reproduces the run's own
    validation, and `test` gives the same numbers, whatever `--seed_everything` the command has: the images an
    evaluation cut short sees are the data's, not the seed's. Before, their order followed the command's seed, so
    `validate` (seed 42 by default) scored other images than the seed-7 run had, and runs of other seeds were
    compared on other images."""
    data = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
            "--data.batch_size", "8", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1"]  # fmt: skip
    main(["fit", *data, *CSV_LOGGER, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--seed_everything", "7"])  # fmt: skip
    (ckpt,) = checkpoints()
    fitted = values(metrics_rows("runs"), "val_loss")
    scores = {}
    for seed in ("42", "8"):
        for stage in ("validate", "test"):
            save_dir = f"{stage}-{seed}"
            main([stage, "--ckpt_path", str(ckpt), *data, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
                  save_dir, "--seed_everything", seed])  # fmt: skip
            scores[stage, seed] = values(metrics_rows(save_dir), "test_loss" if stage == "test" else "val_loss")
    assert scores["validate", "42"] == scores["validate", "8"] == fitted
    assert scores["test", "42"] == scores["test", "8"]


def test_precision_flag_overrides_the_choice(fake_cifar10: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: "AMX")
    with caplog.at_level(logging.INFO):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.precision", "32-true"])
    assert not [r for r in caplog.records if r.getMessage().startswith("Precision")]
    assert any(r.getMessage().startswith("GPU available") for r in caplog.records)  # the banner was captured
    (folder,) = run_folders()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["precision"] == "32-true"
    assert not any("Automatic Mixed Precision" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("given", ["16", "16-mixed"])
def test_fp16_on_a_cpu_is_recorded_and_said_as_the_bf16_that_ran(
    fake_cifar10: Path, given: str, caplog, recwarn
) -> None:
    """Lightning runs fp16 mixed precision on a CPU as bf16-mixed: config.yaml recorded `precision: 16`, which the
    run did not use, and only Lightning's warning, with its site-packages path, said what ran."""
    with caplog.at_level(logging.INFO):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
              "--trainer.accelerator", "cpu", "--trainer.precision", given])  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Precision")]
    assert said == [f"Precision bf16-mixed (--trainer.precision {given}: a CPU has no fp16 mixed precision)"]
    assert not [w for w in recwarn if "AMP with fp16 is not supported on CPU" in str(w.message)]
    # Nor Lightning's advice on the alias 16, to set 16-mixed: that runs as bf16-mixed too on a CPU.
    assert not [w for w in recwarn if "supported for historical reasons" in str(w.message)]
    (folder,) = run_folders()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"


def test_lightnings_warnings_on_building_the_trainer_are_kept_where_no_precision_line_says_what_runs(
    fake_cifar10: Path, recwarn
) -> None:
    main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
          "--trainer.precision", "bf16"])  # fmt: skip
    assert [w for w in recwarn if str(w.message).startswith("`precision=bf16` is supported for historical reasons")]


def test_fp16_true_on_a_cpu_is_said_to_be_slow(fake_cifar10: Path, caplog) -> None:
    """16-true on a CPU runs, as asked, in software fp16: a step of the tutorial CNN took 3 s against 10 ms in bf16,
    with nothing said."""
    with caplog.at_level(logging.INFO):
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
              "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
              "--trainer.precision", "16-true"])  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Precision")]
    assert said == [
        "Precision 16-true: a CPU computes fp16 in software, hundreds of times slower than bf16-mixed or 32-true "
        "(--trainer.precision)"
    ]
    (folder,) = run_folders()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["precision"] == "16-true"


@pytest.mark.parametrize(("chosen", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_true_precisions_train_and_test_in_their_dtype(fake_cifar10: Path, chosen: str, dtype: torch.dtype) -> None:
    """The weights in the precision's dtype, and the batches too (they failed at the first step: float32 images
    into bfloat16 convolutions)."""
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1", "--trainer.precision", chosen])
    (ckpt,) = checkpoints()
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {t.dtype for name, t in weights.items() if name.endswith(".weight")} == {dtype}
    main(["test", "--ckpt_path", str(ckpt), *CSV_LOGGER])
    assert 0 <= values(metrics_rows("runs/version_1"), "test_acc")[-1] <= 1


def test_evaluating_without_a_checkpoint_says_the_weights_are_untrained(fake_cifar10: Path, capfd) -> None:
    said = "cifar-cli: test without --ckpt_path: the network's weights are untrained (give --ckpt_path FILE, or last"
    main(["test", *cifar_args(fake_cifar10), *CSV_LOGGER])
    assert said in capfd.readouterr().err
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "1"])
    main(["test", *cifar_args(fake_cifar10), *CSV_LOGGER, "--ckpt_path", "last"])
    assert "without --ckpt_path" not in capfd.readouterr().err


def test_wandb_failing_to_start_live_is_one_line(fake_cifar10: Path, capfd, monkeypatch: pytest.MonkeyPatch) -> None:
    """Going live without a login where W&B cannot ask for one (a batch job): its error, not its traceback."""
    import functools

    import wandb

    # wandb.init's signature kept: jsonargparse reads the W&B logger's keyword arguments (`mode`) from it.
    @functools.wraps(wandb.init)
    def no_login(**kwargs: object) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger.offline", "false"])
    assert stop.value.code == 1
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "cifar-cli: error: W&B: No API key configured. Use `wandb login` to log in. (its offline: false asks for a "
        "live run; the default logs offline: --trainer.logger.offline true, then `wandb sync`)"
    )
    assert "Traceback" not in err
    # WANDB_MODE=online makes the default a live run: the line said the default logs offline.
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "cifar-cli: error: W&B: No API key configured. Use `wandb login` to log in. (WANDB_MODE=online asks for a "
        "live run; offline: --trainer.logger.offline true, then `wandb sync`)"
    )


def test_a_wandb_logger_named_without_offline_logs_offline(
    fake_cifar10: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A W&B logger named in place of none (configs/debug.yaml's `logger: false`) started from its class's `offline:
    false`: a live run, which stopped without a W&B login blaming an `offline: false` the user never wrote, and
    with one logged live without a word. It logs offline as the default logger does, in the printed config too."""
    named = ["--trainer.logger", "false", "--trainer.logger", "WandbLogger"]
    monkeypatch.delenv("WANDB_MODE")
    for extra, offline in (([], [True]), (["--trainer.logger+=CSVLogger"], [True, None])):
        with pytest.raises(SystemExit):
            main(["fit", *cifar_args(fake_cifar10), *named, *extra, "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
        entries = printed if isinstance(printed, list) else [printed]
        assert [entry["init_args"].get("offline") for entry in entries] == offline
    with pytest.raises(SystemExit):  # given, it is kept
        main(["fit", *cifar_args(fake_cifar10), *named, "--trainer.logger.offline", "false", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["offline"] is False
    monkeypatch.setenv("WANDB_MODE", "online")  # where the default logs live, so does the one named
    with pytest.raises(SystemExit):
        main(["fit", *cifar_args(fake_cifar10), *named, "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]["offline"] is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", *cifar_args(fake_cifar10), *named, "--trainer.logger.save_dir", "runs", "--trainer.max_epochs", "1"])
    (config,) = Path("runs").glob("*/*/config.yaml")
    assert yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["offline"] is True
    assert list(Path("runs", "wandb").glob("offline-run-*"))


def failing_wandb_init(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import functools

    import wandb

    @functools.wraps(wandb.init)  # its signature kept: jsonargparse reads the W&B logger's arguments from it
    def init(**kwargs: object) -> None:
        raise error

    monkeypatch.setattr(wandb, "init", init)


def wandb_error(name: str, message: str) -> Exception:
    """One of W&B's errors, by its class name: the one W&B raises where its service process ends at start-up
    (`ServicePollForTokenError`), or one of `wandb.errors`."""
    import wandb
    from wandb.sdk.lib.service.service_port_file import ServicePollForTokenError

    return (
        ServicePollForTokenError(message)
        if name == "ServicePollForTokenError"
        else getattr(wandb.errors, name)(message)
    )


@pytest.mark.parametrize(
    ("args", "env", "error", "said"),
    [
        # Real errors of W&B offline (wandb 0.31), for the default run and for one that asked to go live.
        pytest.param(["--trainer.logger.project", "a/b"], {}, None, "Invalid project name 'a/b': cannot contain",
                     id="project"),
        pytest.param(["--trainer.logger.offline", "false", "--trainer.logger.project", "a/b"], {}, None,
                     "Invalid project name", id="project-live"),
        pytest.param(["--trainer.logger.id", "a/b"], {}, None, "Run ID cannot contain the characters", id="id"),
        # W&B checks the key offline too, and an offline run needs none.
        pytest.param([], {"WANDB_API_KEY": " key"}, None, "API key cannot start or end with whitespace", id="key"),
        pytest.param([], {}, "ServicePollForTokenError", "wandb-core exited with code 2", id="service"),
        pytest.param([], {}, "CommError", "no answer from api.wandb.ai", id="offline-comm"),
    ],
)  # fmt: skip
def test_wandb_errors_other_than_going_live_are_one_line_without_the_live_run_advice(
    fake_cifar10: Path, capfd, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict, error: str | None, said: str
) -> None:
    """The advice to log offline was given for every W&B error at start-up: to a default (offline) run with a bad
    project name too, "its offline: false asks for a live run"."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if error is not None:
        failing_wandb_init(monkeypatch, wandb_error(error, said))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", *args])
    assert stop.value.code == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cifar-cli: error: W&B: {said}"), last
    assert "live run" not in last and "Traceback" not in err


def test_wandb_service_stopping_at_start_up_is_one_line(
    fake_cifar10: Path, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wandb-core panics on an identity token file it cannot read (beside an API key, offline too): W&B raised an
    error without a message, and the command ended in two tracebacks (the second from W&B's teardown at exit)."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(Path("missing-token").absolute()))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1"])
    assert stop.value.code == 1
    err = capfd.readouterr().err
    assert "failed to read identity token file" in err  # wandb-core's own line
    assert err.strip().splitlines()[-1] == (
        "cifar-cli: error: W&B: its service (wandb-core) stopped without an answer (its own error is above)"
    )
    assert "Traceback" not in err


@pytest.mark.parametrize("error", ["AuthenticationError", "CommError"])
def test_wandb_refusing_or_unreachable_live_gets_the_live_run_advice(
    fake_cifar10: Path, capfd, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    failing_wandb_init(monkeypatch, wandb_error(error, "no answer from api.wandb.ai"))
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), "--trainer.max_epochs", "1", "--trainer.logger.offline", "false"])
    assert stop.value.code == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "cifar-cli: error: W&B: no answer from api.wandb.ai (its offline: false asks for a live run; the default logs "
        "offline: --trainer.logger.offline true, then `wandb sync`)"
    )


def test_diverged_training_stops_in_one_line_and_checkpoints_no_nan_weights(fake_cifar10: Path, capfd) -> None:
    """A loss gone NaN: exit 1 with one line, before validation; before, the metrics dropped the NaN, the run
    ended 0 and its NaN weights were the best checkpoint."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_epochs", "2",
              "--trainer.log_every_n_steps", "2", "--model.learning_rate", "1e12"])  # fmt: skip
    assert stop.value.code == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cifar-cli: error: training diverged: train_loss is nan by step 2; lower "
                              "--model.learning_rate (now 1e+12)"), err[-3:]  # fmt: skip
    assert "Traceback" not in "\n".join(err)
    assert not checkpoints()


def test_max_steps_within_the_first_epoch_ends_with_a_checkpoint_despite_early_stopping(fake_cifar10: Path) -> None:
    # 160 training images at batch 32: 5 steps an epoch; the run stops after 3, before any validation. Lightning's
    # EarlyStopping would check val_loss at that epoch's end and stop the run with a traceback.
    main(["fit", *cifar_args(fake_cifar10), *CSV_LOGGER, "--trainer.max_steps", "3"])
    (last,) = Path().glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3
    config = yaml.safe_load((last.parent.parent / "config.yaml").read_text())
    (early,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
    assert early["init_args"]["check_on_train_epoch_end"] is False and early["init_args"]["monitor"] == "val_loss"
