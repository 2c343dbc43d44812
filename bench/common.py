"""What the benchmarks share: running cifar-cli, reading its CSV metrics and output, and naming the machine."""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from jsonargparse import ArgumentError, auto_cli
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cifar_cli.atomic import atomic_write_text
from cifar_cli.cli import one_line
from cifar_cli.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# `--smoke` runs on a CPU, whatever a config names, and each fit stops after a few batches.
SMOKE_DEVICE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
SMOKE_LIMITS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]


def command(function: Callable, prog: str) -> None:
    """Run `function` with its arguments from the command line (jsonargparse's auto_cli). A bad flag or value, found
    as it is parsed or by `function` (UsageError), ends as cifar-cli's own do, in one line `PROG: error: ...` and exit
    code 2, not under jsonargparse's usage block and tip; `--help` prints whole."""
    try:
        auto_cli(function, exit_on_error=False, prog=prog)
    except (ArgumentError, UsageError) as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


def check_output_folder(folder: Path, flag: str) -> None:
    """Refuse `folder` (the value of `flag`) where no folder can be made or written in: a file in its path, a
    read-only or foreign folder. Found by `mkdir` or a write, it ended in a traceback, after the images were
    decoded. Checked without making anything, as bad input writes nothing."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    why = "" if existing.is_dir() else f"{existing} is a file, not a folder"
    if not why and not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    if why:
        raise UsageError(f"{flag} {folder}: cannot make a folder there: {why}")


def cifar_cli(args: list[str], cwd: Path, in_process: bool = False, timeout: float | None = None) -> tuple[float, str]:
    """Run `cifar-cli ARGS` in `cwd`; return its wall-clock seconds and its output. Fails loudly on errors, and
    on a process still running after `timeout` seconds (see `run_process`).

    Each run is the real command in its own process. `in_process` (the smoke runs of the test suite) calls the
    same entry point in this process instead, which saves the 5 to 10 s of imports a process costs.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if in_process:
        code, output = _in_process(args, cwd)
    else:
        done = run_process([sys.executable, "-m", "cifar_cli", *args], cwd, timeout)
        code, output = done.returncode, done.stdout + done.stderr
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"cifar-cli {' '.join(args)} failed in {cwd}:\n{output[-3000:]}")
    return seconds, output


def run_process(
    command: list[str], cwd: Path | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run(command)` with the output captured and the benchmarks' environment, in a process group of
    its own: after `timeout` seconds the whole group is killed and SystemExit says so with the output's tail.

    Written out because `subprocess.run`'s timeout kills only the process it started, and a DDP run's other ranks
    (processes Lightning starts) would keep running, holding their GPUs for the steps after it.
    """
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=bench_env(), start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise SystemExit(
            f"{' '.join(command[1:])} was still running after {timeout:.0f} s and was killed:\n"
            f"{(stdout + stderr)[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cifar_cli_peak_rss(args: list[str], cwd: Path, in_process: bool = False) -> tuple[float, str, int]:
    """`cifar_cli`, returning also the peak resident memory of its process, in bytes: its own `ru_maxrss`, from
    `wait4` (RUSAGE_CHILDREN would give the largest of all children so far). `in_process` (smoke runs) gives this
    process's peak instead."""
    if in_process:
        seconds, output = cifar_cli(args, cwd, in_process=True)
        return seconds, output, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "cifar_cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=bench_env())  # fmt: skip
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"cifar-cli {' '.join(args)} failed in {cwd}:\n{output[-3000:]}")
    return seconds, output, usage.ru_maxrss * 1024  # kilobytes on Linux


def tutorial(
    arrays: Path, epochs: int, val_size: int, limit: int | None, in_process: bool = False, timeout: float | None = None
) -> tuple[float, dict]:
    """Run the tutorial's code (bench/tutorial.py) on `arrays` in their folder: its wall-clock seconds and the
    JSON it prints (fit and training seconds, test accuracy and loss). `in_process` and `timeout` as for
    `cifar_cli`."""
    start = time.perf_counter()
    if in_process:
        from bench.tutorial import main

        with environment(bench_env()), working_directory(arrays.parent):
            result = main(str(arrays), epochs, val_size, limit)
        return time.perf_counter() - start, result
    done = run_process([sys.executable, "-m", "bench.tutorial", str(arrays), str(epochs), str(val_size),
                        *([str(limit)] if limit else [])], arrays.parent, timeout)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"the tutorial's code failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, json.loads(done.stdout.strip().splitlines()[-1])


def _in_process(args: list[str], cwd: Path) -> tuple[int, str]:
    from cifar_cli.cli import main

    output = io.StringIO()
    code = 0
    with environment(bench_env()), working_directory(cwd):
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                main(args)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            finally:
                # What a process would end at its exit: the W&B run, and a one-process DDP group.
                if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
                    sys.modules["wandb"].finish()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
    return code, output.getvalue()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by `env`, and restored whole afterwards (a run sets PL_GLOBAL_SEED, say)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """`contextlib.chdir`, which Python 3.10, the oldest pyproject.toml admits, lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def bench_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def metrics(folder: Path) -> list[dict[str, float]]:
    """The rows of the newest CSVLogger metrics.csv under `folder`, with empty cells dropped."""
    path = max(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    with open(path) as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def fit_time(folder: Path) -> float:
    """FitTimer's last `fit_time` under `folder`: seconds from the first training step to the last validation."""
    return [row for row in metrics(folder) if "fit_time" in row][-1]["fit_time"]


def best_checkpoint(output: str) -> str:
    match = re.search(r"Best checkpoint.*?: (\S+\.ckpt)", output)
    if match is None:
        raise SystemExit(f"no best checkpoint in the fit's output:\n{output[-2000:]}")
    return match.group(1)


def data_args(root: Path, val_size: int, test_size: int) -> list[str]:
    return ["--config", str(CONFIGS / "cifar10-jpg.yaml"), "--data.root", str(root),
            "--data.val_size", str(val_size), "--data.test_size", str(test_size)]  # fmt: skip


def csv_logger(save_dir: str) -> list[str]:
    """Flags that log to CSV in `save_dir` (the benchmarks read their numbers there) without a progress bar."""
    return ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", save_dir,
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


def tutorial_arrays(data, path: Path) -> Path:
    """Save the splits of `data` as the tutorial's code reads them: uint8 HWC arrays, its train set being our
    train + val splits (it splits off its own validation set), its test set our test split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    held_in = [data.splits["train"], data.splits["val"]]
    torch.save(
        {
            "train_images": torch.cat([s.images for s in held_in]).permute(0, 2, 3, 1).contiguous().numpy(),
            "train_labels": torch.cat([s.labels for s in held_in]).tolist(),
            "test_images": data.splits["test"].images.permute(0, 2, 3, 1).contiguous().numpy(),
            "test_labels": data.splits["test"].labels.tolist(),
        },
        path,
    )
    return path


def airbench_arrays(data, folder: Path, limit: int | None = None) -> Path:
    """Save the splits of `data` as bench/airbench94.py reads them (`train.pt` and `test.pt` in `folder`: uint8
    HWC images, labels, class names): our train split to train on, as cifar-cli's fit does, our test split to
    test on; the first `limit` images of each only, for a smoke run."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", data.splits["train"]), ("test", data.splits["test"])):
        images = split.images[:limit].permute(0, 2, 3, 1).contiguous()
        torch.save({"images": images, "labels": split.labels[:limit].clone(), "classes": list(data.class_names)},
                   folder / f"{name}.pt")  # fmt: skip
    return folder


def run_steps(steps: list[tuple[str, str, Callable[[], dict | None]]], results: dict, out: Path,
              table: Callable[[dict], Table], stem: str = "results") -> dict:  # fmt: skip
    """Run each (key, name, step), keeping its result under `key`; then print the table of the results.

    `results.json` (`<stem>.json`) in `out` is rewritten after every step (a run stopped by a time limit keeps what
    it measured), and `results.txt` holds the table. A step that fails (an exception, or a failed or timed-out
    cifar-cli run) keeps `{"error": message}` under its key and a "failed" row in the table, and the steps after it
    still run: on a lent GPU each call counts, and one broken step must not cost the others' numbers. Then
    SystemExit names the failed steps.
    """
    console = Console(width=150)
    failed: list[tuple[str, str]] = []  # (key, name) of the steps that failed
    for key, name, step in steps:
        console.print(f"[bold]{name}[/bold] ...")
        start = time.perf_counter()
        try:
            results[key] = step()
        except (Exception, SystemExit) as error:
            message = str(error).strip() or type(error).__name__
            results[key] = {"error": message[-3000:]}
            failed.append((key, name))
            # As Text: the message is a command's output, which may hold square brackets.
            console.print(Text.assemble(("  failed", "red"), f" ({time.perf_counter() - start:.0f} s): {message}"))
        else:
            console.print(f"  {json.dumps(results[key])} ({time.perf_counter() - start:.0f} s)")
        # Whole or not at all: a kill at the device's time limit mid-write would lose every step measured before.
        atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=2))
    failed_keys = {key for key, _ in failed}
    grid = table({k: v for k, v in results.items() if k not in failed_keys})
    for key, name in failed:
        grid.add_row(name, "", f"failed: {results[key]['error'].splitlines()[0][:100]}")
    console.print(grid)
    with open(os.devnull, "w") as devnull:
        recorder = Console(record=True, width=150, file=devnull)
        recorder.print(grid)
    atomic_write_text(out / f"{stem}.txt", recorder.export_text())
    if failed:
        raise SystemExit(f"{len(failed)} of {len(steps)} steps failed: {', '.join(name for _, name in failed)}")
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), cpu)
        flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"}) or ["no bf16 instructions"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores ({', '.join(bf16)}), {gpu}; torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )
