"""On a CUDA GPU: the batch path on the device, and configs/gpu.yaml end to end. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cli.cli import main
from cifar_cli.data import CIFAR10DataModule

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def test_preprocess_on_gpu_matches_cpu(fake_cifar10: Path) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40)
    data.setup("fit")
    images = data.splits["val"].images
    on_gpu = data.preprocess(images.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), data.preprocess(images))


def test_fit_with_gpu_config(fake_cifar10: Path) -> None:
    gpu, debug = REPO / "configs" / "gpu.yaml", REPO / "configs" / "debug.yaml"
    main(["fit", "--config", str(gpu), "--config", str(debug), "--data.data_dir", str(fake_cifar10),
          "--data.val_size", "40"])  # fmt: skip
    (ckpt,) = Path("runs/debug/checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 5  # 160 images / batch 32
    # 16-mixed trains with a gradient scaler, whose state the checkpoint keeps.
    assert "scale" in state["MixedPrecision"]
