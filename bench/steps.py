"""Training steps timed in a process of their own, for `make bench`'s part b: a plain PyTorch loop and Lightning's
bare loop, each the same steps as `cifar-cli fit` takes (the network by class path, Adam 2e-4 with
torch's fused kernels as cifar-cli builds it, fp32, channels_last, the same batches).

Each side runs in a fresh process, as `cifar-cli fit` does: a loop timed inside the long-lived benchmark process
ran 30% faster than the same loop in a new process here, which made cifar-cli look slower than it is.

    python -m bench.steps {plain,lightning} ROOT VAL_SIZE TEST_SIZE NET BATCH_SIZE WARMUP STEPS

prints one JSON line: `seconds` (wall clock) and `cpu_seconds` (this thread's CPU time) of the timed steps.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from cifar_cli.data import DeviceBatches, ImageFolderDataModule
from cifar_cli.hooks import plain_cuda_check_without_gpu

# Importing Lightning (through cifar_cli.data) made torch's CUDA check slow on a CPU; cifar-cli undoes that at
# start-up, and so does every loop here, as a plain PyTorch loop that never imports Lightning would not pay it.
plain_cuda_check_without_gpu()


class StepClock(Callback):
    """Times training steps `warmup` to the last, and writes JSON to `path` at the end: `steps`, `seconds` (wall
    clock) and `cpu_seconds` (this thread's CPU time: the host's own work, which other processes on a shared
    machine do not inflate).

    Args:
        path: JSON file to write ("": none; the result stays in `result`).
        warmup: Steps left out of the timing (first-call costs: allocation, oneDNN kernel selection).
    """

    def __init__(self, path: str, warmup: int = 50) -> None:
        self.path = path
        self.warmup = warmup
        self._start: tuple[float, float] | None = None
        self._steps = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self._start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._start is not None:
            self._steps += 1
            self._seconds = time.perf_counter() - self._start[0]
            self._cpu_seconds = time.thread_time() - self._start[1]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.result = {"seconds": self._seconds, "cpu_seconds": self._cpu_seconds, "steps": self._steps}
        if self.path:
            Path(self.path).write_text(json.dumps(self.result))


def endless(loader: DeviceBatches):
    """The loader's batches, epoch after epoch, reshuffled as Lightning does."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class OneConv(nn.Module):
    """A network with almost no compute, one 1x1 convolution and the mean over the image: its training steps time
    the host's own work per step (the loop, hooks, logging, metrics), what every GPU step pays on top of its
    kernels."""

    def __init__(self, num_classes: int = 10, image_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(image_shape[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class BareModule(LightningModule):
    """The plain loop's step as a LightningModule with nothing else: Lightning's own loop, for the host row."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-4, fused=True)


def build(data: ImageFolderDataModule, net: str) -> nn.Module:
    """The network named by class path, seeded, channels_last, as cifar-cli builds it."""
    module, name = net.rsplit(".", 1)
    torch.manual_seed(42)
    model = getattr(importlib.import_module(module), name)(len(data.class_names), data.image_shape)
    return model.to(memory_format=torch.channels_last)


def plain_loop(data: ImageFolderDataModule, net: str, batch_size: int, warmup: int, steps: int) -> dict:
    """`steps` steps after `warmup` of a plain PyTorch loop."""
    model = build(data, net)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    batches = endless(DeviceBatches(data.splits["train"], batch_size, shuffle=True, drop_last=True))
    for step in range(warmup + steps):
        if step == warmup:
            start = (time.perf_counter(), time.thread_time())
        images, labels = next(batches)
        x = data.preprocess(images).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.thread_time() - start[1]}


def bare_lightning(data: ImageFolderDataModule, net: str, batch_size: int, warmup: int, steps: int) -> dict:
    """`steps` steps after `warmup` of BareModule under a Trainer with no logger, no callbacks and no progress
    bar: what Lightning's loop alone adds to the plain loop."""
    preprocess = data.preprocess

    class Batches(DeviceBatches):  # the plain loop's batches, normalised and channels-last as it feeds them
        def __iter__(self):
            for images, labels in super().__iter__():
                yield preprocess(images).contiguous(memory_format=torch.channels_last), labels

    clock = StepClock(path="", warmup=warmup)
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, callbacks=[clock], **quiet)
    loader = Batches(data.splits["train"], batch_size, shuffle=True, drop_last=True)
    trainer.fit(BareModule(build(data, net)), train_dataloaders=loader)
    return clock.result


LOOPS = {"plain": plain_loop, "lightning": bare_lightning}


def main(loop: str, root: str, val_size: int, test_size: int, net: str, batch_size: int, warmup: int,
         steps: int) -> dict:  # fmt: skip
    data = ImageFolderDataModule(root, val_size=val_size, test_size=test_size)
    data.prepare_data()
    data.setup("fit")
    return LOOPS[loop](data, net, batch_size, warmup, steps)


if __name__ == "__main__":
    if len(sys.argv) != 9 or sys.argv[1] not in LOOPS:
        sys.exit("usage: python -m bench.steps {plain,lightning} ROOT VAL_SIZE TEST_SIZE NET BATCH_SIZE WARMUP STEPS")
    loop, root, val_size, test_size, net, batch_size, warmup, steps = sys.argv[1:]
    print(json.dumps(main(loop, root, int(val_size), int(test_size), net, int(batch_size), int(warmup), int(steps))))
