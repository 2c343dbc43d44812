"""`ImageDataModule`, the base of the data modules: uint8 splits on the device, in host memory or on disk; batches
normalised on the device."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningDataModule
from torch import Tensor

from cifar_cli.atomic import atomic_file
from cifar_cli.data.augment import BatchAugment, Flip, alternating_mirror, random_crop_flip
from cifar_cli.data.batches import DeviceBatches, TensorImageDataset
from cifar_cli.data.images import (
    Skipped,
    decode_images,
    decode_images_to_npy,
    list_images,
    no_images,
    skipped_line,
    usable_cpus,
)
from cifar_cli.data.placement import Placement, choose_placement, gigabytes, keep_on_disk
from cifar_cli.data.storage import (
    DiskImages,
    cache_path,
    chunks,
    default_cache_dir,
    files_fingerprint,
    open_cache,
    remove_other_versions,
)
from cifar_cli.errors import UsageError
from cifar_cli.scoped import set_during
from cifar_cli.seeding import run_seed

# The checkpoint `predict` runs from, while CifarCLI builds the data module for a folder of new images: a data module
# built then takes its classes and normalisation from the state it saved there (`state_dict`) and reads none of the
# data it was trained on, which another machine need not have. A context variable, not an argument: the checkpoint is
# no setting of the data module, and LightningCLI builds it, and reads its classes for the model, in one call.
_PREDICT_FROM: ContextVar[Mapping[str, Any] | None] = ContextVar("predict_from", default=None)


def predicting_from(checkpoint: Mapping[str, Any] | None) -> AbstractContextManager[None]:
    """Data modules built in this block that have a `predict_root` and find their saved state in `checkpoint`
    predict from that state alone (see `ImageDataModule.saved`)."""
    return set_during(_PREDICT_FROM, checkpoint)


class ImageDataModule(LightningDataModule):
    """Base of the data modules: uint8 splits in memory, batched normalisation and augmentation on the device.

    Subclasses fill `self.splits` with `TensorImageDataset`s in `setup` and say what the data is through
    `class_names` and `image_shape`.

    Args:
        batch_size: Images per batch, per device.
        val_size: Images held out of the training split for validation, when the data set has no validation split.
        split_seed: Seed of the train/validation split; the same seed gives the same split on every run and rank.
        augment: Augment training images, batched on the device: `true` crops and flips them (CIFAR style), a
            class such as `PhotoAugment` does what it says (`--data.augment PhotoAugment --data.augment.mixup 0.2`).
        crop_padding: With `augment` true, the most pixels a crop shifts the image by (reflect padding), per side.
        flip: With `augment` true, which images are mirrored: `random`, each with probability 1/2 every epoch;
            `alternate` (airbench), a random half in the first epoch and each image the other way in every epoch
            after that.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
        placement: Where the uint8 splits live while training: `device` (moved to it once), `host` (host memory,
            each batch copied to the device one batch ahead), `disk` (a file each batch reads its rows from: host
            memory stays bounded), `auto` (the first of these the splits fit in half the free memory of).
    """

    def __init__(
        self,
        batch_size: PositiveInt = 32,
        val_size: PositiveInt = 5000,
        split_seed: int = 42,
        augment: bool | BatchAugment = False,
        crop_padding: PositiveInt = 4,
        predict_root: str | None = None,
        placement: Placement = "auto",
        flip: Flip = "random",
    ) -> None:
        super().__init__()
        if not -(2**63) <= split_seed < 2**64:
            # torch's generator takes a signed or unsigned 64-bit seed; a larger one raised as the split was drawn.
            raise UsageError(f"--data.split_seed {split_seed}: a seed is an integer from {-(2**63)} to {2**64 - 1}")
        self.batch_size = batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment
        if isinstance(augment, BatchAugment):
            augment.check()
        self.crop_padding = crop_padding
        self.flip = flip
        self.predict_root = None if predict_root is None else Path(predict_root).expanduser()
        self.placement = placement
        self.placement_used: str | None = None  # `placement` resolved by `choose_placement` (auto: from free memory)
        self.decode_workers = usable_cpus()  # processes that decode image files (ImageFolderDataModule's flag)
        self.splits: dict[str, TensorImageDataset] = {}
        self.train_images: int | None = None  # the training split's size, once `prepare` has listed the data
        # Names of the predicted images (paths or indices) in the order of the predict split, for predictions.csv.
        self.predict_names: list[str] = []
        self.mean: Tensor | None = None  # per channel, 0-255 scale, from the training split's images
        self.std: Tensor | None = None
        self._stats_on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._prepared_for: str | None = None  # the stage `prepare` checked the data for
        self._predict_folder: tuple[Tensor | DiskImages, list[str]] | None = None  # decoded by `prepare`
        self.cache_dir = default_cache_dir()  # decoded data kept on disk; the subclasses' `cache_dir` flag sets it
        self.held_out_from: dict[str, int | str] | None = None  # what the held-out splits are drawn from, if any
        # The state a checkpoint saved (`state_dict`), when this module predicts `predict_root` from it alone.
        checkpoint = _PREDICT_FROM.get()
        state = checkpoint.get(type(self).__qualname__) if checkpoint is not None and predict_root else None
        self.saved: dict[str, Any] | None = dict(state) if isinstance(state, Mapping) and "mean" in state else None

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(channels, height, width)` of the images the model sees."""
        raise NotImplementedError

    def set_statistics(self, train_images: Tensor | DiskImages) -> None:
        """Take the per-channel mean and std for normalisation from all images of the training split: not from those
        held out of it for validation and testing, which would then shape the inputs of the model they evaluate.

        Exact and cheap from each channel's 256-bin histogram: no float copy of the whole data set. Counted a chunk
        of about 64 MB at a time, so that images on disk are read once and never held whole.
        """
        histograms = torch.zeros(train_images.shape[1], 256, dtype=torch.long)
        for chunk in chunks(train_images):
            for channel, histogram in enumerate(histograms):
                histogram += torch.bincount(chunk[:, channel].flatten(), minlength=256).cpu()
        levels = torch.arange(256, dtype=torch.float64)
        mean, std = [], []
        for histogram in histograms:
            counts = histogram.double()
            mu = (counts * levels).sum() / counts.sum()
            mean.append(mu)
            std.append(((counts * (levels - mu) ** 2).sum() / (counts.sum() - 1)).sqrt())
        self.mean, self.std = torch.stack(mean).float(), torch.stack(std).float()
        self._stats_on.clear()

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Normalise with the given per-channel mean and std (0-255 scale) from now on: a pretrained network's."""
        self.mean, self.std = mean.float(), std.float()
        self._stats_on.clear()

    def state_dict(self) -> dict[str, Any]:
        # What the model needs of the data to predict, saved in every checkpoint (under the class's name): its
        # classes in label order and its input normalisation. `predict --ckpt_path F --data.predict_root DIR`
        # then reads nothing else, and evaluation normalises as training did even where the data has changed.
        if self.mean is None or self.std is None:
            return {}
        state = {"class_names": self.class_names, "mean": self.mean.clone(), "std": self.std.clone()}
        if self.held_out_from is not None:
            state["held_out_from"] = dict(self.held_out_from)
        return state

    def _held_out_source(self) -> str:
        """The training images the held-out splits are drawn from, as `check_held_out` names them."""
        raise NotImplementedError

    def check_held_out(self, trained: Mapping[str, Any] | None, ckpt_path: str, stage: str) -> None:
        """Refuse, in one line, to evaluate a checkpoint on training images its run trained on: the held-out splits
        are drawn from the training images (a folder's listing), so an image added or removed since, another
        split_seed, or held-out sizes beyond those of the run draw others. Checkpoints from before this record (and
        CIFAR's before it kept one) pass unchecked."""
        before, now = (trained or {}).get("held_out_from"), self.held_out_from
        if not isinstance(before, Mapping) or now is None:
            return
        if (stage in ("test", "predict") and not now["test_size"]) or (stage == "validate" and not now["val_size"]):
            return  # a split with its own folder
        # Validation takes the first val_size images of the seeded order, test the next test_size, training the
        # rest: splits within the first images the run held out (a smaller --data.val_size) hold none it trained on.
        reach = now["val_size"] if stage == "validate" else now["val_size"] + now["test_size"]
        untrained = int(before.get("val_size", 0)) + int(before.get("test_size", 0))
        changed = next((key for key in ("images", "names", "split_seed") if before.get(key) != now[key]), None)
        if changed is None and reach <= untrained:
            return
        if changed == "images":
            what = f"it had {before['images']} images, now {now['images']}"
        elif changed == "names":
            what = "the names of its images have changed"
        elif changed == "split_seed":
            what = f"--data.split_seed was {before['split_seed']}, now {now['split_seed']}"
        elif untrained == 0:
            what = "it had val/ and test/ folders of its own"
        else:
            sizes = f"--data.val_size {now['val_size']}" + (
                "" if stage == "validate" else f" and --data.test_size {now['test_size']}"
            )
            what = f"it held out {untrained} images, {sizes} take{'s' if stage == 'validate' else ''} {reach}"
        uses = {"fit": "validates on", "validate": "validates on"}.get(stage, "tests on")
        raise UsageError(
            f"checkpoint {ckpt_path} held other images of {self._held_out_source()} out of training ({what}): some of "
            f"those this command {uses} were trained on; pass the data and the --data flags it was trained with"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after `setup` with a checkpoint's state: the model goes on seeing its inputs as in
        # training (the statistics of the training images it had; a pretrained network's own, set again anyway).
        if "mean" in state_dict and "std" in state_dict:
            self.set_normalization(torch.as_tensor(state_dict["mean"]), torch.as_tensor(state_dict["std"]))

    def prepare_data(self) -> None:
        # Lightning calls this on local rank 0 of each node. cifar-cli calls `prepare` before it builds the trainer,
        # so that bad data stops the command before Lightning logs or writes anything; then this costs nothing.
        fn = self.trainer.state.fn if self.trainer is not None else None
        self.prepare(fn.value if fn is not None else "fit")

    def prepare(self, stage: str) -> None:
        """Check the data for `stage` (fit, validate, test or predict) and download or cache it, once per process.

        Bad data ends in a UsageError that says what to change.
        """
        if self._prepared_for == stage:
            return
        self.check_crop_padding()
        # The predict folder first: the data set's preparation may write its cache.
        predict = self._decode_predict_folder() if stage == "predict" and self.predict_root is not None else None
        if self.saved is None:
            self.prepare_files(stage)
        self._predict_folder = predict
        self._prepared_for = stage

    def prepare_files(self, stage: str) -> None:
        """Download or cache the data set and check it for `stage`."""

    def check_crop_padding(self) -> None:
        """Refuse a crop that would shift the image by its whole side or more (reflect padding needs less). Checked
        in `prepare`, before the trainer is built: found in `setup` alone, it stopped the command after Lightning's
        banner, leaving an empty run folder behind, and after an image folder's decoding."""
        side = min(self.image_shape[1:])
        if self.augment is True and self.crop_padding >= side:
            raise UsageError(f"--data.crop_padding {self.crop_padding} must be below the image side, {side} pixels")

    def setup(self, stage: str) -> None:
        self.check_crop_padding()  # again: `prepare` runs on each node's first process only
        if self.saved is not None:  # predicting from a checkpoint: none of the labelled data is read
            if stage != "predict":
                raise RuntimeError(f"a data module built to predict from a checkpoint cannot {stage}")
            self.set_normalization(torch.as_tensor(self.saved["mean"]), torch.as_tensor(self.saved["std"]))
        elif not self.splits:
            self.load_splits()
        if stage == "predict":
            self.setup_predict_folder()
            if self.saved is not None and not isinstance(self.splits["predict"].images, DiskImages):
                # Where the folder's images live while predicting, as `placement` decides for the labelled splits
                # (`host`: batches copied to the device one at a time; `auto`: from the free memory).
                self.choose_placement(self.splits["predict"].images.nbytes)

    def load_splits(self) -> None:
        """Fill `self.splits` with the labelled splits and set the normalisation statistics.

        Subclasses call `choose_placement` first, and `place` each split's images.
        """
        raise NotImplementedError

    def choose_placement(self, nbytes: int) -> str:
        """Resolve `placement` for `nbytes` of splits on the trainer's device (`auto`: from the free memory, in a
        line on stderr) and keep it in `placement_used`."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        processes = trainer.num_devices if trainer is not None else 1  # DDP ranks on this machine, a copy each
        self.placement_used, line = choose_placement(self.placement, nbytes, device, processes)
        if line is not None and (trainer is None or trainer.is_global_zero):
            print(f"cifar-cli: {line}", file=sys.stderr)
        return self.placement_used

    def notice(self, line: str | None) -> None:
        """Print `line` (if any) on stderr as `cifar-cli: line`, from a node's first process only: the others list
        the same folders when they set up, and would repeat it. Before the trainer exists, only that process lists
        them (`prepare`, from `check_data`)."""
        if line is not None and (self.trainer is None or self.trainer.local_rank == 0):
            print(f"cifar-cli: {line}", file=sys.stderr)

    def place(self, images: Tensor | DiskImages) -> Tensor | DiskImages:
        """A split's images as `placement_used` keeps them: read into memory, unless they stay on disk."""
        if isinstance(images, DiskImages) and self.placement_used != "disk":
            return images.load()
        return images

    def setup_predict_folder(self) -> None:
        """Make `predict_root`'s images the predict split, named by their paths relative to it."""
        if self.predict_root is None:
            return
        images, names = self._predict_folder or self._decode_predict_folder()
        self._predict_folder = None
        self.splits["predict"] = TensorImageDataset(images, torch.full((len(names),), -1, dtype=torch.long))
        self.predict_names = names

    def _decode_predict_folder(self) -> tuple[Tensor | DiskImages, list[str]]:
        """predict_root's images and their paths relative to it (the predictions' names). The images are in memory,
        or in a `.npy` file in `cache_dir` that batches read from (placement `disk`, or `auto` where the decoded
        images would take more than half the free host memory: a folder of 100,000 photos at 224 px is 15 GB)."""
        root = self.predict_root
        assert root is not None
        try:
            is_folder = root.is_dir()
        except PermissionError as err:  # below a folder that may not be read; not one it cannot write in, as said
            raise UsageError(
                f"cannot read folder {err.filename} (permission denied): make it readable (chmod a+rx)"
            ) from None
        if not is_folder:
            missing = "" if root.exists() else " (no such path)"
            raise UsageError(f"--data.predict_root {root} is not a folder{missing}: pass a folder of images")
        skipped: list[Skipped] = []
        paths = list_images(root, skipped)
        if not paths:
            raise UsageError(f"--data.predict_root {root} has {no_images(skipped)}")
        self.notice(skipped_line(root, skipped))  # a README or a .tif among the images: said, not an error
        _, size, _ = self.image_shape  # square, as every data module here
        names = [p.relative_to(root).as_posix() for p in paths]
        nbytes = len(paths) * 3 * size * size
        processes = self.trainer.num_devices if self.trainer is not None else 1  # DDP ranks here, a copy each
        on_disk, free = keep_on_disk(self.placement, nbytes, processes)
        if not on_disk:
            return decode_images(paths, size, self.decode_workers, label=f"decoding {root}"), names
        cache = cache_path(self.cache_dir, f"predict-{size}px", root, files_fingerprint(paths, names, size))
        if self.placement == "auto" and (self.trainer is None or self.trainer.is_global_zero):
            print(
                f"cifar-cli: predict folder {root}: {gigabytes(nbytes)} decoded, {gigabytes(free)} of host memory "
                f"free -> disk ({cache})",
                file=sys.stderr,
            )
        decoded = open_cache(cache, (len(paths), 3, size, size))
        if decoded is not None:
            return decoded, names
        with atomic_file(cache) as partial:  # a bad image, or a kill, leaves no file behind
            decode_images_to_npy(paths, size, partial, self.decode_workers, label=f"decoding {root}")
        remove_other_versions(cache)
        return DiskImages(cache), names

    def check_split_sizes(self, n_train: int, held_out: int, note: str = "") -> None:
        """Refuse held-out sizes that leave no training image; `note`, in parentheses, says where they come from."""
        self.train_images = n_train - held_out  # the training split's, known before it is loaded (`setup`)
        if held_out >= n_train:
            raise UsageError(
                f"val_size/test_size hold out {held_out} of {n_train} training images{f' ({note})' if note else ''}, "
                f"leaving none to train on: choose --data.val_size (and --data.test_size) with a sum below {n_train}"
            )

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 batch -> normalised float batch. Training batches arrive augmented already (`augment_batch`)."""
        if self.mean is None or self.std is None:
            raise RuntimeError("preprocess needs the training statistics: call setup first")
        if images.device not in self._stats_on:
            shape = (1, -1, 1, 1)
            self._stats_on[images.device] = (
                self.mean.to(images.device).view(shape),
                (1 / self.std).to(images.device).view(shape),
            )
        mean, inverse_std = self._stats_on[images.device]
        # Two kernels: uint8 - float32 promotes to float32 without a separate conversion.
        return (images - mean) * inverse_std

    def augment_batch(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, index: Tensor, epoch: int
    ) -> tuple[Tensor, Tensor]:
        """The augmented training batch: `(images, labels)` in, `(images, labels)` out (probabilities with MixUp).
        `index`: the images' positions in the training split; `epoch`: the training epoch.

        `augment` true: random crops and flips of the uint8 batch: on uint8, a quarter of the bytes to move that
        floats would take, and the same pixels, since cropping and mirroring commute with the per-channel
        normalisation."""
        if isinstance(self.augment, BatchAugment):
            return self.augment(images, labels, generator, self.num_classes)
        mirror = None
        if self.flip == "alternate":
            mirror = alternating_mirror(index, epoch, len(self.splits["train"]), run_seed())
        return random_crop_flip(images, self.crop_padding, generator=generator, mirror=mirror), labels

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, ...]:
        images, *rest = batch
        images = self.preprocess(images)
        if self.trainer is not None:
            # In the precision's dtype for the "-true" precisions (bf16-true, 16-true, 64-true), whose weights are
            # in it; Lightning converts the batch before this hook, when the images are still uint8.
            images = self.trainer.precision_plugin.convert_input(images)
        return images, *rest

    def _loader(self, split: str, train: bool = False) -> DeviceBatches:
        if split not in self.splits:
            raise UsageError(f"{type(self).__name__} has no {split} split: {self._missing_split_hint(split)}")
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        # A split on disk stays there (a large predict folder, whatever the labelled splits' placement).
        on_device = self.placement_used in (None, "device") and not isinstance(self.splits[split].images, DiskImages)
        if on_device and self.splits[split].device != device:
            self.splits[split] = self.splits[split].to(device)  # once per split: later batches never leave it
        return DeviceBatches(
            self.splits[split],
            self.batch_size,
            shuffle=train,
            drop_last=train,
            scramble=split in ("val", "test"),  # predict keeps the split's order: predictions.csv lists it so
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            # Training: Lightning's own seed variable, as its DistributedSampler uses, so --seed_everything sets the
            # order too. Evaluation: the split's seed, so that one cut short (--trainer.limit_val_batches) sees the
            # same images in every run and command, whatever their seed (`validate --ckpt_path` scores the run's).
            seed=run_seed() if train else self.split_seed,
            with_index=not train,  # evaluation and predict name each image (cifar_cli.dashboard, PredictionWriter)
            augment=self.augment_batch if train and self.augment else None,
            device=None if on_device else device,  # host or disk: each batch is sent to the device ahead
        )

    def _missing_split_hint(self, split: str) -> str:
        return "call setup first"

    def train_dataloader(self) -> DeviceBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DeviceBatches:
        return self._loader("val")

    def test_dataloader(self) -> DeviceBatches:
        return self._loader("test")

    def predict_dataloader(self) -> DeviceBatches:
        return self._loader("predict")
