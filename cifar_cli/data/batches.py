"""A split as uint8 tensors on one device, and its batches cut there by index: the DataLoader's stand-in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


class TensorImageDataset(Dataset):
    """Images `(N, C, H, W)` uint8 with labels `(N,)` int64 (-1 where unknown), indexed a whole batch at once."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> TensorImageDataset:
        return TensorImageDataset(self.images.to(device), self.labels.to(device))


class DeviceBatches:
    """The batches of one split, cut by index from its tensors on the device they live on; a DataLoader's stand-in.

    Written by hand because a DataLoader collates every batch on the host: here a batch is one gather on the
    training device. The order comes from torch's DistributedSampler: a permutation seeded by `seed + epoch`, the
    same on every rank, of which each of the `num_replicas` ranks takes its own shard. Lightning calls
    `sampler.set_epoch` before every training epoch, so a resumed run sees the same order as an uninterrupted one.

    Args:
        data: The split, on the device the batches are wanted on.
        batch_size: Images per batch.
        shuffle: Draw a new order every epoch; otherwise the split's order.
        drop_last: Leave out the last batch when it is short (training: every step sees `batch_size` images),
            unless it is the only one.
        num_replicas: Number of DDP ranks sharing the split.
        rank: This process's rank.
        seed: Seed of the shuffled order.
        with_index: Yield `(images, labels, index)`, the index of each image in the split, instead of
            `(images, labels)`.
    """

    def __init__(
        self,
        data: TensorImageDataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        with_index: bool = False,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.with_index = with_index
        # Under DDP without shuffling the sampler repeats a few images to give every rank as many batches.
        self.sampler = DistributedSampler(data, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_sampler = None  # Lightning inspects `sampler` and `batch_sampler` as on a DataLoader

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last and n >= self.batch_size else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.data.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            # index_select, not images[index]: 14x faster for a batch of 32 on a CPU (5 us against 70 us).
            images, labels = self.data.images.index_select(0, index), self.data.labels.index_select(0, index)
            yield (images, labels, index) if self.with_index else (images, labels)



def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Cut `range(n)` into a seeded random partition: one index tensor per size, then one for the rest.

    The generator is seeded on its own, not from the global seed, so every run and every DDP rank draws the same
    split and no validation image is ever trained on.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size].sort().values)
        start += size
    parts.append(order[start:].sort().values)
    return parts
