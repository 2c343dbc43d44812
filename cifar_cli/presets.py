"""cifar-cli's own configs (the repository's configs/), found from any folder: `--config configs/gpu.yaml`, as the
README and cifar-cli's messages write it, names the file in the current folder where there is one, else the copy
that comes with cifar-cli."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifar_cli.errors import UsageError

# The folder that names them on a command line, as in the repository.
FOLDER = Path("configs")


def presets_folder() -> Path | None:
    """Where cifar-cli's configs are: inside the package of an installed wheel (pyproject.toml maps configs/ to
    cifar_cli/configs), or beside it in a source checkout, which an editable install imports from. By path, not
    `importlib.resources`: setuptools' editable finder (84) finds no mapped subpackage without an `__init__.py`."""
    package = Path(__file__).resolve().parent
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / "default.yaml").is_file():
            return folder
    return None


def names() -> list[str]:
    """The configs' file names, sorted."""
    folder = presets_folder()
    return sorted(path.name for path in folder.glob("*.yaml")) if folder is not None else []


def shown(path: object) -> str:
    """A config's path as cifar-cli's messages write it: `configs/NAME.yaml` for one of cifar-cli's own, which
    `shipped_config` turned into its full path."""
    folder = presets_folder()
    return str(FOLDER / Path(str(path)).name) if folder is not None and Path(str(path)).parent == folder else str(path)


def shipped_config(value: str) -> str | None:
    """The path of cifar-cli's own config for a `--config` value `configs/NAME.yaml` that names no file from the
    current folder; None for any other value (a file that is there, a path elsewhere, YAML text), which jsonargparse
    reads as it is. A `configs/` name that is not one of cifar-cli's is refused, naming them."""
    path = Path(value)
    if path.parent != FOLDER or path.suffix not in (".yaml", ".yml") or path.exists():
        return None
    folder = presets_folder()
    if folder is None:
        return None  # neither installed nor checked out with its configs: jsonargparse says the file is missing
    if (folder / path.name).is_file():
        return str(folder / path.name)
    raise UsageError(
        f"--config {value}: no such file in {Path.cwd()}, nor among cifar-cli's own configs ({', '.join(names())})"
    )


def read_config(path: Any) -> Any:
    """A config file's contents as YAML (`path` a file's path, or jsonargparse's Path of one the parse read); None
    where it is not a readable YAML file (YAML text given to --config, say), which the parse itself reports."""
    try:
        text = path.get_content() if hasattr(path, "get_content") else Path(path).read_text(encoding="utf-8")
        return yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError):
        return None
