"""Finding the run to resume, and carrying a run's identity (its folder and W&B run) through its checkpoints.

Each run has its own folder (`save_dir/name/<run id>/`), so Lightning's own `--ckpt_path last`, which looks in
the new run's empty checkpoint folder, finds nothing. Here `last` means the newest `last.ckpt` under the save
folder, and the resumed run takes back the run id that the checkpoint records: same folder, same `config.yaml`,
same W&B run, whose charts then continue one curve.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments.slurm import _is_srun_used
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from cifar_cli.atomic import atomic_write_csv

# Checkpoint entry (under cifar_cli's own key) holding the run's identity.
RUN_KEY = "run"
CSV_METRICS = "metrics.csv"  # Lightning's CSVLogger's file
SET_ASIDE = ".resumed"


def last_checkpoints(roots: list[Path]) -> list[Path]:
    """`last*.ckpt` files in the runs under `roots`, newest first: `root/checkpoints/` (no logger),
    `root/<name>/<run id>/checkpoints/` or `root/<run id>/checkpoints/` (a logger's runs, with or without a
    name), or a checkpoint folder itself."""
    patterns = ("last*.ckpt", "checkpoints/last*.ckpt", "*/checkpoints/last*.ckpt", "*/*/checkpoints/last*.ckpt")
    found = {p.resolve(): p for root in roots for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    return sorted(found.values(), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def run_identity(trainer: Trainer) -> dict[str, Any] | None:
    """The first logger's class and version (the W&B run id, or CSVLogger's version): what names the run folder;
    and, as `followers`, those of the loggers after it, each with a folder of its own."""
    if not trainer.loggers:
        return None
    first, *followers = [_identity(logger) for logger in trainer.loggers]
    return {**first, "followers": followers}


def _identity(logger: Any) -> dict[str, Any]:
    return {"logger": f"{type(logger).__module__}.{type(logger).__qualname__}", "version": logger.version}


def logger_name(logger: Any) -> str | None:
    """The class name of a logger given as a config (`class_path` namespace), a class path string (a checkpoint's
    run identity) or nothing (no logger: None); of a list of loggers, the first's, which names the run folder."""
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    class_path = logger if isinstance(logger, str) else getattr(logger, "class_path", None)
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) and class_path else None


def continue_run(logger_config: Any, identity: dict[str, Any] | None) -> bool:
    """Point the logger config (a `class_path`/`init_args` namespace) at the run the checkpoint came from.

    Only when it names the same logger class: the version is what both WandbLogger (its run id) and Lightning's
    file loggers take to reuse a run's folder. Returns whether the run is continued.
    """
    if not isinstance(identity, dict) or identity.get("version") is None or logger_config is None:
        return False
    if not isinstance(identity, dict) or logger_name(logger_config) is None:
        return False
    if logger_name(logger_config) != logger_name(identity.get("logger")):
        return False
    first = logger_config[0] if isinstance(logger_config, (list, tuple)) else logger_config  # it names the folder
    first.init_args.version = identity["version"]
    # A logger after it (`--trainer.logger+=CSVLogger`) goes on in its own folder too, unless given a version: a
    # CSVLogger's next version would be a new folder. The run's added CSVLogger comes last, after the config's.
    followers = list(logger_config[1:]) if isinstance(logger_config, (list, tuple)) else []
    for config, saved in zip(followers, identity.get("followers") or []):
        init_args = config.get("init_args") if hasattr(config, "get") else None
        same = logger_name(config) == logger_name(saved.get("logger"))
        if same and init_args is not None and "version" in init_args and init_args.version is None:
            init_args.version = saved.get("version")
    return True


class _WithoutSlurmResume(_CheckpointConnector):
    """Lightning's checkpoint connector (private, 2.6), without its resume from `hpc_ckpt_N.ckpt`."""

    @property
    def _hpc_resume_path(self) -> str | None:
        return None


def requeued_slurm_job() -> int:
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT), where this is a SLURM job Lightning
    recognises (SLURMEnvironment.detect, without its warning, as in `pass_over_slurm_checkpoints`); 0 elsewhere."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if _is_srun_used() and count.isdigit() else 0


def pass_over_slurm_checkpoints(trainer: Trainer) -> None:
    """Start a command that names no checkpoint without one, in a SLURM job too.

    Lightning's requeue handler (SLURMEnvironment's auto_requeue, on SIGUSR1) saves `hpc_ckpt_N.ckpt` in
    `default_root_dir`, and in a SLURM job Lightning loads the newest of them for any fit, test or predict that names
    no checkpoint: a new run went on silently from another run's weights and epoch. A requeued run goes on with
    `--ckpt_path last`, from the `last.ckpt` that the preemption's SIGTERM saved, at a batch end (the handler saves
    wherever the step is).
    """
    found = trainer._checkpoint_connector._hpc_resume_path
    trainer._checkpoint_connector = _WithoutSlurmResume(trainer)
    # Lightning's test of a SLURM job (SLURMEnvironment.detect) without its warning that srun is not used, which
    # the trainer's set-up gave already where it applies.
    if found is not None and _is_srun_used() and trainer.is_global_zero:
        print(
            f"cifar-cli: {os.path.relpath(found)} (Lightning's SLURM checkpoint) is not resumed: a run goes on with "
            "--ckpt_path last, or --ckpt_path FILE",
            file=sys.stderr,
        )


def set_aside_csv_metrics(trainer: Trainer) -> None:
    """Before a resumed run's CSVLogger opens its folder, move its `metrics.csv` aside for `keep_csv_metrics`."""
    for logger in trainer.loggers:
        metrics = Path(logger.log_dir or "", CSV_METRICS) if isinstance(logger, CSVLogger) else None
        if trainer.is_global_zero and metrics is not None and metrics.is_file():
            os.replace(metrics, metrics.with_name(CSV_METRICS + SET_ASIDE))


def keep_csv_metrics(trainer: Trainer, step: int) -> None:
    """Put a resumed run's earlier rows back into its CSVLogger `metrics.csv`, up to the checkpoint's `step`.

    Written by hand because Lightning's CSV writer deletes an existing `metrics.csv` when it opens a run's folder
    ("Previous log files in this directory will be deleted"), so a resumed run would lose everything logged before
    the interruption. Called once the writer exists: the rows logged up to the checkpoint go back into the file
    (whole, through `atomic_write`); those logged after it are dropped, since the resumed run logs them again.
    A row cut short by a kill is passed over.

    Lightning logs a step's metrics one step behind its count (`_batches_that_stepped`): every row logged before
    a checkpoint at step N reads a step below N, and the first step after it logs at N. A kill that saves nothing
    (kill -9, out of memory) leaves those rows in the file, and one kept at N came back twice.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or not trainer.is_global_zero:
            continue
        writer = logger.experiment
        saved = Path(writer.metrics_file_path).with_name(CSV_METRICS + SET_ASIDE)
        if not saved.is_file():
            continue
        with open(saved, newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if None not in row.values() and (_step(row) or 0) < max(step, 1)]
        atomic_write_csv(writer.metrics_file_path, keys, rows)
        # The writer appends its rows under this header; a key it has not seen rewrites the header, not the rows.
        writer.metrics_keys = sorted(set(writer.metrics_keys) | set(keys))
        saved.unlink()


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def run_folder_name(checkpoint: dict[str, Any]) -> str | None:
    """The name (a W&B project, a CSVLogger's `name`) of the folder that holds the checkpoint's run folder
    (`save_dir/name/version`), by the folder its `last.ckpt` was kept in; None where the checkpoint does not say."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("LastCheckpoint") and isinstance(state, dict) and isinstance(state.get("dirpath"), str):
            return Path(state["dirpath"]).parent.parent.name or None
    return None


def budget_spent(checkpoint: dict[str, Any], max_time: Any) -> bool:
    """Whether the checkpoint's run has trained for all of `max_time` (`--trainer.max_time`), by the training time
    its Timer (FitTimer) recorded: resumed, it would stop before its first step."""
    states = [s for s in (checkpoint.get("callbacks") or {}).values() if isinstance(s, dict) and "time_elapsed" in s]
    if max_time is None or not states:
        return False
    try:
        timer = Timer(duration=max_time)  # Lightning's own reading of the limit and of the time spent
    except Exception:  # a malformed limit, refused in one line before the trainer is built
        return False
    timer.load_state_dict(states[0])
    return (timer.time_remaining() or 0) <= 0


# The first line of every run's config.yaml: a file without it is not overwritten (a YAML comment, so the file is
# still a config for `--config`).
RUN_CONFIG_MARK = "# The resolved config of a cifar-cli run, written by the run itself\n"


def written_by_a_run(path: str) -> bool:
    """Whether the file at `path` is a config.yaml that a cifar-cli run wrote (it starts with RUN_CONFIG_MARK)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline() == RUN_CONFIG_MARK
    except (OSError, UnicodeDecodeError):
        return False


def restart_config(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A restart's resolved config `now`, with what it took from the checkpoint to continue the run given back as
    the run's `earlier` config.yaml had it: `ckpt_path` and the loggers' `version` and `id`. (config.yaml is given
    with `--ckpt_path`; a version in it would make `--config config.yaml` alone write into this run's folder.)"""
    config = copy.deepcopy(now)
    config["ckpt_path"] = earlier.get("ckpt_path")
    loggers = [_as_list(c.get("trainer", {}).get("logger")) for c in (config, earlier)]
    for logger, before in zip(*loggers):
        args, args_before = (x.get("init_args") if isinstance(x, dict) else None for x in (logger, before))
        if isinstance(args, dict) and isinstance(args_before, dict):
            for key in ("version", "id"):
                if key in args or key in args_before:
                    args[key] = args_before.get(key)
    return config


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def settings_changed(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`config_changes` between two configs of a run, each change once: the optimizer's `lr` is the one learning
    rate, `--model.learning_rate` (cifar_cli.optimizer_flags), and its copy took a place of the four a line names."""
    changes = config_changes(earlier, now)
    rate = [change.split(" ", 1)[1] for change in changes if change.startswith("model.learning_rate ")]
    return [change for change in changes if change not in (f"model.optimizer.lr {r}" for r in rate)]


def config_changes(earlier: Any, now: Any, key: str = "") -> list[str]:
    """`key before -> after` for each setting that differs between two configs, keys as the command line's flags
    name them (`model.optimizer.lr`, without `init_args`); a list of classes (callbacks, loggers) that gained or
    lost one, as `key +Class -Class`; a class given for another, or for none, by its name (`model.lr_schedule null
    -> WarmupLinearDecay`)."""
    if _class_name(earlier) != _class_name(now):
        return [f"{key} {_short(earlier)} -> {_short(now)}"]
    if isinstance(earlier, dict) and isinstance(now, dict):
        changes = []
        for name in [*earlier, *(k for k in now if k not in earlier)]:
            inner = key if name == "init_args" else f"{key}.{name}" if key else str(name)
            changes += config_changes(earlier.get(name), now.get(name), inner)
        return changes
    if isinstance(earlier, list) and isinstance(now, list) and earlier != now:
        classes = [[_class_name(item) for item in items] for items in (earlier, now)]
        if None not in classes[0] + classes[1]:
            if classes[0] == classes[1]:
                return [
                    c for name, a, b in zip(classes[0], earlier, now) for c in config_changes(a, b, f"{key}.{name}")
                ]
            gone, new = Counter(classes[0]) - Counter(classes[1]), Counter(classes[1]) - Counter(classes[0])
            return [" ".join([key, *(f"+{n}" for n in new.elements()), *(f"-{n}" for n in gone.elements())])]
    return [] if earlier == now else [f"{key} {_short(earlier)} -> {_short(now)}"]


def _class_name(item: Any) -> str | None:
    class_path = item.get("class_path") if isinstance(item, dict) else None
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None


def _short(value: Any) -> str:
    """A value as a flag takes it: a class by its name, and YAML's null, true and false."""
    if (name := _class_name(value)) is not None:
        return name
    text = json.dumps(value, default=str) if isinstance(value, (dict, list, bool)) or value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
