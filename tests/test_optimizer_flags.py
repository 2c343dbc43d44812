"""LightningCLI's `--optimizer` and `--lr_scheduler`, `--model.optimizer.lr`, and the one learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_cli import CSV_LOGGER, cifar_args, fails, metrics_rows, print_config

from cifar_cli.cli import main
from cifar_cli.errors import UsageError

TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.logger", "false"]
# A net with BatchNorm layers, so that the norm group's factor shows.
FAST_NET = ["--model.net", "cifar_cli.nets.FastNet", "--model.net.init_args.widths", "[8, 16, 16]"]


def newest_checkpoint() -> dict:
    (path,) = sorted(Path().glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
    return torch.load(path, weights_only=True)


def groups_lr(ckpt: dict) -> list[tuple[float, float]]:
    return [(g["initial_lr"], g["lr"]) for g in ckpt["optimizer_states"][0]["param_groups"]]


def test_optimizer_and_scheduler_flags_keep_groups_and_rebuild_from_the_checkpoint(fake_cifar10: Path) -> None:
    main(["fit", *cifar_args(fake_cifar10), *FAST_NET, *CSV_LOGGER, "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "2", "--model.norm_lr_factor", "4",
          "--optimizer", "SGD", "--optimizer.lr", "0.05", "--optimizer.momentum", "0.9",
          "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5",
          "--trainer.callbacks+=LearningRateMonitor"])  # fmt: skip
    (path,) = Path("runs").glob("**/config.yaml")
    config = yaml.safe_load(path.read_text())
    # The flags land in the model's arguments, where config.yaml and the checkpoint keep them.
    assert config["optimizer"] is None and config["lr_scheduler"] is None
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.SGD"
    assert config["model"]["optimizer"]["init_args"]["lr"] == config["model"]["learning_rate"] == 0.05
    assert config["model"]["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    # Per epoch, over both parameter groups: 0.05 then 0.025, the BatchNorm group at 4x.
    rows = metrics_rows("runs")
    lr = sorted({(int(r["step"]), float(r["lr-SGD/pg1"])) for r in rows if r.get("lr-SGD/pg1")})
    norm = sorted({(int(r["step"]), float(r["lr-SGD/pg2"])) for r in rows if r.get("lr-SGD/pg2")})
    assert [x for _, x in lr] == pytest.approx([0.05, 0.025])
    assert [x for _, x in norm] == pytest.approx([0.2, 0.1])
    ckpt = newest_checkpoint()
    assert ckpt["hyper_parameters"]["learning_rate"] == 0.05
    assert ckpt["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.SGD"
    (path,) = [p for p in Path().glob("**/checkpoints/*.ckpt") if not p.name.startswith("last")]

    main(["test", "--ckpt_path", str(path), "--trainer.logger", "false"])
    main(["fit", "--ckpt_path", str(path), "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    resumed = newest_checkpoint()
    assert resumed["epoch"] == 2
    group = resumed["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.05 and group["momentum"] == 0.9  # SGD, restored with its own settings
    assert any("momentum_buffer" in s for s in resumed["optimizer_states"][0]["state"].values())
    assert resumed["lr_schedulers"][0]["step_size"] == 1 and len(groups_lr(resumed)) == 2


@pytest.mark.parametrize(
    ("args", "fused"),
    [
        ([], True),  # Adam, with no implementation chosen: torch's fused kernels
        (["--optimizer", "SGD", "--optimizer.momentum", "0.9"], True),
        (["--model.optimizer.fused", "false"], False),  # chosen: kept
        (["--optimizer", "AdamW", "--optimizer.foreach", "true"], None),
        (["--optimizer", "RMSprop"], "absent"),  # no fused kernels: built as it is
    ],
)
def test_optimizer_uses_fused_kernels_unless_the_user_chose_an_implementation(
    fake_cifar10: Path, args: list[str], fused: bool | None | str
) -> None:
    main(["fit", *cifar_args(fake_cifar10), *TINY, "--trainer.max_epochs", "1", *args])
    ckpt = newest_checkpoint()
    assert ckpt["global_step"] == 2
    assert [g.get("fused", "absent") for g in ckpt["optimizer_states"][0]["param_groups"]] == [fused]
    # The saved hyperparameters hold what the user chose, not what was derived from it: a resume decides anew.
    chosen = ckpt["hyper_parameters"]["optimizer"]["init_args"].get("fused", "absent")
    assert chosen == {True: None, False: False, None: None, "absent": "absent"}[fused]


@pytest.mark.parametrize(
    ("args", "optimizer", "lr"),
    [
        (["--optimizer", "torch.optim.AdamW"], torch.optim.AdamW, 2e-4),  # the model's default learning rate
        (["--optimizer", "AdamW", "--model.learning_rate", "0.01"], torch.optim.AdamW, 0.01),
        (["--model.optimizer.lr", "0.01"], torch.optim.Adam, 0.01),
        (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.momentum", "0.9"], torch.optim.SGD, 2e-4),
        (["--optimizer", "SGD", "--optimizer.lr", "0.05", "--model.learning_rate", "0.05"], torch.optim.SGD, 0.05),
        # A value given equal to the optimizer's own default is given all the same (it was replaced by 2e-4).
        (["--optimizer", "SGD", "--optimizer.lr", "0.001"], torch.optim.SGD, 0.001),
        (["--optimizer", "Adam", "--optimizer.lr", "0.001"], torch.optim.Adam, 0.001),
        (["--model.optimizer.init_args.lr", "0.001"], torch.optim.Adam, 0.001),
    ],
)
def test_optimizer_forms_set_one_learning_rate(fake_cifar10: Path, args: list[str], optimizer: type, lr: float) -> None:
    main(["fit", *cifar_args(fake_cifar10), *TINY, "--trainer.max_epochs", "1", *args])
    ckpt = newest_checkpoint()
    assert ckpt["hyper_parameters"]["optimizer"]["class_path"] == f"torch.optim.{optimizer.__name__}"
    assert ckpt["hyper_parameters"]["learning_rate"] == lr
    assert all(g["lr"] == lr for g in ckpt["optimizer_states"][0]["param_groups"])


def test_optimizer_weight_decay_equal_to_its_default_from_a_config_is_kept(fake_cifar10: Path, tmp_path: Path) -> None:
    (tmp_path / "adamw.yaml").write_text("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n"
                                         "    init_args: {lr: 0.001, weight_decay: 0.01}\n")  # fmt: skip
    main(
        ["fit", "--config", str(tmp_path / "adamw.yaml"), *cifar_args(fake_cifar10), *TINY, "--trainer.max_epochs", "1"]
    )
    ckpt = newest_checkpoint()
    assert ckpt["hyper_parameters"]["learning_rate"] == 0.001 and ckpt["hyper_parameters"]["weight_decay"] == 0.01
    assert all(g["lr"] == 0.001 and g["weight_decay"] == 0.01 for g in ckpt["optimizer_states"][0]["param_groups"])


def test_optimizer_from_a_config_file_top_level(fake_cifar10: Path, tmp_path: Path) -> None:
    (tmp_path / "sgd.yaml").write_text(
        "optimizer:\n  class_path: torch.optim.SGD\n  init_args: {lr: 0.05}\n"
        "lr_scheduler:\n  class_path: CosineAnnealingLR\n  init_args: {T_max: 10}\n"
    )
    main(["fit", "--config", str(tmp_path / "sgd.yaml"), *cifar_args(fake_cifar10), *TINY])
    ckpt = newest_checkpoint()
    assert ckpt["hyper_parameters"]["learning_rate"] == 0.05
    (scheduler,) = ckpt["lr_schedulers"]
    assert scheduler["T_max"] == 10 and scheduler["base_lrs"] == [0.05]


@pytest.mark.parametrize(
    "flag", ["--lr_scheduler", "--model.lr_scheduler", "--model.lr_scheduler=", "--model.lr_scheduler.class_path"]
)
def test_reduce_lr_on_plateau_monitors_val_loss(fake_cifar10: Path, flag: str) -> None:
    """The class's name alone is Lightning's ReduceLROnPlateau through LightningCLI's flag and through the model's
    own (which jsonargparse refused as ambiguous with torch's class of the same name)."""
    group = flag.rstrip("=").removesuffix(".class_path")
    chosen = [f"{flag}ReduceLROnPlateau"] if flag.endswith("=") else [flag, "ReduceLROnPlateau"]
    main(["fit", *cifar_args(fake_cifar10), *TINY, "--optimizer", "SGD", "--optimizer.lr", "0.05", *chosen,
          f"{group}.monitor", "val_loss", f"{group}.patience", "0"])  # fmt: skip
    ckpt = newest_checkpoint()
    (scheduler,) = ckpt["lr_schedulers"]
    assert scheduler["monitor"] == "val_loss" and scheduler["best"] < float("inf")  # it saw val_loss
    saved = ckpt["hyper_parameters"]["lr_scheduler"]
    assert saved["class_path"] == "lightning.pytorch.cli.ReduceLROnPlateau"
    assert saved["init_args"]["monitor"] == "val_loss"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "NotAnOptimizer"], "--optimizer NotAnOptimizer: no optimizer class is named NotAnOptimizer ("),
        (["--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "-1"], "--lr_scheduler.T_max -1"),
        (["--lr_scheduler", "CosineAnnealingWarmRestarts", "--lr_scheduler.T_0", "-1"], "--lr_scheduler.T_0 -1"),
        (["--optimizer", "SGD", "--optimizer.momentum", "-1"], "--optimizer: Invalid momentum value: -1"),
        (["--optimizer", "SGD", "--model.optimizer", "Adagrad"], "--optimizer and --model.optimizer both choose"),
        # Adam with its own defaults, named: it was taken for the default and SGD trained without a word.
        (["--optimizer", "SGD", "--model.optimizer", "Adam"], "--optimizer and --model.optimizer both choose"),
        (
            ["--optimizer", "SGD", "--optimizer.lr", "0.05", "--model.learning_rate", "0.0002"],
            "--optimizer.lr 0.05 and --model.learning_rate 0.0002 disagree",
        ),
        (
            ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--model.lr_schedule", "WarmupLinearDecay"],
            "--lr_scheduler and --model.lr_schedule both schedule",
        ),
        (
            ["--optimizer", "SGD", "--optimizer.lr", "0.05", "--model.learning_rate", "0.1"],
            "--optimizer.lr 0.05 and --model.learning_rate 0.1 disagree",
        ),
        (["--model.optimizer.lr", "0.01", "--model.learning_rate", "0.1"], "--model.optimizer.lr 0.01 and"),
        # Copied into --model.weight_decay, which takes no negative value: a traceback as config.yaml was written.
        (["--optimizer", "AdamW", "--optimizer.weight_decay", "-1"], "--optimizer.weight_decay -1.0: the weight decay"),
        (["--model.optimizer.weight_decay", "-0.5"], "--model.optimizer.weight_decay -0.5: the weight decay is at"),
        (["--model.lr_scheduler", "os.system"], "os.system"),
        # Optimizers that fail at their first step, in a traceback once the run's folder is written: one that
        # takes only sparse gradients, and LBFGS, which flattens gradients with view(), over channels_last weights.
        (["--optimizer", "SparseAdam"], "--optimizer: SparseAdam does not support dense gradients"),
        (["--optimizer", "LBFGS"], "TutorialCNN's channels_last weights: add --model.channels_last false"),
        # A GPU's setting on the CPU: torch's step asserts, and the AssertionError was a traceback.
        (
            ["--model.optimizer.capturable", "true", "--trainer.accelerator", "cpu"],
            "--model.optimizer: If capturable=True, params and state_steps must be on supported devices: ['cuda'",
        ),
        # A fused optimizer asked for, beside clipping under mixed precision: Lightning refused it at the first step.
        (
            ["--model.optimizer.fused", "true", "--trainer.gradient_clip_val", "1", "--trainer.precision=bf16-mixed"],
            "--model.optimizer.fused true: Lightning's mixed precision (bf16-mixed) cannot clip a fused optimizer's",
        ),
    ],
)
def test_bad_optimizer_flags_fail_in_one_line(capsys, args: list[str], message: str) -> None:
    assert message in fails(capsys, "fit", *args)
    assert not Path("runs").exists()


def test_resumed_run_keeps_the_optimizer_implementation_of_its_checkpoint(fake_cifar10: Path) -> None:
    # A checkpoint written before optimizers were fused: its optimizer state has fused=None, and a resumed run
    # keeps it, so that resuming continues the same arithmetic.
    main(["fit", *cifar_args(fake_cifar10), *TINY, "--trainer.max_epochs", "1"])
    (path,) = [p for p in Path().glob("**/checkpoints/*.ckpt") if not p.name.startswith("last")]
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer_states"][0]["param_groups"]:
        group["fused"] = None
    torch.save(ckpt, path)
    main(["fit", *cifar_args(fake_cifar10), *TINY, "--ckpt_path", str(path)])
    resumed = newest_checkpoint()
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4
    assert [g["fused"] for g in resumed["optimizer_states"][0]["param_groups"]] == [None]


def test_optimizer_flag_beside_a_config_that_chose_one_names_the_config(capsys, tmp_path: Path) -> None:
    """`--optimizer AdamW` beside configs/fast-cpu.yaml, which sets `model.optimizer`: the refusal spoke of a
    `--model.optimizer` the user never typed. It names the file and the flag that replaces the file's choice."""
    err = fails(capsys, "fit", "--config", "configs/fast-cpu.yaml", "--optimizer", "AdamW")
    assert err.endswith(
        "--optimizer AdamW and configs/fast-cpu.yaml's model.optimizer (torch.optim.SGD) both choose the optimizer: "
        "give one of them (--model.optimizer AdamW replaces the config's)"
    )
    # The flag it names does replace it.
    assert "torch.optim.AdamW" in print_config(
        capsys, "--config", "configs/fast-cpu.yaml", "--model.optimizer", "AdamW"
    )
    # A top-level `optimizer:` in a file beside --model.optimizer, and a scheduler: the same.
    mine = tmp_path / "mine.yaml"
    mine.write_text("optimizer: {class_path: torch.optim.SGD}\n")
    err = fails(capsys, "fit", "--config", str(mine), "--model.optimizer", "RMSprop")
    assert err.endswith(f"{mine}'s optimizer (torch.optim.SGD) and --model.optimizer both choose the optimizer: "
                        "give one of them")  # fmt: skip
    mine.write_text(
        "model:\n  lr_scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 1}}\n"
    )
    err = fails(capsys, "fit", "--config", str(mine), "--lr_scheduler", "ExponentialLR", "--lr_scheduler.gamma", "0.9")
    assert err.endswith(
        f"--lr_scheduler ExponentialLR and {mine}'s model.lr_scheduler (torch.optim.lr_scheduler.StepLR) both choose "
        "the scheduler: give one of them (--model.lr_scheduler ExponentialLR replaces the config's)"
    )
    # A torch scheduler beside the schedule a recipe sets: it spoke of a --model.lr_schedule never typed.
    err = fails(
        capsys, "fit", "--config", "configs/fast-cpu.yaml", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"
    )
    assert err.endswith(
        "--lr_scheduler and configs/fast-cpu.yaml's model.lr_schedule (cifar_cli.optim.WarmupLinearDecay) both "
        "schedule the learning rate: give one of them (--model.lr_schedule null drops the config's)"
    )


def test_a_gpu_only_optimizer_setting_is_left_to_the_gpu_run() -> None:
    """The settings are tried over a dummy weight on the CPU, where torch asserts on Adam's `capturable` (GPU weights
    only): a GPU run takes it, a CPU run is refused in one line."""
    from functools import partial

    from cifar_cli.classifier import ImageClassifier
    from cifar_cli.nets import TutorialCNN
    from cifar_cli.optimizer_flags import check_built

    model = ImageClassifier(TutorialCNN(3), ["a", "b", "c"], optimizer=partial(torch.optim.Adam, capturable=True))
    flags = {"optimizer": "--model.optimizer", "lr_scheduler": "--model.lr_scheduler"}
    assert check_built(model, flags, on_gpu=True) is None
    with pytest.raises(UsageError, match=r"^--model.optimizer: If capturable=True, params and state_steps must be on"):
        check_built(model, flags)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_the_optimizer_check_leaves_cuda_uninitialised_on_a_gpu_machine(monkeypatch, optimizer) -> None:
    """Adam's and AdamW's step ask torch for the current CUDA stream (is a CUDA graph being captured?), which
    initialises CUDA in this process on a GPU machine, dummy weight on the CPU or not: the ranks that ddp_fork forks
    from it then cannot use CUDA."""
    from functools import partial

    from test_cli import fake_gpus

    from cifar_cli.classifier import ImageClassifier
    from cifar_cli.nets import TutorialCNN
    from cifar_cli.optimizer_flags import check_built

    called = fake_gpus(monkeypatch)
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    model = ImageClassifier(TutorialCNN(3), ["a", "b", "c"], optimizer=optimizer, lr_scheduler=scheduler)
    flags = {"optimizer": "--model.optimizer", "lr_scheduler": "--model.lr_scheduler"}
    assert isinstance(check_built(model, flags, on_gpu=True), torch.optim.lr_scheduler.StepLR)
    assert not called
