"""`make bench`: cifar-cli against the W&B tutorial and a plain PyTorch loop, side by side, in one table.

a. data pipeline: images/s of the tutorial's per-sample pipeline against cifar-cli's batches on the device;
b. host overhead per step (a network with almost no compute, batch 8) and the default recipe's training steps,
   each as a plain loop against `cifar-cli fit`;
c. the tutorial's recipe end to end: its code as written against `cifar-cli fit --config configs/cpu.yaml`;
d. time to accuracy of configs/fast-cpu.yaml (45,000/5,000 split of the JPEG training images);
e. transfer with `--model.init_from`: five classes pretrained, the other five fine-tuned from few images, against
   the same fine-tuning from scratch (bench/transfer.py);
f. decoding a folder of 20,000 photos (CIFAR-10 upscaled to 256 px) at 224 px: one process against one per core;
g. training at 128 px with the splits on the device, in host memory or on disk: images/s and peak RSS;
h. `cifar-cli predict` on a folder of 10,000 of those photos at 224 px, decoded into memory and onto disk: seconds
   and peak RSS (f to h: bench/scale.py).

The GPU check is `make bench-gpu` (bench/gpu.py). Every cifar-cli run is the real command in its own process,
started from a scratch folder under `runs/bench/` (`runs/bench-smoke/` with `--smoke`). `--smoke` shrinks every
part to a few steps and runs cifar-cli and the tutorial's code in this process, for the test suite.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from jsonargparse.typing import PositiveInt
from rich.table import Table

from bench.common import (
    CONFIGS,
    SMOKE_LIMITS,
    best_checkpoint,
    check_output_folder,
    cifar_cli,
    command,
    csv_logger,
    data_args,
    machine,
    metrics,
    run_process,
    run_steps,
    tutorial,
    tutorial_arrays,
)
from bench.scale import bench_decode, bench_placement, bench_predict, upscaled_folder
from bench.steps import endless
from bench.steps import main as steps_main
from bench.transfer import bench_transfer
from cifar_cli.data import DeviceBatches, ImageFolderDataModule
from cifar_cli.errors import UsageError

THRESHOLDS = (0.85, 0.90, 0.93)
PARTS = ("pipeline", "host", "overhead", "recipe", "fast_cpu", "transfer", "decode", "placement", "predict")


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
    per_sample = DataLoader(tutorial_set, batch_size=32, shuffle=True)
    batches = 5 if smoke else 1000  # about 1 s of the tutorial's pipeline; ours runs 10x as many
    ours = endless(DeviceBatches(train, 32, shuffle=True, drop_last=True))
    # The fast recipe's batches: random crop and flip (on the uint8 batch, seeded), then the normalisation.
    augmented = endless(DeviceBatches(train, 512, shuffle=True, drop_last=True, augment=data.augment_batch))
    fast = images_per_second(augmented, data.preprocess, batches)
    return {
        "tutorial": images_per_second(per_sample, lambda x: x, batches),
        "ours": images_per_second(ours, data.preprocess, 10 * batches),
        "ours_fast": fast,
    }


def plain_against_cli(data: ImageFolderDataModule, root: Path, out: Path, net: str, batch_size: int,
                      counts: tuple[int, int, int], smoke: bool, lightning: bool = False) -> dict:  # fmt: skip
    """The same training steps (the net named by class path, Adam, fp32, the same batches) as a plain PyTorch loop
    and as `cifar-cli fit --config configs/cpu.yaml` (and, with `lightning`, as Lightning's bare loop), each in a
    process of its own: seconds for `steps` steps after `warmup`, each side run `repeats` times, alternating.

    Identical runs differ by up to 10% on a shared 2-core machine, so the medians are compared.
    """
    warmup, steps, repeats = (1, 1, 1) if smoke else counts
    loops = ["plain", "lightning"] if lightning else ["plain"]
    runs: dict[str, list[float]] = {name: [] for name in [*loops, "cifar_cli"]}
    for repeat in range(repeats):
        for loop in loops:
            args = [loop, str(root), data.val_size, data.test_size, net, batch_size, warmup, steps]
            runs[loop].append(timed_steps(args, smoke)["seconds"])
        clock = out / "overhead" / f"{net.rsplit('.', 1)[1]}-{repeat}.json"
        cifar_cli(["fit", "--config", str(CONFIGS / "cpu.yaml"), *data_args(root, data.val_size, data.test_size),
                   "--model.net", net, "--data.batch_size", str(batch_size), "--trainer.precision", "32-true",
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(warmup + steps),
                   "--trainer.limit_val_batches", "2",
                   "--trainer.callbacks+=bench.steps.StepClock", "--trainer.callbacks.path", str(clock),
                   "--trainer.callbacks.warmup", str(warmup)], out / "overhead", in_process=smoke)  # fmt: skip
        timed = json.loads(clock.read_text())
        assert timed["steps"] == steps, timed
        runs["cifar_cli"].append(timed["seconds"])
    result: dict = {"steps": steps, **{name: statistics.median(values) for name, values in runs.items()}}
    result.update({f"{name}_runs": values for name, values in runs.items()})
    return result


def timed_steps(args: list, smoke: bool) -> dict:
    """bench/steps.py's loop with `args`: in its own process, or in this one for a smoke run."""
    if smoke:
        loop, root, val_size, test_size, net, batch_size, warmup, steps = args
        return steps_main(loop, root, val_size, test_size, net, batch_size, warmup, steps)
    done = run_process([sys.executable, "-m", "bench.steps", *map(str, args)])
    if done.returncode:
        raise SystemExit(f"bench.steps {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_host(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool) -> dict[str, float]:
    """b. Host overhead per step: OneConv at batch 8, 2,000 steps; cifar-cli's time per step minus the loop's, and
    Lightning's own loop (BareModule) between the two."""
    result = plain_against_cli(data, root, out, "bench.steps.OneConv", 8, (200, 2000, 5), smoke, lightning=True)
    result["overhead_ms"] = 1000 * (result["cifar_cli"] - result["plain"]) / result["steps"]
    result["lightning_ms"] = 1000 * (result["lightning"] - result["plain"]) / result["steps"]
    return result


def bench_overhead(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool) -> dict[str, float]:
    """b. The default recipe's training steps (TutorialCNN, batch 32): plain loop against cifar-cli."""
    return plain_against_cli(data, root, out, "cifar_cli.nets.TutorialCNN", 32, (50, 600, 3), smoke)


def bench_tutorial_recipe(data: ImageFolderDataModule, root: Path, out: Path, smoke: bool) -> dict[str, float]:
    """c. The tutorial's code as written (2 epochs, batch 32, fit then test in one process) against `cifar-cli fit
    --config configs/cpu.yaml` then `cifar-cli test`, whole processes on both sides.

    Both train on the same images (the tutorial splits cifar-cli's train + val split its own way) and are tested
    on the same held-out test split.
    """
    arrays = tutorial_arrays(data, out / "tutorial" / "arrays.pt")
    epochs = "1" if smoke else "2"
    tutorial_wall, theirs = tutorial(arrays, int(epochs), data.val_size, 2 if smoke else None, in_process=smoke)
    limits = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"] if smoke else []
    fit_args = ["fit", "--config", str(CONFIGS / "cpu.yaml"), *data_args(root, data.val_size, data.test_size),
                "--trainer.max_epochs", epochs, *limits]  # fmt: skip
    fit_seconds, output = cifar_cli(fit_args, out / "recipe", in_process=smoke)
    test_args = ["test", "--config", str(CONFIGS / "cpu.yaml"), "--ckpt_path", best_checkpoint(output),
                 "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "test"]  # fmt: skip
    test_seconds, _ = cifar_cli(test_args, out / "recipe", in_process=smoke)
    ours = metrics(out / "recipe" / "test")[-1]
    return {
        "tutorial_fit": theirs["fit_seconds"],
        "tutorial_wall": tutorial_wall,
        "tutorial_acc": theirs["test_acc"],
        "ours_fit": fit_seconds,
        "ours_test": test_seconds,
        "ours_acc": ours["test_acc"],
    }


def bench_fast_cpu(root: Path, out: Path, smoke: bool, val_size: int) -> dict[str, float | None]:
    """d. configs/fast-cpu.yaml on the 45,000/5,000 split: fit seconds until val_acc first reaches each threshold."""
    limits = SMOKE_LIMITS if smoke else []
    folder = out / "fast-cpu"
    cifar_cli(["fit", *data_args(root, val_size, 0), "--config", str(CONFIGS / "fast-cpu.yaml"), *limits,
               *csv_logger("logs")], folder, in_process=smoke)  # fmt: skip
    validations = [row for row in metrics(folder / "logs") if "val_acc" in row and "fit_time" in row]
    result: dict[str, float | None] = {
        f"{t:.2f}": next((r["fit_time"] for r in validations if r["val_acc"] >= t), None) for t in THRESHOLDS
    }
    result["final_acc"] = validations[-1]["val_acc"]
    result["fit_time"] = validations[-1]["fit_time"]
    result["epochs"] = len(validations)
    return result


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def table(results: dict, title: str) -> Table:
    grid = Table(title=title, title_justify="left")
    for column in ("benchmark", "baseline", "cifar-cli", "ratio", "target"):
        grid.add_column(column)
    if a := results.get("pipeline"):
        grid.add_row("a. data pipeline, batch 32 (images/s)", f"{a['tutorial']:,.0f} (tutorial)",
                     f"{a['ours']:,.0f}", f"{a['ours'] / a['tutorial']:.0f}x", ">= 50x")  # fmt: skip
        grid.add_row("   batch 512, random crop + flip (images/s)", "", f"{a['ours_fast']:,.0f}", "", "")
    if h := results.get("host"):
        grid.add_row(f"b. host time per step, OneConv batch 8 (ms, median of {len(h['plain_runs'])})",
                     f"{1000 * h['plain'] / h['steps']:.3f} (plain loop)",
                     f"{1000 * h['cifar_cli'] / h['steps']:.3f}", f"{h['overhead_ms']:+.3f} ms",
                     "<= +0.3 ms")  # fmt: skip
        grid.add_row("   Lightning's loop alone (no logger, callbacks, bar)",
                     f"{1000 * h['lightning'] / h['steps']:.3f}", "", f"{h['lightning_ms']:+.3f} ms", "")  # fmt: skip
    if b := results.get("overhead"):
        grid.add_row(f"b. Lightning overhead, {b['steps']} steps (s, median of {len(b['plain_runs'])})",
                     f"{b['plain']:.2f} (plain loop)",
                     f"{b['cifar_cli']:.2f}", f"{b['cifar_cli'] / b['plain']:.3f}", "<= 1.05")  # fmt: skip
    if c := results.get("recipe"):
        ours = c["ours_fit"] + c["ours_test"]
        grid.add_row("c. tutorial recipe, fit + test, whole processes (s)", f"{c['tutorial_wall']:.0f} (tutorial code)",
                     f"{ours:.0f}", f"{ours / c['tutorial_wall']:.2f}", "<= 0.5")  # fmt: skip
        grid.add_row("   test accuracy", f"{c['tutorial_acc']:.4f}", f"{c['ours_acc']:.4f}",
                     f"{c['ours_acc'] - c['tutorial_acc']:+.4f}", ">= +0")  # fmt: skip
    if d := results.get("fast_cpu"):
        targets = {"0.85": "", "0.90": "<= 600 s", "0.93": "<= 1800 s"}
        for threshold, target in targets.items():
            grid.add_row(f"d. fast-cpu.yaml, fit until val_acc >= {threshold}", "", seconds(d[threshold]), "", target)
        grid.add_row(f"   after {d['epochs']} epochs", "", f"val_acc {d['final_acc']:.4f} in {d['fit_time']:.0f} s",
                     "", "")  # fmt: skip
    if e := results.get("transfer"):
        grid.add_row(f"e. transfer: pretrained on half the classes ({e['pretrain_epochs']} epochs, val_acc)", "",
                     f"{e['pretrain_val_acc']:.4f}", "", "")  # fmt: skip
        for key in sorted((k for k in e if k.startswith("scratch_")), key=lambda k: int(k.split("_")[1])):
            n = key.split("_")[1]
            scratch, tuned = e[key], e[f"pretrained_{n}"]
            grid.add_row(f"   fine-tuned on the others, {n} images/class (test_acc)", f"{scratch:.4f} (scratch)",
                         f"{tuned:.4f}", f"{tuned - scratch:+.4f}", "> 0")  # fmt: skip
    if f := results.get("decode"):
        grid.add_row(f"f. decode {f['images']:,} JPEGs of 256 px at {f['size']} px (images/s)",
                     f"{f['one_process']:,.0f} (1 process)", f"{f['all_cores']:,.0f} ({f['cores']} processes)",
                     f"{f['all_cores'] / f['one_process']:.2f}x", "")  # fmt: skip
        grid.add_row(f"   before: 1 process, {f['default_threads_count']} torch threads", "",
                     f"{f['default_threads']:,.0f}", "", "")  # fmt: skip
    if g := results.get("placement"):
        cache = g["cache_bytes"]
        device = g["device"]["images_per_s"]
        for name in ("device", "host", "disk", "disk_cold"):
            row = g[name]
            label = {"disk_cold": "disk, page cache dropped"}.get(name, name)
            grid.add_row(f"g. placement {label}, {g['image_size']} px (images/s; peak RSS)" if name == "device"
                         else f"   placement {label}", "",
                         f"{row['images_per_s']:,.0f}; {row['peak_rss'] / 1e9:.2f} GB",
                         f"{row['images_per_s'] / device:.2f}x",
                         f"RSS << {cache / 1e9:.2f} GB cache" if name.startswith("disk") else "")  # fmt: skip
    if h := results.get("predict"):
        decoded = h["decoded_bytes"]
        for name, label in (("memory", "in memory"), ("disk", "on disk, decoding"), ("disk_again", "on disk again")):
            row = h[name]
            grid.add_row(f"h. predict {h['images']:,} photos at {h['image_size']} px, {label} (s; peak RSS)"
                         if name == "memory" else f"   predict {label}", "",
                         f"{row['seconds']:.1f} s; {row['peak_rss'] / 1e9:.2f} GB", "",
                         f"RSS < in memory ({decoded / 1e9:.2f} GB decoded)" if name != "memory" else "")  # fmt: skip
    return grid


def run(
    root: str = "data/cifar10-jpg",
    out: str | None = None,
    val_size: PositiveInt = 5000,
    test_size: PositiveInt = 5000,
    smoke: bool = False,
    parts: list[str] | None = None,
    photos: str = "data/cifar10-jpg-256",
) -> dict:
    """Run every benchmark and print one table.

    Args:
        root: Image folder with `train/<class>/` (`make data` unpacks the CIFAR-10 JPEGs there).
        out: Folder for the runs' files; the results go to `results.json` and `results.txt` there. Default
            `runs/bench`, and `runs/bench-smoke` for a smoke run, which leaves a whole run's results and logs alone.
        val_size: Validation images held out of the training images.
        test_size: Test images held out for part c.
        smoke: A few steps of everything, to check that the benchmarks run.
        parts: Only these parts (pipeline, host, overhead, recipe, fast_cpu, transfer, decode, placement, predict); the
            table shows those measured, in `results-<parts>.json` and `.txt` (`results-host.json`), so that the
            results of a whole run stay beside them.
        photos: Folder of the CIFAR-10 JPEGs upscaled to 256 px that parts f, g and h read, made from `root` when
            missing (smoke runs make a small one under `out`).
    """
    if parts is not None and (not parts or set(parts) - set(PARTS)):
        # A misspelt part matched none and ran nothing: an empty table over the last run's results.txt.
        unknown = ", ".join(part for part in parts if part not in PARTS)
        raise UsageError(f"--parts: {f'no part {unknown}' if unknown else 'none given'}; "
                         f"choose from {', '.join(PARTS)}")  # fmt: skip
    root_path, out_path = Path(root).resolve(), Path(out or ("runs/bench-smoke" if smoke else "runs/bench")).resolve()
    if not (root_path / "train").is_dir():
        raise UsageError(f"{root_path} has no train/ folder: run `make data` or pass --root")
    check_output_folder(out_path, "--out")
    try:
        data = ImageFolderDataModule(str(root_path), val_size=val_size, test_size=test_size)
        data.prepare_data()  # builds the decoded cache once, before anything is timed
        data.setup("fit")
    except UsageError as error:  # the folder, or sizes it cannot hold: one line, with this command's flags
        raise UsageError(str(error).replace("--data.", "--")) from None
    out_path.mkdir(parents=True, exist_ok=True)
    title = f"cifar-cli benchmarks: {machine()}"
    results: dict = {"machine": title}
    steps = [
        ("pipeline", "a. data pipeline", lambda: bench_pipeline(data, smoke)),
        ("host", "b. host overhead per step", lambda: bench_host(data, root_path, out_path, smoke)),
        ("overhead", "b. Lightning overhead", lambda: bench_overhead(data, root_path, out_path, smoke)),
        ("recipe", "c. tutorial recipe", lambda: bench_tutorial_recipe(data, root_path, out_path, smoke)),
        ("fast_cpu", "d. fast-cpu.yaml", lambda: bench_fast_cpu(root_path, out_path, smoke, val_size)),
        ("transfer", "e. transfer", lambda: bench_transfer(root_path, out_path, smoke)),
        ("decode", "f. decoding", lambda: bench_decode(photos_folder(), out_path / "decode", smoke)),
        ("placement", "g. placement", lambda: bench_placement(photos_folder(), out_path / "placement", smoke)),
        ("predict", "h. predict folder", lambda: bench_predict(photos_folder(), out_path / "predict", smoke)),
    ]
    steps = [step for step in steps if parts is None or step[0] in parts]

    def photos_folder() -> Path:
        folder = out_path / "photos" if smoke else Path(photos).resolve()
        return upscaled_folder(root_path, folder, 64 if smoke else 256, 40 if smoke else None)

    chosen = [part for part in PARTS if parts is None or part in parts]
    stem = "results" if len(chosen) == len(PARTS) else "-".join(["results", *chosen])
    return run_steps(steps, results, out_path, lambda results: table(results, title), stem)


if __name__ == "__main__":
    command(run, "bench")
