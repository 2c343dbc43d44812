"""`make bench-gpu`: the GPU check, one command that writes one JSON and one table (`results.json`, `results.txt`).

1. configs/fast.yaml, `runs` times (seeds 0, 1, ...): test accuracy (mean and min) on 5,000 held-out images,
   training seconds (FitTimer: first step to the end of the last validation), and the rest of each `fit`
   process separately (start-up: imports, loading the decoded images, building the model; and the end);
   then airbench94's own code (bench/airbench94.py), the record fast.yaml follows, as many times on the same
   training and test images: the accuracy the record's code reaches on this data, to read the first against
   (the 94.0% target is airbench94's on the original CIFAR-10, 50,000 training images; this data is a JPEG copy,
   40,000 of whose images train);
2. one epoch of the tutorial recipe on the GPU: `cifar-cli fit --config configs/gpu.yaml` against the tutorial's
   code (bench/tutorial.py), both timed from the first training step to the end of the epoch's validation, on
   the same 40,000 training and 5,000 validation images;
3. the GPU tests: `pytest -m gpu tests/test_gpu.py` (the other test files need wandb, which a GPU machine may lack);
4. configs/ddp.yaml on every GPU present, one epoch of the tutorial recipe.

The headline target first: a run cut short by the device's time limit keeps it. Every cifar-cli run is the real
command in its own process, from a scratch folder under `out`, killed with its process group after `timeout`
seconds; a failed or killed step leaves its error in the results and the next step runs (`run_steps`). With
`--smoke`, every step runs on the CPU with a few batches, and cifar-cli runs in this process: the test suite
checks so that the command works the first time it meets a GPU. About 5 minutes on an H100.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from rich.table import Table

from bench.common import (
    CONFIGS,
    REPO,
    SMOKE_DEVICE,
    SMOKE_LIMITS,
    airbench_arrays,
    best_checkpoint,
    check_output_folder,
    cifar_cli,
    command,
    csv_logger,
    data_args,
    fit_time,
    machine,
    metrics,
    run_process,
    run_steps,
    tutorial,
    tutorial_arrays,
)
from cifar_cli.data import ImageFolderDataModule
from cifar_cli.errors import UsageError

VAL_SIZE = TEST_SIZE = 5000


def one_epoch(root: Path, data: ImageFolderDataModule, config: str, smoke: bool) -> list[str]:
    """`fit` flags for one epoch of the tutorial recipe with `config`, logged to CSV in `logs/`."""
    limits = [*SMOKE_DEVICE, *SMOKE_LIMITS] if smoke else []
    return ["fit", *data_args(root, data.val_size, data.test_size), "--config", str(CONFIGS / config),
            "--trainer.max_epochs", "1", *csv_logger("logs"), *limits]  # fmt: skip


def gpu_tests(timeout: float | None) -> dict:
    """3. `pytest -m gpu tests/test_gpu.py`: the counts of passed, failed and skipped tests (all skip without a GPU)."""
    start = time.perf_counter()
    done = run_process([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "test_gpu.py")], REPO, timeout)  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", summary)}
    return {"exit_code": done.returncode, "summary": summary, "seconds": time.perf_counter() - start, **counts}


def recipe_epoch(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool, timeout: float | None) -> dict:
    """2. One epoch of the tutorial recipe: cifar-cli with configs/gpu.yaml against the tutorial's code."""
    arrays = tutorial_arrays(data, out / "tutorial" / "arrays.pt")
    _, theirs = tutorial(arrays, 1, data.val_size, 2 if smoke else None, in_process=smoke, timeout=timeout)
    folder = out / "gpu-recipe"
    args = one_epoch(root, data, "gpu.yaml", smoke)
    wall, _ = cifar_cli(args, folder, in_process=smoke, timeout=timeout)
    ours = fit_time(folder / "logs")
    images = len(data.splits["train"]) if not smoke else 2 * data.batch_size
    return {
        "images": images,
        "tutorial_seconds": theirs["train_seconds"],
        "tutorial_images_per_s": images / theirs["train_seconds"],
        "ours_seconds": ours,
        "ours_images_per_s": images / ours,
        "ours_wall": wall,
    }


def fast_runs(
    data: ImageFolderDataModule, root: Path, out: Path, runs: int, smoke: bool, timeout: float | None
) -> dict:
    """1. configs/fast.yaml `runs` times: test accuracy, training seconds, and the rest of the fit's process."""
    smoke_args = [*SMOKE_DEVICE, *SMOKE_LIMITS, "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "16"]
    accs, seconds, startup = [], [], []
    for seed in range(runs):
        folder = out / "fast" / str(seed)
        config = ["--config", str(CONFIGS / "fast.yaml"), *(smoke_args if smoke else [])]
        fit = ["fit", *data_args(root, data.val_size, data.test_size), *config, "--seed_everything", str(seed),
               *csv_logger("logs")]  # fmt: skip
        wall, output = cifar_cli(fit, folder, smoke, timeout)
        seconds.append(fit_time(folder / "logs"))
        startup.append(wall - seconds[-1])
        cifar_cli(["test", *config, "--ckpt_path", best_checkpoint(output), *csv_logger("test")], folder, smoke,
                  timeout)  # fmt: skip
        accs.append(metrics(folder / "test")[-1]["test_acc"])
    return {
        "runs": runs,
        "acc_mean": sum(accs) / runs,
        "acc_min": min(accs),
        "seconds_mean": sum(seconds) / runs,
        "seconds_max": max(seconds),
        "startup_mean": sum(startup) / runs,
        "accs": accs,
        "seconds": seconds,
    }


def airbench_runs(data: ImageFolderDataModule, out: Path, runs: int, smoke: bool, timeout: float | None) -> dict:
    """1b. airbench94's code `runs` times on fast.yaml's training and test images: test accuracy and training
    seconds as it times them (its CUDA events: the whitening, the epochs and the test-time augmentation)."""
    folder = airbench_arrays(data, out / "airbench94", limit=64 if smoke else None)
    sizes = ["--epochs", "1", "--batch_size", "16"] if smoke else []
    done = run_process([sys.executable, "-m", "bench.airbench94", str(folder), "--runs", str(runs), *sizes], REPO,
                       timeout)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"bench.airbench94 failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    accs, seconds = result["accs"], result["seconds"]
    return {
        "runs": runs,
        "device": result["device"],
        "acc_mean": sum(accs) / runs,
        "acc_min": min(accs),
        "seconds_mean": sum(seconds) / runs,
        "seconds_max": max(seconds),
        "accs": accs,
        "seconds": seconds,
    }


def ddp_epoch(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool, timeout: float | None) -> dict:
    """4. configs/ddp.yaml on every GPU present: one epoch of the tutorial recipe."""
    folder = out / "ddp"
    devices = max(torch.cuda.device_count(), 1)
    args = one_epoch(root, data, "ddp.yaml", smoke)
    cifar_cli(args, folder, in_process=smoke, timeout=timeout)
    seconds = fit_time(folder / "logs")
    images = len(data.splits["train"]) if not smoke else 2 * data.batch_size * devices
    return {"devices": devices, "seconds": seconds, "images_per_s": images / seconds}


def table(results: dict, title: str) -> Table:
    """The table of the steps in `results` (a step that failed or did not run has no rows)."""
    grid = Table(title=title, title_justify="left")
    for column in ("check", "tutorial code", "cifar-cli", "ratio", "target"):
        grid.add_column(column)

    def runs(n: int) -> str:
        return f"{n} run{'' if n == 1 else 's'}"

    if f := results.get("fast"):
        grid.add_row(f"1. fast.yaml, {runs(f['runs'])}: test_acc mean (min)", "",
                     f"{f['acc_mean']:.4f} ({f['acc_min']:.4f})", "", ">= 0.94")  # fmt: skip
        grid.add_row("   training seconds, mean (max)", "", f"{f['seconds_mean']:.2f} ({f['seconds_max']:.2f})", "",
                     "<= 5 s on an H100")  # fmt: skip
        grid.add_row("   rest of the fit process, mean (s)", "", f"{f['startup_mean']:.1f}", "", "")
    if a := results.get("airbench"):
        grid.add_row(f"1b. airbench94's code, same images, {runs(a['runs'])}: test_acc mean (min)", "",
                     f"{a['acc_mean']:.4f} ({a['acc_min']:.4f})", "", "")  # fmt: skip
        grid.add_row("   its seconds, mean (max)", "", f"{a['seconds_mean']:.2f} ({a['seconds_max']:.2f})", "", "")
    if r := results.get("recipe"):
        grid.add_row("2. tutorial recipe, one epoch (s)", f"{r['tutorial_seconds']:.1f}", f"{r['ours_seconds']:.1f}",
                     f"{r['ours_seconds'] / r['tutorial_seconds']:.2f}", "")  # fmt: skip
        grid.add_row("   images/s", f"{r['tutorial_images_per_s']:,.0f}", f"{r['ours_images_per_s']:,.0f}",
                     f"{r['ours_images_per_s'] / r['tutorial_images_per_s']:.1f}x", "")  # fmt: skip
    if t := results.get("tests"):
        grid.add_row("3. pytest -m gpu", "", t["summary"], "", "all pass")
    if d := results.get("ddp"):
        grid.add_row(f"4. ddp.yaml on {d['devices']} GPU(s), one epoch (s)", "", f"{d['seconds']:.1f}", "", "")
        grid.add_row("   images/s", "", f"{d['images_per_s']:,.0f}", "", "")
    return grid


def run(
    root: str = "data/cifar10-jpg",
    out: str | None = None,
    runs: PositiveInt = 5,
    smoke: bool = False,
    timeout: PositiveFloat = 300,
    results: str | None = None,
) -> dict:
    """Run the GPU check and print one table.

    Args:
        root: Image folder with `train/<class>/` (`make data` unpacks the CIFAR-10 JPEGs there).
        out: Folder for the runs' files. Default `runs/bench-gpu`, and `runs/bench-gpu-smoke` for a smoke run, which
            leaves a whole run's results and logs alone.
        runs: Runs of configs/fast.yaml (seeds 0, 1, ...).
        smoke: Every step on the CPU with a few batches, to check that the command works.
        timeout: Seconds any one process (a cifar-cli run, the tutorial's code, the GPU tests) may take before it
            is killed and its step counted as failed.
        results: Folder for `results.json` and `results.txt`; default `out`.
    """
    root_path = Path(root).resolve()
    out_path = Path(out or ("runs/bench-gpu-smoke" if smoke else "runs/bench-gpu")).resolve()
    if not (root_path / "train").is_dir():
        raise UsageError(f"{root_path} has no train/ folder: run `make data` or pass --root")
    if not smoke and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU here; `--smoke true` runs the same steps on the CPU")
    results_path = Path(results).resolve() if results else out_path
    check_output_folder(out_path, "--out")
    check_output_folder(results_path, "--results")
    sizes = (20, 20) if smoke else (VAL_SIZE, TEST_SIZE)
    start = time.perf_counter()
    # A folder it cannot use ends here (UsageError, one line), before anything is written.
    data = ImageFolderDataModule(str(root_path), val_size=sizes[0], test_size=sizes[1])
    data.prepare_data()  # decodes the images into the cache every run reads, before anything is timed
    data.setup("fit")
    out_path.mkdir(parents=True, exist_ok=True)
    results_path.mkdir(parents=True, exist_ok=True)
    title = f"cifar-cli GPU check: {machine()}"
    measured: dict = {"machine": title, "decode_seconds": time.perf_counter() - start}
    steps = [
        ("fast", "1. fast.yaml", lambda: fast_runs(data, root_path, out_path, 1 if smoke else runs, smoke, timeout)),
        ("airbench", "1b. airbench94", lambda: airbench_runs(data, out_path, 1 if smoke else runs, smoke, timeout)),
        ("recipe", "2. tutorial recipe, one epoch", lambda: recipe_epoch(data, root_path, out_path, smoke, timeout)),
        ("tests", "3. pytest -m gpu", lambda: gpu_tests(timeout)),
        ("ddp", "4. ddp.yaml", lambda: ddp_epoch(data, root_path, out_path, smoke, timeout)),
    ]
    return run_steps(steps, measured, results_path, lambda measured: table(measured, title))


if __name__ == "__main__":
    command(run, "bench-gpu")
