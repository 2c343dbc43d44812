"""Parts f and g of `make bench`: data at scale.

f. decoding: images/s turning a folder of 20,000 JPEGs of 256 px into the 224 px `.npy` cache, with one process
   against one per core (and, before that, one process at torch's default thread count, as decoding was);
g. placement: training images/s (of a network with almost no compute: the data path's) and the process's peak RSS
   with the splits on the device, in host memory and on disk (page cache warm, then dropped), each `cifar-cli fit`
   in a fresh process, at 128 px;
h. predict: `cifar-cli predict` on a folder of 10,000 of those photos at 224 px, decoded into memory and onto disk
   (then again, reading the file the first run wrote): seconds and peak RSS of each process.

All read a folder of the CIFAR-10 JPEGs upscaled to 256 px, made once from `--root` under `data/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchvision.io import encode_jpeg

from bench.common import CONFIGS, cifar_cli_peak_rss, csv_logger
from cifar_cli.data import ImageFolderDataModule, list_images
from cifar_cli.data.images import _decode_chunk, decode_images_to_npy, decode_square, usable_cpus

PLACEMENTS = ("device", "host", "disk", "disk_cold")
# Part g's network: one 1x1 convolution, so that images/s measures the data path (and Lightning's loop), which is
# what the placements change. TutorialCNN took 1.5 s a step at 128 px and batch 64 here (2-core CPU, fp32): 300
# steps would take 8 minutes a placement, and its compute would hide the data path.
NET = "bench.steps.OneConv"


class DropPageCache(Callback):
    """Drops a file's pages from the kernel's page cache when training starts (after setup has read it for the
    statistics), so that every batch reads the disk, as with data larger than memory. Clean pages go without root.

    Args:
        path: The file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _upscale(tasks: list[tuple[Path, Path]], size: int) -> None:
    torch.set_num_threads(1)
    for source, target in tasks:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_jpeg(decode_square(source, size), quality=90).numpy().tobytes())


def upscaled_folder(root: Path, folder: Path, size: int, limit: int | None) -> Path:
    """`folder/train/<class>/*.jpg`: root's training images (`limit` of them, spread over the classes) resized to
    `size` px and saved as JPEG at quality 90, made once (a `.complete` file marks a finished folder): photos of a
    few hundred pixels."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    sources = list_images(root / "train")
    sources = sources[:: max(len(sources) // limit, 1)][:limit] if limit else sources
    tasks = [(path, folder / path.relative_to(root)) for path in sources]
    print(f"bench: making {len(tasks)} {size} px JPEGs in {folder} (once)", flush=True)
    chunks = [tasks[i : i + 500] for i in range(0, len(tasks), 500)]
    with ProcessPoolExecutor(usable_cpus()) as pool:
        list(pool.map(_upscale, chunks, [size] * len(chunks)))
    done.write_text(f"{len(tasks)}\n")
    return folder


def bench_decode(folder: Path, out: Path, smoke: bool) -> dict:
    """f. Images/s decoding `folder`'s first 20,000 images into a 224 px `.npy` file (written, then removed)."""
    paths = list_images(folder / "train")[: 24 if smoke else 20_000]
    size = 48 if smoke else 224
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"images": len(paths), "size": size, "cores": usable_cpus()}
    for name, workers in (("one_process", 1), ("all_cores", usable_cpus())):
        target = out / f"{name}.npy"
        start = time.perf_counter()
        decode_images_to_npy(paths, size, target, workers=workers)
        result[name] = len(paths) / (time.perf_counter() - start)
        result["npy_bytes"] = target.stat().st_size
        target.unlink()
    # As decoding was before: one process at torch's default thread count, on a tenth of the images.
    sample = paths[: max(len(paths) // 10, 1)]
    start = time.perf_counter()
    _decode_chunk(sample, size, None, 0)
    result["default_threads"] = len(sample) / (time.perf_counter() - start)
    result["default_threads_count"] = torch.get_num_threads()
    return result


def bench_placement(folder: Path, out: Path, smoke: bool) -> dict:
    """g. `cifar-cli fit` steps (NET, batch 64, fp32) at 128 px with each placement, each in a fresh process:
    training images/s over the timed steps, and the process's peak RSS."""
    size, val_size = (32, 8) if smoke else (128, 5000)
    warmup, steps, batch_size = (1, 1, 8) if smoke else (10, 200, 64)
    data = ImageFolderDataModule(str(folder), image_size=size, val_size=val_size)
    data.prepare_data()  # builds the cache once, untimed
    cache = data._listings()["train"].cache
    result: dict = {"image_size": size, "steps": steps, "batch_size": batch_size, "cache_bytes": cache.stat().st_size}
    for placement in PLACEMENTS:
        clock = out / f"{placement}.json"
        cold = ["--trainer.callbacks+=bench.scale.DropPageCache", "--trainer.callbacks.path", str(cache)]
        args = ["fit", "--config", str(CONFIGS / "cpu.yaml"), "--config", str(CONFIGS / "cifar10-jpg.yaml"),
                "--data.root", str(folder), "--data.image_size", str(size), "--data.val_size", str(val_size),
                "--data.test_size", "0", "--data.placement", placement.removesuffix("_cold"),
                "--model.net", NET, "--data.batch_size", str(batch_size), "--trainer.precision", "32-true",
                "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", str(warmup + steps), "--trainer.limit_val_batches", "2",
                "--trainer.callbacks+=bench.steps.StepClock", "--trainer.callbacks.path", str(clock),
                "--trainer.callbacks.warmup", str(warmup), *csv_logger("logs"),
                *(cold if placement == "disk_cold" else [])]  # fmt: skip
        _, _, peak = cifar_cli_peak_rss(args, out / placement, in_process=smoke)
        timed = json.loads(clock.read_text())
        result[placement] = {"images_per_s": timed["steps"] * batch_size / timed["seconds"], "peak_rss": peak}
    return result


def linked_folder(sources: list[Path], folder: Path) -> Path:
    """`folder/<class>/` of links to `sources` (listing follows links to files), made once, each source's class
    being its parent folder's name."""
    done = folder / ".complete"
    if not done.is_file():
        for source in sources:
            target = folder / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(source.resolve())
        done.write_text(f"{len(sources)}\n")
    return folder


def bench_predict(folder: Path, out: Path, smoke: bool) -> dict:
    """h. `cifar-cli predict --data.predict_root` over 10,000 of `folder`'s photos at 224 px with `--data.placement
    host` (decoded into memory) and `disk` (into a `.npy` file in the cache, then read by batches), the disk run
    twice: the second reads the file the first wrote. Each in a fresh process: seconds and peak RSS."""
    size, count, per_class = (32, 24, 8) if smoke else (224, 10_000, 20)
    photos = list_images(folder / "train")
    predict_root = linked_folder(photos[:: max(len(photos) // count, 1)][:count], out / "photos")
    by_class: dict[str, list[Path]] = {}
    for path in photos:
        by_class.setdefault(path.parent.name, []).append(path)
    train = linked_folder([p for paths in by_class.values() for p in paths[:per_class]], out / "train" / "train")
    # A checkpoint at `size`: one step of NET, so that predicting measures the data path.
    shutil.rmtree(out / "fit", ignore_errors=True)
    fit = ["fit", "--config", str(CONFIGS / "cpu.yaml"), "--config", str(CONFIGS / "cifar10-jpg.yaml"),
           "--data.root", str(train.parent), "--data.image_size", str(size), "--data.val_size", "4",
           "--data.test_size", "0", "--model.net", NET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
           *csv_logger("logs")]  # fmt: skip
    cifar_cli_peak_rss(fit, out / "fit", in_process=smoke)
    (checkpoint,) = (out / "fit").glob("**/checkpoints/last.ckpt")
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    result: dict = {"images": len(list_images(predict_root)), "image_size": size}
    result["decoded_bytes"] = result["images"] * 3 * size * size
    for run, placement in (("memory", "host"), ("disk", "disk"), ("disk_again", "disk")):
        args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_root", str(predict_root),
                "--data.placement", placement, "--data.cache_dir", str(cache), *csv_logger("logs")]  # fmt: skip
        seconds, _, peak = cifar_cli_peak_rss(args, out / run, in_process=smoke)
        result[run] = {"seconds": seconds, "peak_rss": peak}
    return result
