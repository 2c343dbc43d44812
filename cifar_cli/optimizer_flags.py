"""LightningCLI's `--optimizer` and `--lr_scheduler` handed to the model, and the one learning rate resolved.

The model builds its optimizer over parameter groups (the BatchNorm and backbone factors); LightningCLI's own
wiring of these flags would build it over one group of all parameters. So the flags are parsed as LightningCLI
parses them, then moved into `model.optimizer` and `model.lr_scheduler` before anything is built: the saved
config.yaml and the checkpoint's hyperparameters hold them there, and `--ckpt_path` rebuilds the same run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, ReduceLROnPlateau

from cifar_cli.errors import UsageError
from cifar_cli.presets import read_config, shown

# The sections of a top-level config (`cifar-cli --config FILE fit`).
LIGHTNING_SUBCOMMANDS = tuple(LightningCLI.subcommands())
# ImageClassifier's defaults: a value other than these was chosen by the user.
DEFAULT_OPTIMIZER = "torch.optim.Adam"
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_WEIGHT_DECAY = 0.0
# Scheduler arguments that count epochs (or steps) of a period: torch accepts 0 or -1 for some of them and fails
# later, at the first step that divides by it, or trains on a meaningless curve.
PERIODS = ("T_max", "T_0", "step_size", "total_steps")


def import_class(class_path: str) -> type | None:
    module, _, name = str(class_path).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None
    return target if isinstance(target, type) else None


def class_default(class_path: str, name: str) -> Any:
    """The default of `name` in the class's signature, or `inspect.Parameter.empty`."""
    cls = import_class(class_path)
    parameter = inspect.signature(cls).parameters.get(name) if cls is not None else None
    return parameter.default if parameter is not None else inspect.Parameter.empty


def _init_args(options: Namespace) -> Namespace:
    if options.get("init_args") is None:
        options["init_args"] = Namespace()
    return options["init_args"]


def is_default_optimizer(options: Any) -> bool:
    """Whether `model.optimizer` is ImageClassifier's default, Adam with its class defaults."""
    if not isinstance(options, Namespace) or options.get("class_path") != DEFAULT_OPTIMIZER:
        return options is None
    init = options.get("init_args") or Namespace()
    return all(value == class_default(DEFAULT_OPTIMIZER, name) for name, value in init.items())


def unsettled(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model hyperparameters as defaults for the command line: the optimizer's `lr` and
    `weight_decay` left out. `settle` wrote the learning rate and weight decay into both places; left in the
    optimizer's arguments they would read as given there, and a `--model.learning_rate` beside `--ckpt_path` as
    a second, disagreeing value. The model's own two keep them."""
    optimizer = hparams.get("optimizer")
    init = optimizer.get("init_args") if isinstance(optimizer, dict) else None
    if not isinstance(init, dict):
        return hparams
    init = {k: v for k, v in init.items() if k not in ("lr", "weight_decay")}
    return {**hparams, "optimizer": {**optimizer, "init_args": init}}


# The model's settings that the optimizer's own arguments copy (`settle`), by the optimizer's name.
SETTLED = {"lr": "learning_rate", "weight_decay": "weight_decay"}


def without_settled_copies(config: Any) -> bool:
    """Remove from a config file's contents each pair of the optimizer's `lr` (`weight_decay`) and the model's
    `learning_rate` (`weight_decay`) that agree, as `--print_config` and every run's config.yaml write them (see
    `settle`), in its `model` section and its subcommands'; True where one was removed. Left in, the pair reads as
    two given values, and a `--model.learning_rate` beside the file as a third that disagrees with one of them: the
    file holds one learning rate, which a flag or a later config changes, as it changes any other setting. What is
    left of ImageClassifier's default optimizer, Adam with its class defaults, is removed too."""
    removed = False
    sections = [config, *(config.get(s) for s in LIGHTNING_SUBCOMMANDS)] if isinstance(config, dict) else []
    for section in sections:
        model = section.get("model") if isinstance(section, dict) else None
        optimizer = model.get("optimizer") if isinstance(model, dict) else None
        init = optimizer.get("init_args") if isinstance(optimizer, dict) else None
        if not isinstance(init, dict):
            continue
        for name, model_name in SETTLED.items():
            if name in init and model_name in model and init[name] == model[model_name]:
                del init[name], model[model_name]
                removed = True
        default = all(  # (YAML writes Adam's betas as a list)
            (tuple(value) if isinstance(value, list) else value) == class_default(DEFAULT_OPTIMIZER, name)
            for name, value in init.items()
        )
        if removed and optimizer.get("class_path") == DEFAULT_OPTIMIZER and default:
            # The default optimizer, spelled out: `--optimizer SGD` beside the file chooses another, as without it.
            del model["optimizer"]
    return removed


def drop_settled_copies(model: Any) -> None:
    """Remove from a parsed `model` the optimizer's `lr` (`weight_decay`) where it is the copy `settle` wrote of the
    model's `learning_rate` (`weight_decay`), for `--print_config=skip_default`: it leaves out the model's value where
    it is the default, and the copy left alone would read as the optimizer's own, given in the file, which a
    `--model.learning_rate` beside it then disagreed with. The model's value, printed where it is not the default,
    is the one the file gives."""
    options = model.get("optimizer") if isinstance(model, Namespace) else None
    init = options.get("init_args") if isinstance(options, Namespace) else None
    if not isinstance(init, Namespace):
        return
    for name, model_name in SETTLED.items():
        if name in init and init[name] == model.get(model_name):
            del init[name]


def given_keys(given: Namespace | None, *keys: str) -> dict[str, Any] | None:
    """The values under `keys` (e.g. "optimizer", "init_args") of `given`, the command line parsed without defaults
    (what the user gave, in flags or configs); None where that is not known."""
    if not isinstance(given, Namespace):
        return None
    node: Any = given
    for key in keys:
        node = node.get(key) if isinstance(node, Namespace) else None
    return dict(node.items()) if isinstance(node, Namespace) else ({} if node is None else {"": node})


def config_that_sets(key: str, argv: list[str], configs: list[Any], subcommand: str) -> str | None:
    """The last of the `configs` files (in the order given) that sets `key` (`model.optimizer`), as the command line
    names it (`configs/fast.yaml` for cifar-cli's own); None where a flag on `argv` sets it, or no file does."""
    flag = f"--{key}"
    if any(arg == flag or arg.startswith((f"{flag}=", f"{flag}.")) for arg in argv):
        return None
    for path in reversed(configs):
        content = read_config(path)
        for section in (content, content.get(subcommand)) if isinstance(content, dict) else ():
            node = section
            for name in key.split("."):
                node = node.get(name) if isinstance(node, dict) else None
            if node is not None:
                return shown(path)
    return None


def _short(class_path: str) -> str:
    """A class path as a flag takes it: torch's optimizers and schedulers by their names."""
    module, _, name = class_path.rpartition(".")
    return name if module in ("torch.optim", "torch.optim.lr_scheduler") else class_path


def both_choose(key: str, what: str, top: Namespace, own: Namespace, origin: Callable[[str], str | None]) -> UsageError:
    """The refusal of `--KEY` beside `--model.KEY` (`key` "optimizer"), each named where it was given: a flag, or
    the config file that set it (`--optimizer AdamW` beside configs/fast.yaml's SGD spoke of a `--model.optimizer`
    never typed)."""
    top_file, own_file = origin(key), origin(f"model.{key}")
    if top_file is None and own_file is None:
        return UsageError(f"--{key} and --model.{key} both choose the {what}: give one of them")
    top_name = f"{top_file}'s {key} ({top['class_path']})" if top_file else f"--{key} {_short(top['class_path'])}"
    own_name = f"{own_file}'s model.{key} ({own['class_path']})" if own_file else f"--model.{key}"
    fix = f" (--model.{key} {_short(top['class_path'])} replaces the config's)" if top_file is None else ""
    return UsageError(f"{top_name} and {own_name} both choose the {what}: give one of them{fix}")


def move_optimizer_flags(
    config: Namespace,
    model_defaults: Namespace | None = None,
    given: Namespace | None = None,
    origin: Callable[[str], str | None] = lambda key: None,
) -> dict[str, str]:
    """Move `--optimizer` and `--lr_scheduler` of the subcommand's `config` into the model's arguments, and settle
    the learning rate and weight decay in `model.learning_rate` / `model.weight_decay` (and the optimizer's own
    arguments, which then agree). Returns the flags that gave the optimizer and the scheduler, for error messages.

    An optimizer's own `lr` (or `weight_decay`) counts as given when `given` (the subcommand's command line and
    configs parsed without defaults) holds it, or, where that is unknown, when it differs from its class's default;
    given, it wins over the model's default; given with a different `--model.learning_rate`, the pair is refused.
    `model.optimizer` and `model.lr_scheduler` count as given when they differ from `model_defaults` (the parser's,
    which with `--ckpt_path` are the checkpoint's): `--optimizer` beside a checkpoint replaces its optimizer.
    `origin(key)`: the config file that set `key`, for the messages (see `config_that_sets`); None for a flag.
    """
    model = config["model"]
    defaults = model_defaults if isinstance(model_defaults, Namespace) else Namespace()
    flags = {"optimizer": "--model.optimizer", "lr_scheduler": "--model.lr_scheduler"}
    optimizer = config.get("optimizer")
    if optimizer is not None:
        own = model.get("optimizer")
        named = given_keys(given, "model", "optimizer")
        if named is not None:
            own_given = bool(named)
        else:
            own_given = not is_default_optimizer(own) and own != defaults.get("optimizer")
        if own_given and own.as_dict() != optimizer.as_dict():
            raise both_choose("optimizer", "optimizer", optimizer, own, origin)
        model["optimizer"], config["optimizer"] = optimizer.clone(), None
        flags["optimizer"] = "--optimizer"
    scheduler = config.get("lr_scheduler")
    if scheduler is not None:
        own = model.get("lr_scheduler")
        if own is not None and own != defaults.get("lr_scheduler") and own.as_dict() != scheduler.as_dict():
            raise both_choose("lr_scheduler", "scheduler", scheduler, own, origin)
        model["lr_scheduler"], config["lr_scheduler"] = scheduler.clone(), None
        flags["lr_scheduler"] = "--lr_scheduler"
    if model.get("lr_scheduler") is not None and (schedule := model.get("lr_schedule")) is not None:
        file = origin("model.lr_schedule")
        named = f"{file}'s model.lr_schedule ({schedule['class_path']})" if file else "--model.lr_schedule"
        fix = " (--model.lr_schedule null drops the config's)" if file else ""
        raise UsageError(f"{flags['lr_scheduler']} and {named} both schedule the learning rate: give one of them{fix}")
    if isinstance(model.get("optimizer"), Namespace):
        given_model = given_keys(given, "model")
        given_optimizer = None
        if given_model is not None:  # the optimizer's arguments the user gave, under either flag
            given_optimizer = {**given_keys(given, "model", "optimizer", "init_args"),
                               **given_keys(given, "optimizer", "init_args")}  # fmt: skip
        given_args = (given_optimizer, given_model)
        settle(model, "lr", "learning_rate", DEFAULT_LEARNING_RATE, flags["optimizer"], *given_args)
        settle(model, "weight_decay", "weight_decay", DEFAULT_WEIGHT_DECAY, flags["optimizer"], *given_args)
    if isinstance(model.get("lr_scheduler"), Namespace):
        init = model["lr_scheduler"].get("init_args") or Namespace()
        for name in PERIODS:
            if isinstance(init.get(name), int) and init[name] <= 0:
                raise UsageError(f"{flags['lr_scheduler']}.{name} {init[name]}: a period is a positive number")
    return flags


def settle(
    model: Namespace,
    name: str,
    model_name: str,
    model_default: float,
    flag: str,
    given_optimizer: dict[str, Any] | None = None,
    given_model: dict[str, Any] | None = None,
) -> None:
    """One value of the optimizer's `name` and the model's `model_name`: the one given, in both places.

    `given_optimizer`, `given_model`: the optimizer's and the model's arguments the user gave (see `given_keys`);
    without them, a value that differs from its default counts as given, so that one equal to it
    (`--optimizer.lr 0.001`, Adam's and SGD's own) would lose to the model's."""
    options = model["optimizer"]
    default = class_default(options["class_path"], name)
    if default is inspect.Parameter.empty:
        return  # an optimizer without this argument: the parameter groups still carry it, unused
    init = _init_args(options)
    own, value = init.get(name, default), model.get(model_name)
    if given_optimizer is None or given_model is None:
        own_given, model_given = own is not None and own != default, value != model_default
    else:
        own_given, model_given = own is not None and name in given_optimizer, model_name in given_model
    if own_given and model_given and own != value:
        what = model_name.replace("_", " ")
        raise UsageError(f"{flag}.{name} {own} and --model.{model_name} {value} disagree: give the {what} once")
    if own_given:
        if name == "lr" and not own > 0:
            raise UsageError(f"{flag}.lr {own}: the learning rate is a positive number")
        if name == "weight_decay" and not own >= 0:  # (--model.weight_decay's own type refuses it in the parse)
            raise UsageError(f"{flag}.weight_decay {own}: the weight decay is at least 0")
        model[model_name] = own
    init[name] = model[model_name]


def check_built(model: Any, flags: dict[str, str], on_gpu: bool = False) -> Any:
    """Build the model's optimizer and scheduler once over a dummy parameter, so that arguments torch refuses fail
    in one line now rather than with a traceback at the first step; the scheduler is stepped a few times, as
    some fail only then (StepLR with step_size 0 divides by it). Returns the scheduler built, or None.

    The dummy is on the CPU. torch asserts on the settings it takes for GPU weights only (Adam's `capturable`):
    refused for a CPU run, and for a run `on_gpu` left to torch's own check at the first step (None returned)."""
    weight = torch.zeros(1, requires_grad=True)
    params = [{"params": [weight], "lr": model.hparams.learning_rate}]
    weight.grad = torch.zeros(1)

    def closure() -> torch.Tensor:  # as Lightning steps every optimizer: LBFGS needs it, the others call it once
        return torch.zeros(())

    try:
        optimizer = model.optimizer(params)
        # Adam's and AdamW's step first ask whether a CUDA graph is being captured, on the current CUDA stream, which
        # initialises CUDA in this process on a GPU machine (torch 2.14, optim/optimizer.py): ddp_fork's ranks then
        # cannot use CUDA. Nothing is captured here, and the optimizer is thrown away after the check.
        for check in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):
            if hasattr(optimizer, check):
                setattr(optimizer, check, lambda: None)
        # One step, over a dense gradient as the network's are: SparseAdam refuses them only at the first step.
        optimizer.step(closure=closure)
    except AssertionError as err:
        if on_gpu:
            return None
        raise UsageError(f"{flags['optimizer']}: {err}") from err
    except (TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"{flags['optimizer']}: {err}") from err
    if isinstance(optimizer, torch.optim.LBFGS) and not all(p.is_contiguous() for p in model.parameters()):
        # Its step flattens each gradient with view(), which a channels_last gradient does not allow: a traceback
        # at the first step.
        raise UsageError(
            f"{flags['optimizer']} LBFGS flattens gradients with view(), which fails on "
            f"{type(model.net).__name__}'s channels_last weights: add --model.channels_last false"
        )
    if model.lr_scheduler is None:
        return None
    try:
        scheduler = model.lr_scheduler(optimizer)
        for _ in range(3):
            optimizer.step(closure=closure)
            scheduler.step(0.0) if isinstance(
                scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
            ) else scheduler.step()
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as err:
        raise UsageError(f"{flags['lr_scheduler']}: {err}") from err
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if isinstance(scheduler, torch_plateau) and not isinstance(scheduler, ReduceLROnPlateau):
        # torch's own class; Lightning's subclass adds `monitor`. Lightning refused it as training started, the run's
        # folder written, with an example in Python.
        flag = flags["lr_scheduler"]
        raise UsageError(
            f"{flag} torch.optim.lr_scheduler.ReduceLROnPlateau cannot name the metric it watches: use Lightning's, "
            f"{flag} lightning.pytorch.cli.ReduceLROnPlateau {flag}.monitor val_loss"
        )
    return scheduler
