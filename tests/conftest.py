"""Offline fixtures: a small fake CIFAR-10/100 in the real on-disk format, and a small image folder.

Images are class-coloured noise, so a network can learn them in a few steps and tests can check that training
really lowers the loss. Nothing here reads the real data set or the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# Several pytest workers (make test: one per core), and the DDP tests' ranks beside them: torch's default of one
# thread per core in every process oversubscribes the cores, and OpenMP's waiting threads then spin on them. On 2
# cores one thread a worker took the suite from 319 s to 225 s. Set before torch starts its thread pool, and
# inherited by the processes the tests start.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torchvision.datasets import CIFAR10, CIFAR100  # noqa: E402
from torchvision.io import encode_jpeg, write_png  # noqa: E402

from cifar_cli.data import CIFAR10DataModule, CIFAR100DataModule  # noqa: E402


@contextlib.contextmanager
def one_process_world() -> Iterator[None]:
    """Around a DDP run in this process (a world of one): the process group it starts ends with it, and so do the
    variables Lightning sets for it (LOCAL_RANK, NODE_RANK, MASTER_PORT), which would make a later DDP run in this
    process take itself for a rank another process launched, and wait for its peers."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def class_images(labels: np.ndarray, size: int = 32, seed: int = 0) -> np.ndarray:
    """`(N, 3, size, size)` uint8 images: noise around a colour that depends on the label."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, size=(max(labels.max() + 1, 1), 3))
    noise = rng.normal(0, 25, size=(len(labels), 3, size, size))
    return np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)


def _write_batch(path: Path, labels: np.ndarray, label_key: str, seed: int) -> str:
    images = class_images(labels, seed=seed).reshape(len(labels), -1)  # rows of 3072 = R plane, G plane, B plane
    with open(path, "wb") as file:
        pickle.dump({"data": images, label_key: labels.tolist()}, file)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data_dir with `cifar-10-batches-py/`: 5 training batches of 40 images and a test batch of 50.

    torchvision verifies each batch file's MD5 against the real archive's; the fake files get their own sums by
    patching the class attributes for this test only, so the check stays as strict as it is for users.
    """
    folder = tmp_path / "data" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_list = []
    for i, (name, _) in enumerate(CIFAR10.train_list):
        labels = rng.integers(0, 10, 40)
        train_list.append([name, _write_batch(folder / name, labels, "labels", seed=i)])
    test_name = CIFAR10.test_list[0][0]
    test_md5 = _write_batch(folder / test_name, rng.integers(0, 10, 50), "labels", seed=99)
    meta = folder / CIFAR10.meta["filename"]
    with open(meta, "wb") as file:
        pickle.dump({"label_names": list(CIFAR10DataModule.names)}, file)
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [[test_name, test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": hashlib.md5(meta.read_bytes()).hexdigest()})
    return tmp_path / "data"


@pytest.fixture
def fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data_dir with `cifar-100-python/`: 300 training and 100 test images over 100 classes."""
    folder = tmp_path / "data" / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    (train_name, _), (test_name, _) = CIFAR100.train_list[0], CIFAR100.test_list[0]
    train_md5 = _write_batch(folder / train_name, rng.integers(0, 100, 300), "fine_labels", seed=0)
    test_md5 = _write_batch(folder / test_name, rng.integers(0, 100, 100), "fine_labels", seed=1)
    meta = folder / CIFAR100.meta["filename"]
    with open(meta, "wb") as file:
        pickle.dump({"fine_label_names": list(CIFAR100DataModule.names)}, file)
    monkeypatch.setattr(CIFAR100, "train_list", [[train_name, train_md5]])
    monkeypatch.setattr(CIFAR100, "test_list", [[test_name, test_md5]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": hashlib.md5(meta.read_bytes()).hexdigest()})
    return tmp_path / "data"


def write_image_folder(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0, jpeg: bool = True) -> None:
    """`root/<class>/NNNN.jpg` (or .png) files, `counts[class]` of each, as class-coloured noise."""
    classes = sorted(counts)
    labels = np.concatenate([np.full(counts[c], i) for i, c in enumerate(classes)])
    images = torch.from_numpy(class_images(labels, size=size, seed=seed))
    for i, (label, image) in enumerate(zip(labels, images)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        if jpeg:
            (folder / f"{i:04d}.jpg").write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())
        else:
            write_png(image, str(folder / f"{i:04d}.png"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """`root/train/` with 3 classes of 40 images and `root/test/` with 3 classes of 10."""
    root = tmp_path / "images"
    write_image_folder(root / "train", {"cat": 40, "dog": 40, "frog": 40})
    write_image_folder(root / "test", {"cat": 10, "dog": 10, "frog": 10}, seed=1, jpeg=False)
    return root


@pytest.fixture(autouse=True)
def offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every test runs in its own folder, with its own cache, and W&B offline and quiet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cifar-cli"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # the runs' folder is runs/cifar-cli/
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifacts' staged copies
    # W&B's own records of the environment, which no test reads: its pip package list (0.35 s a run) and git state.
    monkeypatch.setenv("WANDB__SAVE_REQUIREMENTS", "false")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_QUIET", "true")  # (what the CLI sets by default; a test that asks removes it)
    monkeypatch.delenv("JSONARGPARSE_DEBUG", raising=False)
    # Python's own signal handlers, as a `cifar-cli` process starts with: a handler an earlier test's run left
    # installed in this worker (the clean stop's, Lightning's, the start-up's) would change what Ctrl-C and SIGTERM do
    # here.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # (a test that calls cifar_cli.entry.run sets SIGTERM's too)
    yield
    # A command that fails leaves its W&B run to end at process exit (W&B records the exit code); tests share one
    # process, and some log to W&B without the CLI. The W&B service resolves relative run folders against its own
    # working directory: stop it, so that the next test's service starts in that test's folder.
    wandb = sys.modules.get("wandb")  # imported by the tests that log to W&B; the GPU check's machine lacks it
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
