"""Where the uint8 splits live while training (`--data.placement`), and `auto`'s choice from the free memory.

- `device`: moved to the training device once; a batch is one gather there.
- `host`: in host memory; each batch is gathered there and copied to the device one batch ahead.
- `disk`: in a `.npy` file (`DiskImages`); each batch reads its rows, so host memory stays bounded.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Placement = Literal["auto", "device", "host", "disk"]
# `auto` keeps the splits where they take at most this fraction of the free memory: the rest is left to the
# network, its activations and optimizer state, and the machine's other processes.
FREE_FRACTION = 0.5


def available_host_memory() -> int:
    """Bytes of host memory that new allocations can take without swapping: Linux's MemAvailable (which counts the
    page cache it can drop), capped by this process's cgroup limit (a container's, a SLURM job's)."""
    available = None
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:  # not Linux
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                available = min(available, int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def free_device_memory(device: torch.device) -> int:
    """Bytes free on the training device: the GPU's own memory, or the host's for any other device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_placement(requested: str, nbytes: int, device: torch.device, processes: int = 1) -> tuple[str, str | None]:
    """The placement of `nbytes` of splits for training on `device`, and for `auto` the line that says why.

    `auto` picks the device when the splits fit in FREE_FRACTION of its free memory, else host memory when they fit
    in that fraction of it, else disk. Each of the `processes` (DDP ranks) on this machine holds its own copy, in
    the host's memory unless the device is a GPU.
    """
    if requested != "auto":
        return requested, None
    on_host = nbytes * processes
    need = nbytes if device.type == "cuda" else on_host
    free = free_device_memory(device)
    if need <= FREE_FRACTION * free:
        choice, where = "device", f"free on {device}"
    else:
        need, free, where = on_host, available_host_memory(), "of host memory free"
        choice = "host" if need <= FREE_FRACTION * free else "disk"
    return choice, f"data placement auto -> {choice} ({gigabytes(need)} of splits, {gigabytes(free)} {where})"


def keep_on_disk(requested: str, nbytes: int, processes: int = 1) -> tuple[bool, int]:
    """Whether `nbytes` of decoded images outside the splits (a predict folder) are kept on disk: with `disk`, and
    with `auto` where the `processes` (DDP ranks) on this machine, a copy each, would take more than FREE_FRACTION
    of the free host memory; and, for `auto`, that free memory (else 0). `device` and `host` keep them in memory,
    as asked."""
    if requested != "auto":
        return requested == "disk", 0
    free = available_host_memory()
    return nbytes * processes > FREE_FRACTION * free, free
