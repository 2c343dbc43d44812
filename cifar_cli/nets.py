"""Networks: plain `nn.Module`s that map normalised images to logits. No Lightning here.

Every network takes `num_classes` and `image_shape` first; the CLI links both from the data module, so any
network here trains on any data module (`--model.net cifar_cli.nets.NAME`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn


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
            raise ValueError(f"TutorialCNN needs images of at least 14x14 pixels, got {height}x{width}")
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
