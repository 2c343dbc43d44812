"""Data placement (device, host memory, disk) and decoding image folders on every core."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from test_cli import CSV_LOGGER

import cifar_cli.data.base as base_module
import cifar_cli.data.images as images_module
import cifar_cli.data.placement as placement_module
import cifar_cli.data.storage as storage_module
from cifar_cli.cli import main
from cifar_cli.data import (
    CIFAR10DataModule,
    DeviceBatches,
    DiskImages,
    ImageFolderDataModule,
    TensorImageDataset,
    decode_images,
    list_images,
)
from cifar_cli.data.images import decode_images_to_npy
from cifar_cli.data.placement import choose_placement, keep_on_disk
from cifar_cli.data.storage import create_npy
from cifar_cli.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PLACEMENTS = ["device", "host", "disk"]
# The fast recipe shrunk, as tests/test_resume.py runs it: augmentation, EMA, whitening from training images.
FAST = ["--config", str(REPO / "configs" / "fast-cpu.yaml"), "--model.net.init_args.widths", "[8, 16, 16]",
        "--data.batch_size", "32", "--trainer.enable_progress_bar", "false"]  # fmt: skip
GB = 10**9


def data_args(dataset: str, request: pytest.FixtureRequest) -> list[str]:
    if dataset == "cifar10":
        return ["--data.data_dir", str(request.getfixturevalue("fake_cifar10")), "--data.val_size", "40"]
    root = request.getfixturevalue("image_folder")
    return ["--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "30"]


def last_weights(folder: Path) -> dict[str, torch.Tensor]:
    (last,) = folder.glob("runs/**/last.ckpt")
    return torch.load(last, weights_only=True)["state_dict"]


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_every_placement_trains_to_the_same_weights(
    dataset: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = []
    real_send = DeviceBatches._send
    monkeypatch.setattr(DeviceBatches, "_send", lambda self, *args: sent.append(1) or real_send(self, *args))
    weights, sends = {}, {}
    for placement in PLACEMENTS:
        (tmp_path / placement).mkdir()
        os.chdir(tmp_path / placement)
        main(["fit", *FAST, *data_args(dataset, request), "--data.placement", placement, "--trainer.max_epochs", "2",
              *CSV_LOGGER])  # fmt: skip
        weights[placement], sends[placement] = last_weights(Path()), len(sent)
        sent.clear()
    # Host and disk send every batch (train and validation) ahead to the device; device cuts them there.
    assert sends["device"] == 0 and sends["host"] > 0 and sends["disk"] == sends["host"]
    for placement in ("host", "disk"):
        assert weights[placement].keys() == weights["device"].keys()
        assert all(torch.equal(weights[placement][k], weights["device"][k]) for k in weights["device"])
    # Disk placement kept its copy in the cache folder: CIFAR's splits, or the image folder's decoded cache.
    assert list((tmp_path / "cache" / "cifar-cli").glob("*.npy"))


def batches(data: CIFAR10DataModule | ImageFolderDataModule) -> list[torch.Tensor]:
    """Every tensor of two training epochs and one validation pass, in order."""
    out = []
    for epoch in (0, 1):
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        out += [t for batch in loader for t in batch]
    return out + [t for batch in data.val_dataloader() for t in batch]


def test_batches_and_statistics_are_the_same_in_every_placement(fake_cifar10: Path, image_folder: Path) -> None:
    for make in (
        lambda p: CIFAR10DataModule(str(fake_cifar10), val_size=40, augment=True, placement=p),
        lambda p: ImageFolderDataModule(str(image_folder), val_size=30, augment=True, batch_size=16, placement=p),
    ):
        reference = None
        for placement in PLACEMENTS:
            data = make(placement)
            data.setup("fit")
            assert data.placement_used == placement
            on_disk = isinstance(data.splits["train"].images, DiskImages)
            assert on_disk == (placement == "disk")
            got = (data.mean, data.std, batches(data))
            if reference is None:
                reference = got
                continue
            assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
            assert len(got[2]) == len(reference[2]) and all(torch.equal(a, b) for a, b in zip(got[2], reference[2]))


def test_sent_ahead_batches_resume_at_the_next_batch(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    path = tmp_path / "images.npy"
    offset = create_npy(path, tuple(images.shape))
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(images.numpy().tobytes())
    on_disk = TensorImageDataset(DiskImages(path), torch.arange(40))

    def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *_) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flip(-1) if torch.rand(1, generator=g) < 0.5 else x, y

    def loader(data: TensorImageDataset, device: torch.device | None) -> DeviceBatches:
        batches = DeviceBatches(data, 4, shuffle=True, drop_last=True, seed=5, augment=augment, device=device)
        batches.sampler.set_epoch(3)
        return batches

    uninterrupted = list(loader(TensorImageDataset(images, torch.arange(40)), None))
    interrupted = loader(on_disk, torch.device("cpu"))
    iterator = iter(interrupted)
    for _ in range(4):
        next(iterator)  # batch 4 has been read ahead by now; the state counts the 4 yielded
    assert interrupted.state_dict() == {
        "epoch": 3,
        "batches_taken": 4,
        "images_taken": 16,
        "epoch_images_taken": 16,
        "hashed_order": 1,
    }
    resumed = loader(on_disk, torch.device("cpu"))
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert len(rest) == 6
    assert resumed.state_dict() == {
        "epoch": 3,
        "batches_taken": 10,
        "images_taken": 40,
        "epoch_images_taken": 40,
        "hashed_order": 1,
    }
    for (x, y), (x0, y0) in zip(rest, uninterrupted[4:]):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    ("device_free", "host_free", "processes", "device", "expected"),
    [
        (100 * GB, 100 * GB, 1, "cuda", "device"),  # 10 GB of splits in half the GPU's free memory
        (15 * GB, 100 * GB, 1, "cuda", "host"),
        (15 * GB, 15 * GB, 1, "cuda", "disk"),
        (30 * GB, 30 * GB, 4, "cuda", "device"),  # each GPU holds its own rank's copy
        (15 * GB, 100 * GB, 4, "cuda", "host"),  # 4 ranks' copies: 40 GB of host memory
        (15 * GB, 30 * GB, 4, "cuda", "disk"),
        (30 * GB, 30 * GB, 1, "cpu", "device"),
        (30 * GB, 30 * GB, 2, "cpu", "disk"),  # on a CPU, the device's memory is the host's, shared by the ranks
    ],
)
def test_auto_placement_from_free_memory(
    device_free: int, host_free: int, processes: int, device: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placement_module, "available_host_memory", lambda: host_free)
    monkeypatch.setattr(
        placement_module, "free_device_memory", lambda d: device_free if d.type == "cuda" else host_free
    )
    choice, line = choose_placement("auto", 10 * GB, torch.device(device), processes)
    assert choice == expected
    assert re.fullmatch(rf"data placement auto -> {expected} \(\d+\.\d GB of splits, \d+\.\d GB .*free.*\)", line)
    assert choose_placement("host", 10 * GB, torch.device(device), processes) == ("host", None)


def test_free_memory_is_read_from_the_system() -> None:
    free = placement_module.available_host_memory()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert placement_module.free_device_memory(torch.device("cpu")) == pytest.approx(free, rel=0.2)


def test_auto_placement_chooses_disk_when_memory_is_short_and_says_so(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    monkeypatch.setattr(placement_module, "available_host_memory", lambda: 200_000)  # 0.2 MB: splits take 0.8
    # The default W&B logger: its image logger picks validation images by index, from the file.
    main(["fit", *FAST, "--data.data_dir", str(fake_cifar10), "--data.val_size", "40", "--trainer.max_epochs", "1"])
    err = capfd.readouterr().err
    assert re.search(r"^cifar-cli: data placement auto -> disk \(0\.0 GB of splits, 0\.0 GB", err, re.MULTILINE)
    assert len(list(Path("cache/cifar-cli").glob("cifar10-*.npy"))) == 4  # train and test: images and labels


def test_disk_copy_of_cifar_is_made_once_and_then_read_alone(
    fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40, placement="disk")
    data.prepare_data()
    data.setup("fit")
    memory = CIFAR10DataModule(str(fake_cifar10), val_size=40, placement="device")
    memory.setup("fit")
    for split in ("train", "val", "test"):
        assert torch.equal(data.splits[split].images[:], memory.splits[split].images)
        assert torch.equal(data.splits[split].labels, memory.splits[split].labels)

    # A second run reads the copy, without loading the data set's archive into memory.
    def refuse(*args, **kwargs):
        raise AssertionError("the archive was loaded")

    monkeypatch.setattr(CIFAR10DataModule, "_load", refuse)
    again = CIFAR10DataModule(str(fake_cifar10), val_size=40, placement="disk")
    again.prepare_data()
    again.setup("fit")
    assert torch.equal(again.splits["val"].images[:], memory.splits["val"].images)


def write_npy(path: Path, rows: int, side: int) -> torch.Tensor:
    images = torch.randint(0, 256, (rows, 3, side, side), dtype=torch.uint8)
    offset = create_npy(path, tuple(images.shape))
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(images.numpy().tobytes())
    return images


def rss_bytes() -> int:
    """This process's resident memory now: anonymous pages, and file pages mapped in (a memory map's)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return sum(int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile"))


def test_disk_images_read_only_the_rows_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = write_npy(tmp_path / "images.npy", 2000, 32)
    disk = DiskImages(tmp_path / "images.npy")
    assert len(disk) == 2000 and disk.shape == images.shape and disk.nbytes == images.numel()
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(storage_module.os, "preadv", lambda fd, views, offset: read.append(
        real_preadv(fd, views, offset)) or read[-1])  # fmt: skip
    index = torch.tensor([1999, 3, 4, 5, 700, 3])
    assert torch.equal(disk.read(index), images[index])
    # One read per run of consecutive rows (3, 4, 5 together), and only those rows' bytes.
    assert read == [3072, 3 * 3072, 3072, 3072]
    subset = disk.subset(torch.tensor([10, 11, 12, 500]))
    assert torch.equal(subset[torch.tensor([3, 0])], images[[500, 10]]) and torch.equal(subset[1:3], images[11:13])
    assert torch.equal(subset[-1], images[500]) and len(subset) == 4
    with pytest.raises(IndexError):
        disk.read(torch.tensor([2000]))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_an_epoch_on_disk_keeps_memory_bounded(tmp_path: Path) -> None:
    images = write_npy(tmp_path / "images.npy", 1600, 100)  # 48 MB
    data = TensorImageDataset(DiskImages(tmp_path / "images.npy"), torch.arange(1600))
    loader = DeviceBatches(data, 32, shuffle=True, device=torch.device("cpu"))
    before, peak, count = rss_bytes(), 0, 0
    for x, y in loader:
        peak = max(peak, rss_bytes() - before)
        count += len(y)
        assert torch.equal(x[0], images[y[0]])
    # Every image was read; resident memory grew by a few batches (1 MB each), not by the file's 48 MB, as it
    # would through a memory map.
    assert count == 1600 and peak < 12 * 2**20


def odd_folder(root: Path) -> list[Path]:
    write_image_folder(root / "a", {"x": 20}, size=48)  # JPEGs resized to 24
    write_image_folder(root / "b", {"y": 20}, size=24, seed=3, jpeg=False)  # PNGs of the size asked for
    write_image_folder(root / "c", {"z": 3}, size=16, seed=4)
    return list_images(root)


def test_parallel_decoding_gives_exactly_the_serial_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = odd_folder(tmp_path / "images")
    serial = decode_images(paths, 24, workers=1)
    monkeypatch.setattr(images_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(images_module, "CHUNK", 5)  # 9 chunks over 2 workers, finishing in any order
    assert torch.equal(decode_images(paths, 24, workers=2), serial)
    decode_images_to_npy(paths, 24, tmp_path / "images.npy", workers=2)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "images.npy")), serial)
    assert torch.equal(DiskImages(tmp_path / "images.npy").load(), serial)


def test_a_bad_image_in_a_worker_ends_in_the_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = odd_folder(tmp_path / "images")
    (tmp_path / "images" / "a" / "x" / "broken.jpg").write_bytes(b"\xff\xd8\xffjunk")
    monkeypatch.setattr(images_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(images_module, "CHUNK", 5)
    paths = list_images(tmp_path / "images")
    with pytest.raises(UsageError, match=r"^cannot decode image .*/a/x/broken.jpg \(.*\): remove or replace the file$"):
        decode_images(paths, 24, workers=2)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's parent in a container may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_decoding_workers_end_with_the_command_killed_while_they_decode(tmp_path: Path, signum: int) -> None:
    # A command stopped while its folder decodes (`kill PID`, `timeout`, `docker stop`, the OOM killer) left its
    # workers behind, reparented, each waiting for work for ever with its copy of the command's memory.
    write_image_folder(tmp_path / "images", {"a": 3, "b": 3})
    script = f"""
import os, time
from pathlib import Path
from cifar_cli.data import images

def slow(paths, *args):
    Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
    time.sleep(120)

images._decode_chunk, images.PARALLEL_FROM, images.CHUNK = slow, 1, 1
images.decode_images(images.list_images(Path({str(tmp_path / "images")!r})), 32, workers=2)
"""
    command = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    workers: list[int] = []
    try:
        for _ in range(600):
            workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
            if len(workers) == 2 or command.poll() is not None:
                break
            time.sleep(0.1)
        assert len(workers) == 2, "the workers did not start"
        command.send_signal(signum)
        command.wait(timeout=60)
        for _ in range(100):
            if not any(_running(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not [pid for pid in workers if _running(pid)], "a decoding worker outlived the command"
    finally:
        command.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_image_folder_decodes_with_workers_and_an_interrupted_build_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image_folder(tmp_path / "data" / "train", {"a": 30, "b": 30}, size=40)
    write_image_folder(tmp_path / "data" / "test", {"a": 5, "b": 5}, size=40, seed=2)
    cache = tmp_path / "cache" / "deep"

    def build(**kwargs) -> ImageFolderDataModule:
        data = ImageFolderDataModule(str(tmp_path / "data"), val_size=10, cache_dir=str(cache), **kwargs)
        data.prepare_data()
        return data

    real_chunk = images_module._decode_chunk
    calls = []

    def interrupted(paths, *args):
        calls.append(len(paths))
        if len(calls) == 3:  # the test folder, after train/'s two chunks
            raise KeyboardInterrupt
        return real_chunk(paths, *args)

    monkeypatch.setattr(images_module, "CHUNK", 32)
    monkeypatch.setattr(images_module, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(decode_workers=1)
    assert not (tmp_path / "cache").exists()  # neither train/'s finished file nor the folders made for it
    monkeypatch.setattr(images_module, "_decode_chunk", real_chunk)
    serial = build(decode_workers=1)
    serial.setup("fit")
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("test-32px-") and files[1].startswith("train-32px-")
    monkeypatch.setattr(images_module, "PARALLEL_FROM", 1)
    other_cache = str(tmp_path / "other")
    parallel = ImageFolderDataModule(str(tmp_path / "data"), val_size=10, cache_dir=other_cache, decode_workers=2)
    parallel.prepare_data()
    parallel.setup("fit")
    for split in ("train", "val", "test"):
        assert torch.equal(parallel.splits[split].images, serial.splits[split].images)


def predict_rows(args: list[str], capsys) -> tuple[list[dict[str, str]], str]:
    """The rows of the predictions CSV that `cifar-cli predict` wrote, and what it printed on stderr."""
    capsys.readouterr()
    main(["predict", *args])
    printed = capsys.readouterr()
    written = printed.out.split(" images written to ")[1].split()[0]
    with open(written) as file:
        return list(csv.DictReader(file)), printed.err


def test_large_predict_folder_is_decoded_to_disk_once_and_predicts_as_in_memory(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", *CSV_LOGGER])  # fmt: skip
    (ckpt,) = Path().glob("**/checkpoints/epoch*.ckpt")
    photos = tmp_path / "photos"
    write_image_folder(photos / "album", {"a": 20, "b": 20}, seed=3)
    args = ["--ckpt_path", str(ckpt), "--data.predict_root", str(photos), *CSV_LOGGER]
    in_memory, _ = predict_rows([*args, "--data.placement", "host"], capsys)
    assert not list(Path("cache").rglob("predict-*.npy"))
    # auto, with less free memory than the folder's decoded images (40 x 3 KB) take twice over: to disk.
    monkeypatch.setattr(placement_module, "available_host_memory", lambda: 200_000)
    on_disk, err = predict_rows(args, capsys)
    (cache,) = Path("cache").rglob("predict-32px-*.npy")
    assert on_disk == in_memory and len(on_disk) == 40
    assert (
        f"cifar-cli: predict folder {photos}: 0.0 GB decoded, 0.0 GB of host memory free -> disk ({cache.resolve()})"
        in err
    )
    # Decoded once: a second run reads the file.
    monkeypatch.setattr(base_module, "decode_images_to_npy", lambda *a, **k: pytest.fail("decoded again"))
    assert predict_rows([*args, "--data.placement", "disk"], capsys)[0] == in_memory
    assert list(Path("cache").rglob("predict-*.npy")) == [cache]


def test_bad_image_in_a_predict_folder_on_disk_leaves_no_file(image_folder: Path, tmp_path: Path, capsys) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", *CSV_LOGGER])  # fmt: skip
    (ckpt,) = Path().glob("**/checkpoints/epoch*.ckpt")
    photos = tmp_path / "photos"
    write_image_folder(photos, {"x": 3})
    (photos / "x" / "broken.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--data.placement", "disk"])
    assert exit_info.value.code != 0
    assert "broken.jpg" in capsys.readouterr().err
    assert not [p for p in Path("cache").rglob("*") if "predict" in p.name]


def test_predict_folder_goes_to_disk_when_the_ranks_copies_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement_module, "available_host_memory", lambda: 1000)
    assert keep_on_disk("auto", 400, processes=1) == (False, 1000)  # 400 bytes: within half of 1000
    assert keep_on_disk("auto", 400, processes=2) == (True, 1000)  # two ranks hold 800
    assert keep_on_disk("disk", 1, processes=1) == (True, 0) and keep_on_disk("host", 10**12, 8) == (False, 0)
