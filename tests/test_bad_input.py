"""Bad input, case by case: every case ends in one line on stderr and exit code 2, with nothing written.

Each case writes its inputs into the test's folder, then runs `main([...])` in this process. Lightning's log lines
(the seed, the GPU/TPU banner, tips) go to the real stderr through logging handlers bound at import, so the cases
read file descriptor 2 (`capfd`), which sees them, and the warnings Python would print. The folder's files (names,
sizes, modification times) are the same after the run as before it. Odd but valid input must work instead: the
images and config at the end of the file.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning
import numpy as np
import pytest
import torch
import yaml
from conftest import write_image_folder
from jsonargparse import Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ReduceLROnPlateau
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cifar_cli.callbacks import FitTimer
from cifar_cli.checks import check_linked_net_args, check_monitors
from cifar_cli.classifier import ImageClassifier
from cifar_cli.cli import main
from cifar_cli.data import CIFAR10DataModule, ImageFolderDataModule, decode_images
from cifar_cli.data.images import decode_rgb, image_suffixes, read_formats, reads_avif, reads_heif
from cifar_cli.errors import UsageError
from cifar_cli.nets import TutorialCNN

REPO = Path(__file__).resolve().parents[1]
FOLDER = ["--data", "ImageFolderDataModule", "--data.root", "images"]
# Warnings Python prints by default: each would be one more line on stderr.
SHOWN = (UserWarning, RuntimeWarning, FutureWarning, SyntaxWarning, UnicodeWarning, BytesWarning)


class Payload:
    """A pickle that would create `path` when loaded: the code a hostile checkpoint runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def images(counts: dict[str, int], split: str = "train") -> None:
    write_image_folder(Path("images") / split, counts)


def image_bytes(kind: str = "JPEG") -> bytes:
    """A valid 64x64 image of noise, whole, in Pillow's format `kind`."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, kind)
    return buffer.getvalue()


def checkpoint(num_classes: int = 10, **changes: Any) -> dict[str, Any]:
    """A checkpoint as `cifar-cli fit` writes it, of TutorialCNN on CIFAR-10, with `changes` to its entries."""
    net = TutorialCNN(num_classes=num_classes, image_shape=(3, 32, 32))
    names = list(CIFAR10DataModule.names)
    ckpt = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {
            "net": {
                "class_path": "cifar_cli.nets.TutorialCNN",
                "init_args": {"num_classes": num_classes, "image_shape": (3, 32, 32)},
            },
            "class_names": names if num_classes == 10 else [f"c{i}" for i in range(num_classes)],
            "optimizer": {"class_path": "torch.optim.Adam"},
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "cifar_cli": {"data": {"class_path": "cifar_cli.data.CIFAR10DataModule", "init_args": {"val_size": 40}}},
        "pytorch-lightning_version": lightning.__version__,
    }
    for key, value in changes.items():  # "hyper_parameters.net.class_path": "os.system"
        *parents, last = key.split(".")
        entry = ckpt
        for parent in parents:
            entry = entry[parent]
        entry[last] = value
    return ckpt


def write(name: str, content: str | bytes) -> None:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_bytes(content.encode() if isinstance(content, str) else content)


def truncate(name: str) -> None:
    data = Path(name).read_bytes()
    write(name, data[: len(data) // 2])


def pickle_payload(name: str, protocol: int = 2) -> None:
    """A plain pickle (not torch.save's zip) whose loading would create `pwned`."""
    write(name, pickle.dumps({"state_dict": {}, "x": Payload(Path("pwned"))}, protocol=protocol))


def force_unsafe_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set, and torch.load failing the case if it is called at all."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


# A network with a num_classes argument whose forward drops the first logit.
SLICED_NET = """from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))

    def forward(self, x):
        return self.head(x)[:, 1:]
"""


def importable_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules in the test's folder importable, without writing their bytecode there."""
    monkeypatch.syspath_prepend(os.getcwd())
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


class Case(NamedTuple):
    id: str
    args: list[str]
    phrase: str  # in the error line
    files: dict[str, str | bytes] = {}  # written before the run
    setup: Callable[[], Any] | None = None  # writes other inputs before the run
    ckpt: Any = None  # torch.save-d as model.ckpt before the run
    env: Callable[[pytest.MonkeyPatch], None] | None = None
    # Refused as the trainer is built, after the data's checks: their decoded cache (whole, reused by the next run)
    # is all that may be written.
    caches: bool = False


FIT = ["fit", *FOLDER, "--data.val_size", "2"]
# What the default callbacks and a ReduceLROnPlateau can monitor in `fit`, as the refusals list it.
FIT_METRICS = (
    "train_loss, train_loss_step, train_loss_epoch, train_acc, train_acc_step, train_acc_epoch, val_loss, val_acc, "
    "fit_time"
)
TEST_CKPT = ["test", "--ckpt_path", "model.ckpt"]
# The pickled `open` names its module: io in Python 3.11, _io from 3.12 on.
OPEN = f"{open.__module__}.open"
CLASSES_AB = {"a": 4, "b": 4}
CASES = [
    # Flags: sizes, types, names, choices.
    Case("batch_size_zero", ["fit", "--data.batch_size", "0"], '"batch_size": Not of type PositiveInt: 0'),
    Case("val_size_negative", ["fit", "--data.val_size", "-5"], '"val_size": Not of type PositiveInt: -5'),
    Case("batch_size_not_a_number", ["fit", "--data.batch_size", "many"], '"batch_size": Not of type PositiveInt'),
    Case("learning_rate_not_a_number", ["fit", "--model.learning_rate", "fast"], 'Parser key "model.learning_rate"'),
    # torch refused it as the optimizer was built, naming --model.optimizer, which the user had not given
    Case(
        "weight_decay_negative",
        ["fit", "--model.weight_decay", "-1"],
        'cifar-cli: error: Parser key "model.weight_decay": Not of type NonNegativeFloat: -1 does not conform',
    ),
    # jsonargparse said "Expected a <class 'int'>", without the value
    Case(
        "max_epochs_not_a_number",
        ["fit", "--trainer.max_epochs", "two"],
        'cifar-cli: error: Parser key "trainer.max_epochs": expected an integer, got two',
    ),
    Case(
        "seed_not_a_number",
        ["fit", "--seed_everything", "abc"],
        'cifar-cli: error: Parser key "seed_everything": expected true or false, or an integer, got abc',
    ),
    # An argument of a class chosen by a setting: jsonargparse named the class and "<class 'tuple'>"
    Case(
        "schedule_restarts_not_a_list",
        ["fit", "--model.lr_schedule", "WarmupLinearDecay", "--model.lr_schedule.restarts", "0.5"],
        'cifar-cli: error: Parser key "model.lr_schedule.restarts": expected a list ([...]), got 0.5',
    ),
    Case("unknown_option", ["fit", "--trainer.max_epochs_x", "3"], "unrecognized arguments: --trainer.max_epochs_x"),
    # A config before the subcommand, as some LightningCLI scripts take it: jsonargparse's line said only that the
    # option "is not accepted before subcommand 'fit'".
    Case(
        "config_before_the_subcommand",
        ["--config", "configs/cpu.yaml", "fit"],
        "cifar-cli: error: --config configs/cpu.yaml before the subcommand: a config there holds a section per "
        "subcommand (fit: {trainer: ...}), and 'trainer.accelerator' is not one; give it after the subcommand: "
        "cifar-cli fit --config configs/cpu.yaml",
    ),
    # argparse would take a prefix for the whole flag (this one for --trainer.max_epochs)
    Case("abbreviated_option", ["fit", "--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch"),
    Case(
        "unknown_subcommand",
        ["tset"],
        "unknown subcommand 'tset': fit, validate, test, predict or report; did you mean test?",
    ),
    # Lightning's help offered it, and it was taken without a word: cifar-cli loads every checkpoint weights-only.
    Case("weights_only_false_fit", ["fit", "--weights_only", "false"], "--weights_only false: cifar-cli loads"),
    Case("weights_only_false_test", [*TEST_CKPT, "--weights_only=false"], "--weights_only false: cifar-cli loads"),
    Case("no_subcommand", [], "give a subcommand: fit, validate, test, predict or report (cifar-cli --help)"),
    Case("unknown_data_class", ["fit", "--data", "NoSuchDataModule"], "NoSuchDataModule"),
    Case("unknown_net_class", ["fit", "--model.net", "NoSuchNet"], "NoSuchNet"),
    Case(
        "bad_tta_choice",
        ["fit", "--model.tta", "sideways"],
        'cifar-cli: error: Parser key "model.tta": expected one of none, flip, flip-shift, got sideways',
    ),
    # An argument of LightningCLI's --optimizer or --lr_scheduler before their class: jsonargparse tried it on the
    # abstract base class and said "'torch.optim.Optimizer': Option 'lr' is not accepted".
    *(
        Case(
            f"optimizer_argument_{name}",
            ["fit", *args],
            "cifar-cli: error: --optimizer.lr 0.01 is given before the optimizer's class: --optimizer CLASS "
            "--optimizer.lr 0.01 (a torch.optim class, such as Adam or SGD), or --model.optimizer.lr 0.01 alone for "
            "the model's optimizer (Adam, or the one a config chose)",
        )
        for name, args in [
            ("without_its_class", ["--optimizer.lr", "0.01"]),
        ]
    ),
    Case(
        "optimizer_argument_before_its_class",
        ["fit", "--optimizer.lr=0.01", "--optimizer", "SGD"],
        "cifar-cli: error: --optimizer.lr 0.01 is given before --optimizer SGD, whose argument it is: give the class "
        "first (--optimizer SGD --optimizer.lr 0.01)",
    ),
    # An argument of --data or --model.net before the class that takes it: jsonargparse read it on the class then in
    # place and named that one ("'cifar_cli.data.CIFAR10DataModule': Option 'root' is not accepted").
    Case(
        "data_argument_before_its_class",
        ["fit", "--data.root", "images", "--data", "ImageFolderDataModule"],
        "cifar-cli: error: --data.root images is given before --data ImageFolderDataModule, whose argument it is: "
        "give the class first (--data ImageFolderDataModule --data.root images)",
    ),
    Case(
        "net_argument_before_its_class",
        ["fit", "--model.net.name=resnet18", "--model.net", "TorchvisionNet"],
        "cifar-cli: error: --model.net.name resnet18 is given before --model.net TorchvisionNet, whose argument it "
        "is: give the class first (--model.net TorchvisionNet --model.net.name resnet18)",
    ),
    Case(
        "scheduler_argument_without_its_class",
        ["fit", "--lr_scheduler.gamma", "0.5"],
        "cifar-cli: error: --lr_scheduler.gamma 0.5 is given before the scheduler's class: --lr_scheduler CLASS "
        "--lr_scheduler.gamma 0.5 (any torch.optim.lr_scheduler class, such as StepLR)",
    ),
    Case(
        "optimizer_arguments_without_class_path_in_a_config",
        ["fit", "--config", "optimizer.yaml"],
        "cifar-cli: error: optimizer: lr is given without the optimizer's class: give its class_path (such as Adam), "
        "and lr under init_args",
        files={"optimizer.yaml": "optimizer:\n  init_args:\n    lr: 0.01\n"},
    ),
    # Lightning's `best` is the best checkpoint of a fit in the same process; a command of its own has none
    *(
        Case(
            f"ckpt_path_best_{subcommand}",
            [subcommand, "--ckpt_path", "best"],
            "cifar-cli: error: --ckpt_path best: Lightning's best is that of a fit in the same process; pass the path "
            "fit printed as its best checkpoint (best_checkpoint in the run's summary.json), or last for the newest "
            "run's last.ckpt",
        )
        for subcommand in ("test", "validate", "predict", "fit")
    ),
    # Lightning's other names for --ckpt_path, which its help lists beside best: they read "no such file".
    Case(
        "ckpt_path_hpc",
        ["test", "--ckpt_path", "hpc"],
        "cifar-cli: error: --ckpt_path hpc: Lightning's hpc is the hpc_ckpt_N.ckpt its SLURM requeue saves wherever "
        "the step is, which cifar-cli does not resume; pass last for the newest run's last.ckpt, or a checkpoint's "
        "path",
    ),
    Case(
        "ckpt_path_registry",
        ["fit", "--ckpt_path", "registry:my-model:latest"],
        "cifar-cli: error: --ckpt_path registry:my-model:latest: Lightning's registry (Lightning AI's model registry) "
        "is not read by cifar-cli; pass a checkpoint's path, or last for the newest run's last.ckpt",
    ),
    # numpy's generator takes 0 to 2**32 - 1; Lightning's seed_everything raised its ValueError in a traceback
    *(
        Case(
            f"seed_{name}",
            ["fit", "--seed_everything", value],
            f"cifar-cli: error: --seed_everything {value}: a seed is an integer from 0 to 4294967295 (true: a random "
            "one, false: none)",
        )
        for name, value in [("negative", "-1"), ("above_uint32", "4294967296")]
    ),
    # A random seed drawn by each node's own command (or each rank torchrun starts): the ranks' shards would overlap.
    Case(
        "seed_true_on_several_nodes",
        ["fit", "--seed_everything", "true", "--trainer.num_nodes", "2"],
        "--seed_everything true: the ranks of this run would each draw another seed; give one",
    ),
    Case(
        "seed_true_under_torchrun",
        ["fit", "--seed_everything", "true"],
        "--seed_everything true: the ranks of this run would each draw another seed; give one",
        env=lambda mp: mp.setenv("WORLD_SIZE", "2"),
    ),
    Case(
        "whiten_bias_until_without_whitening",
        ["fit", "--model.whiten_bias_until", "0.3"],
        "--model.whiten_bias_until needs a network whose whitening layer has a bias (FastNet); TutorialCNN has none",
    ),
    # configs/budget.yaml stacked on the tutorial recipe instead of a fast one: the value came from the config.
    Case(
        "budget_config_on_the_tutorial_recipe",
        ["fit", "--config", str(REPO / "configs" / "budget.yaml"), "--trainer.max_time", "00:00:01:00"],
        "TutorialCNN has none: leave it unset (configs/budget.yaml sets it: stack it on configs/fast-cpu.yaml or "
        "configs/fast.yaml, whose FastNet has one)",
    ),
    # The fast recipe with another network: "leave it unset" of a setting the user never gave.
    Case(
        "fast_config_with_another_network",
        [
            "fit",
            "--config",
            str(REPO / "configs" / "fast.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--model.net",
            "TutorialCNN",
        ],  # fmt: skip
        "TutorialCNN has none: leave it unset (configs/fast.yaml sets it: --model.whiten_bias_until null unsets it)",
    ),
    Case("whiten_bias_until_above_one", ["fit", "--model.whiten_bias_until", "1.5"], "model.whiten_bias_until"),
    # The data decides them (a link): the flag was taken and silently replaced, while --model.class_names is refused.
    Case(
        "net_num_classes_given",
        ["fit", "--model.net.num_classes", "5"],
        "--model.net.num_classes 5: the network's classes come from the data (10:",
    ),
    Case(
        "net_image_shape_given_in_a_config",
        ["fit", "--config", "c.yaml"],
        "--model.net.image_shape [3, 8, 8]: the network's image shape comes from the data ([3, 32, 32]",
        {"c.yaml": "model:\n  net:\n    class_path: TutorialCNN\n    init_args:\n      image_shape: [3, 8, 8]\n"},
    ),
    # cross_entropy fails at the first step above 1; below 0 or at 1 it trains on wrong or uniform targets
    *(
        Case(
            f"label_smoothing_{name}",
            ["fit", "--model.label_smoothing", value],
            f"cifar-cli: error: --model.label_smoothing {value}: must be at least 0 and below 1 (at 1 every target "
            "is uniform and the labels are lost); 0.1 is usual",
        )
        for name, value in [("above_one", "2"), ("negative", "-0.5"), ("one", "1")]
    ),
    Case(
        "backbone_lr_factor_without_backbone",
        ["fit", "--model.backbone_lr_factor", "0.1"],
        "cifar-cli: error: --model.backbone_lr_factor 0.1 needs a network with a backbone, such as TorchvisionNet or "
        "TimmNet; TutorialCNN has none: leave it at 1",
    ),
    *(
        Case(
            f"low_res_until_{name}",
            ["fit", "--model.net", "FastNet", "--model.low_res_side", "24", "--model.low_res_until", value],
            f"cifar-cli: error: --model.low_res_until {value}: a fraction of training progress, above 0 and at most 1 "
            "(0.5: the first half of training at --model.low_res_side)",
        )
        for name, value in [("above_one", "2"), ("zero", "0")]
    ),
    Case(
        "low_res_side_fixed_size_net",
        ["fit", "--model.low_res_side", "24"],
        "cifar-cli: error: --model.low_res_side 24: TutorialCNN cannot take 24x24 images (mat1 and mat2 shapes cannot "
        "be multiplied (1x576 and 1600x512)); progressive resizing needs a network that takes both sizes, with global "
        "pooling, such as FastNet",
    ),
    Case(
        "low_res_side_below_what_the_net_takes",
        ["fit", "--model.net", "FastNet", "--model.low_res_side", "8"],
        "cifar-cli: error: --model.low_res_side 8: FastNet cannot take 8x8 images (Given input size: (256x1x1). "
        "Calculated output size: (256x0x0). Output size is too small); its smallest side is 9: pass a side from 9 "
        "to 31",
    ),
    Case(
        "low_res_side_not_below_image_side",
        ["fit", "--model.net", "FastNet", "--model.low_res_side", "64"],
        "cifar-cli: error: --model.low_res_side 64 is not below the images' side (32x32), so no step would train at a "
        "lower resolution: pass a smaller side, such as 24, or leave it unset",
    ),
    Case(
        "net_too_large_for_images",
        ["fit", "--model.net", "TorchvisionNet", "--model.net.name", "inception_v3"],
        "cifar-cli: error: TorchvisionNet inception_v3 cannot take 32x32 images (Calculated padded input size per "
        "channel: (1 x 1). Kernel size: (3 x 3). Kernel size can't be greater than actual input size): choose "
        "another --model.net",
    ),
    # Lightning's own check of the EMA's decay was a traceback; a lookahead peak above 1 trained, pushing the slow
    # weights away from the network's.
    Case(
        "ema_decay_above_one",
        ["fit", "--trainer.callbacks+=cifar_cli.averaging.EMA", "--trainer.callbacks.decay", "2"],
        'Parser key "decay": Not of type ClosedUnitInterval: 2 does not conform',
    ),
    # Lightning's own EMAWeightAveraging: torch's check of the decay, reported by jsonargparse beside the repr of
    # every callback of the list, after a traceback.
    Case(
        "lightning_ema_decay_above_one",
        ["fit", "--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay", "2"],
        "cifar-cli: error: EMAWeightAveraging: Invalid decay value 2.0 provided. Please provide a value in [0,1] "
        "range.",
    ),
    Case(
        "lookahead_peak_above_one",
        ["fit", "--trainer.callbacks+=cifar_cli.averaging.Lookahead", "--trainer.callbacks.peak", "3"],
        'Parser key "peak": Not of type ClosedUnitInterval: 3 does not conform',
    ),
    Case(
        "swa_with_lr_schedule",
        [
            "fit",
            "--model.net",
            "FastNet",
            "--model.lr_schedule",
            "WarmupLinearDecay",
            "--trainer.callbacks+=StochasticWeightAveraging",
            "--trainer.callbacks.swa_lrs",
            "0.05",
        ],  # fmt: skip
        "cifar-cli: error: StochasticWeightAveraging replaces --model.lr_schedule with its own schedule (SWALR), and "
        "the schedule's end cuts off the epoch in which it recomputes BatchNorm statistics: give --model.lr_schedule "
        "null, or average with cifar_cli.averaging.EMA",
    ),
    # FastNet's settings: no block at all was refused as too small for the images; a BatchNorm momentum above 1 makes
    # the running statistics evaluation uses diverge, and a logit scale of 0 makes every logit 0.
    Case(
        "fastnet_no_blocks",
        ["fit", "--model.net", "FastNet", "--model.net.widths", "[]"],
        "cifar-cli: error: --model.net.widths []: FastNet needs at least one block (airbench94's: [64, 256, 256])",
    ),
    Case(
        "fastnet_batchnorm_momentum_above_one",
        ["fit", "--model.net", "FastNet", "--model.net.batchnorm_momentum", "2"],
        'Parser key "batchnorm_momentum": Not of type ClosedUnitInterval: 2 does not conform',
    ),
    Case(
        "fastnet_logit_scale_zero",
        ["fit", "--model.net", "FastNet", "--model.net.logit_scale", "0"],
        'Parser key "logit_scale": Not of type PositiveFloat: 0 does not conform to restriction v>0',
    ),
    # A network whose logits are not one per class failed at the first step (cross-entropy, the confusion matrix),
    # or trained on logits no label has.
    Case(
        "net_logits_not_one_per_class",
        ["fit", "--model.net", "torch.nn.Flatten"],
        "cifar-cli: error: --model.net Flatten returns logits of shape [1, 3072] for one image, not [1, 10] for the "
        "data's 10 classes: give it a num_classes argument, which cifar-cli sets, for its last layer",
    ),
    # One that has the argument, and drops a logit in its forward: the advice to give it one was beside the point.
    Case(
        "net_with_num_classes_logits_not_one_per_class",
        ["fit", "--model.net", "sliced_module.Net"],
        "cifar-cli: error: --model.net Net returns logits of shape [1, 9] for one image, not [1, 10] for the data's "
        "10 classes: cifar-cli set its num_classes to 10; its forward must return one logit per class",
        {"sliced_module.py": SLICED_NET},
        env=importable_here,
    ),
    Case(
        "lr_schedule_peak_above_one",
        ["fit", "--model.lr_schedule", "WarmupLinearDecay", "--model.lr_schedule.peak", "2"],
        "cifar-cli: error: --model.lr_schedule.peak 2.0: a fraction of a cycle, from 0 to 1 (0.23: the full rate at "
        "23%)",
    ),
    Case(
        "lr_schedule_negative_end",  # the last steps would have climbed the loss
        ["fit", "--model.lr_schedule", "WarmupLinearDecay", "--model.lr_schedule.end", "-0.5"],
        "cifar-cli: error: --model.lr_schedule.end -0.5: a factor on the learning rate, at least 0",
    ),
    Case(
        "lr_schedule_restarts_not_increasing",
        ["fit", "--model.lr_schedule", "WarmupLinearDecay", "--model.lr_schedule.restarts", "[0.5, 0.3]"],
        "cifar-cli: error: --model.lr_schedule.restarts [0.5, 0.3]: increasing fractions of training, each above 0 "
        "and below 1 ([0.4]: a second cycle from 40% of training)",
    ),
    Case("bad_precision", ["fit", "--trainer.precision", "17"], 'Parser key "trainer.precision"'),
    Case(
        "accelerator_tpu", ["fit", "--trainer.accelerator", "tpu"], "--trainer.accelerator tpu: this machine has no TPU"
    ),
    Case(
        "accelerator_mps", ["fit", "--trainer.accelerator", "mps"], "--trainer.accelerator mps: this machine has no MPS"
    ),
    Case(
        "accelerator_misspelt", ["fit", "--trainer.accelerator", "cpuu"], "no such accelerator; choose one of auto, cpu"
    ),
    # Trainer settings Lightning takes and fails on mid-run (a modulo by zero), or refuses with a traceback.
    Case("accumulate_zero", ["fit", "--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches 0: give 1"),
    Case("check_val_zero", ["fit", "--trainer.check_val_every_n_epoch", "0"], "check_val_every_n_epoch 0: give 1"),
    Case("val_check_interval_zero", ["fit", "--trainer.val_check_interval", "0"], "--trainer.val_check_interval 0:"),
    Case("max_epochs_below_minus_one", ["fit", "--trainer.max_epochs", "-3"], "--trainer.max_epochs -3: give 0 or"),
    Case("max_time_unreadable", ["fit", "--trainer.max_time", "10min"], "--trainer.max_time 10min: give days:hours"),
    # Lightning's own refusal told an offline run to go online to log its model, which ModelArtifacts does offline.
    Case(
        "log_model_offline",
        ["fit", "--trainer.logger.log_model", "true"],
        "--trainer.logger.log_model true: Lightning's WandbLogger uploads checkpoints only online, and this run logs "
        "offline; ModelArtifacts",
    ),
    Case(
        "lr_schedule_without_a_length",
        ["fit", "--trainer.max_epochs", "-1", "--model.lr_schedule", "WarmupLinearDecay"],
        "--model.lr_schedule needs a known length: set --trainer.max_epochs, max_steps or max_time",
    ),
    Case(
        "devices_all_on_cpu",
        ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "-1"],
        "--trainer.devices -1: on the CPU give a number of processes, e.g. --trainer.devices 2",
    ),
    Case(
        "ddp_config_without_gpu",  # configs/ddp.yaml's settings: the advice leads to a command that runs
        ["fit", "--trainer.accelerator", "gpu", "--trainer.devices", "-1", "--trainer.strategy", "ddp"],
        "run with --config configs/cpu.yaml or --trainer.accelerator cpu --trainer.devices 2",
        env=lambda mp: mp.setattr(torch.cuda, "is_available", lambda: False),
    ),
    Case(
        "num_nodes_zero",
        [*FIT, "--trainer.num_nodes", "0"],
        "--trainer: `num_nodes` must be a positive integer",
        setup=lambda: images(CLASSES_AB),
        caches=True,
    ),
    Case(
        "strategy_unknown",
        [*FIT, "--trainer.strategy", "foo"],
        "--trainer: ",
        setup=lambda: images(CLASSES_AB),
        caches=True,
    ),
    # A logger whose package is missing (mlflow): Lightning's ModuleNotFoundError ended in a traceback.
    Case(
        "logger_package_missing",
        [*FIT, "--trainer.logger+=MLFlowLogger"],
        "cifar-cli: error: lightning.pytorch.loggers.MLFlowLogger: Requirement 'mlflow>=",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "precision_package_missing",
        [*FIT, "--trainer.precision", "transformer-engine"],
        "--trainer: Requirement 'transformer_engine",
        setup=lambda: images(CLASSES_AB),
        caches=True,
    ),
    Case(
        "optimizer_lr_flag",
        ["fit", "--model.optimizer", "SGD", "--model.optimizer.lr", "0.1", "--model.learning_rate", "0.2"],
        "--model.optimizer.lr 0.1 and --model.learning_rate 0.2 disagree",
    ),
    Case(
        "optimizer_class_path_runs_code",
        ["fit", "--model.optimizer", '{"class_path": "os.system", "init_args": {"command": "touch pwned"}}'],
        "os.system is not an optimizer class",
    ),
    Case(
        "validation_off_with_early_stopping",
        ["fit", "--trainer.limit_val_batches", "0"],
        "EarlyStopping monitors val_loss",
    ),
    # A monitor naming a metric fit never logs: Lightning found it after the first epoch, in a traceback.
    Case(
        "early_stopping_monitor_never_logged",
        [*FIT, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val_f1"],
        f"cifar-cli: error: EarlyStopping monitors val_f1, which this run never logs: choose one of {FIT_METRICS}; "
        "did you mean val_acc?",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "checkpoint_monitor_never_logged",
        [*FIT, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val_accuracy"],
        f"cifar-cli: error: ModelCheckpoint monitors val_accuracy, which this run never logs: choose one of "
        f"{FIT_METRICS}, epoch, step; did you mean val_acc?",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "plateau_monitor_never_logged",
        [*FIT, "--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "nonexistent"],
        "cifar-cli: error: --lr_scheduler ReduceLROnPlateau monitors nonexistent, which this run never logs: choose "
        f"one of {FIT_METRICS}",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "model_plateau_monitor_never_logged",
        [
            *FIT,
            "--model.lr_scheduler",
            "lightning.pytorch.cli.ReduceLROnPlateau",
            "--model.lr_scheduler.monitor",
            "val_los",
        ],
        "cifar-cli: error: --model.lr_scheduler ReduceLROnPlateau monitors val_los, which this run never logs: "
        f"choose one of {FIT_METRICS}; did you mean val_loss?",
        setup=lambda: images(CLASSES_AB),
    ),
    # torch's own ReduceLROnPlateau cannot name its metric: Lightning refused it as training started, the run's
    # folder written, with an example in Python.
    *(
        Case(
            f"torch_plateau_{flag.strip('-').replace('.', '_')}",
            [*FIT, flag, "torch.optim.lr_scheduler.ReduceLROnPlateau"],
            f"cifar-cli: error: {flag} torch.optim.lr_scheduler.ReduceLROnPlateau cannot name the metric it watches: "
            f"use Lightning's, {flag} lightning.pytorch.cli.ReduceLROnPlateau {flag}.monitor val_loss",
            setup=lambda: images(CLASSES_AB),
        )
        for flag in ("--lr_scheduler", "--model.lr_scheduler")
    ),
    # Config files.
    Case("config_missing", ["fit", "--config", "missing.yaml"], "File does not exist"),
    # YAML syntax: jsonargparse's "Problems parsing config: ... in <unicode string>" named neither the file nor a tab
    Case(
        "config_yaml_syntax",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml is not valid YAML (line 2, column 1): expected ',' or ']', but got "
        "'<stream end>' while parsing a flow sequence that starts at line 1",
        {"c.yaml": "trainer: [1, 2\n"},
    ),
    Case(
        "config_yaml_tab",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml is not valid YAML (line 2, column 1): found character '\\t' that cannot start "
        "any token: YAML indents with spaces, not tabs",
        {"c.yaml": "trainer:\n\tmax_epochs: 1\n"},
    ),
    Case(
        "config_yaml_unclosed_quote",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml is not valid YAML (line 3, column 1): found unexpected end of stream while "
        "scanning a quoted scalar that starts at line 2",
        {"c.yaml": 'model:\n  net: "FastNet\n'},
    ),
    # PyYAML keeps the last of a key given twice: the first section's settings were dropped without a word
    Case(
        "config_key_twice",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml: trainer is given twice in one mapping (lines 1 and 3): the second would "
        "replace the first; merge them",
        {"c.yaml": "trainer:\n  max_epochs: 1\ntrainer:\n  accelerator: cpu\n"},
    ),
    # It read "the following arguments are required: fit.model.net", which the config had given
    *(
        Case(
            f"config_required_set_to_null_{i}",
            ["fit", "--config", "c.yaml"],
            "cifar-cli: error: --model.net is set to nothing (`net: null`, or `net:` with nothing below it, in a "
            "config): give it a value, or remove that line to keep its default (TutorialCNN)",
            {"c.yaml": content},
        )
        for i, content in enumerate(["model:\n  net: null\n", "model:\n  net:\n"])
    ),
    # The same on the command line: jsonargparse read "null" as a config file's path ("Expected a path but null
    # either not accessible or invalid") and went on about dot import paths
    Case(
        "flag_required_class_null",
        ["fit", "--model.net", "null"],
        "cifar-cli: error: --model.net null sets it to nothing, and it needs a value: give one, or leave the flag "
        "out to keep its default (TutorialCNN)",
    ),
    Case(
        "flag_optimizer_none",
        ["fit", "--model.optimizer=none"],
        "cifar-cli: error: --model.optimizer none sets it to nothing, and it needs a value: give one, or leave the "
        "flag out to keep its default (Adam)",
    ),
    # A file given to a group (jsonargparse's `--trainer FILE`) had none of these checks: the second of the two
    # max_epochs was taken without a word, a tab read "<unicode string>", an init_arg: was read as init_args of another
    Case(
        "group_file_key_twice",
        ["fit", "--trainer", "t.yaml", "--print_config"],
        "cifar-cli: error: --trainer t.yaml: max_epochs is given twice in one mapping (lines 1 and 2): the second "
        "would replace the first; merge them",
        {"t.yaml": "max_epochs: 1\nmax_epochs: 2\n"},
    ),
    Case(
        "group_file_yaml_tab",
        ["fit", "--trainer=t.yaml"],
        "cifar-cli: error: --trainer t.yaml is not valid YAML (line 2, column 1): found character '\\t' that cannot "
        "start any token: YAML indents with spaces, not tabs",
        {"t.yaml": "logger:\n\tsave_dir: x\n"},
    ),
    Case(
        "group_file_key_beside_class_path",
        ["fit", "--model", "m.yaml"],
        "cifar-cli: error: --model m.yaml: net has init_arg beside class_path cifar_cli.nets.FastNet: a class's "
        "arguments go under init_args; did you mean init_args?",
        {"m.yaml": "net:\n  class_path: cifar_cli.nets.FastNet\n  init_arg:\n    widths: [8, 8, 8]\n"},
    ),
    # A date-like value: PyYAML's timestamp ended in datetime's ValueError, a traceback
    Case(
        "config_date_like_value",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: --trainer.max_time 2026-13-45",
        {"c.yaml": "trainer:\n  max_time: 2026-13-45\n"},
    ),
    Case(
        "config_list",
        ["fit", "--config", "c.yaml"],
        "config c.yaml holds a list, not a mapping",
        {"c.yaml": "- trainer\n- model\n"},
    ),
    Case(
        "config_scalar",
        ["fit", "--config", "c.yaml"],
        "config c.yaml holds a str, not a mapping",
        {"c.yaml": "max_epochs 3\n"},
    ),
    Case(
        "config_wandb_sweep",
        ["fit", "--config", "sweep.yaml"],
        "cifar-cli: error: config sweep.yaml is a W&B sweep, not a cifar-cli config: `wandb sweep FILE` starts it "
        "and `wandb agent` runs it (configs/sweep.yaml says how)",
        {"sweep.yaml": "program: cifar-cli\nmethod: bayes\nparameters:\n  model.learning_rate:\n    min: 0.5\n"},
    ),
    # A key beside class_path: jsonargparse read the mapping as arguments of the class already chosen, and named it
    Case(
        "config_init_args_misspelled",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml: model.net has init_arg beside class_path FastNet: a class's arguments go "
        "under init_args; did you mean init_args?",
        {"c.yaml": "model:\n  net:\n    class_path: FastNet\n    init_arg:\n      widths: [8, 16, 16]\n"},
    ),
    Case(
        "config_argument_beside_class_path",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml: trainer.callbacks has monitor beside class_path EarlyStopping: a class's "
        "arguments go under init_args (init_args: {monitor: ...})",
        {"c.yaml": "trainer:\n  callbacks:\n  - class_path: EarlyStopping\n    monitor: val_acc\n"},
    ),
    # A class_path whose module raises as it is imported (a module of the user's): a traceback of 100 lines
    *(
        Case(
            f"class_path_module_{name}",
            ["fit", "--config", "c.yaml"],
            f"cifar-cli: error: {name}_module.Net: importing its module failed with {error} ("
            f"{{cwd}}/{name}_module.py, line 1); JSONARGPARSE_DEBUG=true shows the traceback",
            {"c.yaml": f"model:\n  net:\n    class_path: {name}_module.Net\n", f"{name}_module.py": source},
            env=importable_here,
        )
        for name, source, error in [
            ("raising", "raise RuntimeError('needs a driver')\n", "RuntimeError: needs a driver"),
            ("syntax_error", "def f(:\n    pass\n", "SyntaxError: invalid syntax"),
        ]
    ),
    # What `test --print_config` prints, given to fit: "Subcommand 'fit' does not accept option 'verbose'"
    Case(
        "config_of_another_subcommand",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: verbose is an option of validate and test, not of fit (a config printed by `test "
        "--print_config`?): remove its verbose: line",
        {"c.yaml": "verbose: true\nckpt_path: null\n"},
    ),
    # A group that holds no mapping: jsonargparse took it whole, and `trainer: 5` ended in an AttributeError traceback
    Case(
        "config_group_not_a_mapping",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml: trainer: holds int 5, not a mapping of its settings indented below it: see "
        "the output of --print_config for the form",
        {"c.yaml": "trainer: 5\n"},
    ),
    Case(
        "config_group_empty",
        ["fit", "--config", "c.yaml"],
        "cifar-cli: error: config c.yaml: trainer: holds nothing (its settings all commented out?): remove the line, "
        "or give its settings indented below it",
        {"c.yaml": "trainer:\n#  max_epochs: 3\n"},
    ),
    Case("config_unknown_key", ["fit", "--config", "c.yaml"], "dropout", {"c.yaml": "model:\n  dropout: 0.5\n"}),
    Case("config_wrong_type", ["fit", "--config", "c.yaml"], "max_epochs", {"c.yaml": "trainer:\n  max_epochs: two\n"}),
    Case(
        "config_not_text",
        ["fit", "--config", "c.yaml"],
        "config c.yaml is not a YAML text file (byte 2: ",
        {"c.yaml": b"\x00\x01\xff\xfe trainer"},
    ),
    Case(
        "group_config_not_text",
        ["fit", "--model", "m.yaml"],
        "--model m.yaml is not a YAML text file",
        {"m.yaml": b"\x00\x01\xff\xfe model"},
    ),
    # Data.
    Case(
        "cifar_missing_no_download",
        ["fit", "--data.data_dir", "nowhere", "--data.download", "false"],
        "CIFAR10 is missing or corrupted",
    ),
    Case("folder_root_missing", FIT, "image folder images does not exist"),
    # The JPEG copy's config before `make data`: the folder was said not to exist, with nothing on how to make it.
    Case(
        "jpeg_copy_not_unpacked",
        ["fit", "--config", "configs/cifar10-jpg.yaml"],
        "cifar-cli: error: image folder data/cifar10-jpg does not exist: expected ROOT/train/<class>/<image>.jpg (or "
        ".png); `make data` in cifar-cli's folder unpacks the CIFAR-10 JPEG copy there (run from that folder, or give "
        "--data.root)",
    ),
    Case("folder_no_train", FIT, "image folder images has no train/ folder", {"images/val/a/x.png": b""}),
    Case("folder_no_class_folders", FIT, "images/train has no class folders", {"images/train/x.jpg": b""}),
    Case(
        "folder_one_class",
        FIT,
        "cifar-cli: error: images/train has one class folder (a): a classifier needs at least 2",
        setup=lambda: images({"a": 4}),
    ),
    Case(
        "folder_empty_class",
        FIT,
        "class folder b in images/train has no images",
        setup=lambda: [images({"a": 4}), Path("images/train/b").mkdir()],
    ),
    Case(
        "folder_stray_file",
        FIT,
        "images/train/x.png is not in a class folder",
        {"images/train/x.png": b""},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_corrupt_image",
        FIT,
        "cannot decode image images/train/a/bad.jpg",
        {"images/train/a/bad.jpg": b"\xff\xd8\xffjunk"},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_truncated_jpeg",  # torchvision's reason, without the path of its C++ source that came with it
        FIT,
        "cannot decode image images/train/a/cut.jpg (Image is incomplete or truncated): remove or replace the file",
        {"images/train/a/cut.jpg": image_bytes()[:300]},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_truncated_png",  # a lambda's reason: `operator(), /__w/vision/.../decode_png.cpp:79, Out of bound ...`
        FIT,
        "cannot decode image images/train/a/cut.png (Out of bound read in decode_png. Probably, the input image is "
        "corrupted): remove or replace the file",
        {"images/train/a/cut.png": image_bytes("PNG")[:3000]},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_web_page_named_jpg",  # a scraped image whose server sent an error page: torchvision's reason said
        # "Only jpeg, png, webp and gif are currently supported ... rely on `decode_avif` and `decode_heic` directly"
        FIT,
        f"cannot decode image images/train/a/page.jpg (not an image: its contents are no {read_formats()}): "
        "remove or replace the file",
        {"images/train/a/page.jpg": "<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n"},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_zero_byte_image",
        FIT,
        "image images/train/b/empty.png is empty (0 bytes)",
        {"images/train/b/empty.png": b""},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_test_class_unknown",
        FIT,
        "classes that train/ lacks: zebra",
        setup=lambda: [images(CLASSES_AB), images({"zebra": 2}, "test")],
    ),
    Case(
        "folder_val_size_too_large",
        [*FIT, "--data.val_size", "50"],
        "hold out 50 of 8 training images",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_images_too_small_for_net",
        [*FIT, "--data.image_size", "8"],
        "cifar-cli: error: TutorialCNN needs images of at least 16x16 pixels, got 8x8",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_images_too_small_for_fastnet",
        [*FIT, "--model.net", "FastNet", "--data.image_size", "4"],
        "cifar-cli: error: FastNet with 3 blocks needs images of at least 9 pixels a side, got 4x4",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "folder_images_too_small_for_torchvision_net",
        [*FIT, "--model.net", "TorchvisionNet", "--model.net.name", "inception_v3", "--data.image_size", "40"],
        "cifar-cli: error: TorchvisionNet inception_v3 cannot take 40x40 images (Calculated padded input size per "
        "channel: (2 x 2). Kernel size: (3 x 3). Kernel size can't be greater than actual input size): choose "
        "another --model.net, or another --data.image_size",
        setup=lambda: images(CLASSES_AB),
    ),
    # Refused as the trainer set the data up: after Lightning's banner, an empty run folder left behind and the
    # folder decoded (CIFAR downloaded)
    *(
        Case(
            f"crop_padding_not_below_the_image_side_{name}",
            [*args, "--data.augment", "true", "--data.crop_padding", padding],
            f"cifar-cli: error: --data.crop_padding {padding} must be below the image side, {side} pixels",
            setup=lambda: images(CLASSES_AB),
        )
        for name, args, padding, side in [
            ("folder", [*FIT, "--data.image_size", "16"], "16", "16"),
            ("cifar", ["fit"], "40", "32"),
        ]
    ),
    # torch's generator takes a signed or unsigned 64-bit seed: a larger one ended in a traceback as the split was drawn
    *(
        Case(
            f"split_seed_beyond_64_bits_{name}",
            [*args, "--data.split_seed", "18446744073709551616"],
            "cifar-cli: error: --data.split_seed 18446744073709551616: a seed is an integer from "
            "-9223372036854775808 to 18446744073709551615",
            setup=lambda: images(CLASSES_AB),
        )
        for name, args in [("folder", FIT), ("cifar", ["validate"])]
    ),
    Case("folder_test_without_test_split", ["test", *FIT[1:]], "has no test split", setup=lambda: images(CLASSES_AB)),
    # predict reads the test split only without a folder of its own: the advice named only the test split
    Case(
        "folder_predict_without_test_split",
        ["predict", *FIT[1:]],
        "cifar-cli: error: ImageFolderDataModule has no test split: add images/test/<class>/ with images the model "
        "has not trained on, or hold out training images when you fit (--data.test_size N); or predict a folder of "
        "images with --data.predict_root DIR",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "predict_root_missing",
        ["predict", *FIT[1:], "--data.predict_root", "new"],
        "--data.predict_root new is not a folder (no such path)",
        setup=lambda: images(CLASSES_AB),
    ),
    Case(
        "predict_root_empty",
        ["predict", *FIT[1:], "--data.predict_root", "new"],
        "--data.predict_root new has no images",
        {"new/notes.txt": "no images\n"},
        lambda: images(CLASSES_AB),
    ),
    Case(
        "predict_root_corrupt_image",
        ["predict", *FIT[1:], "--data.predict_root", "new"],
        "cannot decode image new/x.png",
        {"new/x.png": b"\x89PNG\r\n\x1a\njunk"},
        lambda: images(CLASSES_AB),
    ),
    # Checkpoints.
    Case("ckpt_missing", TEST_CKPT, "--ckpt_path model.ckpt: no such file"),
    # It exists: "no such file" sent the user looking for a typo.
    Case("ckpt_device", ["test", "--ckpt_path", os.devnull], f"--ckpt_path {os.devnull} is not a regular file"),
    # `--ckpt_path "$CKPT"` with the variable unset: test evaluated an untrained network, fit started a new run
    *(
        Case(
            f"ckpt_empty_path_{subcommand}",
            [subcommand, "--ckpt_path", "", *FOLDER],
            "cifar-cli: error: --ckpt_path '' is empty (an unset variable?): give a checkpoint file, or last, or leave "
            "the flag out",
            setup=lambda: images(CLASSES_AB),
        )
        for subcommand in ("test", "fit")
    ),
    # `--config "$CONFIG"`, `--model.init_from "$CKPT"` with the variable unset: read as none, without a word
    Case(
        "config_empty_path",
        ["fit", "--config", "", *FOLDER],
        "cifar-cli: error: --config '' is empty (an unset variable?): give a config file, or leave the flag out",
    ),
    Case(
        "init_from_empty_path",
        ["fit", "--model.init_from=", *FOLDER],
        "cifar-cli: error: --model.init_from '' is empty (an unset variable?): give a checkpoint file, or leave the "
        "flag out",
        setup=lambda: images(CLASSES_AB),
    ),
    # The checkpoint's settings stay defaults: its whiten_bias_until was refused for the TutorialCNN asked for.
    Case(
        "ckpt_of_another_net",
        [*TEST_CKPT, "--model.net", "TutorialCNN"],
        "cifar-cli: error: --model.net cifar_cli.nets.TutorialCNN: --ckpt_path model.ckpt holds the weights of a "
        "cifar_cli.nets.FastNet, which do not fit another network: leave --model.net out",
        ckpt=checkpoint(
            **{
                "hyper_parameters.net": {
                    "class_path": "cifar_cli.nets.FastNet",
                    "init_args": {"num_classes": 10, "image_shape": (3, 32, 32)},
                },
                "hyper_parameters.whiten_bias_until": 0.3,
            }
        ),
    ),
    Case(
        "ckpt_directory", TEST_CKPT, "--ckpt_path model.ckpt is a directory", setup=lambda: Path("model.ckpt").mkdir()
    ),
    Case("ckpt_empty", TEST_CKPT, "--ckpt_path model.ckpt is empty (0 bytes)", {"model.ckpt": b""}),
    Case(
        "ckpt_text",
        TEST_CKPT,
        "is not a Lightning checkpoint (not a file torch.save wrote",
        {"model.ckpt": "epoch: 3\n"},
    ),
    Case(
        "ckpt_truncated",
        TEST_CKPT,
        "is not a Lightning checkpoint (the file is truncated or damaged",
        ckpt=checkpoint(),
        setup=lambda: truncate("model.ckpt"),
    ),
    # Saved by hand from a checkpoint's entries: Lightning's KeyError traceback once the data was loaded
    Case(
        "ckpt_without_lightning_version",
        TEST_CKPT,
        "--ckpt_path model.ckpt is not a Lightning checkpoint (it has no pytorch-lightning_version entry: saved by "
        "hand?); pass a .ckpt file written by `cifar-cli fit`",
        ckpt={k: v for k, v in checkpoint().items() if k != "pytorch-lightning_version"},
    ),
    Case("ckpt_plain_tensor", TEST_CKPT, "is not a Lightning checkpoint (it holds a Tensor", ckpt=torch.zeros(3)),
    Case("ckpt_without_state_dict", TEST_CKPT, "it holds a dict without a state_dict", ckpt={"epoch": 3}),
    Case(
        "ckpt_state_dict_not_tensors",
        TEST_CKPT,
        "its state_dict holds more than tensors",
        ckpt=checkpoint(state_dict={"net.w": [1, 2]}),
    ),
    Case(
        "ckpt_not_from_cifar_cli",
        TEST_CKPT,
        "was not written by cifar-cli",
        ckpt={"state_dict": {}, "hyper_parameters": {"hidden_dim": 64}},
    ),
    Case(
        "ckpt_pickle_runs_code",
        TEST_CKPT,
        f"weights-only loading refuses (GLOBAL {OPEN})",
        ckpt={"state_dict": {}, "x": Payload(Path("pwned"))},
    ),
    Case(
        "ckpt_plain_pickle_runs_code",
        TEST_CKPT,
        f"weights-only loading refuses (GLOBAL {OPEN})",
        setup=lambda: pickle_payload("model.ckpt"),
    ),
    Case(
        "ckpt_plain_pickle_protocol_4",
        TEST_CKPT,
        "not a file torch.save wrote",
        setup=lambda: pickle_payload("model.ckpt", 4),
    ),
    Case(
        "ckpt_force_no_weights_only_env",
        TEST_CKPT,
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set",
        ckpt=checkpoint(),
        env=force_unsafe_load,
    ),
    Case(
        "ckpt_other_model",
        TEST_CKPT,
        "does not fit the model (net.",
        ckpt=checkpoint(**{"hyper_parameters.net.class_path": "cifar_cli.nets.FastNet"}),
    ),
    Case(
        "ckpt_other_class_count",
        TEST_CKPT,
        "checkpoint model.ckpt was trained on other classes: it has 3 classes, the data 10 (the data lacks c0, c1, "
        "c2; adds airplane, automobile, bird, ...); pass the data it was trained on",
        ckpt=checkpoint(num_classes=3),
    ),
    Case(
        "ckpt_net_is_a_function",
        TEST_CKPT,
        "os.system does not correspond to a subclass of Module",
        ckpt=checkpoint(**{"hyper_parameters.net.class_path": "os.system"}),
    ),
    Case(
        "ckpt_optimizer_runs_code",
        TEST_CKPT,
        "builtins.eval is not an optimizer class",
        ckpt=checkpoint(**{"hyper_parameters.optimizer": {"class_path": "builtins.eval", "init_args": {}}}),
    ),
    Case(
        "ckpt_schedule_not_a_schedule",
        TEST_CKPT,
        "subprocess.Popen does not correspond to a subclass of LRSchedule",
        ckpt=checkpoint(
            **{"hyper_parameters.lr_schedule": {"class_path": "subprocess.Popen", "init_args": {"args": "touch pwned"}}}
        ),
    ),
    Case(
        "ckpt_unknown_hyperparameter",
        TEST_CKPT,
        "does not accept option 'model.bogus'",
        ckpt=checkpoint(**{"hyper_parameters.bogus": 1}),
    ),
    Case(
        "ckpt_unknown_instantiator",
        TEST_CKPT,
        "unknown _instantiator 'os.system'",
        ckpt=checkpoint(**{"hyper_parameters._instantiator": "os.system"}),
    ),
    Case(
        "ckpt_data_class_is_a_function",
        TEST_CKPT,
        'its data config is refused: Parser key "data": Import path builtins.eval',
        ckpt=checkpoint(**{"cifar_cli.data.class_path": "builtins.eval"}),
    ),
    Case(
        "ckpt_data_unknown_argument",
        TEST_CKPT,
        "Option 'bogus' is not accepted",
        ckpt=checkpoint(**{"cifar_cli.data.init_args.bogus": 1}),
    ),
]


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file and folder below `root`: size and modification time (None for a folder)."""
    tree: dict[str, tuple[int, int] | None] = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        tree[path.relative_to(root).as_posix()] = None if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return tree


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capfd, recwarn, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.ckpt is not None:
        torch.save(case.ckpt, "model.ckpt")
    for name, content in case.files.items():
        write(name, content)
    if case.setup is not None:
        case.setup()
    if case.env is not None:
        case.env(monkeypatch)
    before = snapshot(tmp_path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(case.args)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-cli: error: "), err
    assert case.phrase.replace("{cwd}", os.getcwd()) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not [str(w.message) for w in recwarn if issubclass(w.category, SHOWN)]
    after = snapshot(tmp_path)
    if case.caches:
        after = {path: value for path, value in after.items() if not path.startswith("cache")}
    assert after == before
    assert not Path("pwned").exists()  # the payload of the code-running cases


def test_matrix_is_large() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("args", "phrase", "caches"),
    [
        # The case that printed the seed, the GPU/TPU lines and a tip before its error: the data is checked first.
        (["--data.val_size", "50"], "cifar-cli: error: val_size/test_size hold out 50 of 8", False),
        # Refused as the trainer is built, after the data's checks: it printed the seed and the precision first.
        (["--data.val_size", "2", "--trainer.num_nodes", "0"], "--trainer: `num_nodes` must be a positive", True),
    ],
    ids=["data", "trainer"],
)
def test_bad_input_in_a_real_process(tmp_path: Path, args: list[str], phrase: str, caches: bool) -> None:
    """The console script prints the one line too: no log line, warning or banner before it, in its own process."""
    images({"a": 4, "b": 4})
    bin_dir = Path(sys.executable).parent
    # matplotlib (imported by a dependency) keeps a font cache, built on first import: the user's, as in any run,
    # not one in this test's folder (XDG_CACHE_HOME points there).
    env = {**os.environ, "MPLCONFIGDIR": str(Path.home() / ".cache" / "matplotlib")}
    before = snapshot(tmp_path)
    run = subprocess.run([bin_dir / "cifar-cli", "fit", *FOLDER, *args], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], run.stderr
    after = snapshot(tmp_path)
    if caches:  # the data's decoded cache, whole: the next run reuses it
        after = {path: value for path, value in after.items() if not path.startswith("cache")}
    assert after == before


# Odd but valid input.
def gradient(height: int = 32, width: int = 32) -> np.ndarray:
    """A smooth `(H, W, 3)` uint8 RGB image, which JPEG keeps within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (height + width - 2)], -1
    ).astype(np.uint8)


def png16(path: Path, rgb16: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand: Pillow cannot write one."""
    height, width, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def odd_image(kind: str, path: Path) -> np.ndarray:
    """Write an odd but valid image file; return the `(H, W, 3)` uint8 RGB it shows."""
    rgb = gradient()
    image = Image.fromarray(rgb)
    if kind == "grayscale.png":
        gray = image.convert("L")
        gray.save(path)
        return np.repeat(np.asarray(gray)[..., None], 3, -1)
    if kind == "rgba.png":
        image.convert("RGBA").save(path)
        return rgb
    if kind == "palette.png":
        palette = image.convert("P")
        palette.save(path)
        return np.asarray(palette.convert("RGB"))
    if kind == "gray16.png":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
        return np.repeat(rgb[..., :1], 3, -1)
    if kind == "rgb16.png":
        png16(path, rgb.astype(np.uint16) * 257)
        return rgb
    if kind == "cmyk.jpg":
        image.convert("CMYK").save(path, quality=95)
        return rgb
    if kind == "animated.gif":
        frames = [image.convert("P"), Image.fromarray(255 - rgb).convert("P")]
        frames[0].save(path, save_all=True, append_images=frames[1:])
        return np.asarray(frames[0].convert("RGB"))
    if kind == "animated.webp":  # torchvision refuses animated WebP: Pillow decodes it
        Image.fromarray(rgb).save(path, save_all=True, append_images=[Image.fromarray(255 - rgb)], lossless=True)
        return rgb
    if kind == "rgb.bmp":  # Pillow reads BMPs, torchvision none
        image.save(path)
        return rgb
    if kind == "palette.bmp":
        palette = image.convert("P")
        palette.save(path)
        return np.asarray(palette.convert("RGB"))
    raise ValueError(kind)


ODD_KINDS = ["grayscale.png", "rgba.png", "palette.png", "gray16.png", "rgb16.png", "cmyk.jpg", "animated.gif",
             "animated.webp", "rgb.bmp", "palette.bmp"]  # fmt: skip


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_but_valid_image_decodes_to_rgb(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"image-{kind}"
    expected = torch.from_numpy(odd_image(kind, path)).permute(2, 0, 1)
    decoded = decode_rgb(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 32, 32)
    tolerance = 8 if kind.endswith(".jpg") else 0  # JPEG is lossy, and its CMYK round trip more so
    assert (decoded.int() - expected.int()).abs().max() <= tolerance


def test_odd_images_of_mixed_sizes_train_and_predict(tmp_path: Path, capfd) -> None:
    train = Path("images/train")
    write_image_folder(train, {"a": 6, "b": 6})
    for i, kind in enumerate(ODD_KINDS):
        folder = train / "ab"[i % 2]
        odd_image(kind, folder / f"odd-{kind}")
    for size in [(20, 20), (48, 32), (32, 90)]:  # (width, height): resized and centre-cropped to 32x32
        Image.fromarray(gradient(size[1], size[0])).save(train / "a" / f"size-{size[0]}x{size[1]}.png")
    data = ImageFolderDataModule("images", val_size=4)
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 12 + len(ODD_KINDS) + 3
    # Files that are not images are skipped, and said once in a line: a README does not stop a run.
    (train / "README.txt").write_text("odd images\n")
    Image.fromarray(gradient()).save(train / "b" / "scan.tif")
    capfd.readouterr()
    main(["fit", *FOLDER, "--data.val_size", "4", "--trainer.max_epochs", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    said = [line for line in capfd.readouterr().err.splitlines() if "skipped" in line]
    assert said == [
        f"cifar-cli: skipped 2 files of images/train that are not {'/'.join(sorted(image_suffixes()))} images "
        "(.tif: 1, .txt: 1; e.g. images/train/README.txt)"
    ]
    (ckpt,) = Path().glob("**/checkpoints/epoch=*.ckpt")
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", "images/train/a", "--trainer.logger", "false"])
    out = capfd.readouterr().out
    assert f"Predictions for {6 + len(ODD_KINDS) // 2 + 3} images written to" in out


# EXIF orientation tag: how a viewer turns the stored pixels (6: a quarter turn clockwise, as phones store portraits).
ORIENTATIONS = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


def phone_formats(*suffixes: str) -> None:
    """Skip the test where Pillow can write or read none of the files it needs: HEIC through pillow-heif 1.1 or later
    (the `dev` extra), AVIF by itself (its wheels from 11.3)."""
    if any(suffix.lower() in (".heic", ".heif") for suffix in suffixes) and not reads_heif():
        pytest.skip("needs pillow-heif 1.1 or later")
    if ".avif" in suffixes and not reads_avif():
        pytest.skip("this Pillow has no AVIF codec")


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".heic", ".avif"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_rotated_photo_decodes_upright(suffix: str, orientation: int, tmp_path: Path) -> None:
    # pillow-heif writes the turn as HEIF's own rotation (`irot`, which viewers apply) and keeps the EXIF tag too, as
    # iPhones do: turned by both, the photo would lie on its other side (a quarter) or upside down (a half).
    phone_formats(suffix)
    stored = gradient(24, 40)  # landscape pixels, shown as a portrait where the tag turns them a quarter
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    lossless = {"lossless": True} if suffix == ".webp" else {"quality": 95}
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **lossless)
    shown = torch.from_numpy(ORIENTATIONS[orientation](stored).copy()).permute(2, 0, 1)
    decoded = decode_rgb(path)
    assert decoded.shape == shown.shape
    assert (decoded.int() - shown.int()).abs().max() <= (8 if suffix in (".jpg", ".heic", ".avif") else 0)


def test_ten_bit_heic_decodes_to_8_bit_rgb(tmp_path: Path) -> None:
    # An iPhone's HDR photos are 10-bit HEIC: torchvision's decode_heic returns uint16 for them, Pillow (through
    # pillow-heif) 8-bit RGB, as every other image here.
    phone_formats(".heic")
    import pillow_heif

    rgb = gradient(24, 40)
    deep = pillow_heif.from_bytes(mode="RGB;16", size=(40, 24), data=(rgb.astype(np.uint16) * 257).tobytes())
    deep.save(tmp_path / "hdr.heic", quality=95)
    assert pillow_heif.open_heif(tmp_path / "hdr.heic", convert_hdr_to_8bit=False).info["bit_depth"] == 10
    decoded = decode_rgb(tmp_path / "hdr.heic")
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 24, 40)
    assert (decoded.int() - torch.from_numpy(rgb).permute(2, 0, 1).int()).abs().max() <= 8


def test_heic_and_avif_photos_train_and_predict_upright(capfd) -> None:
    """Phone photos (`IMG_0001.HEIC`, as iPhones name them) and AVIFs are read as every other image, upright: they
    were skipped, with a count line."""
    phone_formats(".heic", ".avif")
    train = Path("images/train")
    write_image_folder(train, {"a": 6, "b": 6})
    for i, jpg in enumerate(sorted(train.glob("*/*.jpg"))[::2]):  # half of each class
        with Image.open(jpg) as image:
            image.save(jpg.with_name(f"IMG_{i:04d}{('.HEIC', '.avif', '.heif')[i % 3]}"), quality=95)
        jpg.unlink()
    assert len(list(train.glob("*/IMG_*"))) == 6
    photos = Path("photos")  # a portrait photo stored as landscape pixels, turned by its tag (6), and as a PNG
    photos.mkdir()
    stored = gradient(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("IMG_0100.HEIC", "IMG_0101.avif"):
        Image.fromarray(stored).save(photos / name, exif=exif.tobytes(), quality=95)
    Image.fromarray(ORIENTATIONS[6](stored)).save(photos / "upright.png")
    capfd.readouterr()
    main([*FIT, "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert "skipped" not in capfd.readouterr().err
    (ckpt,) = Path().glob("**/checkpoints/epoch=*.ckpt")
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", "photos", "--trainer.logger", "false"])
    assert "skipped" not in capfd.readouterr().err
    with open("predictions.csv", newline="") as f:
        assert [row["image"] for row in csv.DictReader(f)] == ["IMG_0100.HEIC", "IMG_0101.avif", "upright.png"]
    data = ImageFolderDataModule("images", val_size=2, predict_root="photos")
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 12
    data.setup("predict")
    heic, avif, png = data.splits["predict"].images.int()  # 32x32, as the model saw them
    assert (heic - png).abs().max() <= 8 and (avif - png).abs().max() <= 8


def test_decode_images_keeps_mixed_sizes_square(tmp_path: Path) -> None:
    paths = []
    for width, height in [(32, 32), (64, 32), (16, 40)]:
        paths.append(tmp_path / f"{width}x{height}.png")
        Image.fromarray(gradient(height, width)).save(paths[-1])
    assert decode_images(paths, 24).shape == (3, 3, 24, 24)


@pytest.mark.parametrize(
    "content", ["# only a comment\n", "", "\n# two\n# comments\n"], ids=["comment", "empty", "comments"]
)
def test_config_of_only_comments_is_an_empty_config(content: str, tmp_path: Path, capfd) -> None:
    write("c.yaml", content)

    def printed(*args: str) -> dict[str, Any]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args, "--print_config"])
        assert exit_info.value.code in (0, None)
        return yaml.safe_load(io.StringIO(capfd.readouterr().out))

    assert printed("--config", "c.yaml") == printed()


def test_config_of_only_comments_trains(tmp_path: Path, fake_cifar10: Path) -> None:
    write("c.yaml", "# a preset still to be written\n")
    data = ["--data.data_dir", str(fake_cifar10), "--data.val_size", "40"]
    main(["fit", "--config", "c.yaml", *data, "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    assert len(list(Path().glob("**/checkpoints/epoch=*.ckpt"))) == 1


def test_full_disk_is_one_line_and_leaves_no_partial_file(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The disk fills while the first checkpoint is written: one line, exit code 1, and no partial file left."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".ckpt." in os.readlink(f"/proc/self/fd/{fd}"):  # a checkpoint's partial file: the config fitted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.max_epochs", "1",
              "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cifar-cli: error")]
    # The file named, as for any other write: torch.save's error, and the OSError under it, named none.
    (run,) = Path("runs").glob("**/version_0")
    assert errors == [f"cifar-cli: error: no space left on the device writing {run}/checkpoints/epoch=0-step=5.ckpt: "
                      "free some, or write elsewhere (--trainer.default_root_dir, --data.cache_dir)"]  # fmt: skip
    assert not [p for p in Path().rglob("*") if p.name.endswith(".partial") or p.suffix == ".ckpt"]
    assert len(list(Path("runs").rglob("config.yaml"))) == 1


@pytest.mark.parametrize(
    ("flag", "folder", "reason"),
    [
        ("--data.cache_dir", "notes.txt/out", "not a directory"),
        ("--trainer.default_root_dir", "notes.txt/out", "not a directory"),
        # The folder a file: its `mkdir(exist_ok=True)` raised FileExistsError, a traceback.
        ("--data.cache_dir", "notes.txt", "a file, not a folder"),
        ("--trainer.default_root_dir", "notes.txt", "a file, not a folder"),
        # A file system that makes no folders: mkdir's FileNotFoundError was a traceback.
        ("--data.cache_dir", "/proc/cifar-cli", "no folder can be made there"),
        ("--trainer.default_root_dir", "/proc/cifar-cli", "no folder can be made there"),
    ],
)
def test_a_folder_that_cannot_be_written_is_one_line(flag: str, folder: str, reason: str, capsys) -> None:
    """A folder to write in that cannot be made (a file in its path here; a read-only disk, one without permission):
    one line, exit code 1, and nothing written. It was a traceback, from the cache's or the logger's `mkdir`."""
    images(CLASSES_AB)
    Path("notes.txt").write_text("a file, not a folder")
    before = snapshot(Path())
    logger = "CSVLogger" if folder != "notes.txt" else "false"  # without a logger, the folder itself is made
    with pytest.raises(SystemExit) as exit_info:
        main([*FIT, "--trainer.max_epochs", "1", "--trainer.logger", logger, flag, folder])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cifar-cli: error")]
    assert len(errors) == 1 and errors[0].startswith("cifar-cli: error: cannot write in ")
    assert errors[0].endswith(
        f"{folder} ({reason}): choose a folder you can write in (--trainer.default_root_dir, --data.cache_dir)"
    )
    if flag == "--data.cache_dir":  # refused before the trainer is built
        assert snapshot(Path()) == before


def test_a_folder_without_permission_names_the_folder(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A run without a logger writes its config.yaml first, into the folder itself: the error named the hidden
    partial file it could not make there (`.config.yaml.HOST.PID.xxxx.partial`), not the folder. Permission is
    refused here by mkstemp, as a folder without it (or a read-only disk) refuses it; root would pass."""
    images(CLASSES_AB)

    def refused(suffix: str = "", prefix: str = "", dir: str = "") -> tuple[int, str]:
        if os.path.basename(dir) != "out":  # the data's cache
            return mkstemp(suffix=suffix, prefix=prefix, dir=dir)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}x1y2{suffix}"))

    mkstemp = tempfile.mkstemp

    monkeypatch.setattr("cifar_cli.atomic.tempfile.mkstemp", refused)
    with pytest.raises(SystemExit) as exit_info:
        main([*FIT, "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.default_root_dir", "out"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar-cli: error")]
    assert exit_info.value.code == 1
    assert errors == ["cifar-cli: error: cannot write in out (permission denied): choose a folder you can write in "
                      "(--trainer.default_root_dir, --data.cache_dir)"]  # fmt: skip


def test_a_home_wandb_cannot_write_in_is_one_line_before_training(monkeypatch, capsys) -> None:
    """W&B stages what a run logs (tables, images, model artifacts) in a folder of the home (~/.local/share/wandb),
    not the run's: with a read-only home the run trained an epoch, then failed at its first validation with advice
    (--trainer.default_root_dir, --data.cache_dir) that moves nothing of W&B's. Refused before training, naming the
    variable that moves it."""
    images(CLASSES_AB)
    Path("home").write_text("a file, not a folder")
    monkeypatch.setenv("HOME", str(Path("home").absolute()))
    monkeypatch.delenv("WANDB_DATA_DIR")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main([*FIT, "--trainer.max_epochs", "1", "--trainer.logger.save_dir", "runs"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cifar-cli: error")]
    assert len(errors) == 1 and errors[0].startswith(f"cifar-cli: error: cannot write in {Path('home').absolute()}")
    assert errors[0].endswith(
        " (not a directory): set WANDB_DATA_DIR to a folder you can write in (W&B stages what a run logs there), "
        "or log without W&B (--trainer.logger CSVLogger)"
    )
    assert not Path("runs").exists()  # no run begun


def test_a_wandb_dir_that_cannot_be_written_in_is_one_line_naming_it(monkeypatch, capsys) -> None:
    """WANDB_DIR, which holds W&B's own files, below a file: one line before training that says to move WANDB_DIR,
    not the run's folders (--trainer.default_root_dir, --data.cache_dir), which would not help."""
    images(CLASSES_AB)
    Path("scratch").write_text("a file, not a folder")
    monkeypatch.setenv("WANDB_DIR", "scratch/wandb")
    with pytest.raises(SystemExit) as exit_info:
        main([*FIT, "--trainer.max_epochs", "1", "--trainer.logger.save_dir", "runs"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cifar-cli: error")]
    assert errors == [
        f"cifar-cli: error: cannot write in {Path('scratch', 'wandb').absolute()} (not a directory): set WANDB_DIR to "
        "a folder you can write in, or unset it (W&B's files then go under the logger's save_dir, runs/ by default)"
    ]
    assert not list(Path("runs").glob("*/*/checkpoints"))  # no training begun


@pytest.mark.parametrize("cache", [True, False], ids=["cache-folder", "none-writable"])
def test_a_home_matplotlib_cannot_write_in_prints_nothing_of_it(tmp_path: Path, monkeypatch, cache: bool) -> None:
    """Matplotlib, which torchmetrics imports as every command starts, printed two long lines about a temporary
    folder where the home cannot be written in. Its files go into cifar-cli's cache folder instead, or where that
    cannot be made either, into a temporary folder removed at exit; MPLCONFIGDIR, where set, is left alone."""
    Path("home").write_text("a file, not a folder")
    monkeypatch.setenv("HOME", str(Path("home", "user").absolute()))
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("TMPDIR", str(Path("tmp").absolute()))
    Path("tmp").mkdir()
    if not cache:
        monkeypatch.delenv("XDG_CACHE_HOME")
    run = subprocess.run([sys.executable, "-m", "cifar_cli", "fit", "--print_config"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "seed_everything" in run.stdout
    assert (tmp_path / "cache" / "cifar-cli" / "matplotlib").is_dir() == cache
    assert not list(Path("tmp").glob("matplotlib-*"))


def test_network_settings_the_data_gives_alike_pass() -> None:
    data = CIFAR10DataModule()
    net = Namespace(
        class_path="cifar_cli.nets.TutorialCNN", init_args=Namespace(num_classes=10, image_shape=(3, 32, 32))
    )
    check_linked_net_args(Namespace(model=Namespace(net=net)), data)
    net.init_args.num_classes = 100
    with pytest.raises(UsageError, match="num_classes 100: the network's classes come from the data"):
        check_linked_net_args(Namespace(model=Namespace(net=net)), data)


def test_monitors_that_may_be_logged_pass() -> None:
    """The monitor check refuses only names it knows are never logged."""
    model = ImageClassifier(TutorialCNN(3), class_names=["a", "b", "c"])
    plateau = ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), monitor="val_loss")
    fine = [EarlyStopping("train_loss_epoch"), ModelCheckpoint(monitor="step"), ModelCheckpoint(), FitTimer()]
    check_monitors(model, [*fine, EarlyStopping("fit_time")], plateau, "--lr_scheduler")
    # LearningRateMonitor's names follow the optimizer and its parameter groups: any lr- name may be one.
    check_monitors(model, [LearningRateMonitor(), EarlyStopping("lr-SGD/pg2")], None, "--lr_scheduler")
    with pytest.raises(UsageError, match="EarlyStopping monitors fit_time, which this run never logs"):
        check_monitors(model, [EarlyStopping("fit_time")], None, "--lr_scheduler")  # no FitTimer
    with pytest.raises(UsageError, match="EarlyStopping monitors lr-SGD"):
        check_monitors(model, [EarlyStopping("lr-SGD")], None, "--lr_scheduler")  # no LearningRateMonitor

    class LogsMore(ImageClassifier):
        pass

    class OwnCallback(Callback):  # may log with pl_module.log
        pass

    # A model of the user's own, or a callback, may log more: their names pass.
    check_monitors(LogsMore(TutorialCNN(3), class_names=["a", "b", "c"]), [EarlyStopping("val_f1")], None, "")
    check_monitors(model, [EarlyStopping("val_f1"), OwnCallback()], None, "")


def test_val_check_interval_beyond_an_epoch_is_one_line(tmp_path: Path, capfd) -> None:
    """A step count above the epoch's batches while validation counts per epoch (configs/budget.yaml's interval with
    `--trainer.check_val_every_n_epoch 1`): Lightning refuses it only once the data is loaded, in a traceback."""
    images(CLASSES_AB)
    args = [*FIT, "--data.batch_size", "2", "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "10"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cifar-cli: error: --trainer.val_check_interval 10: more than the 3 training batches"), err
    # Refused before the run starts: it left the run's config.yaml and hparams.yaml, and W&B's offline run.
    assert not Path("config.yaml").exists()
    with pytest.raises(SystemExit):
        main([*FIT, "--data.batch_size", "2", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.val_check_interval", "10", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
              "runs"])  # fmt: skip
    assert "more than the 3 training batches" in capfd.readouterr().err and not Path("runs").exists()
    # An interval within the epoch's batches (3, counted as Lightning counts them) still runs.
    main([*args, "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "3"])
    # The interval configs/budget.yaml sets: the line spoke of a flag never typed.
    with pytest.raises(SystemExit):
        main([*args, "--config", "configs/fast-cpu.yaml", "--config", "configs/budget.yaml",
              "--model.net.widths", "[8, 8, 8]", "--trainer.check_val_every_n_epoch", "1"])  # fmt: skip
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cifar-cli: error: configs/budget.yaml's trainer.val_check_interval 1000000: more than"), (
        last
    )


def test_a_checkpoint_path_under_the_home_is_found(
    tmp_path: Path, fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`~` in `--ckpt_path=~/x.ckpt`, which no shell expands, or in a config: it was "no such file", though the
    data paths expand it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    torch.save({**checkpoint(), "pytorch-lightning_version": lightning.__version__}, home / "model.ckpt")
    write("c.yaml", "ckpt_path: ~/model.ckpt\n")
    for args in (["--ckpt_path=~/model.ckpt"], ["--config", "c.yaml"]):
        main(["validate", *args, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
        assert f"Checkpoint: {home / 'model.ckpt'}\n" in capsys.readouterr().out
    main(["fit", "--model.init_from=~/model.ckpt", "--data.val_size", "40", "--trainer.max_epochs", "1",
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert "cifar-cli: --model.init_from ~/model.ckpt: loaded 14 of 14 network tensors" in capsys.readouterr().err


def test_resuming_from_a_weights_only_checkpoint_is_one_line(fake_cifar10: Path, capfd) -> None:
    """A checkpoint a ModelCheckpoint wrote with save_weights_only has no optimizer state: `fit --ckpt_path` on it
    ended in Lightning's KeyError, a traceback, once the data was loaded. Refused first; --model.init_from takes it."""
    args = ["--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.max_epochs", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(["fit", *args, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_weights_only", "true",
          "--trainer.callbacks.dirpath", "weights", "--trainer.callbacks.filename", "w"])  # fmt: skip
    before = snapshot(Path())
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "weights/w.ckpt"])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "cifar-cli: error: --ckpt_path weights/w.ckpt holds the network's weights alone (a ModelCheckpoint's "
        "save_weights_only), not the optimizer and progress a resumed fit goes on with: start a new run from its "
        "weights with --model.init_from weights/w.ckpt"
    ]
    assert snapshot(Path()) == before
    main(["fit", *args, "--model.init_from", "weights/w.ckpt", "--trainer.default_root_dir", "new"])
    assert "--model.init_from weights/w.ckpt: loaded 14 of 14 network tensors" in capfd.readouterr().err


def test_a_weights_only_checkpoint_carries_its_data_config(image_folder: Path, capfd) -> None:
    """A ModelCheckpoint's save_weights_only skips the callbacks' on_save_checkpoint, which wrote the run's data
    config: `predict --ckpt_path F --data.predict_root DIR` on it took CIFAR-10's classes and was refused, its advice
    the --data.predict_root it had been given."""
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_weights_only", "true",
          "--trainer.callbacks.dirpath", "weights", "--trainer.callbacks.filename", "w"])  # fmt: skip
    assert "optimizer_states" not in torch.load("weights/w.ckpt", weights_only=True)
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cats = str(image_folder / "test" / "cat")
    main(["predict", "--ckpt_path", "weights/w.ckpt", "--data.predict_root", cats, *quiet])
    with open("predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 10 and {row["predicted"] for row in rows} <= {"cat", "dog", "frog"}
    main(["test", "--ckpt_path", "weights/w.ckpt", *quiet])  # the run's image folder, and its test split
    assert "test_acc" in capfd.readouterr().out


def test_a_root_dir_under_the_home_holds_the_whole_run(
    tmp_path: Path, fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--trainer.default_root_dir=~/outs`, which no shell expands: Lightning put the run's folder (config,
    checkpoints, metrics) in a folder named `~` in the current one, and W&B its files in the home's `outs`."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    main(["fit", "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir=~/outs"])  # fmt: skip
    assert not Path("~").exists()
    (run,) = (home / "outs" / "runs" / "cifar-cli").iterdir()
    assert (run / "config.yaml").is_file() and len(list(run.glob("checkpoints/*.ckpt"))) == 2
    assert len(list((home / "outs" / "runs" / "wandb").glob(f"offline-run-*-{run.name}"))) == 1


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["fit", "--data", "ImageFolderDataModule"], "--data.root"),
        (["predict", "--ckpt_path", "m.ckpt"], "--data.predict_root"),
    ],
)
def test_a_folder_whose_name_is_not_utf8_is_one_line_naming_it(command: list[str], flag: str, capsys) -> None:
    """A folder named in Latin-1 (`donn\\xe9es`): jsonargparse reads --data.* values as YAML, which holds only
    Unicode, and the error was a codec's, under `Parser key "data"`, that named neither the flag nor the folder."""
    folder = os.fsdecode(b"donn\xe9es")
    write_image_folder(Path(folder) / "train", {"cat": 4, "dog": 4})
    with pytest.raises(SystemExit) as exit_info:
        main([*command, flag, folder, "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.splitlines()[-1] == (
        f"cifar-cli: error: {flag} 'donn\\xe9es': the name is not UTF-8, which cifar-cli's configs (YAML) cannot "
        "hold: rename it, or link it under a UTF-8 name (ln -s) and give that"
    )


def test_native_windows_is_refused_in_one_line() -> None:
    # On native Windows the command's first import failed (signal.SIGUSR1), in a traceback that named no remedy.
    code = "import sys; sys.platform = 'win32'; sys.argv = ['cifar-cli', 'fit']; import cifar_cli.entry"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (
        1,
        "cifar-cli: native Windows is not supported: run it in WSL 2 (Windows Subsystem for Linux), where CUDA GPUs "
        "work too\n",
    )


@pytest.mark.parametrize("suffix", [".avif", ".heic"])
def test_a_cut_short_phone_photo_is_named_as_such(suffix: str, tmp_path: Path) -> None:
    # Pillow drops libavif's reason (and pillow-heif's for a file cut short early): a cut-short AVIF was "not an
    # image: its contents are no JPEG, PNG, GIF, WebP, BMP, HEIC or AVIF", which it is.
    phone_formats(suffix)
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(gradient(64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError) as refused:
        decode_rgb(path)
    assert str(refused.value) == (
        f"cannot decode image {path} (a damaged or cut-short {suffix[1:].upper()} file: no image could be read from "
        "it): remove or replace the file"
    )


def test_large_jpegs_decode_reduced_upright_and_close_to_the_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder of phone photos decoded every JPEG in full, then shrank it to 32 or 224 px: libjpeg's DCT scaling
    # (1/2 to 1/8) decodes a 12-MP photo 2.6 times as fast.
    from cifar_cli.data import images as image_files
    from cifar_cli.data.images import _decode_jpeg_reduced, decode_square

    tried = []
    monkeypatch.setattr(
        image_files, "_decode_jpeg_reduced", lambda *args: tried.append(args) or _decode_jpeg_reduced(*args)
    )
    cifar = tmp_path / "cifar.jpg"  # a small file is not opened twice: that halved the rate of CIFAR's JPEGs
    Image.fromarray(gradient(32, 32)).save(cifar, quality=95)
    decode_square(cifar, 32)
    assert tried == []
    monkeypatch.setattr(image_files, "REDUCE_FROM_BYTES", 0)  # the smooth photo below takes fewer bytes than a real one

    stored = gradient(384, 512)  # landscape pixels, turned a quarter by the EXIF tag: a portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(photo, quality=95, exif=exif.tobytes())
    reduced = _decode_jpeg_reduced(photo, 32)
    assert reduced is not None and tuple(reduced.shape) == (3, 64, 48)  # 1/8 of 512x384, turned upright
    for size in (32, 96):
        full = torch.from_numpy(ORIENTATIONS[6](stored).copy()).permute(2, 0, 1)
        expected = TF.center_crop(TF.resize(full, size, antialias=True), [size, size])
        assert (decode_square(photo, size).int() - expected.int()).abs().max() <= 8
    assert [size for _, size in tried] == [32, 96]
    # Smaller than twice the size, CMYK, or not a JPEG inside: decoded in full, as before.
    assert _decode_jpeg_reduced(photo, 200) is None
    Image.fromarray(stored).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert _decode_jpeg_reduced(tmp_path / "cmyk.jpg", 32) is None
    Image.fromarray(stored).save(tmp_path / "png.jpg", format="PNG")
    assert _decode_jpeg_reduced(tmp_path / "png.jpg", 32) is None
    assert decode_square(tmp_path / "png.jpg", 32).shape == (3, 32, 32)
