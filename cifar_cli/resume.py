"""Finding the run to resume, and carrying a run's identity (its folder and W&B run) through its checkpoints.

Each run has its own folder (`save_dir/name/<run id>/`), so Lightning's own `--ckpt_path last`, which looks in
the new run's empty checkpoint folder, finds nothing. Here `last` means the newest `last.ckpt` under the save
folder, and the resumed run takes back the run id that the checkpoint records: same folder, same `config.yaml`,
same W&B run, whose charts then continue one curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

# Checkpoint entry (under cifar_cli's own key) holding the run's identity.
RUN_KEY = "run"


def last_checkpoints(roots: list[Path]) -> list[Path]:
    """`last*.ckpt` files in the runs under `roots`, newest first: `root/checkpoints/` (no logger),
    `root/<name>/<run id>/checkpoints/` (a logger's runs), or a checkpoint folder itself."""
    patterns = ("checkpoints/last*.ckpt", "*/*/checkpoints/last*.ckpt", "last*.ckpt")
    found = {p.resolve(): p for root in roots for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    return sorted(found.values(), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def run_identity(trainer: Trainer) -> dict[str, Any] | None:
    """The first logger's class and version (the W&B run id, or CSVLogger's version): what names the run folder."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    return {"logger": f"{type(logger).__module__}.{type(logger).__qualname__}", "version": logger.version}


def continue_run(logger_config: Any, identity: dict[str, Any] | None) -> bool:
    """Point the logger config (a `class_path`/`init_args` namespace) at the run the checkpoint came from.

    Only when it names the same logger class: the version is what both WandbLogger (its run id) and Lightning's
    file loggers take to reuse a run's folder. Returns whether the run is continued.
    """
    if not identity or identity.get("version") is None or logger_config is None:
        return False
    class_path = getattr(logger_config, "class_path", None)
    if class_path is None or class_path.rsplit(".", 1)[-1] != identity["logger"].rsplit(".", 1)[-1]:
        return False
    logger_config.init_args.version = identity["version"]
    return True
