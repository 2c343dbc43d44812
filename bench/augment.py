"""Milliseconds per training batch of the batched augmentations, on this machine's CPU (or `--device cuda`).

    python -m bench.augment [--batch 64] [--device cpu] [--repeats 20] [--threads N]

Times the full PhotoAugment pipeline (random-resized crop and flip, colour jitter with hue, random erasing,
MixUp and CutMix) at 224 and 128 px, and its parts at 224 px, against the CIFAR crop and flip
(`--data.augment true`) at 32 px. Not part of `make bench`: a measurement for the README.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from jsonargparse.typing import PositiveInt

from bench.common import command
from cifar_cli.data import PhotoAugment, random_crop_flip
from cifar_cli.errors import UsageError

FULL = PhotoAugment(hue=0.1, erasing=0.25, mixup=0.8, cutmix=1.0)


def ms_per_batch(fn: Callable[[torch.Generator], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Fastest wall time and median CPU time (all of this process's threads) of `fn` over `repeats` calls, after 3
    warm-up calls, in ms. On a shared machine other processes stretch the wall time, and with more than one thread
    also the CPU time (idle OpenMP threads spin); `--threads 1` gives the steadiest CPU time."""
    generator = torch.Generator(device=device)
    wall, cpu = [], []
    for i in range(repeats + 3):
        generator.manual_seed(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter(), time.process_time()
        fn(generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start[0])
        cpu.append(time.process_time() - start[1])
    return 1000 * min(wall[3:]), 1000 * sorted(cpu[3:])[repeats // 2]


def device_type(text: str) -> torch.device:
    """A torch device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: {text} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: this machine has no CUDA GPU that PyTorch can use")
    return device


def main(
    batch: PositiveInt = 64, device: str = "cpu", repeats: PositiveInt = 20, threads: PositiveInt | None = None
) -> None:
    """Milliseconds per training batch of the batched augmentations, on this machine's CPU (or `--device cuda`).

    Args:
        batch: images per batch.
        device: the torch device that runs them (cpu, cuda, cuda:1, ...).
        repeats: timed calls of each, after 3 warm-up calls.
        threads: torch's CPU threads (default: torch's own count).
    """
    device = device_type(device)
    if threads is not None:
        torch.set_num_threads(threads)
    n = batch
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {device}, batch {n}: ms per batch, fastest wall (median CPU)")
    labels = torch.randint(0, 1000, (n,), device=device)

    def images(size: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)

    cifar, x224, x128 = images(32), images(224), images(128)
    floats = x224.float()
    rows = {
        "CIFAR crop+flip, 32 px": lambda g: random_crop_flip(cifar, 4, generator=g),
        "PhotoAugment full, 224 px": lambda g: FULL(x224, labels, g, 1000),
        "PhotoAugment full, 128 px": lambda g: FULL(x128, labels, g, 1000),
        "224 px, crop+flip (grid_sample)": lambda g: FULL.crop_flip(x224, g),
        "224 px, colour jitter (b, c, s, hue)": lambda g: FULL.jitter(floats, g),
        "224 px, erasing (p=0.25)": lambda g: FULL.erase(floats, g),
        "224 px, MixUp/CutMix": lambda g: FULL.mix(floats, labels, g, 1000),
        "224 px, default PhotoAugment()": lambda g: PhotoAugment()(x224, labels, g, 1000),
    }
    for name, fn in rows.items():
        wall, cpu = ms_per_batch(fn, device, repeats)
        print(f"  {name + ':':38s}{wall:8.1f} ({cpu:.1f})")


if __name__ == "__main__":
    command(main, "bench.augment")
