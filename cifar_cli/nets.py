"""Networks: plain `nn.Module`s that map normalised images to logits. No Lightning here.

Every network takes `num_classes` and `image_shape` first; the CLI links both from the data module, so any
network here trains on any data module (`--model.net cifar_cli.nets.NAME`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from torch import Tensor, nn

from cifar_cli.errors import UsageValueError

# Patches whose second moments FastNet's whitening fit sums at once (one chunk of images): 400 MB of 2x2 patches.
WHITENING_PATCHES = 2**23


class TutorialCNN(nn.Module):
    """The W&B tutorial's CNN: conv 32, 32, max-pool, conv 64, 64, max-pool, then fully connected 512, 128, classes.

    The 3x3 convolutions are unpadded, as in the tutorial: each trims 2 pixels, so a 32x32 image reaches the first
    linear layer as 64 x 5 x 5. That size is computed here instead of by the tutorial's dummy forward pass.

    Args:
        num_classes: Number of output logits.
        image_shape: `(channels, height, width)` of the input images.
    """

    def __init__(self, num_classes: PositiveInt = 10, image_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.conv1 = nn.Conv2d(channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.conv3 = nn.Conv2d(32, 64, 3)
        self.conv4 = nn.Conv2d(64, 64, 3)
        self.pool = nn.MaxPool2d(2)
        feature_h, feature_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if feature_h < 1 or feature_w < 1:
            raise UsageValueError(f"TutorialCNN needs images of at least 16x16 pixels, got {height}x{width}")
        self.fc1 = nn.Linear(64 * feature_h * feature_w, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.pool(F.relu(self.conv4(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class ConvBlock(nn.Sequential):
    """3x3 convolution, 2x2 max-pool, BatchNorm, GELU, 3x3 convolution, BatchNorm, GELU: one stage of `FastNet`."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm_momentum: float) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels),
            nn.MaxPool2d(2),
            batch_norm(out_channels, batchnorm_momentum),
            nn.GELU(),
            conv3x3(out_channels, out_channels),
            batch_norm(out_channels, batchnorm_momentum),
            nn.GELU(),
        )


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding="same", bias=False)
    # Identity on the first in_channels filters: each block starts out passing its input through (airbench).
    nn.init.dirac_(conv.weight.data[: min(in_channels, out_channels)])
    return conv


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    # A learned shift only: the scale stays 1, and the next convolution's weights carry it. eps 1e-12 as in
    # airbench, where the batch variance never approaches 0.
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


class FastNet(nn.Module):
    """The CIFAR-10 speed-record network (airbench94, Keller Jordan 2024), with configurable widths.

    A frozen patch-whitening convolution (2x2 patches: its filters are the eigenvectors of the patches'
    covariance, scaled to unit variance, and their negatives), GELU, then one `ConvBlock` per width (each halves
    the resolution), a global max-pool and a bias-free linear layer. No residual connections. The logits are
    scaled down (`logit_scale`) so that the high learning rates of the fast recipe stay stable.

    The whitening filters come from the training images: the classifier calls `init_whitening` once before the
    first training step. Until then the layer holds random filters.

    Args:
        num_classes: Number of output logits.
        image_shape: `(channels, height, width)` of the input images.
        widths: Output channels of each block; airbench94 uses 64, 256, 256.
        whiten_kernel: Side of the whitening patches, in pixels.
        batchnorm_momentum: Weight of each batch in BatchNorm's running statistics (PyTorch convention).
        logit_scale: Factor on the logits.
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        widths: tuple[PositiveInt, ...] = (64, 256, 256),
        whiten_kernel: PositiveInt = 2,
        batchnorm_momentum: ClosedUnitInterval = 0.4,
        logit_scale: PositiveFloat = 1 / 9,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        if not widths:
            raise UsageValueError(
                "--model.net.widths []: FastNet needs at least one block (airbench94's: [64, 256, 256])"
            )
        side = min(height, width) - whiten_kernel + 1
        for _ in widths:
            side //= 2
        if side < 1:
            raise UsageValueError(
                f"FastNet with {len(widths)} blocks needs images of at least {whiten_kernel - 1 + 2 ** len(widths)} "
                f"pixels a side, got {height}x{width}"
            )
        whiten_width = 2 * channels * whiten_kernel**2
        self.whiten = nn.Conv2d(channels, whiten_width, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        blocks, in_channels = [], whiten_width
        for out_channels in widths:
            blocks.append(ConvBlock(in_channels, out_channels, batchnorm_momentum))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images `(N, C, H, W)`; a few thousand suffice."""
        c, (h, w) = images.shape[1], self.whiten.kernel_size
        # The patches' second moments, summed a chunk of images at a time: the 5,000 images' patches at once take
        # 12 GB at 224 px (400 MB at CIFAR's 32 px, one chunk).
        per_image = (images.shape[2] - h + 1) * (images.shape[3] - w + 1)
        covariance = images.new_zeros(c * h * w, c * h * w, dtype=torch.float)
        for chunk in images.split(max(1, WHITENING_PATCHES // per_image)):
            patches = chunk.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
            covariance += patches.T @ patches
        covariance /= len(images) * per_image
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        # Largest-variance directions first; each filter scaled so its response has unit variance.
        filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(-1, c, h, w)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.whiten(x))
        x = self.blocks(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.logit_scale
