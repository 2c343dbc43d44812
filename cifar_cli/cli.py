"""`cifar-cli`: LightningCLI over `ImageClassifier` and the data modules, with the tutorial recipe as its defaults."""

from __future__ import annotations

import contextlib
import difflib
import enum
import errno
import gc
import importlib
import inspect
import io
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from jsonargparse.typing import register_type
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BasePredictionWriter,
    ProgressBar,
    StochasticWeightAveraging,
)
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from cifar_cli import hooks
from cifar_cli.atomic import AtomicCheckpointIO, atomic_csv_logs, atomic_write_text
from cifar_cli.callbacks import (
    UNSTARTED_RUN,
    FitTimer,
    LastCheckpoint,
    PredictionWriter,
    Preemption,
    drop_logger_only,
    epoch_label,
    lightning_takes_signals,
    one_per_state_key,
    run_dir,
)
from cifar_cli.checkpoints import (
    CHECKPOINT_KEY,
    FROM_FIT,
    apply_hyperparameters,
    check_optimizer_class,
    check_same_classes,
    check_same_net,
    check_weights_fit,
    load_checkpoint,
)
from cifar_cli.checks import (
    ArgumentParser,
    QuietSeed,
    check_accelerator,
    check_data,
    check_group_files,
    check_linked_net_args,
    check_monitors,
    check_run_folder,
    check_trainer_values,
    check_wandb_folder,
    chosen_seed,
    config_given,
    input_problem,
    local_rank_zero,
    net_name,
    output_shape,
    plain_numbers,
)
from cifar_cli.classifier import SCHEDULE_NEEDS_LENGTH, ImageClassifier
from cifar_cli.dashboard import RunCSVLogger, with_csv_logger
from cifar_cli.data import ImageDataModule
from cifar_cli.data.base import predicting_from
from cifar_cli.data.batches import train_batches
from cifar_cli.distributed import carry_spawned_state, exit_if_rank_failed, exit_if_spawned_rank_failed, watch_ranks
from cifar_cli.entry import StoppedAfterStage, StoppedBeforeStart, end_stopping_after_stage
from cifar_cli.errors import DEBUG_ENV, TrainingDiverged, UsageError, causes, debug_switch, debugging
from cifar_cli.folders import claim_version_folder, hold_run_folder, release_folders
from cifar_cli.optimizer_flags import (
    check_built,
    config_that_sets,
    drop_settled_copies,
    import_class,
    move_optimizer_flags,
    unsettled,
    without_settled_copies,
)
from cifar_cli.precision import (
    announce_precision,
    choose_precision,
    default_precision,
    on_cuda,
    show_held_warnings,
)
from cifar_cli.presets import read_config, shipped_config, shown
from cifar_cli.pretrained import LOCAL_DIR, saved_timm_config, weights_from_checkpoint
from cifar_cli.resume import (
    RUN_CONFIG_MARK,
    RUN_KEY,
    budget_spent,
    continue_run,
    keep_csv_metrics,
    last_checkpoints,
    logger_name,
    pass_over_slurm_checkpoints,
    requeued_slurm_job,
    restart_config,
    run_folder_name,
    run_identity,
    set_aside_csv_metrics,
    settings_changed,
    written_by_a_run,
)
from cifar_cli.terminal import (
    ignore_for_this_run,
    print_summary,
    progress_bar,
    quiet_model_summary,
    quiet_wandb,
    silence_noise,
    sync_line,
    tensor_core_tip,
    true_stop_line,
)

# A torch.device as its string (`cpu`, `cuda:0`), the form its constructor takes: jsonargparse wrote the default of
# StochasticWeightAveraging's `device` as `Unable to serialize instance cpu`, with a warning, into --print_config
# and the run's config.yaml, which then failed mid-run with a traceback.
register_type(torch.device, str, torch.device)
# A string enum as its value, where a parameter typed `str` defaults to one (Lightning's Timer: `interval: str =
# Interval.step`): YAML could not write it, and `--trainer.callbacks+=Timer` ended in a traceback. jsonargparse
# writes a parameter typed as the enum by its name itself, before YAML sees it.
yaml.SafeDumper.add_multi_representer(
    enum.Enum,
    lambda dumper, value: (
        dumper.represent_str(value.value) if isinstance(value, str) else dumper.represent_undefined(value)
    ),
)

# Checkpoint entry (under cifar_cli's own key): the folder `fit` ran in, where the data config's relative paths start.
WORKING_DIR_KEY = "working_dir"
SEED_KEY = "seed"  # the run's seed, which a resume with `--seed_everything true` goes on with
# The data modules' arguments that name files or folders.
DATA_PATHS = ("root", "data_dir", "cache_dir", "predict_root")


def continues_without_logger(trainer: dict[str, Any], identity: Any, ckpt_path: str) -> bool:
    """Whether `fit` without a logger goes on with a run that had none, from its folder's checkpoints
    (`default_root_dir/checkpoints/`): the same run, whose config.yaml is there. It was taken for a new run, whose
    config.yaml replaced the run's, the earlier settings lost and `ckpt_path` written in (the same command again
    changed the file)."""
    if identity is not None or logger_name(trainer.get("logger")) is not None:
        return False
    folder = Path(expand_home(trainer.get("default_root_dir") or os.getcwd()), "checkpoints")
    return Path(ckpt_path).resolve().parent == folder.resolve()


def data_paths_from(data: dict[str, Any], working_dir: str | None) -> dict[str, Any]:
    """A checkpoint's data config with each relative path that does not exist from here, but does from the folder
    `fit` ran in, made absolute: `test --ckpt_path runs/.../x.ckpt` then works from any folder, while a project
    moved whole, run from its new root, keeps its relative paths."""
    init_args = data.get("init_args")
    if not isinstance(working_dir, str) or not isinstance(init_args, dict):
        return data
    init_args = dict(init_args)
    for key in DATA_PATHS:
        if (there := found_from(init_args.get(key), working_dir)) is not None:
            init_args[key] = there
    return {**data, "init_args": init_args}


def data_paths_in(data: dict[str, Any], working_dir: str, saved: Any) -> dict[str, Any]:
    """A data config of a run resumed from another folder as seen from the folder `fit` first ran in,
    `working_dir`, which its checkpoints go on naming: each path that `data_paths_from` found there given back as
    the run's `saved` data config had it, any other relative one (given from this folder) made absolute. The restart
    named `data.root images -> /project/images` as a change of its settings, config.yaml and the checkpoints took the
    absolute path, and the project moved whole no longer found its data."""
    init_args = data.get("init_args")
    before = saved.get("init_args") if isinstance(saved, dict) else None
    if not isinstance(init_args, dict):
        return data
    init_args = dict(init_args)
    for key in DATA_PATHS:
        path, earlier = init_args.get(key), (before or {}).get(key)
        if not isinstance(path, str) or not path:
            continue
        if isinstance(earlier, str) and earlier and path == os.path.join(working_dir, earlier):
            init_args[key] = earlier
        elif not os.path.isabs(os.path.expanduser(path)):
            init_args[key] = os.path.abspath(path)
    return {**data, "init_args": init_args}


def found_from(path: Any, working_dir: str) -> str | None:
    """`path` joined to `working_dir`, where it is relative, does not exist from here and does from there; else
    None."""
    if not isinstance(path, str) or not path or os.path.isabs(os.path.expanduser(path)) or os.path.exists(path):
        return None
    there = os.path.join(working_dir, path)
    return there if os.path.exists(there) else None


def checkpoint_defaults(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's data and model settings as the command line's defaults: its data config (relative paths found
    from where `fit` ran) and its model hyperparameters (see `unsettled`)."""
    saved = checkpoint.get(CHECKPOINT_KEY, {})
    defaults = {"data": data_paths_from(saved["data"], saved.get(WORKING_DIR_KEY))} if saved.get("data") else {}
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k != "_instantiator"}
    if hparams:
        # A network the checkpoint carries the architecture of is built from it, not from its folder.
        working_dir = None if saved_timm_config(checkpoint) is not None else saved.get(WORKING_DIR_KEY)
        defaults["model"] = net_paths_from(unsettled(hparams), working_dir)
    return defaults


def net_paths_from(hparams: dict[str, Any], working_dir: str | None) -> dict[str, Any]:
    """A checkpoint's model hyperparameters with a relative `local-dir:PATH` network (TimmNet), not found from here
    but from the folder `fit` ran in, made absolute, as `data_paths_from` does for the data: timm builds the
    architecture from that folder's config.json, and `test --ckpt_path` run from another folder failed."""
    net = hparams.get("net")
    init_args = net.get("init_args") if isinstance(net, dict) else None
    name = init_args.get("name") if isinstance(init_args, dict) else None
    if not isinstance(working_dir, str) or not isinstance(name, str) or not name.startswith(LOCAL_DIR):
        return hparams
    there = found_from(name.removeprefix(LOCAL_DIR), working_dir)
    if there is None:
        return hparams
    return {**hparams, "net": {**net, "init_args": {**init_args, "name": LOCAL_DIR + there}}}


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value the command line `argv` gives `flag` (`--flag VALUE` or `--flag=VALUE`; the last one counts)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def expand_home(path: str | os.PathLike) -> str:
    """A path given to cifar-cli with its `~` expanded, as the data paths are: the shell expands only a bare word,
    not `--ckpt_path=~/x.ckpt`, a quoted path or a config's `ckpt_path: ~/x.ckpt`."""
    return os.path.expanduser(str(path))


def class_given_after(argv: list[str], group: str, flag: str) -> str | None:
    """The class that `--group CLASS` (or `--group=CLASS`) names after the first `flag` on the command line."""
    position = next((i for i, arg in enumerate(argv) if arg.split("=")[0] == flag), None)
    if position is None:
        return None
    for i in range(position + 1, len(argv)):
        name, equals, value = argv[i].partition("=")
        if name == f"--{group}":
            return value if equals else argv[i + 1] if i + 1 < len(argv) else None
    return None


PLATEAU_FLAGS = ("--model.lr_scheduler", "--model.lr_scheduler.class_path")


def lightning_plateau(argv: list[str]) -> list[str]:
    """The command line with `--model.lr_scheduler ReduceLROnPlateau` naming Lightning's class, as LightningCLI's
    `--lr_scheduler ReduceLROnPlateau` does. jsonargparse resolves a class name against every class of the
    setting's type: under the model's LRSchedulerCallable, the name is both torch's class and Lightning's subclass,
    which it refused as ambiguous (torch's cannot name the metric it watches, and the run refuses it anyway). In a
    config file the name stays ambiguous, and jsonargparse's one-line error names both full paths."""
    plateau = "lightning.pytorch.cli.ReduceLROnPlateau"
    return with_values(argv, PLATEAU_FLAGS, lambda value: plateau if value == "ReduceLROnPlateau" else None)


LOGGER_FLAG = "--trainer.logger"


def requires_save_dir(name: str) -> bool:
    """Whether the logger class `name` (`CSVLogger`, or its full path) is one of Lightning's that has no default
    `save_dir`."""
    module, _, short = name.rpartition(".")
    if module not in ("", "lightning.pytorch.loggers"):
        return False
    import lightning.pytorch.loggers as loggers

    cls = getattr(loggers, short, None)
    if not inspect.isclass(cls):
        return False
    parameter = inspect.signature(cls).parameters.get("save_dir")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def logger_set_before(args: list[str]) -> Any:
    """The logger the command line `args` and its configs set last (a flag's text, a config's value), or `...`
    where none sets it (the default, W&B)."""
    logger: Any = ...
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        value = value if equals else args[i + 1] if i + 1 < len(args) else ""
        if flag == LOGGER_FLAG:
            logger = value
        elif flag in CONFIG_FLAGS:
            config = read_config(value)
            sections = [config, *config.values()] if isinstance(config, dict) else []  # (and its subcommands')
            for section in sections:
                trainer = section.get("trainer") if isinstance(section, dict) else None
                if isinstance(trainer, dict) and "logger" in trainer:
                    logger = trainer["logger"]
    return logger


def added_logger_folders(argv: list[str]) -> list[str]:
    """The command line with a `--trainer.logger.save_dir` after each `--trainer.logger+=CSVLogger` (or
    `TensorBoardLogger`): the folder the logger before it was given on the command line, else `runs`, beside the
    default W&B run's. A logger added to the list starts with no arguments, not the first logger's (as one that
    replaces it does), and these classes require a folder: `--trainer.logger+=CSVLogger`, as the README gives it,
    was refused with "the following arguments are required: save_dir Expected a <class 'bool'>". So is one that
    replaces no logger (`--trainer.logger CSVLogger` after configs/debug.yaml's `logger: false`); one that replaces
    a logger takes its save_dir over. A save_dir given after it still wins."""
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        args.append(arg)
        i += 1
        if arg.startswith(LOGGER_FLAG + "+="):
            name = arg.partition("=")[2]
        elif arg == LOGGER_FLAG + "+" and i < len(argv):
            name = argv[i]
            args.append(name)
            i += 1
        elif arg.partition("=")[0] == LOGGER_FLAG and (arg != LOGGER_FLAG or i < len(argv)):
            replaced = logger_set_before(args[:-1])
            name = arg.partition("=")[2] if arg != LOGGER_FLAG else argv[i]
            if arg == LOGGER_FLAG:
                args.append(name)
                i += 1
            if str(replaced).lower() not in ("false", "true", "none", "null", ""):
                continue  # W&B's folder, or the logger's the config gave
        else:
            continue
        if requires_save_dir(name):
            args.append(f"{LOGGER_FLAG}.save_dir={flag_value(args, LOGGER_FLAG + '.save_dir') or 'runs'}")
    return args


def with_values(args: list[str], flags: tuple[str, ...], change: Callable[[str], str | None]) -> list[str]:
    """`args` with the value of each of `flags` (`--flag VALUE` or `--flag=VALUE`) replaced by `change(value)`,
    where that is not None."""
    args = list(args)
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        at = i if equals else i + 1
        if flag not in flags or at >= len(args):
            continue
        new = change(value if equals else args[at])
        if new is not None:
            args[at] = f"{flag}={new}" if equals else new
    return args


def argument_before_class(err: ArgumentError, argv: list[str]) -> UsageError | None:
    """The error for an argument of a group that takes a class (`--optimizer`, `--lr_scheduler`, `--data`,
    `--model.net`) given before the class (`--data.root DIR --data ImageFolderDataModule`, `--optimizer.lr 0.01`
    alone, or a config's `init_args` without `class_path`). jsonargparse tries it on the class in place then, the
    default or the abstract base, and names that: "'torch.optim.Optimizer': Option 'lr' is not accepted"."""
    message, option = str(err), re.search(r"Option '(\w+)' is not accepted", str(err))
    group = re.match(r'Parser key "([\w.]+)":', message)
    if option is not None and group is not None:
        flag = f"--{group[1]}.{option[1]}"
        later = class_given_after(argv, group[1], flag)
        if later is not None and (value := flag_value(argv, flag)) is not None:
            return UsageError(
                f"{flag} {value} is given before --{group[1]} {later}, whose argument it is: give the class first "
                f"(--{group[1]} {later} {flag} {value})"
            )
    bases = {"optimizer": "torch.optim.Optimizer", "lr_scheduler": "torch.optim.lr_scheduler.LRScheduler"}
    group = next((g for g, base in bases.items() if message.startswith(f'Parser key "{g}":') and base in message), None)
    if group is None or option is None:
        return None
    what, name, example = group.rpartition("_")[2], option[1], "Adam" if group == "optimizer" else "StepLR"
    flag = f"--{group}.{name}"
    value = flag_value(argv, flag)
    if value is None:  # from a config
        return UsageError(
            f"{group}: {name} is given without the {what}'s class: give its class_path (such as {example}), and {name} "
            "under init_args"
        )
    if group == "optimizer":
        # Not "--optimizer Adam" alone: after a config that chose SGD, that advice trained another optimizer.
        fix = (
            f"--optimizer CLASS {flag} {value} (a torch.optim class, such as Adam or SGD), or --model.optimizer.{name} "
            f"{value} alone for the model's optimizer (Adam, or the one a config chose)"
        )
    else:
        fix = f"--lr_scheduler CLASS {flag} {value} (any torch.optim.lr_scheduler class, such as StepLR)"
    return UsageError(f"{flag} {value} is given before the {what}'s class: {fix}")


# The flags that take a class, each with the class's base and what the message calls it.
CLASS_FLAGS = {
    "trainer.callbacks": ("lightning.pytorch.callbacks.Callback", "callback"),
    "trainer.logger": ("lightning.pytorch.loggers.Logger", "logger"),
    "optimizer": ("torch.optim.Optimizer", "optimizer"),
    "model.optimizer": ("torch.optim.Optimizer", "optimizer"),
    "lr_scheduler": ("torch.optim.lr_scheduler.LRScheduler", "scheduler"),
    "model.lr_scheduler": ("torch.optim.lr_scheduler.LRScheduler", "scheduler"),
    "data": ("lightning.pytorch.LightningDataModule", "data module"),
    "model.net": ("torch.nn.Module", "network"),
}


def unknown_class(err: ArgumentError, argv: list[str]) -> UsageError | None:
    """The error for a class name that a flag taking a class cannot resolve (`--optimizer adam`), or an import path
    of a class of another kind (`--trainer.callbacks+=torch.nn.Linear`), with the close name among the classes
    loaded of the flag's kind, as jsonargparse resolves a name against those. Its line read "Expected a path but adam
    either not accessible or invalid Expected a dot import path string: adam". A module that fails to import keeps
    jsonargparse's line, which says why."""
    match = re.match(
        r'Parser key "([\w.]+)":\s*(?:- )?Expected a path but (\S+) either not accessible or invalid', str(err)
    )
    if (
        match is None
        or match[1] not in CLASS_FLAGS
        or "No module named" in str(err)
        or not re.fullmatch(r"[\w.]+", match[2])
    ):
        return None
    key, name = match[1], match[2]
    flag = None
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        value = value if equals else argv[i + 1] if i + 1 < len(argv) else None
        if option in (f"--{key}", f"--{key}+") and value == name:
            flag = f"--{key}+={name}" if option.endswith("+") else f"--{key} {name}"
    if flag is None:
        return None  # from a config: jsonargparse's line names the key
    base_path, what = CLASS_FLAGS[key]
    base, found = import_class(base_path), import_class(name) if "." in name else None
    if found is not None and base is not None and not issubclass(found, base):
        return UsageError(f"{flag}: {name} is not a {what} ({base_path})")
    subclasses, seen = [base] if base is not None else [], set()
    while subclasses:
        cls = subclasses.pop()
        if cls not in seen:
            seen.add(cls)
            subclasses.extend(cls.__subclasses__())
    names = sorted({cls.__name__ for cls in seen - {base} if not cls.__name__.startswith("_")})  # (not Optimizer)
    lower = {n.lower(): n for n in names}
    short = name.rpartition(".")[2]  # (torch.optim.Adamm: Adam)
    close = [lower[short.lower()]] if short.lower() in lower else difflib.get_close_matches(short, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UsageError(
        f"{flag}: no {what} class is named {name}{hint} (a class by its name, or by its import path: mymodule.MyClass)"
    )


LIST_ENTRIES = {"trainer.callbacks": "the last callback of the list", "trainer.logger": "the logger"}


def argument_of_last_entry(err: ArgumentError, argv: list[str]) -> UsageError | None:
    """The error for `--trainer.callbacks.KEY VALUE` (or `--trainer.logger.KEY`) whose class has no argument KEY.
    The flag sets an argument of the list's last entry, as LightningCLI documents; without a `+=` before it that is
    the default list's last, FitTimer, which the user never named. jsonargparse's line named it, then
    "'lightning.Callback':" (the Union's other branch) with nothing after the colon."""
    message = str(err)
    key = re.match(r'Parser key "([\w.]+)":', message)
    # The class given comes first; the Union's base class after it refuses every argument, also one that the
    # class given takes but refused for its value (`--trainer.callbacks.decay 2` after EMA): that keeps its line.
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*(?:Option '(\w+)' is not accepted)?", message)
    if key is None or key[1] not in LIST_ENTRIES or problem is None or problem[2] is None:
        return None
    class_path, name = problem[1], problem[2]
    flags = (f"--{key[1]}.{name}", f"--{key[1]}.init_args.{name}")
    flag, value = next(((f, v) for f in flags if (v := flag_value(argv, f)) is not None), (None, None))
    if flag is None:
        return None  # from a config: jsonargparse's line names the class and the key there
    short = class_path.rpartition(".")[2]
    position = next(i for i, arg in enumerate(argv) if arg.partition("=")[0] == flag)
    named = any(arg.partition("=")[0] in (f"--{key[1]}", f"--{key[1]}+") for arg in argv[:position])
    where = LIST_ENTRIES[key[1]]
    if key[1] == "trainer.logger" and f"--{key[1]}+" in (arg.partition("=")[0] for arg in argv[:position]):
        where = "the last logger of the list"
    if key[1] == "trainer.callbacks" and not named:
        return UsageError(
            f"{flag} {value}: {where}, {short} (of the default list or a config's), has no argument {name}; add the "
            f"callback it is for first, then its arguments: --trainer.callbacks+=CLASS {flag} {value}"
        )
    cls = import_class(class_path)
    signature = inspect.signature(cls).parameters.values() if cls is not None else []
    known = [p.name for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"its arguments: {', '.join(known)}"
    return UsageError(f"{flag} {value}: {where}, {short}, has no argument {name}; {hint}")


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as `config.yaml` beside the run's checkpoints, and into the W&B run's config.

    Lightning's SaveConfigCallback writes to `trainer.log_dir`, which for WandbLogger is the shared `save_dir`:
    the second run in the same folder would stop on the first run's `config.yaml`. The run's own folder is unique.
    """

    # A run resumed from another folder: the folder `fit` first ran in and the data config it saved (CifarCLI sets it).
    run_origin: tuple[str, Any] | None = None

    @cached_property
    def dumped(self) -> str:
        """The resolved config as YAML."""
        return self.parser.dump(self.config, skip_none=False)

    @cached_property
    def resolved(self) -> dict[str, Any]:
        """The resolved config as plain data; a run resumed from another folder's with its data paths as seen from
        the run's own folder (`data_paths_in`)."""
        resolved = yaml.safe_load(self.dumped)
        if self.run_origin is not None and isinstance(resolved.get("data"), dict):
            resolved["data"] = data_paths_in(resolved["data"], *self.run_origin)
        return resolved

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io.entries = lambda: self.checkpoint_entries(trainer)
        if self.already_saved or not trainer.is_global_zero:
            return
        path = os.path.join(run_dir(trainer), self.config_filename)
        if self.resuming:
            keep_csv_metrics(trainer, self.resume_step)
        run_config = self.resolved
        if not (self.resuming and os.path.isfile(path)):
            if trainer.loggers and os.path.exists(path) and not self.overwrite:
                raise UsageError(f"{path} exists already: pass --trainer.logger.version with a new run name")
            self.check_shared_folder(trainer)
            atomic_write_text(path, RUN_CONFIG_MARK + self.dumped)
        elif written_by_a_run(path):
            run_config = self.record_restart(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # The W&B run's config is config.yaml's: on a restart, the first start's with the settings the
                # restart changed, not the ckpt_path and logger version that only continue the run (the dashboard
                # showed them as settings of the run from then on).
                logger.experiment.config.update(run_config, allow_val_change=True)
        self.already_saved = True

    def record_restart(self, path: str) -> dict[str, Any]:
        """A restart whose settings differ from the run's config.yaml (`--trainer.max_epochs 40` to train on,
        `--model.learning_rate 1e-4`): config.yaml takes them, so that the command a later stop prints, which
        gives config.yaml, goes on as this restart does; before, it went back to the first start's settings (its
        max_epochs, reached already, ended the run at once). The earlier file is kept beside it, named by the step
        up to which it held, once: a second restart at the same step replaces only config.yaml. Returns the run's
        config as config.yaml now holds it."""
        with open(path, encoding="utf-8") as file:
            text = file.read()
        earlier = yaml.safe_load(text)
        if not isinstance(earlier, dict):
            return self.resolved
        config = restart_config(earlier, self.resolved)
        changes = settings_changed(earlier, config)
        if not changes:
            return config
        kept = os.path.join(os.path.dirname(path), f"config-until-step-{self.resume_step}.yaml")
        if not os.path.exists(kept):
            atomic_write_text(kept, text)
        header = "".join(line for line in self.dumped.splitlines(keepends=True) if line.startswith("#"))
        atomic_write_text(path, RUN_CONFIG_MARK + header + yaml.safe_dump(config, sort_keys=False))
        shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
        print(
            f"cifar-cli: this restart changes the run's settings ({shown}); config.yaml now holds them, the earlier "
            f"one is kept as {os.path.basename(kept)}",
            file=sys.stderr,
        )
        return config

    def check_shared_folder(self, trainer: Trainer) -> None:
        """Without a logger every run shares default_root_dir, like its checkpoints: the newest run's config.yaml
        replaces an earlier run's there, never a file of the user's (a config of their own, say). Checked once the
        trainer is built, before any work, and again before writing."""
        path = os.path.join(trainer.default_root_dir, self.config_filename)
        if not trainer.loggers and not self.overwrite and os.path.exists(path) and not written_by_a_run(path):
            raise UsageError(
                f"{path} is not the config.yaml of an earlier run, and a run without a logger writes its config "
                "there: run in another folder, or pass --trainer.default_root_dir"
            )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # A run resumed from another folder than `fit` ran in goes on in its own folder there
        # (CifarCLI._save_where_the_run_is); its ModelCheckpoint states name relative paths from there, and
        # Lightning, finding another dirpath, dropped the best score (the next checkpoint was the best, however bad).
        working_dir = checkpoint.get(CHECKPOINT_KEY, {}).get(WORKING_DIR_KEY)
        if not self.resuming or not isinstance(working_dir, str) or os.path.realpath(working_dir) == os.getcwd():
            return

        def from_there(path: Any) -> Any:
            relative = isinstance(path, str) and path and not os.path.isabs(path)
            return os.path.normpath(os.path.join(working_dir, path)) if relative else path

        for state in (checkpoint.get("callbacks") or {}).values():
            if isinstance(state, dict) and from_there(state.get("dirpath")) != state.get("dirpath"):
                for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                    state[key] = from_there(state.get(key))
                if isinstance(state.get("best_k_models"), dict):
                    state["best_k_models"] = {from_there(k): v for k, v in state["best_k_models"].items()}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The data module's full config (class_path and init_args), so that `--ckpt_path` restores it too, with
        # the folder its relative paths start from, the run's identity, so that resuming from it continues the
        # same run folder and W&B run, and its seed.
        checkpoint.update(self.checkpoint_entries(trainer))

    def checkpoint_entries(self, trainer: Trainer) -> dict[str, Any]:
        return {
            CHECKPOINT_KEY: {
                "data": self.resolved["data"],
                WORKING_DIR_KEY: self.run_origin[0] if self.run_origin is not None else os.getcwd(),
                RUN_KEY: run_identity(trainer),
                SEED_KEY: self.resolved.get("seed_everything"),
            }
        }


def whole_sentences(text: str | None) -> str | None:
    """`text` up to its last full stop: Lightning describes each subcommand by its Trainer method's docstring cut at
    the first line break, which for `test` and `predict` is mid-sentence ("... Useful to")."""
    if not text or text.rstrip().endswith(".") or "." not in text:
        return text
    return text[: text.rindex(".") + 1]


CKPT_PATH_HELP = {
    "fit": "A checkpoint written by `cifar-cli fit`, whose run goes on from it, or `last`: the newest run's last.ckpt "
    "under the logger's folder (runs/), a new run where there is none. Its settings are the defaults; flags and "
    "configs given beside it override them. `~` is the home folder.",
    "evaluate": "The checkpoint to use, written by `cifar-cli fit`, or `last`: the newest run's last.ckpt under the "
    "logger's folder (runs/). Its settings are the defaults, so no other flag is needed; flags and configs given "
    "beside it override them. `~` is the home folder.",
}

# Lightning's help of --weights_only, from its Trainer methods' docstrings, advises `false` for trusted checkpoints.
WEIGHTS_ONLY_HELP = (
    "cifar-cli always loads checkpoints weights-only (torch.load(weights_only=True)), whatever this says: true or "
    "null change nothing, and false is refused."
)

# The tutorial's callbacks, the default of `--trainer.callbacks`.
DEFAULT_CALLBACKS = [
    {
        "class_path": "lightning.pytorch.callbacks.EarlyStopping",
        "init_args": {"monitor": "val_loss", "mode": "min", "patience": 3},
    },
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val_loss", "mode": "min", "save_top_k": 1},
    },
    {"class_path": "cifar_cli.callbacks.ImagePredictionLogger", "init_args": {"num_samples": 32}},
    {"class_path": "cifar_cli.callbacks.PredictionWriter"},
    {"class_path": "cifar_cli.dashboard.EvaluationLogger"},
    {"class_path": "cifar_cli.dashboard.ModelArtifacts"},
    {"class_path": "cifar_cli.callbacks.FitTimer"},
]


def mark_defaults(callbacks: list[Any]) -> None:
    """Mark the callbacks that are the default list (`DEFAULT_CALLBACKS`, kept or extended with `+=`), so that the
    W&B-only ones among them idle without a word in a run without W&B: the README's own `--trainer.logger CSVLogger`
    said two `does nothing` lines at every run, of callbacks the user never asked for. jsonargparse keeps no record of
    which values came from a default, so the list is told by its classes: one that starts with the default's, in its
    order, is that list (configs/default.yaml and a run's config.yaml spell it out); any other was the user's own."""
    classes = [getattr(importlib.import_module(path), name) for path, _, name in
               (c["class_path"].rpartition(".") for c in DEFAULT_CALLBACKS)]  # fmt: skip
    if [type(c) for c in callbacks[: len(classes)]] == classes:
        for callback in callbacks[: len(classes)]:
            callback.listed_by_default = True


class CifarCLI(LightningCLI):
    """The command line: data modules by class path, the model's net and sizes linked from the data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A parser that reads a config file holding only comments as an empty config (see checks.ArgumentParser).
        kwargs.setdefault("parser_class", ArgumentParser)
        argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        self._argv: list[str] = argv if isinstance(argv, list) else []  # (a config given as a dict: none)
        first = self._argv[0] if self._argv else None
        self._only_subcommand = first if first in LightningCLI.subcommands() else None
        ArgumentParser.help_options = tuple(a.split("=")[0] for a in self._argv if a.split("=")[0].endswith(".help"))
        # The checkpoint `--ckpt_path` names, where it was read before the command line (its path and contents).
        self._named_checkpoint: tuple[str, dict[str, Any]] | None = None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        # LightningCLI builds the parser of every subcommand (the trainer's, model's, data's and optimizer's
        # signatures, about 0.25 s each here) before it reads the command line, and a rank of a DDP run builds them
        # again. A command line that starts with its subcommand gets only that one's; any other (`--help`, a
        # top-level `--config`, a mistyped subcommand) gets them all.
        every = LightningCLI.subcommands()
        only = getattr(self, "_only_subcommand", None)
        return {only: every[only]} if only else every

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # LightningCLI's header names Lightning's version alone; a run repeats bit for bit only with the same torch
        # (README, Where runs go), so config.yaml and --print_config name torch's and torchvision's too.
        import lightning.pytorch
        import torchvision  # (imported by the data modules already)

        versions = {"lightning.pytorch": lightning.pytorch.__version__, "torch": torch.__version__}
        versions["torchvision"] = torchvision.__version__  # with the build (`+cu130`), as torch's
        kwargs.setdefault("dump_header", [f"{name}=={v}" for name, v in versions.items()])
        return super().init_parser(**kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if self.parser._subcommands_action is not None:
            for choice in self.parser._subcommands_action._choices_actions:
                choice.help = whole_sentences(choice.help)
        self.parser.description = (
            "Train and evaluate image classifiers: the subcommands below, and `cifar-cli report RUN_DIR`, which "
            "plots a finished run from its folder (see `cifar-cli report --help`)."
        )
        # Lightning's help of --ckpt_path, from its Trainer methods' docstrings, offers "best", "hpc" and
        # "registry", which cifar-cli refuses in a new process, and reads `last` as the previous fit's in the same one.
        for subcommand, parser in getattr(self, "_subcommand_parsers", {}).items():
            parser.description = whole_sentences(parser.description)
            for action in parser._actions:
                if action.dest == "ckpt_path":
                    action.help = CKPT_PATH_HELP["fit" if subcommand == "fit" else "evaluate"]
                if action.dest == "weights_only":
                    action.help = WEIGHTS_ONLY_HELP
            for group in parser._action_groups:  # the method's flags, titled with its description (no full stop)
                if any(a.dest == "ckpt_path" for a in group._group_actions) and group.title:
                    group.title = whole_sentences(group.title).removesuffix(".")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # `last.ckpt`, kept current for `fit --ckpt_path last`: `--last_checkpoint.every_n_minutes 10` (default),
        # `--last_checkpoint.every_n_steps N`. Its own flags, not an entry of the callbacks list, so that it stays
        # when a config replaces the list.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        # LightningCLI's own `--optimizer` and `--lr_scheduler`, any torch.optim class; handed to the model, which
        # builds them over its parameter groups (see cifar_cli.optimizer_flags).
        parser.add_optimizer_args()
        parser.add_lr_scheduler_args()
        # Derived values are linked, never typed twice: the data decides the classes and the image size.
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.net.init_args.image_shape", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # The tutorial's recipe. Given as class paths, so each object is built after the seed is set.
        parser.set_defaults(
            {
                "data": {"class_path": "cifar_cli.data.CIFAR10DataModule"},
                "model.net": {"class_path": "cifar_cli.nets.TutorialCNN"},
                "trainer.max_epochs": 2,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    # W&B's variables, which the logger's arguments override, set these defaults instead.
                    "init_args": {
                        "project": os.environ.get("WANDB_PROJECT") or "cifar-cli",
                        "save_dir": "runs",
                        "offline": wandb_offline(),
                    },
                },
                "trainer.callbacks": DEFAULT_CALLBACKS,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Nothing: replaces LightningCLI's, which loads the file a second time and puts the checkpoint's
        hyperparameters over the command line's (a `--model.tta flip` beside `test --ckpt_path` was dropped without a
        word). Here they are the model's defaults already (parse_arguments), under the configs and flags, as in
        Lightning PR #21455, type-checked there as LightningCLI would apply them, with an error that names the file;
        the optimizer classes they leave are checked with the command line's in before_instantiate_classes."""

    def _set_seed(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        nodes = config["trainer"].get("num_nodes")
        saved = (getattr(self, "checkpoint", None) or {}).get(CHECKPOINT_KEY, {}).get(SEED_KEY)
        if self.subcommand == "fit" and config.get("seed_everything") is True and type(saved) is int:
            # The run drew its seed when it started: drawn again, the resumed run would shuffle, augment and
            # flip as another run does (the same command restarts a job).
            config["seed_everything"] = saved
        config["seed_everything"] = chosen_seed(config.get("seed_everything"), nodes if isinstance(nodes, int) else 1)
        with QuietSeed():  # announced after the checks, whose errors it would otherwise precede
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        plain_numbers(config)
        trainer = config["trainer"]
        settle_wandb_logger(trainer.get("logger"), getattr(self, "_given", None), self.subcommand)
        check_accelerator(trainer, config.get("config"))
        check_trainer_values(trainer)
        endless = trainer.get("max_epochs") == -1 and trainer.get("max_steps") in (None, -1)
        if self.subcommand == "fit" and config["model"].get("lr_schedule") and endless and not trainer.get("max_time"):
            # ImageClassifier.configure_optimizers says so too, once the run's folder is written.
            raise UsageError(SCHEDULE_NEEDS_LENGTH)
        self.optimizer_flags = self._move_optimizer_flags(self.subcommand)
        check_optimizer_class(config)
        self._check_fused_clipping(config)
        for callback in trainer.get("callbacks") or []:
            init = callback.get("init_args")
            monitor = str(init.get("monitor", "")) if init is not None else ""
            if not (callback.get("class_path", "").endswith("EarlyStopping") and monitor.startswith("val_")):
                continue
            if self.subcommand == "fit" and trainer.get("limit_val_batches") == 0:
                # Lightning's EarlyStopping would stop at the first epoch's end with a traceback.
                raise UsageError(
                    f"--trainer.limit_val_batches 0 turns validation off, but EarlyStopping monitors {monitor}: "
                    "validate on fewer batches (--trainer.limit_val_batches 0.1) or use --config without it"
                )
            # An EarlyStopping on a validation metric checks it after each validation. Lightning's default checks
            # it at the end of each training epoch, which works only when every epoch ends in a validation: an
            # epoch cut short by --trainer.max_steps or max_time ends without one, and the run in a traceback.
            if init.get("check_on_train_epoch_end") is None:
                init["check_on_train_epoch_end"] = False

    def instantiate_classes(self) -> None:
        # LightningCLI's, with the checks of the model and the data before the trainer is built: the trainer logs
        # its banner (GPU/TPU lines, tips) as it is built, which would precede their one-line errors.
        # A checkpoint is all that `predict --ckpt_path F --data.predict_root DIR` needs: the data module takes the
        # classes and normalisation saved there, not the training data's; and with any --ckpt_path the network's
        # pretrained weights are neither downloaded nor read from their file, as the checkpoint's replace them.
        checkpoint = getattr(self, "checkpoint", None)
        with predicting_from(checkpoint if self.subcommand == "predict" else None):
            timm_config = saved_timm_config(checkpoint) if checkpoint is not None else None
            with weights_from_checkpoint(checkpoint is not None, timm_config):
                try:
                    self.config_init = self.parser.instantiate_classes(self.config)
                except UsageError as err:
                    raise self._from_config(err) from None
                except ValueError as err:
                    # A class whose package is missing (`--trainer.logger MLFlowLogger` without mlflow): Lightning
                    # says which and how to install it, in jsonargparse's traceback (in its text only, for a list).
                    pattern = r"Problem with given class_path '([\w.]+)':\s+(Requirement '.+' not met\..*)"
                    missing = next((m for e in causes(err) if (m := re.search(pattern, str(e)))), None)
                    if missing is None:
                        raise
                    raise UsageError(f"{missing[1]}: {missing[2]}") from err
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.check_model_and_data()
        self.trainer = self.instantiate_trainer()
        self._restore_given_save_dir()
        self.announce()

    def _check_fused_clipping(self, config: Namespace) -> None:
        """Refuse a fused optimizer asked for (`--model.optimizer.fused true`) beside gradient clipping under mixed
        precision, bf16-mixed too: Lightning refuses to clip a fused optimizer's gradients, at the first step, in a
        traceback. Where fused is not asked for, cifar-cli leaves it off then (`build_optimizer`)."""
        optimizer, trainer = config["model"].get("optimizer"), config["trainer"]
        init = optimizer.get("init_args") if isinstance(optimizer, Namespace) else None
        clip = trainer.get("gradient_clip_val")
        if init is None or init.get("fused") is not True or not clip:
            return
        precision = (
            trainer.get("precision")
            or (default_precision(trainer.get("accelerator"), trainer.get("strategy")) or ("32-true",))[0]
        )
        if str(precision) in ("16", "16-mixed", "bf16", "bf16-mixed"):
            raise UsageError(
                f"{self.optimizer_flags['optimizer']}.fused true: Lightning's mixed precision ({precision}) cannot "
                f"clip a fused optimizer's gradients (--trainer.gradient_clip_val {clip}): leave fused out, or the "
                "clipping"
            )

    def _from_config(self, err: UsageError) -> UsageError:
        """`err`, saying where the value came from when a config set a whitening-bias schedule for a network without
        one (configs/budget.yaml stacked on the tutorial recipe instead of a fast one, or a fast recipe with another
        `--model.net`): the user gave no such flag."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not str(err).startswith("--model.whiten_bias_until"):
            return err
        if config_given(config.get("config"), "budget.yaml"):
            return UsageError(
                f"{err} (configs/budget.yaml sets it: stack it on configs/fast-cpu.yaml or configs/fast.yaml, whose "
                "FastNet has one)"
            )
        file = self._config_that_sets(self.subcommand or "fit", "model.whiten_bias_until")
        return UsageError(f"{err} ({file} sets it: --model.whiten_bias_until null unsets it)") if file else err

    def check_model_and_data(self) -> None:
        given = getattr(self, "_given", None)
        check_linked_net_args(given.get(self.subcommand) if given and self.subcommand else given, self.datamodule)
        trainer = self._get(self.config_init, "trainer", default={})
        # Training on a GPU, the settings torch asserts on for the CPU's dummy weight are a GPU's own (Adam's
        # capturable): not refused. (The dummy stays on the CPU: a tensor on a GPU here would give every DDP rank a
        # CUDA context on GPU 0, and ddp_fork refuses a parent that has one.)
        scheduler = check_built(self.model, self.optimizer_flags, on_gpu=on_cuda(trainer.get("accelerator")))
        callbacks = trainer.get("callbacks") or []
        if self.subcommand == "fit":
            extra = self._cli_callbacks()
            check_monitors(self.model, [*callbacks, *extra], scheduler, self.optimizer_flags["lr_scheduler"])
        swa = any(isinstance(c, StochasticWeightAveraging) for c in callbacks)
        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if self.subcommand == "fit" and swa and batch_norm and self.model.lr_schedule is not None:
            # Lightning's SWA swaps the per-step schedule for its own per-epoch SWALR (with a warning), and the
            # schedule's end stopped the run before the extra epoch SWA adds, for a network with BatchNorm, to
            # recompute the statistics: the run ended on averaged weights with statistics of other weights.
            raise UsageError(
                "StochasticWeightAveraging replaces --model.lr_schedule with its own schedule (SWALR), and the "
                "schedule's end cuts off the epoch in which it recomputes BatchNorm statistics: give "
                "--model.lr_schedule null, or average with cifar_cli.averaging.EMA"
            )
        finetuning = [c for c in callbacks if isinstance(c, BackboneFinetuning)]
        if finetuning and not isinstance(getattr(self.model.net, "backbone", None), nn.Module):
            # Lightning's own check comes after its setup has failed on the missing attribute, with a traceback.
            raise UsageError(
                f"BackboneFinetuning needs a network with a backbone, such as TorchvisionNet or TimmNet; "
                f"{type(self.model.net).__name__} has none"
            )
        trained_data = None  # the data module's state in the checkpoint, if any
        if getattr(self, "checkpoint", None) is not None:
            ckpt_path = self.config[self.subcommand]["ckpt_path"]
            check_same_classes(self.model, self.checkpoint, ckpt_path, self.subcommand, self.datamodule)
            check_weights_fit(self.model, self.checkpoint["state_dict"], self.config[self.subcommand]["ckpt_path"])
            trained_data = self.checkpoint.get(type(self.datamodule).__qualname__)
            self.checkpoint = None
        self.check_image_sizes()
        if self.subcommand is not None:
            trainer = self._get(self.config_init, "trainer", default={})
            check_wandb_folder(trainer.get("logger"))
            loggers = trainer.get("logger")
            # Those given no version (`_version`, private to Lightning 2.6), before check_run_folder counts their next
            # version_N: its folder is made as the trainer is built (claim_version_folder).
            self._counted = [
                logger
                for logger in (loggers if isinstance(loggers, (list, tuple)) else [loggers])
                if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None
            ]
            if not self.resuming:
                check_run_folder(trainer.get("logger"), trainer.get("default_root_dir") or os.getcwd())
            hold_run_folder(trainer.get("logger"), trainer.get("default_root_dir") or os.getcwd())  # before decoding
            check_data(self.datamodule, self.subcommand)
            if trained_data is not None and isinstance(self.datamodule, ImageDataModule):
                self.datamodule.check_held_out(trained_data, ckpt_path, self.subcommand)

    def announce(self) -> None:
        """The seed, untrained weights, where a resumed run goes on: once the command line, the checkpoint, the
        data and the trainer's settings pass every check; by the first process of each machine only (a DDP run's
        other ranks parse the same command line)."""
        announce_precision(getattr(self, "_chosen_precision", None))
        if self.subcommand is None:
            return
        QuietSeed.announce(self._get(self.config, "seed_everything"))
        config = self.config[self.subcommand]
        untrained = not config.get("ckpt_path") and not config["model"].get("init_from")
        if self.subcommand != "fit" and untrained and local_rank_zero():
            # LightningCLI evaluates the module as built: its classifier (all of a TutorialCNN) is untrained.
            print(f"cifar-cli: {self.subcommand} without --ckpt_path: the network's weights are untrained (give "
                  "--ckpt_path FILE, or last for the newest run's)", file=sys.stderr)  # fmt: skip
        if getattr(self, "resume_line", None) and local_rank_zero():
            print(self.resume_line, file=sys.stderr)

    def check_image_sizes(self) -> None:
        """Refuse a network that cannot take the data's images, or with progressive resizing the smaller ones: it
        would fail at the first step (TutorialCNN's fixed-size flatten, a network that pools too often), after the
        run's folder and W&B run were created. A forward pass of one image of each size, on the meta device."""
        data, model = self.datamodule, self.model
        if not isinstance(data, ImageDataModule) or not isinstance(model, ImageClassifier):
            return
        channels, height, width = data.image_shape
        net, name = model.net, net_name(model.net)
        channels_last = bool(model.hparams.channels_last)
        low = model.hparams.low_res_side if self.subcommand == "fit" else None
        side = min(height, width)
        if low is not None and low >= side:
            raise UsageError(
                f"--model.low_res_side {low} is not below the images' side ({height}x{width}), so no step would "
                f"train at a lower resolution: pass a smaller side, such as {max(side * 3 // 4, 1)}, or leave it unset"
            )
        problem = input_problem(net, (channels, height, width), channels_last)
        if problem is not None:
            other = ", or another --data.image_size" if hasattr(data, "image_size") else ""
            raise UsageError(
                f"{name} cannot take {height}x{width} images ({problem}): choose another --model.net{other}"
            )
        logits = output_shape(net, (channels, height, width), channels_last)
        classes = len(model.class_names)
        if logits is not None and logits != (1, classes):
            # Cross-entropy and the confusion matrices failed at the first step with a shape error, after the run's
            # folder was created; a net with more logits than classes could even train, on logits no label has.
            # A num_classes argument is set to the data's by the CLI (its link): then it is the forward that is off.
            remedy = (
                f"cifar-cli set its num_classes to {classes}; its forward must return one logit per class"
                if "num_classes" in inspect.signature(type(net)).parameters
                else "give it a num_classes argument, which cifar-cli sets, for its last layer"
            )
            raise UsageError(
                f"--model.net {name} returns logits of shape {list(logits)} for one image, not [1, {classes}] for "
                f"the data's {classes} classes: {remedy}"
            )
        if low is not None and (problem := input_problem(net, (channels, low, low), channels_last)) is not None:
            takes = smallest_side(net, channels, low, side, channels_last)
            if takes is not None:  # a network that pools (FastNet) but not down from this side
                raise UsageError(
                    f"--model.low_res_side {low}: {name} cannot take {low}x{low} images ({problem}); its smallest "
                    f"side is {takes}: pass a side from {takes} to {side - 1}"
                )
            raise UsageError(
                f"--model.low_res_side {low}: {name} cannot take {low}x{low} images ({problem}); progressive "
                "resizing needs a network that takes both sizes, with global pooling, such as FastNet"
            )

    def _cli_callbacks(self) -> list[Any]:
        """The callbacks of the command line's own groups (`--last_checkpoint`), beside `--trainer.callbacks`."""
        return [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = list(config.get("callbacks") or [])
        mark_defaults(listed)
        callbacks, kept = one_per_state_key(listed)
        trainer_config = self._get(self.config, "trainer", default={})
        given = trainer_config.get("callbacks")
        if len(kept) < len(listed) and isinstance(given, list) and len(given) == len(listed):
            # config.yaml (and the W&B run's config) lists what runs: the replaced callback listed too, every run
            # from it said the line above again, and a restart's changes read `+EarlyStopping` for a new patience.
            trainer_config["callbacks"] = [given[i] for i in kept]
        extra = self._cli_callbacks()
        if config.get("enable_checkpointing") is False:
            extra = [c for c in extra if not isinstance(c, LastCheckpoint)]  # Lightning refuses any ModelCheckpoint
        # A rich progress bar in a terminal, one line per epoch in a log, unless the config picks another bar or
        # turns progress bars off. Not a default callback in the config: there it would clash with
        # `--trainer.enable_progress_bar false`, and the choice depends on where the output goes.
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(progress_bar())
        # The clean stop on SIGTERM and Ctrl-C, whatever callbacks a config lists.
        if not any(isinstance(c, Preemption) for c in callbacks):
            callbacks.append(Preemption())
        # predictions.csv, whatever callbacks a config lists (a run's config.yaml whose list left the writer out):
        # predict computed every prediction and wrote none, without a word.
        writers = (PredictionWriter, BasePredictionWriter)
        if self.subcommand == "predict" and not any(isinstance(c, writers) for c in callbacks):
            callbacks.append(PredictionWriter())
        # bf16-mixed where the hardware has native bf16, unless a config says otherwise; config.yaml records it.
        if (precision := choose_precision(config)) is not None:
            self._get(self.config, "trainer")["precision"] = precision[0]
        # Lightning ignores `max_time` when the callbacks hold a Timer, as they do with FitTimer: give it to FitTimer.
        timers = [c for c in callbacks if isinstance(c, FitTimer)]
        if config.get("max_time") is not None and timers:
            timers[0].limit(config.pop("max_time"))
        # Checkpoints written whole or not at all, and loaded weights-only, unless the config brings its own IO.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config.update(callbacks=callbacks, plugins=plugins)
        # metrics.csv in every run's folder, whatever else the run logs to (cifar-cli report reads it).
        config["logger"] = with_csv_logger(config.get("logger"))
        given = config.get("precision")
        fp16_as_bf16 = False
        held: list[warnings.WarningMessage] = []
        try:
            # Lightning's warnings as it builds the trainer wait until the precision that runs is known (below).
            with warnings.catch_warnings(record=True) as held:
                trainer = self._instantiate_trainer(config, extra)
            fp16_as_bf16 = precision is None and str(given) in ("16", "16-mixed") and trainer.precision == "bf16-mixed"
            launcher = trainer.strategy.launcher
            if isinstance(launcher, _SubprocessScriptLauncher):
                # What Lightning checks as it launches, where every rank raised it with a traceback: devices x
                # num_nodes against the processes that torchrun or SLURM started.
                launcher.cluster_environment.validate_settings(launcher.num_processes, launcher.num_nodes)
        except (ValueError, TypeError, ImportError) as err:
            # Lightning's refusals of its arguments that are not MisconfigurationException (`num_nodes 0`, an unknown
            # strategy, a precision whose package is missing, devices the accelerator cannot take): one line too.
            raise UsageError(f"--trainer: {str(err).strip().splitlines()[0]}") from err
        finally:
            show_held_warnings(held, precision_said=fp16_as_bf16)
        # Lightning runs fp16 mixed precision on a CPU as bf16-mixed (a CPU has no fp16 autocast), with a warning
        # (silenced): config.yaml records what ran, and the precision line says it.
        if fp16_as_bf16:
            self._get(self.config, "trainer")["precision"] = trainer.precision
            why = f"--trainer.precision {given}: a CPU has no fp16 mixed precision"
            precision = trainer.precision, f"Precision {trainer.precision} ({why})"
        elif precision is None and trainer.precision == "16-true" and isinstance(trainer.accelerator, CPUAccelerator):
            # Kept, as asked; but a CPU computes fp16 in software: a step of the tutorial CNN (batch 32) took 3.07 s
            # against 9.8 ms in bf16 and 20 ms in fp32 on a 2-core Xeon with AMX, with nothing said.
            slow = "a CPU computes fp16 in software, hundreds of times slower than bf16-mixed or 32-true"
            precision = trainer.precision, f"Precision 16-true: {slow} (--trainer.precision)"
        self._chosen_precision = precision  # said once the trainer passes its checks (announce)
        tensor_core_tip(trainer.precision)
        if trainer.is_global_zero:
            for logger in getattr(self, "_counted", []):
                claim_version_folder(logger)
        if not self.config[self.subcommand].get("ckpt_path"):
            pass_over_slurm_checkpoints(trainer)
        now = Path(run_dir(trainer)).parent.name
        if self.resuming and self._run_folder_name not in (None, now):
            # `--trainer.logger.project other` on a restart: the run went on in a second folder of its id (under
            # runs/other/), with a config.yaml and metrics.csv of its own, and its W&B run in another project.
            raise UsageError(
                f"--ckpt_path {self.config[self.subcommand]['ckpt_path']} is of a run under {self._run_folder_name}/, "
                f"and this command's logger would put it under {now}/ (its project or name): a resumed run goes on "
                "in its own folder and W&B run; leave that setting as the run had it, or start a new run from its "
                "weights with --model.init_from"
            )
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.resuming = self.resuming
                callback.run_origin = getattr(self, "_run_origin", None)
                callback.resume_step = int(self.resume_step)
                if not self.resuming:
                    callback.check_shared_folder(trainer)
            if isinstance(callback, PredictionWriter) and self.subcommand == "predict":
                callback.check_folder(trainer)
        if self.resuming and self.ended:
            # A run resumed with nothing left to train logs nothing: an offline W&B part of its own would hold
            # nothing and lengthen the `wandb sync` command. wandb's disabled mode makes the callbacks' logging a no-op.
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger) and logger._experiment is None:
                    logger._wandb_init["mode"] = "disabled"  # private to Lightning (2.6), as in quiet_wandb
        wandb_dir_from_env(trainer)
        if self.resuming:
            set_aside_csv_metrics(trainer)  # before Lightning's CSV writer, created next, deletes the earlier rows
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and not isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                atomic_csv_logs(logger)
        # LearningRateMonitor in a run without a logger (configs/debug.yaml stacked on a recipe that has one):
        # dropped with a notice, as the W&B-only callbacks idle without W&B; Lightning refused the run as it started.
        drop_logger_only(trainer, training=self.subcommand in (None, "fit"))
        watch_ranks(trainer)  # a failed DDP rank is named, not SIGKILLed silently with the others
        carry_spawned_state(trainer)  # ddp_spawn: the epochs, steps and checkpoints of the summary
        quiet_model_summary(trainer)
        quiet_wandb(trainer)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        printer = config_printer() if any(a.split("=")[0] == "--print_config" for a in self._argv) else None
        if printer is None:
            self._parse_arguments(parser, args)
            return
        # jsonargparse prints the config as it parses the command line, before cifar-cli has read it: without a
        # checkpoint's settings (`test --ckpt_path F --print_config` showed CIFAR-10 for a run on an image folder,
        # so the printed config tested on other data), and with the optimizer's own `lr`, which the run replaces
        # by --model.learning_rate. The config is printed here once the command line has been read whole.
        skip_printing, print_if_requested = printer
        try:
            with skip_printing():
                self._parse_arguments(parser, args)
                subcommand = self.config["subcommand"]
                plain_numbers(self.config[subcommand])
                settle_wandb_logger(self.config[subcommand]["trainer"].get("logger"), self._given, subcommand)
                self._move_optimizer_flags(subcommand)
        except ArgumentError:
            # An incomplete config (`--data ImageFolderDataModule` without its root), which jsonargparse prints as a
            # template to fill in; it exits once printed. cifar-cli's own refusals (UsageError) are not templates:
            # the command would refuse the printed config too.
            self._parse_arguments(parser, args)
            raise
        self._restore_given_save_dir()
        options = getattr(self.parser, "print_config", None) or {}
        if options.get("skip_default"):
            drop_settled_copies(self.config[subcommand].get("model"))
        top_level = options.get("key") is None
        try:
            print_if_requested(self.parser, self.config)
        except KeyError:
            if not (top_level and options.get("skip_default")):
                raise
            # jsonargparse 4.53 compares the whole config with defaults that name no subcommand: a traceback.
            raise UsageError(
                "--print_config=skip_default before the subcommand: this jsonargparse cannot print it there; "
                f"give it after the subcommand: cifar-cli {subcommand} --print_config=skip_default"
            ) from None

    def _move_optimizer_flags(self, subcommand: str) -> dict[str, str]:
        """`move_optimizer_flags` on the subcommand's config: with `--ckpt_path`, what the parser gives without the
        flags (the checkpoint's settings) counts as not given; without, ImageClassifier's defaults do. `fit` goes on
        with the checkpoint's optimizer state, so it refuses an optimizer of another class."""
        checkpoint = getattr(self, "checkpoint", None)
        model_defaults = self._parser(subcommand).get_defaults().get("model") if checkpoint is not None else None
        config = self.config[subcommand]
        given = getattr(self, "_given", None)
        flags = move_optimizer_flags(
            config,
            model_defaults,
            given.get(subcommand) if given is not None else None,
            lambda key: self._config_that_sets(subcommand, key),
        )
        if subcommand == "fit" and checkpoint is not None:
            saved = (checkpoint.get("hyper_parameters", {}).get("optimizer") or {}).get("class_path")
            chosen = (config["model"].get("optimizer") or Namespace()).get("class_path")
            if saved and chosen and saved != chosen:
                # Lightning would load the checkpoint's optimizer state into the other optimizer: a KeyError.
                raise UsageError(
                    f"{flags['optimizer']} {chosen}: the checkpoint's run trains with {saved}, whose state goes on "
                    "from it; start a new run from its weights with --model.init_from instead"
                )
        return flags

    def _config_that_sets(self, subcommand: str, key: str) -> str | None:
        """The config file that set `key` (`model.optimizer`) for the messages, None where a flag did (see
        `config_that_sets`)."""
        configs = [*(self.config.get("config") or []), *(self.config[subcommand].get("config") or [])]  # (in order)
        return config_that_sets(key, self._argv, configs, subcommand)

    def _parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if self._only_subcommand is not None:
            check_group_files(self._parser(self._only_subcommand), self._argv)
        try:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError:
                # A flag of the checkpoint's own data module or network (`test --ckpt_path F --data.root DIR` for a
                # run on an image folder) is refused while the parser holds the default ones: with the checkpoint
                # the command line names as the defaults, it is read again.
                if not self._defaults_from_named_checkpoint():
                    raise
                super().parse_arguments(parser, args)
        except UnicodeDecodeError as err:  # a file given for a group (`--model FILE`): jsonargparse's traceback
            raise UsageError(f"{binary_file_argument(self._argv)} is not a YAML text file ({err.reason})") from None
        except ArgumentError as err:
            if (before := argument_before_class(err, self._argv)) is not None:
                raise before from err
            if (entry := argument_of_last_entry(err, self._argv)) is not None:
                raise entry from err
            if (elsewhere := self._option_of_another_subcommand(err)) is not None:
                raise elsewhere from err
            if (early := config_before_subcommand(err, self._argv)) is not None:
                raise early from err
            if (unset := self._required_set_to_null(err) or self._required_given_null(err)) is not None:
                raise unset from err
            if (unknown := unknown_class(err, self._argv)) is not None:  # (after `--model.net null`'s)
                raise unknown from err
            raise
        self._given = given_settings(parser, args)
        self.checkpoint: dict[str, Any] | None = None
        self.resuming = False
        self.ended = False  # resumed after its last epoch or step: nothing is left to train
        self._run_folder_name: str | None = None  # of the run resumed: the folder its run folder is in
        self.resume_step = 0
        self._run_origin: tuple[str, Any] | None = None  # the folder fit first ran in, where resumed from another
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("weights_only") is False:
            # Lightning hands it to torch.load; AtomicCheckpointIO loads weights-only whatever it says, and a
            # checkpoint that needs more is refused: taken without a word, the flag read as if it had worked.
            raise UsageError(
                "--weights_only false: cifar-cli loads checkpoints weights-only, never running a checkpoint's pickled "
                "code; leave the flag out"
            )
        self._save_under_root_dir(subcommand)
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if isinstance(ckpt_path, str) and not ckpt_path.strip():
            # `--ckpt_path "$CKPT"` with the variable unset: it read as no checkpoint, and `test` evaluated an
            # untrained network, `fit` started a new run.
            raise UsageError(f"--ckpt_path {ckpt_path!r} is empty (an unset variable?): give a checkpoint file, or "
                             "last, or leave the flag out")  # fmt: skip
        init_from = subcommand and self.config[subcommand]["model"].get("init_from")
        if isinstance(init_from, str) and not init_from.strip():
            # It read as none: the fit trained from scratch, without a word.
            raise UsageError(f"--model.init_from {init_from!r} is empty (an unset variable?): give a checkpoint file, "
                             "or leave the flag out")  # fmt: skip
        if subcommand == "fit" and not ckpt_path and (restarts := requeued_slurm_job()):
            # A requeued job runs its command again. Lightning goes on from its hpc_ckpt_N.ckpt, saved mid-step at
            # the requeue signal, in a new run folder; cifar-cli loads none (pass_over_slurm_checkpoints) and goes
            # on from the run's last.ckpt, in its own folder, as the README's job script asks with --ckpt_path last.
            if local_rank_zero():
                print(f"cifar-cli: SLURM requeued this job ({restarts}x): going on as with --ckpt_path last",
                      file=sys.stderr)  # fmt: skip
            ckpt_path = self.config[subcommand]["ckpt_path"] = "last"
        if not ckpt_path:
            return
        ckpt_path = expand_home(ckpt_path)
        # Read already, its settings the defaults of the parse that succeeded (_defaults_from_named_checkpoint).
        read_first = self._named_checkpoint is not None and self._named_checkpoint[0] == ckpt_path
        if ckpt_path == "last":
            self.checkpoint, ckpt_path = self._find_last(subcommand)
        elif read_first:
            self.checkpoint = self._named_checkpoint[1]
        else:
            self.checkpoint = load_checkpoint(ckpt_path)
        if self.checkpoint is None:
            return
        if "pytorch-lightning_version" not in self.checkpoint:
            # Lightning reads it first when it restores a checkpoint: a KeyError traceback, once the data was loaded.
            # A file saved by hand from a checkpoint's parts lacks it; its weights alone still start a fit.
            weights = f", or start a new run from its weights with --model.init_from {ckpt_path}"
            raise UsageError(
                f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (it has no pytorch-lightning_version entry: "
                f"saved by hand?); {FROM_FIT}{weights if subcommand == 'fit' else ''}"
            )
        if subcommand != "fit":
            # Lightning restores the checkpoint's ModelCheckpoint state and warns that its folder differs from
            # this run's: only a run that trains on (fit) has use for that state.
            ignore_for_this_run(r"The dirpath has changed from")
            # Nor that an EMA callback (a WeightAveraging) given again, with the fit's config, cannot restore its
            # state: the checkpoint's weights are the average already, as Lightning saves them.
            ignore_for_this_run(r"You're using the WeightAveraging callback, but loading a checkpoint outside")
        # The checkpoint's model and data settings become the defaults, so that `test --ckpt_path FILE` alone
        # evaluates the same network on the split it was trained with, and a flag or config still overrides them.
        saved = self.checkpoint.get(CHECKPOINT_KEY, {})
        defaults = checkpoint_defaults(self.checkpoint)
        if "model" in defaults:
            apply_hyperparameters(parser, self.config, self.checkpoint, ckpt_path)  # refuses them in one line
        if defaults and not read_first:
            self._parser(subcommand).set_defaults(defaults)
            super().parse_arguments(parser, args)
            self._save_under_root_dir(subcommand)
        config = self.config[subcommand]
        check_same_net(config["model"], self.checkpoint, ckpt_path)
        config["ckpt_path"] = ckpt_path
        # The checkpoint's weights replace whatever --model.init_from would load: the file is not read.
        config["model"]["init_from"] = None
        if subcommand == "fit" and "optimizer_states" not in self.checkpoint:
            # Lightning's KeyError, a traceback, once the trainer was built and the data loaded.
            raise UsageError(
                f"--ckpt_path {ckpt_path} holds the network's weights alone (a ModelCheckpoint's save_weights_only), "
                f"not the optimizer and progress a resumed fit goes on with: start a new run from its weights with "
                f"--model.init_from {ckpt_path}"
            )
        if subcommand == "fit":
            # Training goes on in the checkpoint's own run: its folder, its config.yaml, its W&B run.
            logger, identity = config["trainer"].get("logger"), saved.get(RUN_KEY)
            self.resuming = continue_run(logger, identity) or continues_without_logger(
                config["trainer"], identity, ckpt_path
            )
            if self.resuming:  # its folders hold its checkpoints and logs so far, as they should
                self._run_folder_name = run_folder_name(self.checkpoint)
                there = saved.get(WORKING_DIR_KEY)
                # Resumed from another folder than `fit` ran in, not in a copy of the project or one moved whole.
                if (
                    isinstance(there, str)
                    and os.path.realpath(there) != os.path.realpath(os.getcwd())
                    and Path(ckpt_path).resolve().is_relative_to(Path(there).resolve())
                ):
                    self._run_origin = there, saved.get("data")
                self._save_where_the_run_is(logger, ckpt_path, saved.get(WORKING_DIR_KEY))
                ignore_for_this_run(r"Checkpoint directory .* exists and is not empty")
                ignore_for_this_run(r"Experiment logs directory .* exists and is not empty")
            else:
                self._say_new_run_folder(ckpt_path, logger, identity)
            step = self.checkpoint.get("global_step") or 0
            self.resume_step = step
            # The epoch training goes on in: the count of epochs whose batches are all done (a checkpoint taken
            # within an epoch counts that epoch as not done; cifar_cli.callbacks.LastCheckpoint).
            progress = self.checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
            epoch = progress.get("current", {}).get("processed", self.checkpoint.get("epoch") or 0)
            swa = (self.checkpoint.get("callbacks") or {}).get("StochasticWeightAveraging")
            averaged = swa.get("latest_update_epoch", -1) if isinstance(swa, dict) else -1  # -1: not yet
            trainer = config["trainer"]
            if averaged >= 0 and epoch == averaged + 2:
                epoch -= 1  # the epoch after SWA's last average is its BatchNorm pass, no epoch of training
                limit, steps = trainer.get("max_epochs"), trainer.get("max_steps")
                steps_left = steps is None or steps < 0 or steps > step
                if steps_left and (limit is None or limit < 0 or limit > epoch):
                    # Lightning's SWA counts that pass as an epoch and ends it with the average in the module, the
                    # trained weights gone: a restart with more epochs trained none and ran the pass again.
                    raise UsageError(
                        f"--ckpt_path {ckpt_path} was saved after StochasticWeightAveraging's BatchNorm pass, which "
                        f"replaced the trained weights with their average: no more epochs can train from it; resume "
                        f"from a checkpoint of epoch {epoch} or before, or start a new run from it with "
                        f"--model.init_from {ckpt_path}"
                    )
            label = epoch_label(epoch, trainer.get("max_epochs"))
            # A run that ended, restarted by the same command (a requeued job): the limit it reached, if any.
            for unit, done in (("step", step), ("epoch", epoch)):
                limit = trainer.get(f"max_{unit}s")
                if limit is not None and 0 < limit <= done:
                    self.ended = True
                    label = (
                        f"after its last {unit} ({done}/{limit}): nothing is left to train; raise "
                        f"--trainer.max_{unit}s to train on"
                    )
                    break
            if not self.ended and budget_spent(self.checkpoint, trainer.get("max_time")):
                # It stopped at once, saying "epoch 15/1000" and adding an empty W&B part to the `wandb sync` line.
                self.ended = True
                label = (
                    f"after its time budget ({trainer.get('max_time')}): nothing is left to train; raise "
                    "--trainer.max_time to train on"
                )
            self.resume_line = f"cifar-cli: resuming from {ckpt_path} at step {step:,}, {label}"

    @staticmethod
    def _say_new_run_folder(ckpt_path: str, logger: Any, identity: Any) -> None:
        """`fit --ckpt_path FILE` of a run that logged with another logger (or none) trains on in a run folder of
        its own, as `--ckpt_path last` passes over such runs. It said "resuming" and nothing else, but for
        Lightning's line that the checkpoint's ModelCheckpoint state was of another folder."""
        ignore_for_this_run(r"The dirpath has changed from")
        theirs = logger_name(identity.get("logger")) if isinstance(identity, dict) else None
        ours = logger_name(logger)
        if theirs != ours:
            print(
                f"cifar-cli: --ckpt_path {ckpt_path} comes from a run with {theirs or 'no logger'}, and this fit has "
                f"{ours or 'no logger'}: it trains on from that checkpoint in a new run folder (give --trainer.logger "
                f"{theirs or 'false'} to continue the run itself)",
                file=sys.stderr,
            )

    def _option_of_another_subcommand(self, err: ArgumentError) -> UsageError | None:
        """The refusal of a top-level key that another subcommand takes, saying which: `verbose`, in a config
        printed by `test --print_config` and given to `fit`, was "Subcommand 'fit' does not accept option
        'verbose'"."""
        match = re.search(r"Subcommand '(\w+)' does not accept option '(\w+)'", str(err))
        if match is None:
            return None
        subcommand, key = match.groups()
        # The subcommands' own options are their Trainer method's arguments (only the command's parser is built).
        takes = {other: inspect.signature(getattr(Trainer, other)).parameters for other in LightningCLI.subcommands()}
        owners = [other for other, skipped in LightningCLI.subcommands().items()
                  if other != subcommand and key in takes[other] and key not in skipped]  # fmt: skip
        if not owners:
            return None
        return UsageError(
            f"{key} is an option of {' and '.join(owners)}, not of {subcommand} (a config printed by `{owners[-1]} "
            f"--print_config`?): remove its {key}: line"
        )

    def _required_given_null(self, err: ArgumentError) -> UsageError | None:
        """The refusal of `--model.net null` (or `none`, `~`) on the command line, for a setting that needs a class:
        jsonargparse read "null" as the path of a config file, "Expected a path but null either not accessible or
        invalid", and went on about dot import paths."""
        match = re.match(
            r'Parser key "([\w.]+)":\s*(?:- )?Expected a path but (null|none|None|NULL|Null|~) ', str(err).strip()
        )
        if match is None or self._only_subcommand is None or flag_value(self._argv, f"--{match[1]}") != match[2]:
            return None
        default = self._default_name(match[1])
        keep = f", or leave the flag out to keep its default ({default})" if default is not None else ""
        return UsageError(f"--{match[1]} {match[2]} sets it to nothing, and it needs a value: give one{keep}")

    def _default_name(self, key: str) -> str | None:
        """The subcommand's default of `key`, a class by its name."""
        default = self._parser(self._only_subcommand).get_defaults().get(key)
        if isinstance(default, Namespace) and isinstance(default.get("class_path"), str):
            default = default.class_path.rpartition(".")[2]
        return None if default is None else str(default)

    def _required_set_to_null(self, err: ArgumentError) -> UsageError | None:
        """The refusal of a required setting that a config sets to nothing (`net: null`, or `net:` alone), saying
        so and how to give it: it was "the following arguments are required: fit.model.net", which it had been."""
        match = re.fullmatch(r"the following arguments are required: ([\w.]+)", str(err).strip())
        if match is None or self._only_subcommand is None:
            return None
        key = match[1].removeprefix(f"{self._only_subcommand}.")
        default = self._default_name(key)
        if default is None:
            return None
        name = key.rpartition(".")[2]
        return UsageError(
            f"--{key} is set to nothing (`{name}: null`, or `{name}:` with nothing below it, in a config): give it a "
            f"value, or remove that line to keep its default ({default})"
        )

    def _defaults_from_named_checkpoint(self) -> bool:
        """Make the settings of the checkpoint that the command line names (`SUBCOMMAND ... --ckpt_path FILE`) the
        subcommand's defaults, before the command line has been parsed; False where it names none."""
        path = flag_value(self._argv, "--ckpt_path")
        if self._only_subcommand is None or path is None or path == "last" or not path.strip():
            return False
        path = expand_home(path)
        checkpoint = load_checkpoint(path)  # a missing or foreign file: its one-line error, not the flag's
        self._named_checkpoint = (path, checkpoint)
        defaults = checkpoint_defaults(checkpoint)
        if defaults:
            self._parser(self._only_subcommand).set_defaults(defaults)
        return bool(defaults)

    def _save_under_root_dir(self, subcommand: str | None) -> None:
        """`--trainer.default_root_dir DIR` puts the logger's relative `save_dir` (`runs` by default) under DIR.

        Lightning takes the outputs' folder from the logger when there is one, so DIR alone would be silently
        ignored with the default W&B logger: the runs would go to ./runs whatever DIR says.
        """
        trainer = (self.config[subcommand] if subcommand else self.config)["trainer"]
        root, loggers = trainer.get("default_root_dir"), trainer.get("logger")
        if isinstance(root, str) and root.startswith("~"):
            # `--trainer.default_root_dir=~/x` or a config's: no shell expands it, and Lightning made a folder named
            # `~` in the current one for the run's files, while W&B's went to the home.
            trainer["default_root_dir"] = root = expand_home(root)
        self._given_save_dirs: list[tuple[Namespace, str]] = []
        for logger in loggers if isinstance(loggers, list) else [loggers]:  # each of a list (`logger+=CSVLogger`)
            init_args = getattr(logger, "init_args", None)
            save_dir = init_args.get("save_dir") if init_args is not None else None
            if isinstance(save_dir, str) and save_dir.startswith("~"):
                init_args.save_dir = save_dir = expand_home(save_dir)
            if root and save_dir and not os.path.isabs(save_dir) and not Path(save_dir).is_relative_to(root):
                init_args.save_dir = os.path.normpath(os.path.join(root, save_dir))  # (root/. as root)
                self._given_save_dirs.append((init_args, save_dir))

    def _save_where_the_run_is(self, loggers: Any, ckpt_path: str, working_dir: Any) -> None:
        """A resumed run's relative `save_dir` taken from the folder `fit` ran in, where the checkpoint lies under
        it there and not from here: resumed from another folder (`--ckpt_path /project/runs/.../last.ckpt`), the
        run went on in a second folder of the same id under the current one, with a config.yaml and metrics.csv of
        its own. config.yaml keeps `save_dir` as given (`_restore_given_save_dir`)."""
        if not isinstance(working_dir, str):
            return
        checkpoint = Path(ckpt_path).resolve()
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            save_dir = init_args.get("save_dir") if init_args is not None else None
            if not isinstance(save_dir, str) or os.path.isabs(save_dir):
                continue
            there = os.path.normpath(os.path.join(working_dir, save_dir))  # as the checkpoints' states name it
            here = Path(save_dir).resolve()
            if checkpoint.is_relative_to(Path(there).resolve()) and not checkpoint.is_relative_to(here):
                given = next((g for args, g in self._given_save_dirs if args is init_args), save_dir)
                init_args.save_dir = there
                self._given_save_dirs.append((init_args, given))

    def _restore_given_save_dir(self) -> None:
        """The logger's `save_dir` as given, once the logger is built (or before the config is printed): the
        printed config and config.yaml hold `save_dir: runs` beside `default_root_dir: DIR`, as the command line
        gave them. Written joined (`DIR/runs`), they put a rerun with another `--trainer.default_root_dir OTHER`
        in OTHER/DIR/runs."""
        for init_args, save_dir in getattr(self, "_given_save_dirs", []):
            init_args.save_dir = save_dir

    def _find_last(self, subcommand: str) -> tuple[dict[str, Any] | None, str | None]:
        """`--ckpt_path last`: the newest `last.ckpt` under the save folder of the configured logger (one that does not
        load stops the command: it is the run the user asks to continue)."""
        trainer = self.config[subcommand]["trainer"]
        logger = trainer.get("logger")
        # Of a list of loggers, the first's folder is the run's (`--trainer.logger+=CSVLogger` beside W&B).
        first = logger[0] if isinstance(logger, list) and logger else logger
        init_args = getattr(first, "init_args", None) or {}
        roots = [Path(init_args.get("save_dir") or trainer.get("default_root_dir") or ".")]
        if trainer.get("default_root_dir"):
            roots.append(Path(trainer["default_root_dir"]))
        dirpaths = [getattr(getattr(c, "init_args", None), "dirpath", None) for c in trainer.get("callbacks") or []]
        roots += [Path(d) for d in dirpaths if d]
        other_loggers = []
        found: tuple[dict[str, Any] | None, str | None] = (None, None)
        for path in last_checkpoints(roots):
            try:
                checkpoint = load_checkpoint(str(path), flag=f"--ckpt_path last: the newest run's {path}")
            except UsageError as err:
                # The command asks to continue that run (checkpoints are written whole, so it was damaged since):
                # passing over it resumed an older run, or started a new one, without the user choosing it.
                reason = str(err).removesuffix(f"; {FROM_FIT}")
                raise UsageError(
                    f"{reason}: resume that run from another of its checkpoints (in {path.parent}) with --ckpt_path "
                    "FILE, or move the file away to start or resume another"
                ) from err
            # fit goes on in the run's own folder, which only a run of the same logger has (W&B runs and CSV runs
            # share `runs/`): another logger's run would be resumed into a new folder, under this command's config.
            identity = checkpoint.get(CHECKPOINT_KEY, {}).get(RUN_KEY)
            ran_with = identity.get("logger") if isinstance(identity, dict) else None
            if subcommand == "fit" and logger_name(ran_with) != logger_name(logger):
                other_loggers.append(path)
                continue
            found = (checkpoint, str(path))
            break
        if other_loggers:
            print(f"cifar-cli: --ckpt_path last: passed over {other_loggers[0]}, newer but of a run with another "
                  "logger (pass its path to resume it)", file=sys.stderr)  # fmt: skip
        if found[0] is not None:
            return found
        where = ", ".join(sorted({str(r) for r in roots}))
        if subcommand != "fit":
            raise UsageError(f"--ckpt_path last: no last.ckpt under {where}; pass the path of a checkpoint")
        print(f"cifar-cli: --ckpt_path last: no run to resume under {where}; starting a new run", file=sys.stderr)
        self.config[subcommand]["ckpt_path"] = None
        return None, None

    def _train_batches(self) -> int | None:
        """The training batches of an epoch, as Lightning will count them (`fit_loop.max_batches`), where the data
        module has listed its data (`check_data`, on a node's first process); else None."""
        data, trainer = self.datamodule, self.trainer
        images = getattr(data, "train_images", None) if isinstance(data, ImageDataModule) else None
        if images is None:
            return None
        batches = train_batches(images, data.batch_size, trainer.world_size)
        limit = trainer.limit_train_batches
        return min(batches, limit) if isinstance(limit, int) else int(batches * limit)  # (Lightning's own rule)

    def _check_val_check_interval(self, batches: int | None) -> None:
        """Refuse a step count of `--trainer.val_check_interval` above the epoch's `batches` while validation counts
        per epoch. Lightning refuses it once the run has started, in a traceback, with the run's config.yaml and W&B
        run written: stacking `--trainer.check_val_every_n_epoch 1` on configs/budget.yaml does it."""
        trainer = self.trainer
        interval = trainer.val_check_interval
        if batches is None or not isinstance(interval, int) or trainer.check_val_every_n_epoch is None:
            return
        if interval <= batches:
            return
        file = self._config_that_sets("fit", "trainer.val_check_interval")
        setting = f"{file}'s trainer.val_check_interval" if file else "--trainer.val_check_interval"
        raise UsageError(
            f"{setting} {interval}: more than the {batches} training batches of an epoch, within which it counts "
            "while --trainer.check_val_every_n_epoch is set: give fewer batches or a fraction of an epoch, or "
            "--trainer.check_val_every_n_epoch null to count batches across epochs"
        )

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit":
            self._check_val_check_interval(self._train_batches())
            try:
                with true_stop_line(self.trainer):
                    return super()._run_subcommand(subcommand)
            except ValueError as err:
                # Where the batches were not counted before the run (a DDP rank that did not list the data), Lightning's
                # own check, in a traceback.
                if "`val_check_interval`" not in str(err):
                    raise
                self._check_val_check_interval(self.trainer.fit_loop.max_batches)
                raise
        # Lightning asks for the callbacks that wrote the checkpoint (a recipe's EMA, its ModelCheckpoint) whenever
        # the command lacks them: "Please add the following callbacks". Only a resumed fit goes on with their state;
        # test, validate and predict use the weights alone (EMA's average is the checkpoint's state_dict).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to")
            return super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        print_summary(self.trainer, "fit")

    def after_validate(self) -> None:
        print_summary(self.trainer, "validate")

    def after_test(self) -> None:
        print_summary(self.trainer, "test")

    def after_predict(self) -> None:
        print_summary(self.trainer, "predict")


# Lines of jsonargparse's nested messages that repeat what the other lines say, or spell out internals.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
)
# Lines of a Union's other branches (LightningCLI's --lr_scheduler is an LRScheduler or a ReduceLROnPlateau, a
# callbacks entry a list or one callback), left out where a line says what is wrong with the value as given.
_OTHER_BRANCHES = re.compile(
    r"does not correspond to a subclass of|Not a valid subclass of|Subclass types expect one of|a class path \(str\)$"
    r"|a dict with(out)? (class_path|init_args|parameters)"
)
USER_ERRORS = (ArgumentError, MisconfigurationException, UsageError)


def wandb_offline() -> bool:
    """The default of the W&B logger's `offline`: true, unless WANDB_MODE asks for an online run or none. Lightning's
    WandbLogger sets WANDB_MODE=dryrun for an offline run, over the user's: WANDB_MODE=disabled wrote an offline run
    all the same, and WANDB_MODE=online, which W&B's own line advises, logged offline. A config or flag that sets
    `offline` wins over the variable."""
    return os.environ.get("WANDB_MODE", "offline").strip().lower() not in ("online", "run", "disabled")


# WANDB_MODE's values that W&B runs without a server, and the `mode` of `wandb.init` that runs the same.
WANDB_MODES_WITHOUT_SERVER = {"disabled": "disabled", "offline": "offline", "dryrun": "offline"}


def settle_wandb_logger(logger: Any, given: Namespace | None, subcommand: str | None) -> None:
    """The W&B logger's `offline` and `mode` as the run takes them, written into its config (`offline_unless_given`,
    then `record_wandb_mode`, which reads the `offline` the first settles)."""
    offline_unless_given(logger, given, subcommand)
    record_wandb_mode(logger)


def wandb_init_args(entry: Any) -> Any:
    """The `init_args` of a logger's config entry that is a W&B logger, None for any other."""
    init = entry.get("init_args") if isinstance(entry, (dict, Namespace)) else None
    return init if init is not None and str(entry.get("class_path", "")).endswith(".WandbLogger") else None


def offline_unless_given(logger: Any, given: Namespace | None, subcommand: str | None) -> None:
    """`offline` of a W&B logger that the command line and configs name without setting it: cifar-cli's default
    (`wandb_offline`), which the default logger has, not the class's `false`. Named in place of none
    (`--trainer.logger WandbLogger` after configs/debug.yaml's `logger: false`), the logger started from its class's
    defaults and asked for a live run: without a W&B login it stopped saying its `offline: false` did, which the user
    never wrote; with one, it logged live without a word. Written into the config, so that config.yaml and
    --print_config run again as this run did. `given` is `given_settings`' (None where it could not be read: left)."""
    if given is None:
        return
    said = given.get(f"{subcommand}.trainer.logger" if subcommand else "trainer.logger")
    entries = logger if isinstance(logger, list) else [logger]
    said_entries = said if isinstance(said, list) else [said]
    if len(entries) != len(said_entries):  # entries it cannot pair with those given: left as they are
        return
    for entry, named in zip(entries, said_entries):
        init = wandb_init_args(entry)
        if init is None:
            continue
        named_init = named.get("init_args") if isinstance(named, (dict, Namespace)) else None
        if named_init is None or "offline" not in named_init:
            init["offline"] = wandb_offline()


def record_wandb_mode(logger: Any) -> None:
    """The mode W&B takes from WANDB_MODE, written into the W&B logger's `mode` where `offline: false` leaves it to the
    variable (WANDB_MODE=disabled, or `--trainer.logger.offline false` beside WANDB_MODE=offline): config.yaml said
    `offline: false` alone, and the same config run again without the variable logged live, or failed without a W&B
    login. The logger hands `mode` to `wandb.init`, which runs as the variable did. A mode given is kept."""
    mode = WANDB_MODES_WITHOUT_SERVER.get(os.environ.get("WANDB_MODE", "").strip().lower())
    for entry in logger if isinstance(logger, list) else [logger]:
        init = wandb_init_args(entry)
        if mode is None or init is None:
            continue
        if init.get("offline") is False and init.get("mode") is None:
            init["mode"] = mode


def wandb_dir_from_env(trainer: Trainer) -> None:
    """W&B's own files (`wandb/offline-run-...`) in WANDB_DIR where it is set, as W&B documents: Lightning's
    WandbLogger passes its `save_dir` to `wandb.init` as `dir`, which W&B puts over the variable, so it was ignored.
    The run's folder (checkpoints, config.yaml, metrics.csv) stays under `save_dir`, where `--ckpt_path last` finds
    it; the W&B run id is in its checkpoints, so the resumed run's part goes beside the first in WANDB_DIR."""
    folder = os.environ.get("WANDB_DIR", "").strip()
    if not folder:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            # Absolute: W&B's service resolves a relative folder against its own working directory.
            logger._wandb_init["dir"] = os.path.abspath(os.path.expanduser(folder))  # private to Lightning (2.6)


def user_error(err: BaseException) -> BaseException | None:
    """The bad-input error behind `err`, if any: jsonargparse wraps errors raised while it builds the classes."""
    for error in causes(err):
        if isinstance(error, UsageError):
            return error
        if isinstance(error, USER_ERRORS):
            inner = user_error(error.__cause__) if error.__cause__ is not None else None
            return inner if isinstance(inner, UsageError) else error
    return None


def import_failure(err: BaseException) -> str | None:
    """One line for an error raised while jsonargparse imported the module of a `class_path` (a module of the user's
    that raises, or has a syntax error, as it is imported), if `err` is one: it was a traceback of 100 lines, most of
    them jsonargparse's. A missing module is jsonargparse's own one-line error already."""
    for error in causes(err):
        tb, class_path, where = error.__traceback__, None, None
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "import_object" and "jsonargparse" in code.co_filename:
                class_path = tb.tb_frame.f_locals.get("name")
            elif class_path is not None:
                where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)  # the deepest frame: where it was raised
            tb = tb.tb_next
        if not isinstance(class_path, str):
            continue
        reason = str(error).splitlines()[0] if str(error) else ""
        if isinstance(error, SyntaxError) and error.filename:  # its file and line are its own, not a frame's
            where, reason = (error.filename, error.lineno), error.msg
        at = f" ({where[0]}, line {where[1]})" if where is not None else ""
        return (
            f"{class_path}: importing its module failed with {type(error).__name__}: {reason}{at}; "
            f"{DEBUG_ENV}=true shows the traceback"
        )
    return None


def refused_value(err: BaseException) -> str | None:
    """One line for a ValueError raised by a class of the config as jsonargparse built it, if `err` holds one: a
    value it refuses (Lightning's `EMAWeightAveraging(decay=2)`, in torch's check). jsonargparse reports it as a
    Union that does not validate, beside the repr of every callback in the list, after a traceback."""
    for error in causes(err):
        if not isinstance(error, ValueError):
            continue
        tb, class_type = error.__traceback__, None
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "default_class_instantiator" and "jsonargparse" in code.co_filename:
                class_type = tb.tb_frame.f_locals.get("class_type")
            tb = tb.tb_next
        if isinstance(class_type, type):
            return f"{class_type.__name__}: {one_line(error)}"
    return None


def is_wandb_error(err: BaseException) -> bool:
    """Whether `err` is one of W&B's own errors (a missing login, a server that does not answer, a bad setting)."""
    errors = sys.modules.get("wandb.errors")
    return errors is not None and isinstance(err, errors.Error)


def wandb_service_stopped(err: BaseException) -> bool:
    """Whether `err` is W&B's word that its service process (wandb-core) ended before it answered: wandb 0.31 raises
    a HandleAbandonedError, without a message and not one of `wandb.errors`, where wandb-core panics in `wandb.init`
    (a WANDB_IDENTITY_TOKEN_FILE it cannot read, beside WANDB_API_KEY, in an offline run too), after its own lines
    on stderr. Compared by name: the class is internal to wandb (`wandb.sdk.mailbox`)."""
    kind = type(err)
    return kind.__name__ == "HandleAbandonedError" and kind.__module__.startswith("wandb.")


def going_live(err: BaseException) -> bool:
    """Whether W&B's error `err` is one of going live: no login (`wandb.init` asks for the API key only in a
    terminal), an API key or credentials refused, or no server to reach (wandb 0.31: a UsageError "No API key
    configured. Use `wandb login` to log in.", an AuthenticationError, a CommError). Never for an `offline: true`
    run, for which Lightning's WandbLogger sets WANDB_MODE=dryrun before `wandb.init`: it checks WANDB_API_KEY
    offline too ("API key cannot start or end with whitespace"), and a run that stays offline needs no login."""
    errors = sys.modules["wandb.errors"]
    if os.environ.get("WANDB_MODE", "").strip().lower() == "dryrun":
        return False
    about_login = re.search(r"api[ _]?key|log ?in\b", str(err), re.IGNORECASE) is not None
    return isinstance(err, errors.CommError) or (isinstance(err, errors.UsageError) and about_login)


def out_of_space(err: BaseException) -> OSError | None:
    """The full disk (or exhausted quota) behind `err`, if any."""
    full = (e for e in causes(err) if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    return next(full, None)


# A folder that cannot be written in, or made: the command's, not a file's, trouble. EEXIST: `mkdir(exist_ok=True)`
# of a folder whose path is a file.
UNWRITABLE = (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST)


def unwritable(err: BaseException) -> OSError | None:
    """The error of a path that cannot be written in (a file in its way, no permission, a read-only disk, a file
    system that makes no folders), if any."""
    found = (e for e in causes(err) if isinstance(e, OSError) and e.filename and (e.errno in UNWRITABLE or unmade(e)))
    return next(found, None)


def unmade(err: OSError) -> bool:
    """Whether `err` is ENOENT from making a folder whose parents exist: /proc and /sys make none (`mkdir /proc/x`).
    Told by the function that raised it, since the ENOENT of a missing input file reads the same."""
    if err.errno != errno.ENOENT or err.__traceback__ is None:
        return False
    frame = err.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_name in ("mkdir", "makedirs")


def write_elsewhere(path: str) -> str:
    """How to write elsewhere than `path`, a folder that cannot be written in: the run's own folders move with flags;
    W&B's staging folder (~/.local/share/wandb, in a home that may be read-only) and WANDB_DIR with their variables."""
    env = sys.modules.get("wandb.env")
    staging = Path(env.get_data_dir(), "artifacts", "staging").expanduser().absolute() if env is not None else None
    if staging is not None and staging.is_relative_to(Path(path).absolute()):
        return (
            "set WANDB_DATA_DIR to a folder you can write in (W&B stages what a run logs there), or log without W&B "
            "(--trainer.logger CSVLogger)"
        )
    wandb_dir = os.environ.get("WANDB_DIR", "").strip()
    if wandb_dir and Path(wandb_dir).expanduser().absolute().is_relative_to(Path(path).absolute()):
        return (
            "set WANDB_DIR to a folder you can write in, or unset it (W&B's files then go under the logger's "
            "save_dir, runs/ by default)"
        )
    return "choose a folder you can write in (--trainer.default_root_dir, --data.cache_dir)"


# jsonargparse's "Expected a <class 'int'>" and "Expected a typing.Literal['none', 'flip']. Got value: x" lines.
# The keys before it are nested where the value is an argument of a class (`Parser key "model.lr_schedule":
# 'cifar_cli.optim.WarmupLinearDecay': Parser key "restarts": ...`).
_EXPECTED = re.compile(
    r"^((?:Parser key \"[\w.]+\": (?:'[\w.]+': )?)*)Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*)\])"
    r"(?:\. Got value: (.*))?$"
)
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "text",
    "tuple": "a list ([...])",
    "list": "a list ([...])",
}


def expected_values(lines: list[str], given: str | None) -> str | None:
    """jsonargparse's lines for a value of none of a setting's types, as one: `Parser key "trainer.max_epochs":
    expected an integer, got two` (it said "Expected a <class 'int'>", and not the value given); None where other
    lines are among them."""
    matches = [_EXPECTED.match(line) for line in lines]
    if not lines or not all(matches) or not matches[0][1]:
        return None
    kinds, choices = [], []
    for match in matches:
        if match[2]:
            kinds.append(_TYPE_WORDS.get(match[2], match[2]))
        else:
            choices += [choice.strip().strip("'") for choice in match[3].split(",")]
        given = match[4] or given  # the value as the key's own line gives it (a nested one's: NestedArg(...) else)
    if choices:
        kinds.append("one of " + ", ".join(dict.fromkeys(choices)))
    got = f", got {given}" if given is not None else ""
    key = ".".join(re.findall(r'Parser key "([\w.]+)"', matches[0][1]))
    return f'Parser key "{key}": expected {", or ".join(dict.fromkeys(kinds))}{got}'


def one_line(err: BaseException) -> str:
    """An error's message on one line, without jsonargparse's repetitions."""
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    given = next((line.removeprefix("Given value: ") for line in lines if line.startswith("Given value: ")), None)
    lines = [
        line.replace("Problem with given class_path ", "") for line in lines if line and not line.startswith(_NOISE)
    ]
    lines = list(dict.fromkeys(lines))  # each once: a class in two branches of a Union fails the same way in both
    pertinent = [line for line in lines if not _OTHER_BRANCHES.search(line)]
    lines = pertinent if len(pertinent) > 1 else lines
    if len(lines) > 1 and lines[0].endswith(":") and lines[0].startswith("Parser key"):
        # The key on its own line, and where the value is a class's argument, the class and its key on theirs.
        keys = next(i for i, line in enumerate(lines) if not line.endswith(":") or i == len(lines) - 1)
        lines = [" ".join(lines[: keys + 1]), *lines[keys + 1 :]]
    return expected_values(lines, given) or " ".join(lines)


def binary_file_argument(argv: list[str]) -> str:
    """`FLAG FILE` for the first file on the command line that is not UTF-8 text (`a file given` if none is)."""
    for flag, value in zip(["", *argv], argv):
        name = value.partition("=")[2] if value.startswith("--") and "=" in value else value
        flag = value.partition("=")[0] if name is not value else flag
        if flag == "--ckpt_path" or not os.path.isfile(name):
            continue  # (a checkpoint is binary by nature, and read elsewhere)
        try:
            with open(name, "rb") as file:
                file.read(1 << 20).decode("utf-8")  # a config file's first MiB: enough to tell
        except UnicodeDecodeError as err:
            if err.start < (1 << 20) - 4:  # not a character cut at the end of the MiB read
                return f"{flag} {name}".strip()
        except OSError:
            continue
    return "a file given"


SUBCOMMANDS = (*LightningCLI.subcommands(), "report")


def check_subcommand(argv: list[str] | None) -> None:
    """Refuse a command line without a subcommand, or with an unknown one, naming all five: jsonargparse's own
    error lists LightningCLI's four, without `report`."""
    if argv is None or argv[:1] and argv[0].startswith("-"):
        return  # a config as a dict, or options first (--help, --config): LightningCLI's parser decides
    names = ", ".join(SUBCOMMANDS[:-1]) + f" or {SUBCOMMANDS[-1]}"
    if not argv:
        raise UsageError(f"give a subcommand: {names} (cifar-cli --help)")
    if argv[0] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown subcommand '{argv[0]}': {names}{hint}")


def config_before_subcommand(err: ArgumentError, argv: list[str]) -> UsageError | None:
    """The refusal of a subcommand's config given before the subcommand (`cifar-cli --config configs/cpu.yaml fit`,
    as some LightningCLI scripts take it), saying where it goes: jsonargparse's line said only that the option "is
    not accepted before subcommand 'fit'"."""
    match = re.search(r"Option '([\w.]+)' is not accepted before subcommand '(\w+)'", str(err))
    at = next((i for i, arg in enumerate(argv) if arg in SUBCOMMANDS), None)
    if match is None or at is None:
        return None
    configs = [flag_value(argv[:at], flag) for flag in CONFIG_FLAGS]
    given = next((c for c in configs if c is not None), None)
    subcommand, section = match[2], match[1].split(".")[0]
    variable = os.environ.get("PL_CONFIG") if os.getenv("JSONARGPARSE_DEFAULT_ENV", "").lower() == "true" else None
    if given is None and variable:
        # Lightning's "A full configuration yaml would be parsed from PL_CONFIG": jsonargparse reads it as the config
        # before the subcommand, but from the variable only the chosen subcommand's section, where `cifar-cli
        # --config FILE fit` takes every section.
        config = shown(variable)
        if section in SUBCOMMANDS:
            return UsageError(
                f"PL_CONFIG={config}: read from the variable, the config's sections other than {subcommand}'s are "
                f"refused ({section}:); give it on the command line, cifar-cli --config {config} {subcommand}, or its "
                f"{subcommand}: section alone"
            )
        return UsageError(
            f"PL_CONFIG={config}: the config before the subcommand holds a section per subcommand ({subcommand}: "
            f"{{{section}: ...}}), and '{match[1]}' is not one; give {subcommand}'s config as "
            f"PL_{subcommand.upper()}__CONFIG={config} (or cifar-cli {subcommand} --config {config})"
        )
    config = shown(given or "FILE")
    return UsageError(
        f"--config {config} before the subcommand: a config there holds a section per subcommand ({subcommand}: "
        f"{{{section}: ...}}), and '{match[1]}' is not one; give it after the subcommand: "
        f"cifar-cli {subcommand} --config {config}"
    )


def check_model_help(argv: list[str] | None) -> None:
    """Answer `--model.help`, LightningCLI's form for a model chosen by class, in one line: the model is always
    ImageClassifier, so jsonargparse has no such flag and refused it as an unrecognized argument."""
    if not argv or argv[0] == "report" or not any(a.split("=")[0] == "--model.help" for a in argv):
        return
    subcommand = argv[0] if argv[0] in SUBCOMMANDS else "fit"
    raise UsageError(
        f"--model.help: the model is always ImageClassifier; its settings are the --model.* flags of `cifar-cli "
        f"{subcommand} --help`, and a network's are shown by --model.net.help CLASS (--model.net.help TutorialCNN)"
    )


# The classes cifar-cli brings for the flags whose `--KEY.help CLASS` describes one, as `cifar-cli fit --help` and the
# README name them.
CLASS_HELP = {
    "model.net": (["TutorialCNN", "FastNet", "TorchvisionNet", "TimmNet"], "; any nn.Module by its import path"),
    "data": (["CIFAR10DataModule", "CIFAR100DataModule", "ImageFolderDataModule"], ""),
    "data.augment": (["PhotoAugment"], ""),
}


def check_class_help(argv: list[str] | None) -> None:
    """Refuse in one line a `--KEY.help` given no class. jsonargparse described the flag's base class
    (`--model.net.help`: torch.nn.Module's, empty), or refused the line naming another flag (`--data.augment.help`:
    "argument --data: expected one argument"). `--data.help` alone keeps jsonargparse's help of the data modules'
    common settings."""
    for i, arg in enumerate(argv or []):
        if arg == "--help" or not arg.startswith("--") or not arg.endswith(".help") or arg == "--data.help":
            continue
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            continue
        key = arg[2 : -len(".help")]
        names, more = CLASS_HELP.get(key, ([], ""))
        known = f" (cifar-cli's: {', '.join(names)}{more})" if names else ""
        raise UsageError(f"{arg} takes the class to describe: {arg} {names[0] if names else 'CLASS'}{known}")


def class_help_hint(message: str) -> str:
    """jsonargparse's refusal of `--KEY.help NAME` (`Expected a dot import path string: Nope`), with the classes
    cifar-cli brings for KEY."""
    match = re.match(r"--([\w.]+)\.help: ", message)
    if match is None or match[1] not in CLASS_HELP or "Multiple subclasses" in message:
        return message
    names = CLASS_HELP[match[1]][0]
    return f"{message}; cifar-cli's: {', '.join(names)} (--{match[1]}.help {names[0]})"


def not_utf8(err: BaseException, argv: list[str] | None) -> str | None:
    """What to say where a value that is not UTF-8 (a folder named in Latin-1, say) failed to parse, naming its flag;
    None for another error. jsonargparse reads a --data.* value as YAML, which holds only Unicode text: the error was
    a codec's, under `Parser key "data"`. Other values (--trainer.default_root_dir) take such a name."""
    if argv is None or not any(isinstance(e, UnicodeEncodeError) for e in causes(err)):
        return None
    key = re.search(r'Parser key "([^"]+)"', str(err))
    found = []
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            flag, _, value = arg.partition("=") if arg.startswith("--") else (argv[i - 1] if i else "", "", arg)
            found.append((flag or "argument", os.fsencode(value).decode("utf-8", "backslashreplace")))
    named = [f for f in found if key and f[0].startswith(f"--{key[1]}")] or found
    if not named:
        return None
    flag, shown = named[0]
    return (
        f"{flag} '{shown}': the name is not UTF-8, which cifar-cli's configs (YAML) cannot hold: rename it, or link "
        "it under a UTF-8 name (ln -s) and give that"
    )


CONFIG_FLAGS = ("--config", "-c")


def check_empty_configs(argv: list[str] | None) -> None:
    """Refuse an empty `--config` (`--config "$CONFIG"` with the variable unset): jsonargparse passed over it, and
    the command ran on the defaults without a word."""
    for flag, value in zip(["", *(argv or [])], argv or []):
        flag, _, value = value.partition("=") if value.startswith("-") and "=" in value else (flag, "", value)
        if flag in CONFIG_FLAGS and not value.strip():
            raise UsageError(f"{flag} {value!r} is empty (an unset variable?): give a config file, or leave the flag "
                             "out")  # fmt: skip


def settled_configs(args: list[str]) -> list[str]:
    """`args` with each config file that holds the optimizer's copy of the learning rate or weight decay given as
    its contents without the pair (see `without_settled_copies`; jsonargparse's `--config` takes YAML text too)."""

    def settled(path: str) -> str | None:
        config = read_config(path)
        return yaml.safe_dump(config, sort_keys=False) if without_settled_copies(config) else None

    return with_values(args, CONFIG_FLAGS, settled)


def given_settings(parser: LightningArgumentParser, args: ArgsType) -> Namespace | None:
    """The command line and its configs parsed without the parser's defaults: what the user gave, which the parsed
    config (defaults merged) cannot tell from a default of the same value. None where it cannot be read (a config
    given as a dict). About 20 ms; jsonargparse's private `_skip_validation`, as the required arguments are
    defaults' to fill."""
    args = sys.argv[1:] if args is None else args
    if not isinstance(args, list):
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_args(settled_configs(args), defaults=False, _skip_validation=True)
    except (Exception, SystemExit):  # a jsonargparse that reads it otherwise: the rule of the defaults
        return None


@contextlib.contextmanager
def ctrl_c_exits_130() -> Iterator[None]:
    """A Ctrl-C that interrupts the command at once (the second during training, see Preemption, or any outside it)
    ends it with exit code 130, as a process stopped by SIGINT, and one line. Lightning ends a run that it catches
    KeyboardInterrupt in with exit code 1, after its graceful shutdown (which also stops a DDP run's other ranks);
    before the trainer runs (parsing, decoding the data) it was Python's traceback."""
    pressed: list[int] = []

    def noted(signum: int, frame: Any) -> None:
        pressed.append(signum)
        signal.default_int_handler(signum, frame)  # Python's own: KeyboardInterrupt

    ours = threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, noted)
    try:
        yield
    except KeyboardInterrupt:
        print("cifar-cli: interrupted by Ctrl-C", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except SystemExit as stop:
        if pressed and stop.code == 1:  # Lightning's exit after a KeyboardInterrupt
            print("cifar-cli: interrupted by Ctrl-C", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def finish_wandb_run(exit_code: int) -> None:
    """End the W&B run of this process, if one is open, recording `exit_code`."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def finish_stopped_wandb_run(code: int) -> None:
    """End the W&B run of a command stopped by a signal (Preemption's exit code 143, 130 or 138, or a stop after the
    stage), with that code, as W&B's exit hook would. What a stopped offline run logged is kept, and W&B's closing
    lines that name it are off (WANDB_QUIET): without the `wandb sync` line printed here, only the run's resumption
    would have said how to upload it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and not UNSTARTED_RUN and (line := sync_line(wandb.run)) is not None:
        print(line, file=sys.stderr, flush=True)
    finish_wandb_run(code)


def main(args: ArgsType = None) -> None:
    """Entry point of `cifar-cli` and `python -m cifar_cli`. Bad input ends in one line on stderr and exit code 2."""
    hooks.install()  # callback hooks called only where implemented (see cifar_cli.hooks)
    lightning_takes_signals()  # from the start-up's stop on SIGTERM and SIGUSR1 (cifar_cli.entry)
    UNSTARTED_RUN.clear()
    hooks.plain_cuda_check_without_gpu()
    silence_noise()
    # The summary at the end of a run gives the metrics and, offline, the `wandb sync` command; W&B's own closing
    # block would repeat both (about 30 lines of history and summary in every log). WANDB_QUIET=false shows it.
    os.environ.setdefault("WANDB_QUIET", "true")
    argv = sys.argv[1:] if args is None else args if isinstance(args, list) else None
    try:
        with ctrl_c_exits_130():
            debug_switch()
            check_subcommand(argv)
            check_model_help(argv)
            check_class_help(argv)
            check_empty_configs(argv)
            # The values the parse reads otherwise: the configs that come with cifar-cli (given to --config, or to
            # jsonargparse's PL_FIT__CONFIG), Lightning's plateau class, the folder of a logger added to the list.
            for name, value in list(os.environ.items()):
                if re.fullmatch(r"PL_(\w+__)?CONFIG", name) and (path := shipped_config(value)) is not None:
                    os.environ[name] = path
            rewritten = argv
            if argv is not None:
                rewritten = added_logger_folders(lightning_plateau(with_values(argv, CONFIG_FLAGS, shipped_config)))
            if rewritten != argv:
                argv = rewritten
                # The command line itself: LightningCLI warns of args given beside it, and Lightning's DDP launcher
                # starts the other ranks with sys.argv.
                if args is None:
                    sys.argv[1:] = rewritten
                else:
                    args = rewritten
            if argv and argv[:1] == ["report"]:
                # Not a LightningCLI subcommand: it builds no trainer, model or data, only reads a run folder.
                from cifar_cli.report import main as report

                return report(argv[1:])
            CifarCLI(
                ImageClassifier,
                ImageDataModule,
                subclass_mode_data=True,
                seed_everything_default=42,
                # The optimizer and schedule are the model's: it builds the parameter groups. LightningCLI's own
                # --optimizer would put every parameter in one group; the CLI hands it to the model instead.
                auto_configure_optimizers=False,
                save_config_callback=RunConfigSaver,
                parser_kwargs={"exit_on_error": False, "prog": "cifar-cli"},  # not __main__.py under python -m
                args=args,
            )
        # The W&B run ends here, not in W&B's exit hook: the lines that hook prints (the online run's link, or with
        # WANDB_QUIET=false the offline run's `wandb sync` command) keep their colour codes even when stderr is a
        # file, and a log read later shows them raw. A run that fails is still ended by the hook, which records the
        # exit code.
        finish_wandb_run(0)
    except StoppedAfterStage as stop:
        if local_rank_zero():
            print(stop.line(), file=sys.stderr, flush=True)
        # The summary that names an offline run's upload never came: the line, as after a stop during training.
        finish_stopped_wandb_run(128 + stop.signum)
        raise SystemExit(128 + stop.signum) from None
    except StoppedBeforeStart as stop:
        # Preemption has removed the run folder the start made; its W&B run logged nothing worth a `wandb sync`.
        if local_rank_zero():  # a DDP run's other ranks, which their launcher stopped alike, say it once
            print(stop.line(argv or []), file=sys.stderr, flush=True)
        finish_wandb_run(128 + stop.signum)
        raise SystemExit(128 + stop.signum) from None
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if code in (128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGUSR1):
            finish_stopped_wandb_run(code)
        else:
            finish_wandb_run(code)
        raise
    except Exception as err:
        debug = debugging()
        diverged = next((e for e in causes(err) if isinstance(e, TrainingDiverged)), None)
        if diverged is not None and not debug:
            finish_wandb_run(1)
            print(f"cifar-cli: error: {diverged}", file=sys.stderr)
            sys.exit(1)
        if not debug and any(wandb_service_stopped(e) for e in causes(err)):
            # Its teardown at exit fails the same way, and printed "Exception ignored in atexit callback" with a
            # traceback of its own ("ConnectionResetError: Connection lost"): done here, its failure unsaid.
            with contextlib.suppress(Exception):
                sys.modules["wandb"].teardown()
            print("cifar-cli: error: W&B: its service (wandb-core) stopped without an answer (its own error is above)",
                  file=sys.stderr)  # fmt: skip
            sys.exit(1)
        wandb_error = next((e for e in causes(err) if is_wandb_error(e)), None)
        if wandb_error is not None and not debug and not going_live(wandb_error):
            # An invalid project name or run id, a service that failed to start, an offline run's error: W&B's own
            # message alone. The advice below is for live runs; it sent these to the offline run that had failed.
            finish_wandb_run(1)
            print(f"cifar-cli: error: W&B: {one_line(wandb_error)}", file=sys.stderr)
            sys.exit(1)
        if wandb_error is not None and not debug:
            # Going live without a login (outside a terminal, where W&B cannot ask for the key) or without a
            # connection: W&B's own error, in one line.
            if wandb_offline():  # the logger's offline: false, from a flag or a config (a run's config.yaml)
                why = "its offline: false asks for a live run; the default logs offline: --trainer.logger.offline true"
            else:  # WANDB_MODE=online made the default a live run
                mode = os.environ["WANDB_MODE"]
                why = f"WANDB_MODE={mode} asks for a live run; offline: --trainer.logger.offline true"
            print(f"cifar-cli: error: W&B: {one_line(wandb_error)} ({why}, then `wandb sync`)", file=sys.stderr)
            sys.exit(1)
        exit_if_spawned_rank_failed(err)  # under ddp_spawn: "rank R failed: ..."
        undecodable = not_utf8(err, argv) if not debug else None
        if undecodable is not None:
            print(f"cifar-cli: error: {undecodable}", file=sys.stderr)
            sys.exit(2)
        cause = user_error(err)
        # A class_path whose module fails to import, or a class that refuses a value as jsonargparse builds it.
        building = (import_failure(err) or refused_value(err)) if cause is None and not debug else None
        if building is not None:
            print(f"cifar-cli: error: {building}", file=sys.stderr)
            sys.exit(2)
        exit_if_rank_failed(err, one_line(cause) if cause is not None else None)  # under DDP: "rank R failed: ..."
        full = out_of_space(err) if cause is None and not debug else None
        if full is not None:
            # Checkpoints, configs, metrics and caches are written beside their target and renamed (cifar_cli.atomic):
            # the write that failed left nothing, and the files from before it are whole.
            where = f" writing {full.filename}" if full.filename else ""
            print(f"cifar-cli: error: no space left on the device{where}: free some, or write elsewhere "
                  "(--trainer.default_root_dir, --data.cache_dir)", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        denied = unwritable(err) if cause is None and not debug else None
        if denied is not None:
            reason = {errno.EEXIST: "a file, not a folder", errno.ENOENT: "no folder can be made there"}.get(
                denied.errno, denied.strerror.lower()
            )
            print(f"cifar-cli: error: cannot write in {denied.filename} ({reason}): {write_elsewhere(denied.filename)}",
                  file=sys.stderr)  # fmt: skip
            sys.exit(1)
        if cause is None or debug:
            raise
        print(f"cifar-cli: error: {class_help_hint(one_line(cause))}", file=sys.stderr)
        sys.exit(2)
    finally:
        end_stopping_after_stage()
        release_folders()


def config_printer() -> tuple[Callable[[], Any], Callable[[Any, Namespace], None]] | None:
    """jsonargparse's `--print_config`, in two parts: a context in which parsing does not print, and the print
    (which exits). Private in jsonargparse (4.53): None where it has moved, and jsonargparse prints as it parses."""
    try:
        from jsonargparse._actions import _ActionPrintConfig

        return _ActionPrintConfig.skip_print_config, _ActionPrintConfig.print_config_if_requested
    except (ImportError, AttributeError):
        return None


def run() -> None:
    """The entry point of the `cifar-cli` command and of `python -m cifar_cli`: one command in a process of its own."""
    # What the imports made (torch, Lightning, torch._dynamo, jsonargparse: about 400,000 objects) lives as long as the
    # process. Frozen, it is out of the garbage collector's reach: the full collections while the command runs skip
    # it, and so does the last one, at exit, which walked it all: 0.9 s of every command here (a 300-step fit:
    # 1.24 s from the last atexit handler to the end of the process before, 0.31 s after). Not in `main`, which a
    # Python program may call many times: objects it froze there would never be collected.
    gc.freeze()
    main()


def smallest_side(net: nn.Module, channels: int, low: int, side: int, channels_last: bool) -> int | None:
    """The smallest side above `low` and below `side` that `net` takes, or None where it takes none (a fixed-size
    network). By bisection, each try a forward pass on the meta device: a network that takes a side takes the larger
    ones."""
    if input_problem(net, (channels, side - 1, side - 1), channels_last) is not None:
        return None
    fails, works = low, side - 1
    while works - fails > 1:
        middle = (fails + works) // 2
        if input_problem(net, (channels, middle, middle), channels_last) is None:
            works = middle
        else:
            fails = middle
    return works
