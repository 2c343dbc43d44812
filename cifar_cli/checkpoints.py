"""Reading a `--ckpt_path` safely: weights only, checked to come from `cifar-cli fit`, refused in one line otherwise.

A checkpoint is a pickle, and a pickle can run code when it is loaded. Every load here passes
`weights_only=True`, which restricts the unpickler to tensors and plain data, and refuses to load at all when
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` is set (older torch versions let it override `weights_only=True`). The
hyperparameters a checkpoint holds become command-line values: they are type-checked by the CLI's own parser, so a
checkpoint can name only classes the command line itself accepts.
"""

from __future__ import annotations

import pickle
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from cifar_cli.atomic import refuse_unsafe_load
from cifar_cli.data import ImageDataModule
from cifar_cli.data.folder import same_name
from cifar_cli.errors import UsageError
from cifar_cli.optimizer_flags import import_class
from cifar_cli.pretrained import fit_problems

# Checkpoint entry holding the run's data config.
CHECKPOINT_KEY = "cifar_cli"
# The one `_instantiator` LightningCLI writes into the hyperparameters of the modules it builds.
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
FROM_FIT = "pass a .ckpt file written by `cifar-cli fit`"


def load_checkpoint(ckpt_path: str, flag: str | None = None) -> dict[str, Any]:
    """Load a --ckpt_path with weights only, failing in one line when it is missing, not a checkpoint, or not
    written by cifar-cli; `flag` names it in the errors (default `--ckpt_path PATH`)."""
    flag = flag or f"--ckpt_path {ckpt_path}"
    refuse_unsafe_load(flag)
    path = Path(ckpt_path).expanduser()  # `--model.init_from=~/x.ckpt`: no shell expands it
    if path.is_dir():
        raise UsageError(f"{flag} is a directory, not a checkpoint file; {FROM_FIT}")
    if not path.is_file() and ckpt_path == "best":
        raise UsageError(
            f"{flag}: Lightning's best is that of a fit in the same process; pass the path fit printed as its best "
            "checkpoint (best_checkpoint in the run's summary.json), or last for the newest run's last.ckpt"
        )
    if not path.exists() and ckpt_path == "hpc":
        # Lightning's help of --ckpt_path names it beside best; it loads that file for any later command of a SLURM
        # job, which cifar-cli declines (cli.py), and "no such file" said nothing of that.
        raise UsageError(
            f"{flag}: Lightning's hpc is the hpc_ckpt_N.ckpt its SLURM requeue saves wherever the step is, which "
            "cifar-cli does not resume; pass last for the newest run's last.ckpt, or a checkpoint's path"
        )
    if not path.exists() and (ckpt_path == "registry" or ckpt_path.startswith("registry:")):
        raise UsageError(
            f"{flag}: Lightning's registry (Lightning AI's model registry) is not read by cifar-cli; pass a "
            "checkpoint's path, or last for the newest run's last.ckpt"
        )
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} is not a regular file (a device, pipe or socket); {FROM_FIT}")
    if not path.is_file():
        raise UsageError(f"{flag}: no such file; {FROM_FIT}")
    if path.stat().st_size == 0:
        raise UsageError(f"{flag} is empty (0 bytes); {FROM_FIT}")
    try:
        with warnings.catch_warnings():
            # A pickle of another protocol than torch.save's gets a warning before it is refused: a second line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused is None:  # "Unsupported operand": no pickle torch.save wrote, e.g. a text file
            raise UsageError(f"{flag} is not a Lightning checkpoint (not a file torch.save wrote); {FROM_FIT}") from err
        # The weights-only unpickler met a reference to a function or class, e.g. a `__reduce__` that would call
        # one. Nothing of it ran.
        raise UsageError(
            f"{flag} holds objects that weights-only loading refuses (GLOBAL {refused[1]}): loading it could run "
            f"code; {FROM_FIT}"
        ) from err
    except Exception as err:  # torch raises zip, EOF and runtime errors alike for a damaged or foreign file
        damaged = path.read_bytes()[:4] == b"PK\x03\x04"  # the zip format torch.save writes, cut short
        what = "the file is truncated or damaged" if damaged else "not a file torch.save wrote"
        raise UsageError(f"{flag} is not a Lightning checkpoint ({what}: {type(err).__name__}); {FROM_FIT}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        holds = "a dict without a state_dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise UsageError(f"{flag} is not a Lightning checkpoint (it holds {holds}); {FROM_FIT}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint["state_dict"].items()):
        raise UsageError(f"{flag} is not a Lightning checkpoint (its state_dict holds more than tensors); {FROM_FIT}")
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, dict) or "net" not in hparams or "class_names" not in hparams:
        names = sorted(map(str, hparams)) if isinstance(hparams, dict) else type(hparams).__name__
        raise UsageError(
            f"{flag} was not written by cifar-cli's ImageClassifier (its hyperparameters are {names or 'empty'}); "
            f"{FROM_FIT}"
        )
    instantiator = hparams.get("_instantiator", LIGHTNING_INSTANTIATOR)
    if instantiator != LIGHTNING_INSTANTIATOR:
        # Lightning's load_from_checkpoint would import and call it.
        raise UsageError(f"{flag}: its hyperparameters name an unknown _instantiator {instantiator!r}; {FROM_FIT}")
    entry = checkpoint.get(CHECKPOINT_KEY, {})
    if not isinstance(entry, dict) or not isinstance(entry.get("data", {}), dict):
        raise UsageError(f"{flag}: its {CHECKPOINT_KEY!r} entry is not a data config; {FROM_FIT}")
    if entry.get("data"):
        check_data_config(entry["data"], flag)
    return checkpoint


def check_data_config(data: dict[str, Any], flag: str) -> None:
    """Type-check a checkpoint's data config as `--data` is: a subclass of ImageDataModule and its arguments."""
    # The CLI's own parser holds the data config as this type (LightningCLI with subclass_mode_data).
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImageDataModule, "data", fail_untyped=False, required=True)
    try:
        parser.parse_object({"data": data})
    except (ArgumentError, SystemExit) as err:
        raise UsageError(f"{flag}: its data config is refused: {err}") from err


def apply_hyperparameters(
    parser: LightningArgumentParser, config: Namespace, checkpoint: dict[str, Any], ckpt_path: str
) -> Namespace:
    """`config` with the checkpoint's model hyperparameters, type-checked as command-line values are.

    As LightningCLI's own `_parse_ckpt_path`, but from the checkpoint `load_checkpoint` read, with an error that
    names the file. Unknown keys and classes the command line would refuse are refused.
    """
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k != "_instantiator"}
    try:
        config = parser.parse_object({config.subcommand: {"model": hparams}}, config)
    except (ArgumentError, SystemExit) as err:
        raise UsageError(f"--ckpt_path {ckpt_path}: its hyperparameters are refused: {err}") from err
    check_optimizer_class(config[config.subcommand], f"--ckpt_path {ckpt_path}: its hyperparameters are refused:")
    return config


def check_same_net(model: Namespace, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a `--model.net` of another class than the checkpoint's network, whose weights would not fit it, before
    the model is built: the error was whatever failed first, such as the checkpoint's `--model.whiten_bias_until`,
    kept as a default, refused for a TutorialCNN, which the user never gave."""
    saved = checkpoint.get("hyper_parameters", {}).get("net")
    saved_class = saved.get("class_path") if isinstance(saved, dict) else None
    net = model.get("net")
    given = net.get("class_path") if isinstance(net, (Namespace, dict)) else None
    if saved_class and given and given != saved_class:
        raise UsageError(
            f"--model.net {given}: --ckpt_path {ckpt_path} holds the weights of a {saved_class}, which do not fit "
            "another network: leave --model.net out"
        )


def check_optimizer_class(config: Namespace, context: str = "") -> None:
    """Refuse an optimizer or scheduler `class_path` that names no such class, before anything is instantiated.

    jsonargparse accepts any callable as the `class_path` of `--model.optimizer` and `--model.lr_scheduler` (their
    types are Callables that return an optimizer or a scheduler) and calls it with the `init_args` while it builds
    the model: `os.system` would run.
    """
    for key, base, what in (
        ("model.optimizer", torch.optim.Optimizer, "an optimizer class (a subclass of torch.optim.Optimizer)"),
        (
            "model.lr_scheduler",
            (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
            "a scheduler class (a subclass of torch.optim.lr_scheduler.LRScheduler)",
        ),
    ):
        options = config.get(key)
        class_path = options.get("class_path") if isinstance(options, (Namespace, dict)) else None
        if not class_path:
            continue
        target = import_class(class_path)  # the parser has imported the module already while type-checking it
        if not (target is not None and issubclass(target, base)):
            prefix = f"{context} " if context else ""
            raise UsageError(f'{prefix}Parser key "{key}": {class_path} is not {what}')


def check_weights_fit(model: LightningModule, state_dict: dict[str, torch.Tensor], ckpt_path: str) -> None:
    """Fail in one line when a checkpoint's weights do not fit the model the config builds."""
    problems = fit_problems(model.state_dict(), state_dict)
    if problems:
        raise UsageError(
            f"checkpoint {ckpt_path} does not fit the model ({'; '.join(problems[:3])}): it comes from "
            "another model or data set; drop the --model/--data flags that differ from its training run"
        )


def check_same_classes(
    model: LightningModule, checkpoint: dict[str, Any], ckpt_path: str, subcommand: str, data: object = None
) -> None:
    """Fail in one line when the data's classes are not the checkpoint's, in the same order: its outputs would be
    read as other classes (a class folder added, removed or renamed since training), silently when their number is
    the same. `data`: the command's data module, named where it is of another class than the checkpoint's."""
    saved = checkpoint.get("hyper_parameters", {}).get("class_names")
    names = list(getattr(model, "class_names", []))
    if saved is None or list(saved) == names:
        return
    saved = list(saved)
    if [same_name(c) for c in saved] == [same_name(c) for c in names]:
        return  # the same classes in the same order, one side's names decomposed (a copy of the folder from a Mac)
    if len(saved) != len(names):
        differ = f"it has {len(saved)} classes, the data {len(names)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
        differ = f"its class {i} is {saved[i]!r}, the data's {names[i]!r}"
    lacks, adds = [c for c in saved if c not in names], [c for c in names if c not in saved]
    changes = [f"{what} {', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}"
               for what, classes in (("lacks", lacks), ("adds", adds)) if classes]  # fmt: skip
    detail = f" (the data {'; '.join(changes)})" if changes else ""
    if sorted(map(same_name, saved)) == sorted(map(same_name, names)):
        # Decomposed (NFD) accents sort before other letters, composed ones after every ASCII letter.
        form = "NFC" if all(unicodedata.is_normalized("NFC", c) for c in saved) else "NFD"
        detail = (
            " (the same names in another Unicode form, as macOS writes them, which sorts them in another order: "
            f"rename the data's class folders to the checkpoint's form, {form}: `convmv -r -f utf8 -t utf8 "
            f"--{form.lower()} --notest DIR`)"
        )
    advice = "pass the data it was trained on"
    trained_with = str((checkpoint.get(CHECKPOINT_KEY, {}).get("data") or {}).get("class_path", "")).rpartition(".")[2]
    if data is not None and trained_with and trained_with != type(data).__name__:
        # A config's `data:` (configs/default.yaml names CIFAR10DataModule) replaces the checkpoint's data module:
        # `--data.predict_root`, which the advice below names, cannot help then.
        advice = (
            f"it was trained with {trained_with}, and this command's data is {type(data).__name__} (a --data flag or "
            "a config's data: section): leave that out"
        )
    elif subcommand == "fit":
        advice += ", or start a new run from its weights with --model.init_from"
    elif subcommand == "predict":
        advice += ", or predict a folder of images with --data.predict_root DIR"
    raise UsageError(f"checkpoint {ckpt_path} was trained on other classes: {differ}{detail}; {advice}")
