"""`make bench`: cifar-cli against the W&B tutorial and a plain PyTorch loop, side by side, in one table.

a. data pipeline: images/s of the tutorial's per-sample pipeline against cifar-cli's batches on the device;
b. Lightning overhead: the default recipe's training steps as a plain loop against `cifar-cli fit`;
c. the tutorial's recipe end to end: its code as written against `cifar-cli fit --config configs/cpu.yaml`;
d. time to accuracy of configs/fast-cpu.yaml (45,000/5,000 split of the JPEG training images);
e. with a CUDA GPU only: configs/fast.yaml to test accuracy, and the tutorial recipe's epoch time.

Every cifar-cli run is the real command in its own process, started from a scratch folder under `runs/bench/`.
`--smoke` shrinks every part to a few steps, for the test suite.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import auto_cli
from lightning.pytorch import Callback, LightningModule, Trainer
from rich.console import Console
from rich.table import Table

from cifar_cli.data import DeviceBatches, ImageFolderDataModule
from cifar_cli.nets import TutorialCNN

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
THRESHOLDS = (0.85, 0.90, 0.93)


class StepClock(Callback):
    """Times training steps `warmup` to the last, and writes seconds and steps as JSON to `path` at the end.

    Args:
        path: JSON file to write.
        warmup: Steps left out of the timing (first-call costs: allocation, oneDNN kernel selection).
    """

    def __init__(self, path: str, warmup: int = 50) -> None:
        self.path = path
        self.warmup = warmup
        self._start: float | None = None
        self._steps = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._start is not None:
            self._steps += 1
            self._seconds = time.perf_counter() - self._start

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.path).write_text(json.dumps({"seconds": self._seconds, "steps": self._steps}))


def cifar_cli(args: list[str], cwd: Path) -> tuple[float, str]:
    """Run `cifar-cli ARGS` in `cwd`; return its wall-clock seconds and its output. Fails loudly on errors."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cifar_cli", *args], cwd=cwd, capture_output=True, text=True, env=bench_env()
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"cifar-cli {' '.join(args)} failed in {cwd}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def bench_env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def metrics(folder: Path) -> list[dict[str, float]]:
    """The rows of the newest CSVLogger metrics.csv under `folder`, with empty cells dropped."""
    path = max(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    with open(path) as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def best_checkpoint(output: str) -> str:
    match = re.search(r"Best checkpoint.*?: (\S+\.ckpt)", output)
    if match is None:
        raise SystemExit(f"no best checkpoint in the fit's output:\n{output[-2000:]}")
    return match.group(1)


def data_args(root: Path, val_size: int, test_size: int) -> list[str]:
    return ["--config", str(CONFIGS / "cifar10-jpg.yaml"), "--data.root", str(root),
            "--data.val_size", str(val_size), "--data.test_size", str(test_size)]  # fmt: skip


def images_per_second(batches, preprocess, limit: int) -> float:
    count, start = 0, time.perf_counter()
    for i, (images, _) in enumerate(batches):
        if i == limit:
            break
        count += len(preprocess(images))
    return count / (time.perf_counter() - start)


def bench_pipeline(data: ImageFolderDataModule, smoke: bool) -> dict[str, float]:
    """a. The tutorial's DataLoader (per-sample PIL, ToTensor, Normalize, batch 32) against cifar-cli's batches."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from bench.tutorial import in_memory_cifar10

    train = data.splits["train"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    tutorial_set = in_memory_cifar10(train.images.permute(0, 2, 3, 1).numpy(), train.labels.tolist(), transform)
    tutorial = DataLoader(tutorial_set, batch_size=32, shuffle=True)
    batches = 5 if smoke else 1000  # about 1 s of the tutorial's pipeline; ours runs 10x as many
    ours = endless(DeviceBatches(train, 32, shuffle=True, drop_last=True))
    # The fast recipe's batches: random crop and flip (on the uint8 batch, seeded), then the normalisation.
    augmented = endless(DeviceBatches(train, 512, shuffle=True, drop_last=True, augment=data.augment_batch))
    fast = images_per_second(augmented, data.preprocess, batches)
    return {
        "tutorial": images_per_second(tutorial, lambda x: x, batches),
        "ours": images_per_second(ours, data.preprocess, 10 * batches),
        "ours_fast": fast,
    }


def endless(loader: DeviceBatches):
    """The loader's batches, epoch after epoch, reshuffled as Lightning does."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_overhead(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool) -> dict[str, float]:
    """b. The default recipe's training steps (TutorialCNN, batch 32, Adam, fp32): plain loop against cifar-cli.

    Identical runs differ by up to 10% on a shared 2-core machine, so each side runs 3 times, alternating, and
    the medians are compared.
    """
    warmup, steps, repeats = (1, 1, 1) if smoke else (50, 600, 3)
    plain, ours = [], []
    for repeat in range(repeats):
        torch.manual_seed(42)
        net = TutorialCNN(len(data.class_names)).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
        batches = endless(DeviceBatches(data.splits["train"], 32, shuffle=True, drop_last=True))
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            images, labels = next(batches)
            x = data.preprocess(images).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        plain.append(time.perf_counter() - start)
        clock = out / "overhead" / f"steps-{repeat}.json"
        cifar_cli(["fit", "--config", str(CONFIGS / "cpu.yaml"), *data_args(root, data.val_size, data.test_size),
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(warmup + steps),
                   "--trainer.limit_val_batches", "2",
                   "--trainer.callbacks+=bench.run.StepClock", "--trainer.callbacks.path", str(clock),
                   "--trainer.callbacks.warmup", str(warmup)], out / "overhead")  # fmt: skip
        timed = json.loads(clock.read_text())
        assert timed["steps"] == steps, timed
        ours.append(timed["seconds"])
    return {"steps": steps, "plain": statistics.median(plain), "cifar_cli": statistics.median(ours),
            "plain_runs": plain, "cifar_cli_runs": ours}  # fmt: skip


def bench_tutorial_recipe(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool) -> dict[str, float]:
    """c. The tutorial's code as written (2 epochs, batch 32) against `cifar-cli fit --config configs/cpu.yaml`.

    Both train on the same images (the tutorial splits cifar-cli's train + val split its own way) and are tested
    on the same held-out test split.
    """
    arrays = out / "tutorial" / "arrays.pt"
    arrays.parent.mkdir(parents=True, exist_ok=True)
    held_in = [data.splits["train"], data.splits["val"]]
    torch.save(
        {
            "train_images": torch.cat([s.images for s in held_in]).permute(0, 2, 3, 1).contiguous().numpy(),
            "train_labels": torch.cat([s.labels for s in held_in]).tolist(),
            "test_images": data.splits["test"].images.permute(0, 2, 3, 1).contiguous().numpy(),
            "test_labels": data.splits["test"].labels.tolist(),
        },
        arrays,
    )
    epochs = "1" if smoke else "2"
    limit = ["2"] if smoke else []
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.tutorial", str(arrays), epochs, str(data.val_size), *limit],
        cwd=arrays.parent, capture_output=True, text=True, env=bench_env(),
    )  # fmt: skip
    tutorial_wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the tutorial's code failed:\n{done.stderr[-3000:]}")
    tutorial = json.loads(done.stdout.strip().splitlines()[-1])
    limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"] if smoke else []
    fit_args = ["fit", "--config", str(CONFIGS / "cpu.yaml"), *data_args(root, data.val_size, data.test_size),
                "--trainer.max_epochs", epochs, *limits]  # fmt: skip
    fit_seconds, output = cifar_cli(fit_args, out / "recipe")
    test_args = ["test", "--config", str(CONFIGS / "cpu.yaml"), "--ckpt_path", best_checkpoint(output),
                 "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "test"]  # fmt: skip
    cifar_cli(test_args, out / "recipe")
    ours = metrics(out / "recipe" / "test")[-1]
    return {
        "tutorial_fit": tutorial["fit_seconds"],
        "tutorial_wall": tutorial_wall,
        "tutorial_acc": tutorial["test_acc"],
        "ours_fit": fit_seconds,
        "ours_acc": ours["test_acc"],
    }


def bench_fast_cpu(root: Path, out: Path, smoke: bool, val_size: int) -> dict[str, float | None]:
    """d. configs/fast-cpu.yaml on the 45,000/5,000 split: fit seconds until val_acc first reaches each threshold."""
    limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"] if smoke else []
    folder = out / "fast-cpu"
    cifar_cli(["fit", *data_args(root, val_size, 0), "--config", str(CONFIGS / "fast-cpu.yaml"), *limits,
               "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs",
               "--trainer.enable_progress_bar", "false"], folder)  # fmt: skip
    validations = [row for row in metrics(folder / "logs") if "val_acc" in row and "fit_time" in row]
    result: dict[str, float | None] = {
        f"{t:.2f}": next((r["fit_time"] for r in validations if r["val_acc"] >= t), None) for t in THRESHOLDS
    }
    result["final_acc"] = validations[-1]["val_acc"]
    result["fit_time"] = validations[-1]["fit_time"]
    result["epochs"] = len(validations)
    return result


def bench_gpu(root: Path, out: Path, smoke: bool, runs: int) -> dict[str, float] | None:
    """e. On a CUDA GPU: configs/fast.yaml's test accuracy and training seconds over `runs` runs (seeds 0...),
    and one epoch of the tutorial recipe, cifar-cli (configs/gpu.yaml) against the tutorial's code."""
    if not torch.cuda.is_available():
        return None
    accs, seconds = [], []
    for seed in range(runs):
        folder = out / "fast" / str(seed)
        limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"] if smoke else []
        _, output = cifar_cli(["fit", *data_args(root, 5000, 5000), "--config", str(CONFIGS / "fast.yaml"),
                               "--seed_everything", str(seed), *limits, "--trainer.logger", "CSVLogger",
                               "--trainer.logger.save_dir", "logs", "--trainer.enable_progress_bar", "false"],
                              folder)  # fmt: skip
        seconds.append([r for r in metrics(folder / "logs") if "fit_time" in r][-1]["fit_time"])
        cifar_cli(["test", "--config", str(CONFIGS / "fast.yaml"), "--ckpt_path", best_checkpoint(output),
                   "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "test"], folder)  # fmt: skip
        accs.append(metrics(folder / "test")[-1]["test_acc"])
    # One epoch of the tutorial recipe with its validation: cifar-cli's fit_time against the tutorial's fit.
    epoch_args = ["--trainer.max_epochs", "1"] + (["--trainer.limit_train_batches", "2"] if smoke else [])
    cifar_cli(["fit", "--config", str(CONFIGS / "gpu.yaml"), *data_args(root, 5000, 5000), *epoch_args,
               "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs"], out / "gpu-recipe")  # fmt: skip
    ours = [r for r in metrics(out / "gpu-recipe" / "logs") if "fit_time" in r][-1]["fit_time"]
    arrays = out / "tutorial" / "arrays.pt"
    done = subprocess.run(
        [sys.executable, "-m", "bench.tutorial", str(arrays), "1", "5000", *(["2"] if smoke else [])],
        cwd=arrays.parent, check=True, capture_output=True, text=True, env=bench_env(),
    )  # fmt: skip
    tutorial = json.loads(done.stdout.strip().splitlines()[-1])["fit_seconds"]
    return {
        "acc_mean": sum(accs) / len(accs),
        "acc_min": min(accs),
        "seconds_mean": sum(seconds) / len(seconds),
        "runs": len(accs),
        "ours_epoch": ours,
        "tutorial_epoch": tutorial,
    }


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


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def table(results: dict, title: str) -> Table:
    grid = Table(title=title, title_justify="left")
    for column in ("benchmark", "baseline", "cifar-cli", "ratio", "target"):
        grid.add_column(column)
    a = results["pipeline"]
    grid.add_row("a. data pipeline, batch 32 (images/s)", f"{a['tutorial']:,.0f} (tutorial)", f"{a['ours']:,.0f}",
                 f"{a['ours'] / a['tutorial']:.0f}x", ">= 50x")  # fmt: skip
    grid.add_row("   batch 512, random crop + flip (images/s)", "", f"{a['ours_fast']:,.0f}", "", "")
    b = results["overhead"]
    grid.add_row(f"b. Lightning overhead, {b['steps']} steps (s, median of {len(b['plain_runs'])})",
                 f"{b['plain']:.2f} (plain loop)",
                 f"{b['cifar_cli']:.2f}", f"{b['cifar_cli'] / b['plain']:.3f}", "<= 1.05")  # fmt: skip
    c = results["recipe"]
    grid.add_row("c. tutorial recipe, fit (s)", f"{c['tutorial_fit']:.0f} (tutorial code)",
                 f"{c['ours_fit']:.0f}", f"{c['ours_fit'] / c['tutorial_fit']:.2f}", "<= 0.45")  # fmt: skip
    grid.add_row("   test accuracy", f"{c['tutorial_acc']:.4f}", f"{c['ours_acc']:.4f}",
                 f"{c['ours_acc'] - c['tutorial_acc']:+.4f}", ">= +0")  # fmt: skip
    d = results["fast_cpu"]
    targets = {"0.85": "", "0.90": "<= 600 s", "0.93": "<= 1800 s"}
    for threshold, target in targets.items():
        grid.add_row(f"d. fast-cpu.yaml, fit until val_acc >= {threshold}", "", seconds(d[threshold]), "", target)
    grid.add_row(f"   after {d['epochs']} epochs", "", f"val_acc {d['final_acc']:.4f} in {d['fit_time']:.0f} s", "", "")
    e = results.get("gpu")
    if e is None:
        grid.add_row("e. GPU", "", "skipped: no CUDA GPU", "", "")
    else:
        grid.add_row(f"e. fast.yaml, mean of {e['runs']} runs", "", f"test_acc {e['acc_mean']:.4f} "
                     f"(min {e['acc_min']:.4f}) in {e['seconds_mean']:.1f} s", "", ">= 0.94 in <= 5 s")  # fmt: skip
        grid.add_row("   tutorial recipe, one epoch (s)", f"{e['tutorial_epoch']:.1f} (tutorial code)",
                     f"{e['ours_epoch']:.1f}", f"{e['ours_epoch'] / e['tutorial_epoch']:.2f}", "")  # fmt: skip
    return grid


def run(
    root: str = "data/cifar10-jpg",
    out: str = "runs/bench",
    val_size: int = 5000,
    test_size: int = 5000,
    gpu_runs: int = 5,
    smoke: bool = False,
) -> dict:
    """Run every benchmark and print one table.

    Args:
        root: Image folder with `train/<class>/` (`make data` unpacks the CIFAR-10 JPEGs there).
        out: Folder for the runs' files; the results go to `results.json` and `results.txt` there.
        val_size: Validation images held out of the training images.
        test_size: Test images held out for part c.
        gpu_runs: Runs of configs/fast.yaml to average on a GPU.
        smoke: A few steps of everything, to check that the benchmarks run.
    """
    root_path, out_path = Path(root).resolve(), Path(out).resolve()
    if not (root_path / "train").is_dir():
        raise SystemExit(f"bench: {root_path} has no train/ folder: run `make data` or pass --root")
    out_path.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    data = ImageFolderDataModule(str(root_path), val_size=val_size, test_size=test_size)
    data.prepare_data()  # builds the decoded cache once, before anything is timed
    data.setup("fit")
    title = f"cifar-cli benchmarks: {machine()}"
    results: dict = {"machine": title}
    steps = [
        ("pipeline", "a. data pipeline", lambda: bench_pipeline(data, smoke)),
        ("overhead", "b. Lightning overhead", lambda: bench_overhead(data, root_path, out_path, smoke)),
        ("recipe", "c. tutorial recipe", lambda: bench_tutorial_recipe(data, root_path, out_path, smoke)),
        ("fast_cpu", "d. fast-cpu.yaml", lambda: bench_fast_cpu(root_path, out_path, smoke, val_size)),
        ("gpu", "e. GPU", lambda: bench_gpu(root_path, out_path, smoke, 1 if smoke else gpu_runs)),
    ]
    for key, name, step in steps:
        console.print(f"[bold]{name}[/bold] ...")
        start = time.perf_counter()
        results[key] = step()
        console.print(f"  {json.dumps(results[key])} ({time.perf_counter() - start:.0f} s)")
    grid = table(results, title)
    console.print(grid)
    (out_path / "results.json").write_text(json.dumps(results, indent=2))
    with open(os.devnull, "w") as devnull:
        recorder = Console(record=True, width=150, file=devnull)
        recorder.print(grid)
    (out_path / "results.txt").write_text(recorder.export_text())
    return results


if __name__ == "__main__":
    auto_cli(run)
