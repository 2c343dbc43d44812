"""Checks of a command's input before anything runs: config files, the trainer's accelerator, the data.

Lightning reports some bad input only once the trainer is built or running: after its banner (seed, GPU/TPU lines,
tips), in a traceback, or after a logger has created its run. These checks run first and raise a UsageError, which
`cifar-cli` prints in one line.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import secrets
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import _get_rank, rank_prefixed_message
from lightning.fabric.utilities.seed import log as seed_log
from lightning.fabric.utilities.seed import max_seed_value, min_seed_value
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningArgumentParser, ReduceLROnPlateau
from lightning.pytorch.loggers import Logger, WandbLogger
from torch import nn
from torch.func import functional_call

from cifar_cli.callbacks import FIT_TIME, FitTimer
from cifar_cli.classifier import ImageClassifier, fit_metrics
from cifar_cli.data import ImageDataModule
from cifar_cli.errors import UsageError


def plain_numbers(value: Any) -> Any:
    """`value` with the numbers of jsonargparse's restricted types (PositiveInt, ...) made plain int and float, in
    place where it is a Namespace or a list.

    jsonargparse keeps a value of such a type as an instance of it, and carries it over when another class
    replaces the one that declared it (`--model.net mypkg.MyNet` keeps TutorialCNN's `num_classes`). Where the
    new class declares a plain `int`, the instance stays, and YAML cannot write it: the run failed when
    LightningCLI saved its hyperparameters. Plain numbers pass every type's check again at instantiation.
    """
    if isinstance(value, Namespace):
        for key in value.keys():
            value[key] = plain_numbers(value[key])
    elif isinstance(value, list):
        value[:] = [plain_numbers(item) for item in value]
    elif isinstance(value, tuple):
        return tuple(plain_numbers(item) for item in value)
    elif isinstance(value, int) and type(value) not in (int, bool):
        return int(value)
    elif isinstance(value, float) and type(value) is not float:
        return float(value)
    return value


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reading a config file that holds only comments as an empty config, and saying what a
    config must be when a file holds a list or a single value (jsonargparse: "Unexpected config").

    Flags are matched whole: argparse would take `--trainer.max_epoch 3` for `--trainer.max_epochs 3` (any
    unambiguous prefix), so a typo could quietly set another flag, or one that a later version adds.
    """

    # The `--*.help` options of the command line, as typed (CifarCLI sets them).
    help_options: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        # The command's name, not argv[0]'s (`__main__.py` under `python -m cifar_cli`), also in the parsers that
        # jsonargparse builds for a class's help (`--model.net.help FastNet`).
        kwargs.setdefault("prog", "cifar-cli")
        super().__init__(*args, **kwargs)

    def add_class_arguments(self, theclass: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> Any:
        # jsonargparse's help of a class inside the class a group picks (`--data.augment.help PhotoAugment`) is
        # built from that class's own parser, whose keys lack the group's: it listed `--augment.erasing`, which
        # the command line refuses. The parser it builds for the help takes the key the command line gave.
        help_of = f"Help for --{nested_key}.help="
        if nested_key and (self.description or "").startswith(help_of):
            typed = next((o for o in self.help_options if o.endswith(f".{nested_key}.help")), None)
            if typed is not None:
                nested_key = typed[2 : -len(".help")]
                self.description = f"Help for {typed}={self.description[len(help_of) :]}"
        return super().add_class_arguments(theclass, nested_key, *args, **kwargs)

    def parse_path(self, cfg_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Namespace:
        try:
            return super().parse_path(cfg_path, *args, **kwargs)
        except UnicodeDecodeError as err:  # jsonargparse lets it through as a traceback
            raise TypeError(f"config {cfg_path} is not a YAML text file (byte {err.start}: {err.reason})") from None

    def _load_config_parser_mode(
        self, content: str, path: str | os.PathLike = "", ext_vars: dict | None = None, prev_cfg: Any = None
    ) -> Namespace:
        # Overrides a private jsonargparse method (4.53): the one place that sees a config file's whole content.
        name = f"config {Path(path).name}" if path else "config"
        loaded = load_config_yaml(content, name)
        if loaded is None:
            content = "{}"
        elif isinstance(loaded, dict) and {"method", "parameters"} <= loaded.keys():
            # configs/sweep.yaml, given as --config: jsonargparse named its first key that is no flag.
            raise TypeError(
                f"config {Path(path).name} is a W&B sweep, not a cifar-cli config: `wandb sweep FILE` starts it and "
                "`wandb agent` runs it (configs/sweep.yaml says how)"
            )
        elif not isinstance(loaded, dict):
            raise TypeError(
                f"{name} holds a {type(loaded).__name__}, not a mapping of keys (trainer:, model:, data:): see the "
                "output of --print_config for the form"
            )
        else:
            self.check_groups(loaded, name)
            check_class_keys(loaded, name)
        return super()._load_config_parser_mode(content, path, ext_vars, prev_cfg)

    def check_groups(self, config: dict[Any, Any], name: str) -> None:
        """Refuse a group of settings (`trainer:`, `model:`) that holds no mapping: jsonargparse took `trainer: 5`
        whole, and the command ended in an AttributeError traceback; `model: null` read as a missing model.net."""
        for key, value in config.items():
            # A group's only action of its own name loads a file of its settings (`--trainer FILE`); --data's and
            # --optimizer's take a class too.
            typed = any(a.dest == key and type(a).__name__ != "_ActionConfigLoad" for a in self._actions)
            group = key in self.groups and not typed
            if group and value is None:
                raise TypeError(
                    f"{name}: {key}: holds nothing (its settings all commented out?): remove the line, or give its "
                    "settings indented below it"
                )
            if group and not isinstance(value, dict):
                raise TypeError(
                    f"{name}: {key}: holds {type(value).__name__} {value!r}, not a mapping of its settings indented "
                    "below it: see the output of --print_config for the form"
                )


def check_group_files(parser: LightningArgumentParser, argv: list[str]) -> None:
    """Give a file given to a group (`--trainer FILE`, `--model FILE`: jsonargparse's form) the checks of a --config
    file: jsonargparse took the second of a key given twice without a word, and said "<unicode string>" of a tab."""
    groups = {a.option_strings[0] for a in parser._actions if type(a).__name__ == "_ActionConfigLoad"}
    for flag, value in zip(["", *argv], argv):
        flag, _, value = value.partition("=") if value.startswith("--") and "=" in value else (flag, "", value)
        if flag not in groups or not os.path.isfile(value):
            continue  # (a group's settings as YAML text on the command line: no file)
        try:
            with open(value, encoding="utf-8") as file:
                content = file.read()
        except (OSError, UnicodeDecodeError):
            continue  # the parse says what is wrong with it
        name = f"{flag} {value}"
        try:
            check_class_keys(load_config_yaml(content, name), name)
        except TypeError as err:
            raise UsageError(str(err)) from None


# The keys jsonargparse reads beside a `class_path` (`__path__`: where a nested config file came from).
CLASS_KEYS = ("class_path", "init_args", "dict_kwargs", "__path__")


def check_class_keys(config: Any, name: str, key: str = "") -> None:
    """Refuse a key beside a `class_path` other than `init_args`, such as a misspelled `init_arg:` or an argument
    not put under `init_args:`. jsonargparse dropped the class_path then and read the mapping as the arguments of
    the class already chosen, naming that one: `'cifar_cli.nets.TutorialCNN': Option 'init_arg.widths' is not
    accepted` for a config that named FastNet."""
    if isinstance(config, list):
        for item in config:
            check_class_keys(item, name, key)
    if not isinstance(config, dict):
        return
    if "class_path" in config:
        others = [str(k) for k in config if k not in CLASS_KEYS]
        if others:
            close = difflib.get_close_matches(others[0], ["init_args"], n=1, cutoff=0.6)
            hint = "; did you mean init_args?" if close else f" (init_args: {{{others[0]}: ...}})"
            raise TypeError(
                f"{name}: {key or 'the config'} has {', '.join(others)} beside class_path {config['class_path']}: a "
                f"class's arguments go under init_args{hint}"
            )
    for child, value in config.items():  # keys named as their flags are: `data.augment`, without init_args
        check_class_keys(value, name, key if child == "init_args" else f"{key}.{child}" if key else str(child))


class _DuplicateKey(yaml.YAMLError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader as jsonargparse reads configs, without timestamps (`max_time: 2026-13-45` ended in
    datetime's ValueError, a traceback), and refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a second `trainer:` section dropped every setting of the first."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":  # `<<:` may override
                continue
            if key.value in lines:
                raise _DuplicateKey(
                    f"{key.value} is given twice in one mapping (lines {lines[key.value]} and "
                    f"{key.start_mark.line + 1}): the second would replace the first; merge them"
                )
            lines[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config_yaml(content: str, name: str) -> Any:
    """A config file's content, loaded; a syntax error or a key given twice raises a TypeError naming the file and
    the line (jsonargparse said "Problems parsing config: ... in <unicode string>", naming neither the file nor, for
    a tab, the cause)."""
    try:
        return yaml.load(content, Loader=_ConfigLoader)  # a SafeLoader: plain data only
    except _DuplicateKey as err:
        raise TypeError(f"{name}: {err}") from None
    except yaml.MarkedYAMLError as err:
        problem, mark, lines = str(err.problem), err.problem_mark, content.splitlines()
        if err.context and err.context_mark is not None:  # "while scanning a quoted scalar": where it began
            problem += f" {err.context} that starts at line {err.context_mark.line + 1}"
        line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        if "'\\t'" in problem or "\t" in line[: len(line) - len(line.lstrip())]:  # PyYAML writes it as '\t'
            problem += ": YAML indents with spaces, not tabs"
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise TypeError(f"{name} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise TypeError(f"{name} is not valid YAML: {err}") from None


def device_count(devices: Any) -> int | None:
    """`--trainer.devices` as a count of devices (the command line gives `2` as the string "2"); None where it is
    none: "auto", `-1` (every GPU), a list of GPUs."""
    if isinstance(devices, str):
        return int(devices) if devices.strip().isdigit() else None
    return devices if isinstance(devices, int) and not isinstance(devices, bool) else None


def cpu_devices(trainer: Namespace) -> str:
    """The `--trainer.devices` flag a GPU config needs on the CPU: its `-1` (every GPU) or list of GPUs is no
    count of processes."""
    devices = trainer.get("devices")
    count = device_count(devices)
    if devices in (None, "auto") or (count is not None and count >= 0):
        return ""
    return " --trainer.devices 2" if trainer.get("strategy") not in (None, "auto") else " --trainer.devices 1"


def config_given(configs: Any, name: str) -> bool:
    """Whether the --config files given (the config's `config` entry) include one named `name` (`fast.yaml`)."""
    return any(Path(str(path)).name == name for path in configs or [])


def check_accelerator(trainer: Namespace, configs: Any = None) -> None:
    """Refuse an accelerator that does not exist or that this machine lacks; Lightning would fail with a
    traceback (tpu without torch_xla, a misspelt name) or after the seed line. `configs`: the --config files
    given, so that the fast recipe's refusal names its CPU twin."""
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str) or accelerator == "auto":
        return  # an Accelerator object, or Lightning's own choice
    name = accelerator.lower()
    flag = f"--trainer.accelerator {accelerator}"
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        # configs/cpu.yaml in place of fast.yaml would train the tutorial recipe: fast-cpu.yaml is its CPU twin.
        fast = config_given(configs, "fast.yaml")
        config = "configs/fast-cpu.yaml in place of configs/fast.yaml, or" if fast else "configs/cpu.yaml or"
        raise UsageError(
            f"{flag}: this machine has no CUDA GPU that PyTorch can use; "
            f"run with --config {config} --trainer.accelerator cpu{cpu_devices(trainer)}"
        )
    known = AcceleratorRegistry.available_accelerators()
    if name == "gpu":
        return
    if name not in known:
        raise UsageError(f"{flag}: no such accelerator; choose one of {', '.join(sorted({'auto', 'gpu', *known}))}")
    if not AcceleratorRegistry[name]["accelerator"].is_available():
        raise UsageError(
            f"{flag}: this machine has no {name.upper()} that PyTorch can use; run with --trainer.accelerator cpu"
        )


def check_trainer_values(trainer: Namespace) -> None:
    """Refuse trainer settings that Lightning takes at construction and fails on later, with a traceback mid-run
    (a modulo by zero at the first validation or step) or after its start-up lines: checked before anything is
    built or written."""
    at_least_one = ("accumulate_grad_batches", "check_val_every_n_epoch")
    for name in at_least_one:
        value = trainer.get(name)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--trainer.{name} {value}: give 1 or more")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and interval <= 0:
        raise UsageError(f"--trainer.val_check_interval {interval}: give a fraction of an epoch (0-1] or a step count")
    for name in ("max_epochs", "max_steps"):
        value = trainer.get(name)
        if isinstance(value, int) and value < -1:
            raise UsageError(f"--trainer.{name} {value}: give 0 or more (-1: no limit)")
    max_time = trainer.get("max_time")
    if max_time is not None:
        try:
            Timer(duration=max_time)  # Lightning's own reading of it
        except Exception as err:
            raise UsageError(
                f"--trainer.max_time {max_time}: give days:hours:minutes:seconds, e.g. 00:00:10:00 for 10 minutes"
            ) from err
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(logger, "init_args", None)
        wandb = str(getattr(logger, "class_path", "")).endswith("WandbLogger") and isinstance(args, Namespace)
        if wandb and args.get("offline") and args.get("log_model"):
            # Lightning refuses it as it builds the logger, telling the user to go online to log the model.
            raise UsageError(
                f"--trainer.logger.log_model {str(args.log_model).lower()}: Lightning's WandbLogger uploads "
                "checkpoints only online, and this run logs offline; ModelArtifacts (in the default callbacks) logs "
                "the best and last checkpoints as W&B artifacts offline too, which `wandb sync` uploads: leave "
                "log_model out, or log online with --trainer.logger.offline false"
            )
    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() == "cpu" and devices != "auto":
        count = device_count(devices)
        if count is None or count < 1:
            raise UsageError(
                f"--trainer.devices {devices}: on the CPU give a number of processes, e.g. --trainer.devices 2"
            )


def local_rank_zero() -> bool:
    """Whether this process is the first of its node, as Lightning decides where it calls prepare_data: before the
    trainer exists, from the variables its launchers set."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "SLURM_LOCALID"))


def check_linked_net_args(given: Any, data: Any) -> None:
    """Refuse a network's `num_classes` or `image_shape` given on the command line or in a config with another value
    than the data's: the data sets them (a link), and jsonargparse took the value and replaced it without a word,
    while it refuses `--model.class_names`. The data's own value passes (a run's hparams.yaml given as `--model`)."""
    init_args = given.get("model.net.init_args") if isinstance(given, Namespace) else None
    if not isinstance(init_args, Namespace):
        return
    classes, shape = init_args.get("num_classes"), init_args.get("image_shape")
    if classes is not None and classes != data.num_classes:
        names = ", ".join(data.class_names[:3]) + (", ..." if data.num_classes > 3 else "")
        raise UsageError(
            f"--model.net.num_classes {classes}: the network's classes come from the data ({data.num_classes}: "
            f"{names}); leave it out"
        )
    if shape is not None and tuple(shape) != tuple(data.image_shape):
        side = "; --data.image_size sets its side" if hasattr(data, "image_size") else ""
        raise UsageError(
            f"--model.net.image_shape {list(shape)}: the network's image shape comes from the data "
            f"({list(data.image_shape)}{side}); leave it out"
        )


def check_data(data: Any, stage: str) -> None:
    """Check, download and cache the data for `stage` before the trainer is built (on a node's first process
    only, as Lightning's own prepare_data call, which then costs nothing)."""
    if isinstance(data, ImageDataModule) and local_rank_zero():
        data.prepare(stage)


def check_wandb_folder(logger: Any) -> None:
    """Refuse a W&B run whose staging folder, outside the run, cannot be made: W&B copies there what a run logs
    (tables, images, model artifacts), and with a read-only home (its default, ~/.local/share/wandb, unless
    WANDB_DATA_DIR is set) the run trained an epoch, then failed at its first validation. Checked without making the
    folder, as bad input writes nothing: the OSError that making it would raise, which cifar-cli says in one line."""
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    if not any(isinstance(one, WandbLogger) for one in loggers) or not local_rank_zero():
        return
    from wandb import env

    folder = Path(env.get_data_dir(), "artifacts", "staging").expanduser().absolute()
    made = [folder, *folder.parents]
    index = next(i for i, path in enumerate(made) if path.exists())
    first = made[max(index - 1, 0)]  # the first folder to make, or the staging folder itself
    if not made[index].is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(first))
    if not os.access(made[index], os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(first))


def check_run_folder(logger: Any, root: str) -> None:
    """Refuse a new run named as an earlier one (`--trainer.logger.version`, or W&B's WANDB_RUN_ID) before the logger
    starts: found only as its config.yaml was written, it had begun a W&B run (an offline part with the earlier run's
    id, and W&B's closing lines after the error) and replaced the earlier run's metrics.csv with an empty one."""
    first = (logger[0] if logger else None) if isinstance(logger, (list, tuple)) else logger
    if not isinstance(first, Logger) or (_get_rank() or 0) != 0:
        return  # (the other ranks of a DDP run start once the first has begun the run and written its config.yaml)
    version, given = first.version, "pass --trainer.logger.version with a new run name"
    if isinstance(first, WandbLogger) and version is None:
        version = os.environ.get("WANDB_RUN_ID", "").strip() or None
        given = f"WANDB_RUN_ID={version} names that run; set it to a new run name, or unset it"
    if version is None:
        return  # W&B draws a new id
    folder = version if isinstance(version, str) else f"version_{version}"  # as callbacks.run_dir names it
    path = os.path.join(first.save_dir or root, str(first.name), folder, "config.yaml")
    if os.path.exists(path):
        raise UsageError(f"{path} exists already: {given} (`fit --ckpt_path last` continues that run)")


def net_name(net: nn.Module) -> str:
    """The network's class, with the architecture of a torchvision or timm network: `TorchvisionNet inception_v3`."""
    name = getattr(net, "name", None)
    return type(net).__name__ + (f" {name}" if isinstance(name, str) else "")


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[None]:
    """`net` in eval mode and without gradients for the block, each module's mode restored after."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def input_problem(net: nn.Module, shape: tuple[int, int, int], channels_last: bool = False) -> str | None:
    """Why `net` cannot take images of `shape` (channels, height, width), or None where it can."""
    try:
        output_shape(net, shape, channels_last)
    except (RuntimeError, ValueError, AssertionError) as err:  # torch's shape errors; torch._assert's
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def output_shape(net: nn.Module, shape: tuple[int, int, int], channels_last: bool = False) -> tuple[int, ...] | None:
    """The shape of `net`'s output for one image of `shape` (channels, height, width); None where it is no tensor.

    The image goes through the network on the meta device, which computes shapes only (a few ms, whatever the
    network's size: a real forward pass of a ResNet-50 at 224 px takes 1.5 s on 2 CPU cores), in eval mode and
    without gradients; nothing of the network changes. Where that fails, a real pass decides, and raises its error:
    the meta device lacks some operations, and words some shape errors differently.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with evaluating(net):
        try:
            tensors = {k: torch.empty_like(v, device="meta") for k, v in chain(net.named_parameters(),
                                                                                net.named_buffers())}  # fmt: skip
            image = torch.empty(1, *shape, device="meta").contiguous(memory_format=memory_format)
            output = functional_call(net, tensors, (image,))
        except Exception:  # (on the meta device, anything: the real pass below decides)
            device = next(chain(net.parameters(), net.buffers()), torch.empty(0)).device
            output = net(torch.zeros(1, *shape, device=device).contiguous(memory_format=memory_format))
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


class QuietSeed:
    """Seeds without Lightning's "Seed set to N" line, which would precede the checks' errors; `announce` logs it
    once they pass."""

    def __enter__(self) -> None:
        self.level = seed_log.level
        seed_log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        seed_log.setLevel(self.level)

    @staticmethod
    def announce(seed: int | bool | None) -> None:
        """Log the seed as seed_everything does, for the seed LightningCLI set (False or None: no seeding)."""
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed_log.info(rank_prefixed_message(f"Seed set to {seed}", _get_rank()))


def chosen_seed(seed: int | bool | None, num_nodes: int = 1) -> int | bool | None:
    """The value of `--seed_everything` to seed with: an integer numpy takes (Lightning raised its ValueError in a
    traceback), and for `true` a random one drawn here, which LightningCLI then records in config.yaml.

    Written by hand because Lightning's `seed_everything()` without a seed now takes PL_GLOBAL_SEED, or 0: every
    `--seed_everything true` run had seed 0, against what --help says. A rank that Lightning launched inherits
    PL_GLOBAL_SEED from the process that drew it, so every rank of a run seeds alike."""
    if seed is True:
        inherited = os.environ.get("PL_GLOBAL_SEED")
        if inherited is not None and not local_rank_zero():
            return int(inherited)
        started = int(os.environ.get("WORLD_SIZE", 1)) > 1 or int(os.environ.get("SLURM_NTASKS", 1)) > 1
        if started or num_nodes > 1:
            # torchrun or srun started every rank, or each node's command started its own: each would draw its own
            # seed, and the ranks' shards of the shuffled split would overlap.
            raise UsageError("--seed_everything true: the ranks of this run would each draw another seed; give one")
        return min_seed_value + secrets.randbelow(max_seed_value - min_seed_value + 1)
    if isinstance(seed, int) and not isinstance(seed, bool) and not min_seed_value <= seed <= max_seed_value:
        raise UsageError(
            f"--seed_everything {seed}: a seed is an integer from {min_seed_value} to {max_seed_value} (true: a "
            "random one, false: none)"
        )
    return seed


# The packages whose callbacks put no metric of their own in the trainer's callback_metrics, but for FitTimer's and
# LearningRateMonitor's; a callback from elsewhere may (self.log in its hooks).
KNOWN_CALLBACKS = ("lightning.", "pytorch_lightning.", "cifar_cli.")


def check_monitors(model: Any, callbacks: list[Any], scheduler: Any, scheduler_flag: str) -> None:
    """Refuse a `monitor` that names a metric `fit` never logs: EarlyStopping's, a ModelCheckpoint's, a
    ReduceLROnPlateau scheduler's. Lightning finds it missing at the end of the first validation, a whole epoch in,
    with a traceback, the run's folder and W&B run made by then.

    Checked only where every name is known: the model is ImageClassifier itself (a subclass may log more), and every
    callback is Lightning's or cifar-cli's. LearningRateMonitor's names depend on the optimizer and its parameter
    groups (`lr-SGD/pg1`): with one, any `lr-` name passes."""
    if type(model) is not ImageClassifier:
        return
    if not all(type(callback).__module__.startswith(KNOWN_CALLBACKS) for callback in callbacks):
        return
    logged = fit_metrics()
    if any(isinstance(callback, FitTimer) for callback in callbacks):
        logged.append(FIT_TIME)
    lr_monitor = any(isinstance(callback, LearningRateMonitor) for callback in callbacks)
    watched: list[tuple[str, Any, list[str]]] = []
    for callback in callbacks:
        if isinstance(callback, EarlyStopping):
            watched.append((type(callback).__name__, callback.monitor, logged))
        elif isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            # ModelCheckpoint also offers the epoch and step counts.
            watched.append((type(callback).__name__, callback.monitor, [*logged, "epoch", "step"]))
    if isinstance(scheduler, ReduceLROnPlateau):
        watched.append((f"{scheduler_flag} {type(scheduler).__name__}", scheduler.monitor, logged))
    for what, name, known in watched:
        if name in known or (lr_monitor and str(name).startswith("lr-")):
            continue
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        names = ", ".join([*known, "lr-*"] if lr_monitor else known)
        raise UsageError(f"{what} monitors {name}, which this run never logs: choose one of {names}{hint}")
