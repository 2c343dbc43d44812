"""Every network in cifar_cli.nets: logits of the right shape for any image size, and the tutorial's exact size."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

import cifar_cli.nets as nets
from cifar_cli.checks import input_problem

NETS = [
    cls
    for _, cls in inspect.getmembers(nets, inspect.isclass)
    if issubclass(cls, nn.Module)
    and cls.__module__ == nets.__name__
    and "num_classes" in inspect.signature(cls).parameters  # networks, not their building blocks
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
    with pytest.raises(ValueError, match="at least 16x16"):
        nets.TutorialCNN(image_shape=(3, 12, 12))


@pytest.mark.parametrize("side", [14, 15])
def test_tutorial_cnn_smallest_side_it_names_is_the_smallest_that_runs(side: int) -> None:
    # Two 3x3 convolutions and a 2x2 pool, twice: 14 and 15 pixels end as an empty map, 16 as 1x1.
    with pytest.raises(ValueError, match=f"at least 16x16 pixels, got {side}x{side}"):
        nets.TutorialCNN(image_shape=(3, side, side))
    assert nets.TutorialCNN(image_shape=(3, 16, 16))(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_fast_net_whitening_layer_whitens_patches() -> None:
    torch.manual_seed(0)
    # Correlated channels: the whitening filters must decorrelate them.
    base = torch.randn(200, 1, 16, 16)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn_like(base), torch.randn_like(base)], dim=1)
    net = nets.FastNet(image_shape=(3, 16, 16), widths=(8, 8))
    net.init_whitening(images)
    out = net.whiten(images) - net.whiten.bias.view(1, -1, 1, 1)
    features = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the first half: the negatives mirror it
    covariance = features.T @ features / len(features)
    off_diagonal = covariance - torch.diag(covariance.diag())
    assert off_diagonal.abs().max() < 1e-3
    # Unit variance, but for the eps (5e-4) that keeps the weakest direction (variance ~0.01 here) from blowing up.
    assert covariance.diag().min() > 0.9 and covariance.diag().max() < 1.0 + 1e-3
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_fast_net_widths_and_frozen_batchnorm_scale() -> None:
    net = nets.FastNet(widths=(16, 32, 48, 64))
    assert [block[0].out_channels for block in net.blocks] == [16, 32, 48, 64] and net.head.in_features == 64
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8 and not any(n.weight.requires_grad for n in norms)
    assert all(n.bias.requires_grad for n in norms)
    with pytest.raises(ValueError, match="at least 17 pixels"):
        nets.FastNet(widths=(16, 32, 48, 64), image_shape=(3, 16, 16))


def test_input_problem_names_a_size_the_net_cannot_take_and_leaves_the_net_as_it_was() -> None:
    torch.manual_seed(0)
    net = nets.FastNet(image_shape=(3, 16, 16), widths=(8, 8))
    net.train()
    net.blocks[0].eval()  # a module's own mode, which the check must keep
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert input_problem(net, (3, 16, 16), channels_last=True) is None
    assert input_problem(net, (3, 12, 12)) is None  # global pooling: any size its blocks can halve
    tutorial = nets.TutorialCNN(image_shape=(3, 32, 32))
    assert "mat1 and mat2 shapes cannot be multiplied" in input_problem(tutorial, (3, 24, 24))
    assert net.training and not net.blocks[0].training and net.blocks[1].training
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BatchNorm's statistics too
    assert tutorial.training and all(p.device.type == "cpu" for p in tutorial.parameters())


class ItemNet(nn.Module):
    """A network with a data-dependent step, which the meta device cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3))) * float(x.abs().max() + 1)


def test_input_problem_falls_back_to_a_real_pass() -> None:
    assert input_problem(ItemNet(), (3, 8, 8)) is None


def test_fast_net_whitening_fit_to_large_images_holds_their_patches_a_chunk_at_a_time() -> None:
    # The fit reads every 2x2 patch of 5,000 images: at 224 px, 12 GB of patches held at once (measured: 1.2 GB
    # more memory for 500 images). Here 200 images of 96 px (87 MB of patches) in chunks of 2**16 patches, in a
    # process of its own for its peak memory (Linux's VmHWM, reset before the fit); the filters whiten as those of
    # all the patches at once do.
    script = """
import torch
import cifar_cli.nets as nets

def peak_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024

torch.manual_seed(0)
images = torch.randn(200, 3, 96, 96)
reference = nets.FastNet(image_shape=(3, 96, 96), widths=(8, 8))
net = nets.FastNet(image_shape=(3, 96, 96), widths=(8, 8))
nets.WHITENING_PATCHES = 2**16
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the memory in use now
before = peak_mb()
net.init_whitening(images)
grown = peak_mb() - before
nets.WHITENING_PATCHES = 10**12
reference.init_whitening(images)
# The filters' Gram matrix is the inverse of the patches' covariance (plus eps), whatever the eigenvectors' signs.
gram = [n.whiten.weight[:12].reshape(12, -1).double() for n in (net, reference)]
gram = [f.T @ f for f in gram]
print(grown, float(((gram[0] - gram[1]).abs().max() / gram[1].abs().max())))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grown_mb, difference = int(out[0]), float(out[1])
    assert grown_mb < 60, out
    assert difference < 1e-5, out
