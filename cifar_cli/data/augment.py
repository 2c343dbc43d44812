"""Augmentation of a whole batch at once, on the device the batch is on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(images: Tensor, padding: int) -> Tensor:
    """Crop each image of a batch at its own random offset from a reflect-padded copy.

    Written by hand because torchvision's transforms draw one crop per call: per-sample crops would need a Python
    loop over the batch.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: Tensor) -> Tensor:
    """Mirror a random half of the batch left to right."""
    flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)
