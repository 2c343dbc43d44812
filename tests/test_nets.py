"""Every network in cifar_cli.nets: logits of the right shape for any image size, and the tutorial's exact size."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import cifar_cli.nets as nets

NETS = [
    cls
    for _, cls in inspect.getmembers(nets, inspect.isclass)
    if issubclass(cls, nn.Module) and cls.__module__ == nets.__name__
]


@pytest.mark.parametrize("net_class", NETS, ids=[n.__name__ for n in NETS])
@pytest.mark.parametrize("image_shape", [(3, 32, 32), (3, 48, 40), (1, 28, 28)])
def test_net_returns_logits(net_class: type[nn.Module], image_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = net_class(num_classes=7, image_shape=image_shape)
    logits = net(torch.randn(5, *image_shape))
    assert logits.shape == (5, 7)
    # Logits, not log-probabilities: rows do not sum to one after exp.
    assert not torch.allclose(logits.exp().sum(1), torch.ones(5), atol=1e-3)


def test_tutorial_cnn_matches_the_tutorial() -> None:
    net = nets.TutorialCNN(num_classes=10)
    # conv 3->32, 32->32, 32->64, 64->64 (3x3), then 1600->512->128->10: the tutorial's 952,234 parameters.
    assert sum(p.numel() for p in net.parameters()) == 952_234
    assert net.fc1.in_features == 64 * 5 * 5


def test_tutorial_cnn_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="at least 14x14"):
        nets.TutorialCNN(image_shape=(3, 12, 12))
