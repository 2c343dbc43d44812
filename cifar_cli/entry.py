"""The `cifar-cli` command's entry point, light to import: torch and Lightning load in a second or more, and a
Ctrl-C then ends the command as one later does, in one line with exit code 130, not with Python's traceback of
the import under way."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

if sys.platform == "win32":
    # Before anything else: native Windows lacks SIGUSR1 (below), flock (cifar_cli/folders.py) and fork (the decoding
    # workers), and the command ended in a traceback of its import.
    raise SystemExit(
        "cifar-cli: native Windows is not supported: run it in WSL 2 (Windows Subsystem for Linux), where CUDA GPUs "
        "work too"
    )

# The signals that end a process at once by default, and that Lightning takes over only as the trainer starts to run:
# a scheduler's stop (SIGTERM), and SLURM's warning before its time limit (SIGUSR1, `--signal=SIGUSR1@90`).
START_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STAGES = {"fit": "training", "test": "testing", "validate": "validation", "predict": "prediction"}


class StoppedBeforeStart(BaseException):
    """One of START_SIGNALS came while the command started (imports, parsing, decoding the data, building the model
    and the trainer). A BaseException, as KeyboardInterrupt: the code it interrupts passes it on, and cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def line(self, args: list[str]) -> str:
        """What to print: what the command was about to do, and that it did none of it."""
        name = signal.Signals(self.signum).name
        stage = next((a for a in args if a in STAGES or a == "report"), None)
        if stage == "fit":
            return f"cifar-cli: stopped by {name} before training began: nothing was trained or saved"
        if stage in STAGES:
            return f"cifar-cli: stopped by {name} before {STAGES[stage]} began: nothing was saved"
        return f"cifar-cli: stopped by {name}"


class StoppedAfterStage(BaseException):
    """One of START_SIGNALS came after the trainer's stage had ended (from its teardown, which puts back their
    default action, to the end of the command: W&B's checkpoint versions, the summary). A BaseException, as
    StoppedBeforeStart."""

    def __init__(self, signum: int, stage: str) -> None:
        super().__init__(signum, stage)
        self.signum, self.stage = signum, stage

    def line(self) -> str:
        saved = " (its checkpoints are saved)" if self.stage == "fit" else ""
        return (
            f"cifar-cli: stopped by {signal.Signals(self.signum).name} after {STAGES.get(self.stage, self.stage)} "
            f"ended{saved}, before its summary"
        )


class _StopAfterStage:
    """The handler of `stop_cleanly_after_stage`: a class, for `end_stopping_after_stage` to know it."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __call__(self, signum: int, frame: Any) -> None:
        raise StoppedAfterStage(signum, self.stage)


def _stop_before_start(signum: int, frame: Any) -> None:
    raise StoppedBeforeStart(signum)


def stop_cleanly_before_start() -> None:
    """Until the trainer runs, SIGTERM and SIGUSR1 end the command in one line with 128 + the signal's number, as
    the clean stop does during training (and a Ctrl-C here): by default they killed the process without a word. A
    signal the process was started ignoring (SIG_IGN) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in START_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _stop_before_start)


def hand_signals_to_lightning() -> list[int]:
    """Put back the default action of START_SIGNALS where `stop_cleanly_before_start` set its own: called as the
    trainer installs its handlers, which would otherwise call this one too (Lightning chains a SIGTERM handler
    it finds), or leave SIGUSR1 to it (Lightning installs SLURM's requeue handler only where none is set). Returns
    the signals it put back."""
    if threading.current_thread() is not threading.main_thread():
        return []
    # (Also the stop after an earlier stage, where a program runs a second one: Lightning would chain it too.)
    handed = [signum for signum in START_SIGNALS if isinstance(signal.getsignal(signum), _StopAfterStage)
              or signal.getsignal(signum) is _stop_before_start]  # fmt: skip
    for signum in handed:
        signal.signal(signum, signal.SIG_DFL)
    return handed


def keep_stopping_cleanly(signums: list[int]) -> None:
    """Put `stop_cleanly_before_start`'s handler back for those of `signums` that no one has taken since."""
    for signum in signums:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _stop_before_start)


def stop_cleanly_after_stage(stage: str, ignore: bool = False) -> None:
    """Once the trainer's stage (`stage`, a TrainerFn value) has ended, SIGTERM and SIGUSR1 end the command in one
    line with 128 + the signal's number, as during the stage: the trainer's teardown put back their default action,
    which killed the process without a word. Not where someone else has taken them (a signal ignored, say). With
    `ignore`, they are ignored instead (a ddp_spawn rank, whose spawning process ends the command)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in START_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, after_stage_handler(stage, ignore))


def after_stage_handler(stage: str, ignore: bool = False) -> signal.Handlers | _StopAfterStage:
    """The handler `stop_cleanly_after_stage` installs."""
    return signal.SIG_IGN if ignore else _StopAfterStage(stage)


def end_stopping_after_stage(action: signal.Handlers = signal.SIG_DFL) -> None:
    """Put back the default action (or `action`) where `stop_cleanly_after_stage` set its handler: as the command
    ends (a later command in the same process would have Lightning chain it to its own SIGTERM handler)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in START_SIGNALS:
        if isinstance(signal.getsignal(signum), _StopAfterStage):
            signal.signal(signum, action)


def run() -> None:
    stop_cleanly_before_start()
    matplotlib_folder()
    current_folder_modules()
    try:
        from cifar_cli.cli import run as run_command
    except KeyboardInterrupt:
        print("cifar-cli: interrupted by Ctrl-C", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except StoppedBeforeStart as stop:
        print(stop.line(sys.argv[1:]), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    try:
        run_command()
    except StoppedBeforeStart as stop:  # one that came before or after `main`'s own handling of it
        print(stop.line(sys.argv[1:]), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except StoppedAfterStage as stop:  # a second one, during `main`'s handling of the first
        raise SystemExit(128 + stop.signum) from None


def current_folder_modules() -> None:
    """Let class paths name modules of the current folder (`--model.net mynet.Net` for a `mynet.py` there), as under
    `python -m cifar_cli`, which puts the folder first on the import path; the `cifar-cli` script put it nowhere, and
    the same command said `No module named 'mynet'`. Last here, so that a file there named like a package cifar-cli
    imports (`wandb.py`) does not replace it."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def matplotlib_folder() -> None:
    """Set MPLCONFIGDIR where it is unset and Matplotlib's own folders cannot be made (a home that is read-only or
    missing): torchmetrics imports Matplotlib as every command starts, which then said so in two long lines before
    anything of the command's own. Its files (the font list) go into cifar-cli's cache folder instead, kept from run to
    run, or where that cannot be made either, into a temporary folder removed at exit, as Matplotlib's own fallback.
    Linux's folders only (~/.config/matplotlib and ~/.cache/matplotlib, or under XDG_CONFIG_HOME and XDG_CACHE_HOME)."""
    if os.environ.get("MPLCONFIGDIR") or not sys.platform.startswith(("linux", "freebsd")):
        return
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME, and no entry in the password database
        home = None
    config = os.environ.get("XDG_CONFIG_HOME") or (home and home / ".config")
    cache = os.environ.get("XDG_CACHE_HOME") or (home and home / ".cache")
    if config and cache and writable(Path(config, "matplotlib")) and writable(Path(cache, "matplotlib")):
        return
    ours = Path(cache, "cifar-cli", "matplotlib") if cache else None  # data.storage.default_cache_dir's folder
    if ours is not None and writable(ours):
        os.environ["MPLCONFIGDIR"] = str(ours)
        return
    try:
        folder = tempfile.mkdtemp(prefix="matplotlib-")
    except OSError:
        return  # Matplotlib says what to do
    atexit.register(shutil.rmtree, folder, True)
    os.environ["MPLCONFIGDIR"] = folder


def writable(folder: Path) -> bool:
    """Whether `folder` is, or can be made, a folder to write in (made, as Matplotlib makes it)."""
    try:
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return folder.is_dir() and os.access(folder, os.W_OK)
