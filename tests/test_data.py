"""Data modules: splits, statistics, batched augmentation, the image-folder cache."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder

from cifar_cli.checkpoints import check_same_classes
from cifar_cli.cli import main
from cifar_cli.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DeviceBatches,
    ImageFolderDataModule,
    TensorImageDataset,
    image_suffixes,
    list_images,
    random_crop,
    random_crop_flip,
    random_flip,
    split_indices,
)
from cifar_cli.data import images as image_files
from cifar_cli.errors import UsageError


def test_split_is_seeded_disjoint_and_complete() -> None:
    val, test, train = split_indices(100, [10, 5], seed=7)
    assert (len(val), len(test), len(train)) == (10, 5, 85)
    assert sorted(torch.cat([val, test, train]).tolist()) == list(range(100))
    again = split_indices(100, [10, 5], seed=7)
    assert all(torch.equal(a, b) for a, b in zip([val, test, train], again))
    assert not torch.equal(split_indices(100, [10, 5], seed=8)[0], val)


def test_split_ignores_the_global_seed() -> None:
    torch.manual_seed(1)
    first = split_indices(50, [10], seed=3)[0]
    torch.manual_seed(2)
    assert torch.equal(split_indices(50, [10], seed=3)[0], first)


def test_random_crop_takes_a_window_of_the_padded_image() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = random_crop(images, padding=2)
    assert crops.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    for image, crop in zip(padded, crops):
        windows = [image[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(window, crop) for window in windows)


def test_random_crop_and_flip_vary_per_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 16).expand(64, -1, -1, -1)
    crops = random_crop(images, padding=4)
    assert len({crop.sum().item() for crop in crops}) > 10
    flipped = random_flip(images)
    mirrored = torch.tensor([torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)])
    assert 10 < mirrored.sum() < 54


def test_device_batches_shuffle_per_epoch_and_shard_across_ranks() -> None:
    data = TensorImageDataset(torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10))
    in_order = DeviceBatches(data, batch_size=4)
    assert [labels.tolist() for _, labels in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [DeviceBatches(data, 2, shuffle=True, drop_last=True, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    epochs = []
    for epoch in (0, 1):
        shards = []
        for loader in ranks:
            loader.sampler.set_epoch(epoch)  # as Lightning does before each training epoch
            batches = list(loader)
            assert len(batches) == len(loader) == 2  # 5 images per rank: 2 full batches, the short one dropped
            assert all(torch.equal(images.flatten().long(), labels) for images, labels in batches)
            shards.append(torch.cat([labels for _, labels in batches]))
        assert not set(shards[0].tolist()) & set(shards[1].tolist())  # no image on both ranks
        epochs.append(torch.cat(shards).tolist())
    assert epochs[0] != epochs[1]  # a new order every epoch
    again = DeviceBatches(data, 2, shuffle=True, drop_last=True, num_replicas=2, rank=0, seed=3)
    assert torch.cat([labels for _, labels in again]).tolist() == epochs[0][:4]  # the same seed, the same order
    with_index = DeviceBatches(data, 4, with_index=True)
    assert [index.tolist() for _, _, index in with_index][-1] == [8, 9]
    # drop_last keeps a short batch when it is the only one: a tiny training split still trains.
    assert len(DeviceBatches(data, 32, drop_last=True)) == 1


def test_evaluation_batches_of_two_ranks_hold_each_image_once() -> None:
    """11 images over 2 ranks, 3 a batch: the sampler pads rank 1's shard with a repeat of an image of rank 0, which
    evaluation leaves out; both ranks still take 2 batches (they meet in the same collectives). With 13 images and 6
    a batch, rank 1's second batch held the repeat alone: it is empty."""
    for n, size in ((11, 3), (13, 6)):
        data = TensorImageDataset(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.arange(n))
        ranks = [DeviceBatches(data, size, scramble=True, num_replicas=2, rank=r, with_index=True) for r in (0, 1)]
        batches = [list(loader) for loader in ranks]
        assert [len(b) for b in batches] == [len(loader) for loader in ranks] == [2, 2]
        index = [i for rank in batches for _, labels, idx in rank for i in idx.tolist()]
        assert sorted(index) == list(range(n))
        assert all(torch.equal(labels, idx) for rank in batches for _, labels, idx in rank)
    assert len(batches[1][-1][2]) == 0
    # Training keeps the repeat: every rank trains as many images per step.
    train = [DeviceBatches(data, 7, shuffle=True, num_replicas=2, rank=r) for r in (0, 1)]
    assert [sum(len(labels) for _, labels in loader) for loader in train] == [7, 7]


def test_cifar10_splits_and_statistics(fake_cifar10: Path) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40, download=False)
    data.prepare_data()
    data.setup("fit")
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [160, 40, 50]
    assert data.splits["train"].images.dtype == torch.uint8 and data.image_shape == (3, 32, 32)
    assert data.num_classes == 10 and data.class_names[3] == "cat"
    # The same seed gives the same validation images in a second module (a second run, or another DDP rank).
    other = CIFAR10DataModule(str(fake_cifar10), val_size=40)
    other.setup("validate")
    assert torch.equal(other.splits["val"].images, data.splits["val"].images)
    # Normalised with the training split's own statistics: mean 0 and std 1 per channel over its 160 images.
    x = data.preprocess(data.splits["train"].images)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_images_held_out_of_a_folder_take_no_part_in_the_normalisation(tmp_path: Path) -> None:
    """The validation and test images held out of train/ counted in the mean and std that every input of the model
    is normalised with: a quarter of the images of this folder, whose classes differ in colour."""
    write_image_folder(tmp_path / "train", {"a": 20, "b": 20, "c": 20, "d": 20})
    data = ImageFolderDataModule(str(tmp_path), val_size=10, test_size=10)
    data.setup("fit")
    x = data.preprocess(data.splits["train"].images)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    held_out = data.preprocess(torch.cat([data.splits["val"].images, data.splits["test"].images]))
    assert held_out.mean(dim=(0, 2, 3)).abs().max() > 0.01  # they are other images, normalised as the model sees them


def test_augmentation_only_for_training_batches(fake_cifar10: Path) -> None:
    def first_batches(augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        data = CIFAR10DataModule(str(fake_cifar10), val_size=40, augment=augment)
        data.setup("fit")
        return next(iter(data.train_dataloader()))[0], next(iter(data.val_dataloader()))[0]

    (train, val), (plain_train, plain_val) = first_batches(True), first_batches(False)
    assert torch.equal(val, plain_val)  # the same images, in the same order: validation is never augmented
    assert train.dtype == torch.uint8 and not torch.equal(train, plain_train)
    # Each augmented image is a flipped or unflipped window of its reflect-padded original.
    padded = F.pad(plain_train.float(), (4, 4, 4, 4), mode="reflect")
    for image, original in zip(train.float(), padded):
        windows = [original[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)


def mirrored(augmented: torch.Tensor, original: torch.Tensor, padding: int) -> bool:
    """Whether `augmented` is a mirrored crop of `original` (reflect-padded by `padding`); fails if neither."""
    padded = F.pad(original[None].float(), (padding,) * 4, mode="reflect")[0]
    side = original.shape[-1]
    windows = [padded[:, y : y + side, x : x + side] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    plain = any(torch.equal(augmented.float(), w) for w in windows)
    flipped = any(torch.equal(augmented.float(), w.flip(-1)) for w in windows)
    assert plain != flipped, "not a crop of the original, or a symmetric image"
    return flipped


def test_alternating_flip_mirrors_each_image_the_other_way_every_epoch(fake_cifar10: Path) -> None:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    data = CIFAR10DataModule(str(fake_cifar10), augment=True, crop_padding=1, flip="alternate")
    data.splits["train"] = TensorImageDataset(images, torch.arange(64))  # labels: each image's position

    def epoch_mirrors(module: CIFAR10DataModule, epoch: int, seed: int = 5) -> list[bool]:
        """Whether each image of the split (by position) is mirrored in `epoch`, batched in `seed`'s order."""
        batches = DeviceBatches(module.splits["train"], 8, shuffle=True, drop_last=True, seed=seed,
                                augment=module.augment_batch)  # fmt: skip
        batches.sampler.set_epoch(epoch)
        found = {int(i): mirrored(x, images[i], 1) for xs, ids in batches for x, i in zip(xs, ids)}
        return [found[i] for i in range(64)]

    first = epoch_mirrors(data, 0)
    assert 16 <= sum(first) <= 48  # a random half, about
    assert epoch_mirrors(data, 1) == [not m for m in first]
    assert epoch_mirrors(data, 2) == first and epoch_mirrors(data, 0) == first
    # The same for every DDP rank and resumed run (a function of the run's seed, the image and the epoch): here
    # another batch order (the loader's seed) mirrors the same images.
    assert epoch_mirrors(data, 0, seed=6) == first
    random_flips = CIFAR10DataModule(str(fake_cifar10), augment=True, crop_padding=1)
    random_flips.splits = data.splits
    # Independent draws: some images come the same way twice running.
    assert epoch_mirrors(random_flips, 1) != [not m for m in epoch_mirrors(random_flips, 0)]


def test_device_batches_resume_at_the_next_batch_with_the_same_augmentation() -> None:
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(40))

    def loader() -> DeviceBatches:
        def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *_) -> tuple[torch.Tensor, torch.Tensor]:
            return random_crop_flip(x, 2, generator=g), y

        batches = DeviceBatches(data, 4, shuffle=True, drop_last=True, seed=5, augment=augment)
        batches.sampler.set_epoch(3)
        return batches

    full = loader()
    uninterrupted = list(full)
    assert full.state_dict() == {
        "epoch": 3,
        "batches_taken": 10,
        "images_taken": 40,
        "epoch_images_taken": 40,
        "hashed_order": 1,
    }
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(4):
        next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "batches_taken": 4, "images_taken": 16, "epoch_images_taken": 16, "hashed_order": 1}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 6
    for (x, y), (x0, y0) in zip(rest, uninterrupted[4:]):
        assert torch.equal(y, y0) and torch.equal(x, x0)  # same images, same crops and flips
    # A state from the end of an epoch, or from another epoch, starts the next pass at its first batch.
    after = loader()
    after.load_state_dict({"epoch": 2, "batches_taken": 10})
    assert len(list(after)) == 10


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_a_restart_on_another_number_of_ranks_takes_each_remaining_image_once(before: int, after: int) -> None:
    """A DDP run stopped in an epoch and resumed on another number of GPUs: each rank went on at the images it had
    taken of its own shard, whose images are others with another number of shards. 2 ranks resumed on 1 trained
    12 of the 24 images they had taken again; 1 resumed on 2 skipped 12 images."""
    data = TensorImageDataset(torch.zeros(40, 1, 1, 1, dtype=torch.uint8), torch.arange(40))

    def loaders(ranks: int) -> list[DeviceBatches]:
        batches = [DeviceBatches(data, 4, shuffle=True, num_replicas=ranks, rank=r, seed=5) for r in range(ranks)]
        for loader in batches:
            loader.sampler.set_epoch(3)
        return batches

    taken, states = [], []
    for loader in loaders(before):  # 3 batches a rank, then stopped
        iterator = iter(loader)
        taken += [i for _ in range(3) for i in next(iterator)[1].tolist()]
        states.append(loader.state_dict())
    assert states[0]["epoch_images_taken"] == len(taken) == 12 * before
    rest = []
    for loader in loaders(after):
        loader.load_state_dict(states[0])  # the state Lightning saved, rank 0's, restored on every rank
        rest.append([i for _, labels in loader for i in labels.tolist()])
    assert len({len(shard) for shard in rest}) == 1  # as many images a rank: the ranks take as many steps
    everything = taken + [i for shard in rest for i in shard]
    assert set(everything) == set(range(40))
    assert len(everything) - 40 < after  # repeated only to give every rank as many, as the sampler pads


def test_consecutive_seeds_draw_other_orders_not_the_same_an_epoch_apart() -> None:
    """DistributedSampler seeds an epoch's permutation with seed + epoch: a run with seed 1 trained on the orders of
    the run with seed 0, one epoch earlier (a mean over seeds 0-4 averaged five runs of the same orders)."""
    data = TensorImageDataset(torch.zeros(50, 1, 1, 1, dtype=torch.uint8), torch.arange(50))

    def order(seed: int, epoch: int, rank: int = 0, ranks: int = 1) -> list[int]:
        batches = DeviceBatches(data, 5, shuffle=True, drop_last=True, num_replicas=ranks, rank=rank, seed=seed)
        batches.sampler.set_epoch(epoch)
        return torch.cat([labels for _, labels in batches]).tolist()

    assert order(1, 0) != order(0, 1) and order(43, 2) != order(42, 3)
    assert order(0, 1) == order(0, 1) and order(0, 0) != order(0, 1)  # the same seed, the same order; a new epoch's
    shards = [order(7, 2, rank, 3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [15, 15, 15]  # 17 a rank (one a repeat), 2 dropped with drop_last
    assert len({i for shard in shards for i in shard}) == 45


def test_a_state_saved_with_the_earlier_orders_goes_on_in_its_epochs_order() -> None:
    """A checkpoint written in an epoch by a version whose orders were seed + epoch's: its epoch ends in that order,
    each image once; the epochs after it take the new ones."""
    data = TensorImageDataset(torch.zeros(40, 1, 1, 1, dtype=torch.uint8), torch.arange(40))
    batches = DeviceBatches(data, 8, shuffle=True, drop_last=True, seed=5)
    batches.load_state_dict({"epoch": 3, "batches_taken": 2, "images_taken": 16})
    batches.sampler.set_epoch(3)
    earlier = torch.randperm(40, generator=torch.Generator().manual_seed(5 + 3)).tolist()
    assert torch.cat([labels for _, labels in batches]).tolist() == earlier[16:]
    batches.sampler.set_epoch(4)
    assert torch.cat([labels for _, labels in batches]).tolist() == list(batches.sampler)


@pytest.mark.parametrize("device", [None, torch.device("cpu")], ids=["on_device", "sent"])
def test_batches_resumed_with_another_batch_size_go_on_at_the_next_image(device: torch.device | None) -> None:
    """A restart with another --data.batch_size (a smaller GPU, say) trains on the images the interrupted epoch
    had not yet taken, each once: counting batches, it repeated or skipped some."""
    data = TensorImageDataset(torch.zeros(40, 3, 2, 2, dtype=torch.uint8), torch.arange(40))

    def loader(batch_size: int) -> DeviceBatches:
        batches = DeviceBatches(data, batch_size, shuffle=True, drop_last=False, seed=5, device=device)
        batches.sampler.set_epoch(3)
        return batches

    order = torch.cat([y for _, y in loader(8)]).tolist()
    interrupted = iter(first := loader(8))
    taken = [next(interrupted)[1] for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches_taken": 3, "images_taken": 24, "epoch_images_taken": 24, "hashed_order": 1}
    smaller = loader(5)
    smaller.load_state_dict(state)
    again = iter(smaller)
    taken += [next(again)[1] for _ in range(2)]  # interrupted once more, after 10 images of batch size 5
    assert smaller.state_dict()["images_taken"] == 34
    larger = loader(16)
    larger.load_state_dict(smaller.state_dict())
    rest = [y for _, y in larger]
    assert [len(y) for y in rest] == [6]
    assert torch.cat(taken + rest).tolist() == order  # every image once, in the epoch's order
    assert larger.state_dict()["images_taken"] == 40


def test_train_loader_yields_uint8_batches_of_batch_size(fake_cifar10: Path) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40, batch_size=64)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (64,)
    assert sorted(torch.cat([index for _, _, index in data.val_dataloader()]).tolist()) == list(range(40))


def test_cifar100(fake_cifar100: Path) -> None:
    data = CIFAR100DataModule(str(fake_cifar100), val_size=50)
    data.prepare_data()
    data.setup("test")
    assert data.num_classes == 100 and len(data.splits["test"]) == 100 and len(data.splits["train"]) == 250
    assert data.class_names[:2] == ["apple", "aquarium_fish"]


def test_image_folder_splits_classes_and_test_folder(image_folder: Path) -> None:
    data = ImageFolderDataModule(str(image_folder), val_size=30)
    data.prepare_data()
    data.setup("fit")
    assert data.class_names == ["cat", "dog", "frog"]
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [90, 30, 30]
    assert data.splits["test"].labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert data.predict_names[0] == "test/cat/0000.png"


def test_file_names_that_are_not_utf8_train_and_predict(image_folder: Path) -> None:
    # Names from an archive made on another system (Latin-1 `café.jpg`, unzipped on Linux): the folder's fingerprint
    # and torchvision's reader failed on them with a UnicodeEncodeError traceback.
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    os.replace(image_folder / "train" / "cat" / "0000.jpg", image_folder / "train" / "cat" / latin1)
    photos = image_folder.parent / "photos"
    photos.mkdir()
    (photos / latin1).write_bytes((image_folder / "test" / "dog" / "0010.png").read_bytes())
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--trainer.logger", "false"])
    rows = Path("predictions.csv").read_bytes().splitlines()
    assert len(rows) == 2 and rows[1].startswith(b"caf\xe9.jpg,")  # the file's name, as the file system holds it


def test_class_folder_names_that_are_not_utf8_train_test_and_predict(image_folder: Path) -> None:
    # A class folder from another system's archive (Latin-1 `café`): its name went into the metrics' names, the
    # confusion CSV and W&B, which take UTF-8 only, and fit ended in a UnicodeEncodeError traceback at the first
    # validation, whatever the logger.
    for split in ("train", "test"):
        os.replace(image_folder / split / "cat", image_folder / split / os.fsdecode(b"caf\xe9"))
    data = ["--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30"]
    main(["fit", *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"])  # fmt: skip
    (ckpt,) = Path("runs").glob("**/epoch=*.ckpt")
    assert "val_recall/caf\\xe9" in next(Path("runs").glob("**/metrics.csv")).read_text().splitlines()[0]
    main(["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert Path("confusion_test.csv").read_text().splitlines()[0] == "label,caf\\xe9,dog,frog"
    main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    rows = Path("predictions.csv").read_bytes().splitlines()
    assert rows[1].startswith(b"test/caf\xe9/0000.png,") and rows[1].endswith(b",caf\\xe9")


def test_class_folder_names_in_macos_unicode_form_match_train(image_folder: Path, capsys) -> None:
    # macOS writes names decomposed (NFD: `e` and a combining accent), Linux keeps them as typed (NFC): a test/ copied
    # from a Mac beside a train/ made on Linux was refused as "has classes that train/ lacks: épée", a name that
    # looks like train/'s and that `ls` shows alike.
    for split in ("train", "test"):
        os.replace(image_folder / split / "cat", image_folder / split / unicodedata.normalize("NFC", "épée"))
    os.replace(image_folder / "test" / "épée", image_folder / "test" / unicodedata.normalize("NFD", "épée"))
    data = ImageFolderDataModule(str(image_folder), val_size=30)
    data.setup("test")
    assert data.class_names == ["dog", "frog", unicodedata.normalize("NFC", "épée")]
    labels = data.splits["test"].labels.tolist()
    assert [labels[i] for i, name in enumerate(data.predict_names) if "/dog/" in name] == [0] * 10
    assert labels.count(2) == 10
    # The same name twice in train/, spelled both ways: two classes that read alike; refused, naming the folders.
    write_image_folder(image_folder / "train", {unicodedata.normalize("NFD", "épée"): 4}, seed=2)
    with pytest.raises(SystemExit):
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
              "--trainer.logger", "false"])  # fmt: skip
    err = capsys.readouterr().err
    assert "cifar-cli: error: " in err and "the same name in two Unicode forms" in err
    assert not Path("checkpoints").exists()


def test_checkpoint_tests_a_copy_of_its_folder_with_names_in_macos_unicode_form(image_folder: Path, capsys) -> None:
    # The same folder copied through a Mac (names decomposed, NFD): `test --ckpt_path` was refused as "trained on
    # other classes: its class 2 is 'öl', the data's 'öl'".
    nfc, nfd = unicodedata.normalize("NFC", "öl"), unicodedata.normalize("NFD", "öl")
    for split in ("train", "test"):
        os.replace(image_folder / split / "frog", image_folder / split / nfc)
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    for split in ("train", "test"):
        os.replace(image_folder / split / nfc, image_folder / split / nfd)
    main(["test", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert len(Path("confusion_test.csv").read_text().splitlines()) == 4
    # A name whose other form sorts elsewhere puts the classes in another order: refused, saying why.
    nfd_order = ["dog", unicodedata.normalize("NFD", "épée"), "zebra"]
    trained = {"hyper_parameters": {"class_names": ["dog", "zebra", unicodedata.normalize("NFC", "épée")]}}
    with pytest.raises(UsageError, match="the same names in another Unicode form"):
        check_same_classes(SimpleNamespace(class_names=nfd_order), trained, "model.ckpt", "test")


def test_class_folders_that_are_links_are_read(tmp_path: Path, capsys) -> None:
    # A data set put together from others with `ln -s`: a linked class folder counted as a class, but its images
    # were passed over, and the run stopped with "class folder dog ... has no images".
    write_image_folder(tmp_path / "elsewhere", {"dog": 12, "frog": 6}, seed=1)
    root = tmp_path / "images"
    write_image_folder(root / "train", {"cat": 12})
    (root / "train" / "dog").symlink_to(tmp_path / "elsewhere" / "dog")
    (root / "test").mkdir()
    (root / "test" / "frog").symlink_to(tmp_path / "elsewhere" / "frog")  # a class of train/ must be linked too
    (root / "train" / "frog").symlink_to(tmp_path / "elsewhere" / "frog")
    data = ImageFolderDataModule(str(root), val_size=6)
    data.prepare_data()
    data.setup("test")
    assert data.class_names == ["cat", "dog", "frog"]
    assert len(data.splits["train"]) + len(data.splits["val"]) == 30
    assert data.predict_names == [f"test/frog/{i:04d}.jpg" for i in range(12, 18)]
    assert "skipped" not in capsys.readouterr().err
    # Deeper down, a link to a folder is still passed over, and said, as in any folder of images.
    (root / "train" / "cat" / "more").symlink_to(tmp_path / "elsewhere" / "dog")
    ImageFolderDataModule(str(root), val_size=6).prepare("fit")
    assert "(link to a folder: 1; e.g. " in capsys.readouterr().err


def test_evaluation_batches_mix_the_classes_of_a_sorted_folder(image_folder: Path) -> None:
    """The test folder's images come class by class (cat, dog, frog), and so do the rows of the validation split
    held out of train/: evaluated in that order, `--trainer.limit_val_batches 1` would see cats only. Validation
    and test go in one seeded order, the same at every pass; predict keeps the folder's order (predictions.csv)."""
    data = ImageFolderDataModule(str(image_folder), val_size=30, batch_size=10)
    data.setup("fit")
    data.setup("test")
    assert data.splits["test"].labels[:10].unique().tolist() == [0]  # the folder's order: cats first
    for loader in (data.val_dataloader, data.test_dataloader):
        first = [labels for _, labels, _ in loader()][0]
        assert len(first.unique()) == 3
        later = loader()
        later.sampler.set_epoch(3)  # as Lightning does before each validation of a fit
        assert torch.equal(first, [labels for _, labels, _ in later][0])  # the same order at every pass
        assert sorted(torch.cat([index for *_, index in loader()]).tolist()) == list(range(30))  # each image once
    assert torch.cat([index for *_, index in data.predict_dataloader()]).tolist() == list(range(30))


def test_image_folder_test_split_held_out_of_train(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 30, "b": 30})
    data = ImageFolderDataModule(str(tmp_path), val_size=10, test_size=12)
    data.setup("test")
    sizes = {split: len(data.splits[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 38, "val": 10, "test": 12}
    names = data.predict_names
    assert len(set(names)) == 12 and all(name.startswith("train/") for name in names)
    no_test = ImageFolderDataModule(str(tmp_path), val_size=10)
    no_test.setup("test")
    with pytest.raises(UsageError, match="--data.test_size"):
        no_test.test_dataloader()


def test_a_checkpoint_evaluates_only_on_the_images_its_run_held_out(tmp_path: Path, capsys) -> None:
    # The held-out splits are drawn from train/'s listing: one image added after fit (or another --data.test_size)
    # drew others, and `test --ckpt_path` scored the network on images it had trained on, without a word.
    write_image_folder(tmp_path / "data" / "train", {"a": 30, "b": 30})
    data = ["--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "data"), "--data.val_size", "10",
            "--data.test_size", "12"]  # fmt: skip
    main(["fit", *data, "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    held_out = Path("predictions.csv").read_text()
    main(["test", "--ckpt_path", str(ckpt), "--data.val_size", "10", "--trainer.logger", "false"])  # as trained
    capsys.readouterr()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    root = tmp_path / "data" / "train"
    assert refused("test", "--data.test_size", "20") == (
        f"cifar-cli: error: checkpoint {ckpt} held other images of {root} out of training (it held out 22 images, "
        "--data.val_size 10 and --data.test_size 20 take 30): some of those this command tests on were trained on; "
        "pass the data and the --data flags it was trained with"
    )
    assert "--data.split_seed was 42, now 7" in refused("validate", "--data.split_seed", "7")
    # Fewer images, from those the run held out, are none it trained on: a quicker validation, say.
    main(["validate", "--ckpt_path", str(ckpt), "--data.val_size", "4", "--trainer.logger", "false"])
    main(["test", "--ckpt_path", str(ckpt), "--data.val_size", "2", "--data.test_size", "20",
          "--trainer.logger", "false"])  # fmt: skip
    (root / "b" / "new.jpg").write_bytes((root / "b" / "0030.jpg").read_bytes())
    for command in ("test", "validate", "predict", "fit"):
        assert f"held other images of {root} out of training (it had 60 images, now 61)" in refused(command)
    (root / "b" / "new.jpg").unlink()
    main(["predict", "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    assert Path("predictions.csv").read_text() == held_out


def test_a_cifar_checkpoint_validates_only_on_the_images_its_run_held_out(fake_cifar10: Path, capsys) -> None:
    # CIFAR's validation images are drawn from its training set as a folder's are: `validate --ckpt_path` with a
    # larger --data.val_size or another --data.split_seed scored the network on images it had trained on, silently.
    data = ["--data.data_dir", str(fake_cifar10), "--data.download", "false", "--trainer.logger", "false"]
    main(["fit", *data, "--data.val_size", "50", "--trainer.max_epochs", "1"])
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    capsys.readouterr()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *data, "--ckpt_path", str(ckpt)])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    source = fake_cifar10 / "cifar-10-batches-py"
    assert refused("validate", "--data.val_size", "80") == (
        f"cifar-cli: error: checkpoint {ckpt} held other images of {source} out of training (it held out 50 images, "
        "--data.val_size 80 takes 80): some of those this command validates on were trained on; pass the data and "
        "the --data flags it was trained with"
    )
    assert "--data.split_seed was 42, now 7" in refused("validate", "--data.split_seed", "7")
    assert "--data.split_seed was 42, now 7" in refused("fit", "--data.split_seed", "7", "--trainer.max_epochs", "2")
    main(["validate", *data, "--ckpt_path", str(ckpt), "--data.val_size", "20"])  # among those held out
    main(["test", *data, "--ckpt_path", str(ckpt), "--data.split_seed", "7"])  # CIFAR's test set is its own


def test_cifar_val_size_beyond_its_disk_copy_is_one_line_before_the_trainer(fake_cifar10: Path, capfd) -> None:
    # With --data.placement disk and its copy made, the archive was not read again and the sizes went unchecked
    # until the trainer set the data up: after Lightning's banner.
    data = ["--data.data_dir", str(fake_cifar10), "--data.download", "false", "--data.placement", "disk",
            "--data.cache_dir", "cache", "--trainer.logger", "false"]  # fmt: skip
    main(["fit", *data, "--data.val_size", "50", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data, "--data.val_size", "500", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
              "runs"])  # fmt: skip
    assert exit_info.value.code == 2
    assert capfd.readouterr().err.splitlines() == [
        "cifar-cli: error: val_size/test_size hold out 500 of 200 training images, leaving none to train on: choose "
        "--data.val_size (and --data.test_size) with a sum below 200"
    ]
    assert not Path("runs").exists()  # refused before the trainer and its logger were built


def test_a_checkpoint_of_a_run_with_a_val_folder_is_not_validated_on_train_once_it_is_gone(
    tmp_path: Path, capsys
) -> None:
    # Without val/, validation is drawn from train/: all images the run trained on.
    for split, count in (("train", 20), ("val", 6), ("test", 6)):
        write_image_folder(tmp_path / "data" / split, {"a": count, "b": count}, seed=len(split))
    data = ["--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "data"), "--trainer.logger", "false"]
    main(["fit", *data, "--trainer.max_epochs", "1"])
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    shutil.rmtree(tmp_path / "data" / "val")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *data, "--data.val_size", "8", "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cifar-cli: error: checkpoint {ckpt} held other images of {tmp_path / 'data' / 'train'} out of training (it "
        "had val/ and test/ folders of its own): some of those this command validates on were trained on; pass the "
        "data and the --data flags it was trained with"
    )
    main(["test", *data, "--data.val_size", "8", "--ckpt_path", str(ckpt)])  # test/ is still there
    # Nor does `test` need --data.val_size: it reads test/ and no validation split, and draws none from train/ (its
    # default, 5,000 of these 40 images, was refused as leaving "none to train on"). predict reads test/ alike.
    capsys.readouterr()
    main(["test", *data, "--ckpt_path", str(ckpt)])
    assert "test_acc" in capsys.readouterr().out
    main(["predict", *data, "--ckpt_path", str(ckpt)])
    # Without --data.val_size, its default (5,000) is held out of the 40 images of train/: refused as too many, which
    # read "leaving none to train on" alone, in a command that trains nothing, and named no folder gone.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *data, "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cifar-cli: error: val_size/test_size hold out 5000 of 40 training images ({tmp_path / 'data'} has no val/ "
        "folder: validation images are held out of train/), leaving none to train on: choose --data.val_size (and "
        "--data.test_size) with a sum below 40"
    )


def test_a_class_the_held_out_splits_take_whole_is_said_in_fit(tmp_path: Path, capfd) -> None:
    # A class of one image, which the seeded validation split takes: the network never saw it, and nothing said so.
    write_image_folder(tmp_path / "train", {"a": 1, "b": 10, "c": 10, "d": 10, "e": 10})
    args = ["--data", "ImageFolderDataModule", "--data.root", str(tmp_path), "--trainer.max_epochs", "1"]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    main(["fit", *args, "--data.val_size", "5"])
    said = [line for line in capfd.readouterr().err.splitlines() if "held out" in line]
    assert said == [
        f"cifar-cli: every image of class a (1 image) in {tmp_path / 'train'} is held out for validation or testing "
        "(--data.val_size, --data.test_size): the network never learns it; add images, hold out fewer, or draw "
        "another split (--data.split_seed)"
    ]
    data = ImageFolderDataModule(str(tmp_path), val_size=5)
    data.setup("fit")
    assert 0 not in data.splits["train"].labels.tolist() and 0 in data.splits["val"].labels.tolist()
    main(["fit", *args, "--data.val_size", "5", "--data.split_seed", "0"])  # a split that trains on it: no line
    assert "held out" not in capfd.readouterr().err


def test_image_folder_resizes_other_sizes(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 4, "b": 4}, size=48)
    data = ImageFolderDataModule(str(tmp_path), val_size=2, image_size=32)
    data.setup("fit")
    assert data.splits["train"].images.shape == (6, 3, 32, 32)


def test_image_folder_cache_is_reused_and_rebuilt_on_change(tmp_path: Path, monkeypatch) -> None:
    write_image_folder(tmp_path / "data" / "train", {"a": 6, "b": 6})
    decoded = []
    import cifar_cli.data.folder as data_module

    real_decode = data_module.decode_images_to_npy
    monkeypatch.setattr(
        data_module,
        "decode_images_to_npy",
        lambda paths, *args: decoded.append(len(paths)) or real_decode(paths, *args),
    )

    def load() -> torch.Tensor:
        data = ImageFolderDataModule(str(tmp_path / "data"), val_size=2, cache_dir=str(tmp_path / "cache"))
        data.prepare_data()
        data.setup("fit")
        return torch.cat([data.splits["train"].images, data.splits["val"].images])

    first = load()
    assert decoded == [12] and len(list((tmp_path / "cache").glob("train-32px-*.npy"))) == 1
    assert torch.equal(load(), first) and decoded == [12]  # served from the cache
    # Replace one image with another class's image: same name, new content, new modification time.
    target = tmp_path / "data" / "train" / "a" / "0000.jpg"
    target.write_bytes((tmp_path / "data" / "train" / "b" / "0006.jpg").read_bytes())
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    changed = load()
    assert decoded == [12, 12] and not torch.equal(changed, first)
    (tmp_path / "data" / "train" / "b" / "0011.jpg").unlink()
    assert len(load()) == 11 and decoded == [12, 12, 11]
    # Each rebuild replaced the cache it made stale; no partial file is left.
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_image_replaced_by_one_of_the_same_size_and_time_rebuilds_the_cache(tmp_path: Path) -> None:
    # `cp -p other.bmp a/0.bmp`: the same size (BMP files of one side are) and the old modification time, other
    # pixels. Only the change time (ctime), which no copy can set, tells it.
    from PIL import Image

    for name, colour in (("a/0.bmp", (255, 0, 0)), ("a/1.bmp", (0, 0, 255)), ("b/0.bmp", (0, 255, 0))):
        (tmp_path / "data" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "data" / "train" / name)

    def load() -> torch.Tensor:
        data = ImageFolderDataModule(str(tmp_path / "data"), val_size=0, cache_dir=str(tmp_path / "cache"))
        data.prepare_data()
        data.setup("fit")
        return data.splits["train"].images[:]

    first = load()
    target, other = tmp_path / "data" / "train" / "a" / "0.bmp", tmp_path / "data" / "train" / "b" / "0.bmp"
    before = target.stat()
    assert other.stat().st_size == before.st_size
    target.write_bytes(other.read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    changed = load()
    assert not torch.equal(changed[0], first[0]) and torch.equal(changed[0], first[2])
    assert len(os.listdir(tmp_path / "cache")) == 1  # the stale cache is gone


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no train/ folder"),
        ({"train": None}, "has no class folders"),
        ({"train": {"a": 3}}, r"^\S+/root/train has one class folder \(a\): a classifier needs at least 2$"),
        ({"train": {"a": 3, "b": 3}, "test": {"zebra": 2}}, "classes that train/ lacks: zebra"),
        # An empty val/ or test/ trained without validation (no val_loss for the checkpoints) or tested nothing.
        *(
            (
                {"train": {"a": 3, "b": 3}, split: None},
                rf"^\S+/root/{split} has no images \((?:\.avif, )?\.bmp, .*\): put them in {split}/<class>/, or remove "
                rf"the folder to hold out --data.{split}_size images of train/ instead$",
            )
            for split in ("val", "test")
        ),
    ],
)
def test_image_folder_layout_errors(tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for split, counts in layout.items():
        (root / split).mkdir()
        if counts:
            write_image_folder(root / split, counts)
    with pytest.raises(UsageError, match=message):
        data = ImageFolderDataModule(str(root), val_size=1)
        data.prepare_data()


def test_a_root_that_is_a_file_or_the_train_folder_itself_says_so(tmp_path: Path) -> None:
    # A downloaded data.zip passed as the root was said not to exist; train/ itself, passed as the root, was said
    # to have no train/ folder, and nothing said to pass the folder above it.
    (tmp_path / "data.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(UsageError) as refused:
        ImageFolderDataModule(str(tmp_path / "data.zip"))
    assert str(refused.value) == (
        f"image folder {tmp_path}/data.zip is a file, not a folder: expected ROOT/train/<class>/<image>.jpg (or .png)"
    )
    write_image_folder(tmp_path / "data" / "train", {"a": 3, "b": 3})
    with pytest.raises(UsageError) as refused:
        ImageFolderDataModule(str(tmp_path / "data" / "train"))
    assert str(refused.value) == (
        f"image folder {tmp_path}/data/train has no train/ folder: expected ROOT/train/<class>/<image>.jpg (or .png); "
        f"it is a train/ folder itself: pass --data.root {tmp_path}/data"
    )


# The suffixes read: .avif, .heic and .heif among them where Pillow reads them (pillow-heif installed, for HEIC).
READ = "/".join(sorted(image_suffixes()))
NOT_IMAGES = f"that are not {READ} images"


def test_files_that_are_not_images_are_skipped_and_said_in_one_line(tmp_path: Path, capsys) -> None:
    from PIL import Image

    root, train = tmp_path / "data", tmp_path / "data" / "train"
    write_image_folder(train, {"cat": 4, "dog": 4})
    jpegs = sorted(train.glob("*/*.jpg"))
    for i, source in enumerate(jpegs[3:5]):  # cat/0003, dog/0004: BMPs are read (by Pillow)
        Image.open(source).save(source.with_name(f"b{i}.bmp"))
    for name in ("cat/t0.tif", "cat/t1.tif", "dog/t2.tif"):  # TIFFs are not: Pillow clips 16-bit ones
        Image.open(jpegs[0]).save(train / name)
    (train / "README.md").write_text("cats and dogs\n")
    (train / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped without a word
    (train / "dog" / "gone.jpg").symlink_to(train / "dog" / "missing.jpg")
    capsys.readouterr()
    data = ImageFolderDataModule(str(root), val_size=2, placement="device")
    data.prepare("fit")
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 10  # 8 JPEGs and 2 BMPs
    line = (
        f"cifar-cli: skipped 5 files of {train} {NOT_IMAGES} (.tif: 3, .md: 1, broken link: 1; e.g. {train}/README.md)"
    )
    assert capsys.readouterr().err.splitlines() == [line]
    # Said whenever the folder is listed, with the cache in place; not by a node's other processes (DDP ranks).
    again = ImageFolderDataModule(str(root), val_size=2, placement="device")
    again.setup("fit")
    assert capsys.readouterr().err.splitlines() == [line]
    rank_1 = ImageFolderDataModule(str(root), val_size=2, placement="device")
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    rank_1.trainer = SimpleNamespace(local_rank=1, is_global_zero=False, num_devices=2, strategy=cpu)
    rank_1.setup("fit")
    assert len(rank_1.splits["train"]) == 8 and capsys.readouterr().err == ""
    # Files skipped in several split folders: one line, naming the root.
    write_image_folder(root / "test", {"cat": 1, "dog": 1})
    (root / "test" / "notes.txt").write_text("\n")
    ImageFolderDataModule(str(root), val_size=2, placement="device").prepare("test")
    both = (
        f"cifar-cli: skipped 6 files of {root} {NOT_IMAGES} (.tif: 3, .md: 1, .txt: 1, broken link: 1; "
        f"e.g. {root}/test/notes.txt)"
    )
    assert capsys.readouterr().err.splitlines() == [both]
    # A predict folder is listed alike (here one file skipped), and then the labelled folders.
    photos = tmp_path / "photos"
    write_image_folder(photos, {"x": 2})
    (photos / "x" / "scan.tif").write_bytes((train / "cat" / "t0.tif").read_bytes())
    predict = ImageFolderDataModule(str(root), val_size=2, predict_root=str(photos), placement="device")
    predict.prepare("predict")
    predict.setup("predict")
    assert len(predict.splits["predict"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"cifar-cli: skipped 1 file of {photos} that is not a {READ} image (.tif: 1; e.g. {photos}/x/scan.tif)",
        both,
    ]


def test_phone_photos_without_their_decoder_are_skipped_saying_how_to_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Without pillow-heif, and with a Pillow that reads no AVIF, HEIC and AVIF photos are skipped, and the line says
    how to read them: a folder of iPhone photos was skipped with a count, and no word on why or what to do."""
    monkeypatch.setattr(image_files, "reads_heif", lambda: False)
    monkeypatch.setattr(image_files, "reads_avif", lambda: False)
    root, train = tmp_path / "data", tmp_path / "data" / "train"
    write_image_folder(train, {"cat": 4, "dog": 4})
    for name in ("cat/IMG_0001.HEIC", "cat/IMG_0002.heic", "dog/IMG_0003.heif", "dog/web.avif"):
        (train / name).write_bytes(b"\0")  # never opened: skipped by its suffix
    capsys.readouterr()
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "2",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.logger", "false"])  # fmt: skip
    said = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    heic = "pip install 'pillow-heif>=1.1' (or in cifar-cli's folder pip install -e '.[heic]')"
    assert said == [
        f"cifar-cli: skipped 4 files of {train} that are not .bmp/.gif/.jpeg/.jpg/.png/.webp images (.heic: 2, "
        f".avif: 1, .heif: 1; e.g. {train}/cat/IMG_0001.HEIC); to read the .heic/.heif files, {heic} and the .avif "
        "files, a Pillow that reads AVIF (pip install -U pillow), or convert them to JPEG"
    ]
    # A predict folder of phone photos alone has no images it reads: said with the same advice.
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_0004.HEIC").write_bytes(b"\0")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cifar-cli: error: --data.predict_root {photos} has no images (.bmp, .gif, .jpeg, .jpg, .png, .webp; to "
        f"read the .heic files, {heic}, or convert them to JPEG)"
    )


def test_image_folder_undecodable_file(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="cannot decode .*broken.jpg"):
        ImageFolderDataModule(str(tmp_path), val_size=1).prepare_data()


def deny_reading(monkeypatch: pytest.MonkeyPatch, paths: set[Path]) -> None:
    """Reading `paths` fails as it does for a user other than their owner, where the mode lets only the owner read:
    root, who may run the tests, reads every file whatever its mode."""

    def denied(real: Callable) -> Callable:
        def call(path, *args, **kwargs):
            if Path(path) in paths:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(np, "fromfile", denied(np.fromfile))
    monkeypatch.setattr(os, "scandir", denied(os.scandir))
    monkeypatch.setattr(os, "listdir", denied(os.listdir))


def test_an_image_that_may_not_be_read_is_one_line_naming_it(tmp_path: Path, monkeypatch, capsys) -> None:
    # An image of another user's on a shared machine: the command said "cannot write in <image> (permission denied):
    # choose a folder you can write in (--trainer.default_root_dir, --data.cache_dir)".
    write_image_folder(tmp_path / "data" / "train", {"cat": 4, "dog": 4})
    locked = tmp_path / "data" / "train" / "dog" / "0005.jpg"
    deny_reading(monkeypatch, {locked})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "data"), "--data.val_size", "2",
              "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cifar-cli: error: cannot read image {locked} (permission denied): make it readable (chmod a+r) or remove it"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_every_bad_image_of_a_folder_is_named_in_one_line(tmp_path: Path, monkeypatch, capsys, workers: int) -> None:
    # A photo collection with a few broken files stopped at the first: removed, the next run decoded the folder again
    # up to the second, and so on, once per bad file.
    monkeypatch.setattr("cifar_cli.data.images.PARALLEL_FROM", 1)
    monkeypatch.setattr("cifar_cli.data.images.CHUNK", 4)
    train = tmp_path / "data" / "train"
    write_image_folder(train, {"cat": 8, "dog": 8})
    (train / "cat" / "0003.jpg").write_bytes(b"\xff\xd8\xffjunk")
    (train / "dog" / "0012.jpg").write_bytes(b"")
    (train / "dog" / "0015.jpg").write_bytes(b"<html>403</html>")
    with pytest.raises(SystemExit):
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "data"), "--data.val_size", "2",
              "--data.decode_workers", str(workers), "--trainer.logger", "false"])  # fmt: skip
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith(f"cifar-cli: error: cannot decode image {train}/cat/0003.jpg (")
    assert line.endswith(f"; 2 more of the 16 images cannot be used either: {train}/dog/0012.jpg, {train}/dog/0015.jpg")
    assert not list((tmp_path / "cache").glob("**/*.npy"))


def test_images_of_val_and_test_that_are_copies_of_training_images_are_said(image_folder: Path, capsys) -> None:
    # Photos copied into both train/ and val/ (a folder sorted twice, a burst of identical shots): validation scored
    # images the network trained on as unseen, and nothing said so.
    shutil.copytree(image_folder / "test", image_folder / "val")
    shutil.copy(image_folder / "train" / "dog" / "0045.jpg", image_folder / "val" / "dog" / "copy.jpg")
    shutil.copy(image_folder / "train" / "cat" / "0001.jpg", image_folder / "test" / "frog" / "IMG 1.jpg")
    shutil.copy(image_folder / "train" / "cat" / "0002.jpg", image_folder / "test" / "cat" / "IMG 2.jpg")
    data = ImageFolderDataModule(str(image_folder))
    data.prepare("fit")
    err = capsys.readouterr().err
    assert (
        f"cifar-cli: 3 images of val/ and test/ in {image_folder} are copies of training images (e.g. val/dog/copy.jpg "
        "of train/dog/0045.jpg): their scores count images the network trained on; remove them from one side"
    ) in err
    data.prepare("test")  # said by the fit that decodes the folders since they changed
    ImageFolderDataModule(str(image_folder)).prepare("fit")
    assert "copies" not in capsys.readouterr().err


def test_copies_within_train_on_both_sides_of_the_drawn_split_are_said(tmp_path: Path, capsys) -> None:
    # A photo saved twice in train/, whose copies the validation split drawn from train/ put on both sides: the
    # network was scored on an image it trained on, and nothing said so.
    root = tmp_path / "data"
    write_image_folder(root / "train", {"cat": 10, "dog": 10})
    data = ImageFolderDataModule(str(root), val_size=5, test_size=3)
    val_index, test_index, train_index = split_indices(20, [5, 3], data.split_seed)
    names = [f"{c}/{i:04d}.jpg" for i, c in enumerate(["cat"] * 10 + ["dog"] * 10)]
    held_val, held_test, trained = (names[int(index[0])] for index in (val_index, test_index, train_index))
    shutil.copy(root / "train" / trained, root / "train" / held_val)  # a held-out image is a copy of a trained one
    shutil.copy(root / "train" / trained, root / "train" / held_test)
    shutil.copy(root / "train" / names[int(val_index[1])], root / "train" / names[int(test_index[1])])  # held out both
    data.prepare("fit")
    said = [line for line in capsys.readouterr().err.splitlines() if "cop" in line]
    first = min(f"train/{held_val}", f"train/{held_test}")
    assert said == [
        f"cifar-cli: 2 images of train/ in {root} held out for validation and test are copies of images trained on "
        f"(e.g. {first} of train/{trained}): their scores count images the network trained on; remove the copies "
        "from train/"
    ]
    data.setup("fit")  # the split the line names is the one the data module draws: a validation image trained on
    val, train = data.splits["val"].images, data.splits["train"].images
    assert any(torch.equal(image, other) for image in val for other in train)
    # Said once, by the fit that decodes the folder; nothing where no split is drawn from train/.
    ImageFolderDataModule(str(root), val_size=5, test_size=3).prepare("fit")
    write_image_folder(root / "val", {"cat": 2, "dog": 2}, seed=1)
    write_image_folder(root / "test", {"cat": 2, "dog": 2}, seed=2)
    ImageFolderDataModule(str(root)).prepare("fit")
    assert "held out for" not in capsys.readouterr().err


def test_a_class_that_val_or_test_lacks_is_said(image_folder: Path, capsys) -> None:
    # A val/ without one of train/'s classes: that class's validation recall and accuracy read 0 in metrics.csv, the
    # report and W&B, as though the network missed every image of it, and nothing said the class had none.
    write_image_folder(image_folder / "val", {"cat": 3, "frog": 3}, seed=2)
    data = ImageFolderDataModule(str(image_folder))
    data.prepare("fit")
    assert (
        f"cifar-cli: {image_folder}/val has no images of class dog: its val_recall/dog and val_acc/dog read 0 with "
        "nothing to score"
    ) in capsys.readouterr().err
    shutil.rmtree(image_folder / "test" / "frog")
    data.prepare("test")
    assert f"{image_folder}/test has no images of class frog: its test_recall/frog" in capsys.readouterr().err


def test_folders_that_may_not_be_read_are_said(tmp_path: Path, monkeypatch, capsys) -> None:
    # A class's subfolder of another user's was passed over without a word: its images were left out of training.
    root, train = tmp_path / "data", tmp_path / "data" / "train"
    write_image_folder(train, {"cat": 4, "dog": 4})
    write_image_folder(train / "cat" / "more", {"x": 3}, seed=1)
    photos = tmp_path / "photos"
    write_image_folder(photos, {"x": 2})
    deny_reading(monkeypatch, {train / "cat" / "more", photos})
    data = ImageFolderDataModule(str(root), val_size=2)
    data.setup("fit")
    assert len(data.splits["train"]) + len(data.splits["val"]) == 8
    assert capsys.readouterr().err.splitlines()[0] == (
        f"cifar-cli: skipped 1 file of {train} that is not a {READ} image (folder you may "
        f"not read: 1; e.g. {train}/cat/more)"
    )
    # A predict folder that may not be read at all: one line saying so, not that it has no images.
    with pytest.raises(UsageError) as refused:
        ImageFolderDataModule(str(root), val_size=2, predict_root=str(photos)).setup("predict")
    assert str(refused.value) == f"cannot read folder {photos} (permission denied): make it readable (chmod a+rx)"
    # train/ or a class folder that may not be read: that, not "cannot write in" the folder, nor "has no images".
    for folder in (train / "dog", train):
        deny_reading(monkeypatch, {folder})
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "2"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"cifar-cli: error: cannot read folder {folder} (permission denied): make it readable (chmod a+rx)"
        )


def test_a_predict_root_below_a_folder_that_may_not_be_read_is_one_line(
    image_folder: Path, monkeypatch, capsys
) -> None:
    # The folder above may not be read, so neither may the predict folder's own status: the command said it could
    # not write in the predict folder, and to choose another --trainer.default_root_dir.
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = Path("checkpoints").glob("epoch=*.ckpt")
    photos = image_folder / "shared" / "photos"
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if Path(path) == photos:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    if hasattr(pathlib, "_NormalAccessor"):  # Python 3.10's Path.stat calls the os.stat it bound at import
        monkeypatch.setattr(pathlib._NormalAccessor, "stat", staticmethod(stat))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cifar-cli: error: cannot read folder {photos} (permission denied): make it readable (chmod a+rx)"
    )


def test_predict_root_missing(image_folder: Path, tmp_path: Path) -> None:
    data = ImageFolderDataModule(str(image_folder), val_size=30, predict_root=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="is not a folder"):
        data.setup("predict")


def test_saved_state_normalises_as_training_did_and_predicts_without_the_data(image_folder: Path, tmp_path) -> None:
    from cifar_cli.data.base import predicting_from

    data = ImageFolderDataModule(str(image_folder), val_size=30)
    data.setup("fit")
    state = data.state_dict()
    assert state["class_names"] == ["cat", "dog", "frog"]
    assert torch.equal(state["mean"], data.mean) and torch.equal(state["std"], data.std)
    # Other data of the same classes (brighter images, other statistics) is normalised with the saved ones.
    write_image_folder(tmp_path / "other" / "train", {"cat": 10, "dog": 10, "frog": 10}, seed=5)
    other = ImageFolderDataModule(str(tmp_path / "other"), val_size=5)
    other.setup("test")
    assert not torch.allclose(other.mean, data.mean)
    batch = other.splits["train"].images[:4]
    other.load_state_dict(state)
    expected = (batch.float() - state["mean"].view(1, 3, 1, 1)) / state["std"].view(1, 3, 1, 1)
    assert torch.allclose(other.preprocess(batch), expected, atol=1e-5)
    # Built to predict from a checkpoint: classes and statistics from it, the training folder never looked at.
    photos = tmp_path / "photos"
    write_image_folder(photos, {"x": 2})
    with predicting_from({"ImageFolderDataModule": state}):
        alone = ImageFolderDataModule(str(tmp_path / "gone"), val_size=30, predict_root=str(photos))
    alone.prepare("predict")
    alone.setup("predict")
    assert alone.class_names == ["cat", "dog", "frog"] and torch.equal(alone.mean, data.mean)
    assert len(alone.splits["predict"]) == 2 and "train" not in alone.splits
    assert alone.placement_used == "device"  # auto: two images fit anywhere
    with predicting_from({"ImageFolderDataModule": state}):
        on_host = ImageFolderDataModule(str(tmp_path / "gone"), predict_root=str(photos), placement="host")
    on_host.setup("predict")
    assert on_host.placement_used == "host" and on_host.predict_dataloader().device is not None  # sent batch by batch
    with pytest.raises(RuntimeError, match="cannot fit"):
        alone.setup("fit")
    # A training folder there is not read either, not even to refuse it (one class folder).
    write_image_folder(tmp_path / "one" / "train", {"cat": 2})
    with predicting_from({"ImageFolderDataModule": state}):
        one = ImageFolderDataModule(str(tmp_path / "one"), predict_root=str(photos))
    assert one.class_names == state["class_names"]
    # Outside that block, or without a predict folder, a data module reads its data as always.
    with predicting_from({"ImageFolderDataModule": state}), pytest.raises(UsageError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "gone"), val_size=30)


def test_list_images_finds_what_pathlib_finds_in_its_order(tmp_path: Path) -> None:
    root = tmp_path / "images"
    files = ["a/x.jpg", "a-b/x.JPG", "a/b/y.png", "ab/z.webp", ".hidden/h.jpg", "a/.h.jpg", "a/notes.txt", "c.gif"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a link to a folder: not followed, as by rglob
    (root / "a" / "l.jpg").symlink_to(root / "c.gif")  # a link to a file: listed
    (root / "a" / "broken.jpg").symlink_to(root / "missing.jpg")
    skipped = []
    listed = list_images(root, skipped)
    by_pathlib = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in image_suffixes()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
    assert listed == by_pathlib
    assert [p.relative_to(root).as_posix() for p in listed] == [
        "a/b/y.png", "a/l.jpg", "a/x.jpg", "a-b/x.JPG", "ab/z.webp", "c.gif"
    ]  # fmt: skip
    # What is skipped, but for hidden files: said in one line (test_files_that_are_not_images_are_skipped_...).
    assert skipped == [
        (["a", "broken.jpg"], "broken link"),
        (["a", "notes.txt"], ".txt"),
        (["linked"], "link to a folder"),
    ]


def test_caches_of_versions_before_npy_are_removed_once_the_npy_cache_is_in_place(image_folder: Path) -> None:
    cache = Path("cache-dir")
    cache.mkdir()

    def legacy(split: str) -> Path:  # how versions before the .npy caches named a split folder's torch file
        key = hashlib.sha1(f"{(image_folder / split).resolve()}|32".encode()).hexdigest()[:16]
        return cache / f"{split}-32px-{key}.pt"

    other = cache / "train-32px-0123456789abcdef.pt"  # another folder's: left alone
    for path in (legacy("train"), legacy("test"), other):
        path.write_bytes(b"old")
    data = ImageFolderDataModule(str(image_folder), val_size=30, cache_dir=str(cache))
    data.prepare("fit")
    data.setup("fit")
    assert sorted(p.name for p in cache.glob("*.pt")) == [other.name]
    assert len(list(cache.glob("*.npy"))) == 2 and len(data.splits["train"]) == 90


def test_a_pillow_without_avif_reads_none_without_a_warning(monkeypatch: pytest.MonkeyPatch, recwarn) -> None:
    # Pillow before 11.3 knows no "avif" feature, and features.check warned of it on every command: the GPU check
    # installs cifar-cli without its dependencies, beside the machine's own Pillow.
    from PIL import features

    monkeypatch.setattr(features, "modules", {k: v for k, v in features.modules.items() if k != "avif"})
    assert image_files.reads_avif.__wrapped__() is False
    assert not recwarn.list


def test_a_pillow_heif_before_1_1_reads_no_heic(monkeypatch: pytest.MonkeyPatch) -> None:
    # pillow-heif 1.0 misplaces the pixels of a photo its orientation turns (up to 20 levels off on a gradient, 8 from
    # 1.1): its HEIC files are skipped with the advice to install 1.1, as without it.
    pillow_heif = pytest.importorskip("pillow_heif")
    monkeypatch.setattr(pillow_heif, "__version__", "1.0.0")
    assert image_files.reads_heif.__wrapped__() is False
    monkeypatch.setattr(pillow_heif, "__version__", "1.1.0")
    assert image_files.reads_heif.__wrapped__() is True
