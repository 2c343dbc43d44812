"""Image data sets in class folders, decoded once on every core and cached as uint8 `.npy` files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor

from cifar_cli.atomic import atomic_file
from cifar_cli.data.augment import BatchAugment, Flip
from cifar_cli.data.base import ImageDataModule
from cifar_cli.data.batches import TensorImageDataset, split_indices
from cifar_cli.data.images import Skipped, decode_images_to_npy, image_parts, no_images, skipped_line
from cifar_cli.data.placement import Placement
from cifar_cli.data.storage import (
    DiskImages,
    cache_path,
    default_cache_dir,
    files_fingerprint,
    open_cache,
    remove_other_versions,
    rows_of,
)
from cifar_cli.errors import UsageError


def class_name(folder: str) -> str:
    """A class folder's name as the class is named: one that is not UTF-8 (a Latin-1 `café` from an archive made on
    another system) with those bytes as `\\xe9`, as `ls -b` shows them. The metrics' names, the CSV files and W&B
    take UTF-8 only: such a name ended `fit` in a UnicodeEncodeError at the first validation."""
    return os.fsencode(folder).decode(errors="backslashreplace")


def same_name(name: str) -> str:
    """A class name as it compares with another: in Unicode's composed form (NFC). macOS writes names decomposed
    (NFD: `e` and a combining accent), Linux keeps them as typed: a val/ or test/ copied from a Mac beside a train/
    made elsewhere was refused as having a class `épée` that train/ lacks, a name that reads and lists alike."""
    return unicodedata.normalize("NFC", name)


class _Listing(NamedTuple):
    """A split folder's image files, before decoding."""

    cache: Path
    paths: list[Path]
    names: list[str]  # relative to the data set's root: <split>/<class>/<file>
    labels: Tensor
    fingerprint: str
    skipped: list[Skipped]  # the files that are no images (`image_parts`), below <split>/


# Where `make data` unpacks the JPEG copy of CIFAR-10's training images, configs/cifar10-jpg.yaml's `root`.
JPEG_COPY = "data/cifar10-jpg"


class ImageFolderDataModule(ImageDataModule):
    """Any image data set in class folders: `root/train/<class>/*.jpg|png|...`, optionally `root/val/` and `root/test/`.

    Without `root/val/`, `val_size` training images are held out for validation; without `root/test/`,
    `test_size` more (0: no test split). Each folder is decoded once, by a process per core, into a uint8 `.npy`
    file in `cache_dir`, which is rebuilt when any image file is added, removed or changed.

    Args:
        root: Folder holding `train/<class>/` (and optionally `val/<class>/`, `test/<class>/`).
        image_size: Side of the square images the model sees, in pixels; other sizes are resized and centre-cropped.
        batch_size: Images per batch, per device.
        val_size: Training images held out for validation when there is no `root/val/`.
        test_size: Training images held out for testing when there is no `root/test/`.
        split_seed: Seed of the held-out splits; the same seed gives the same split on every run and rank.
        augment: Augment training images, batched on the device: `true` crops and flips them (CIFAR style), a
            class such as `PhotoAugment` does what it says (`--data.augment PhotoAugment --data.augment.mixup 0.2`).
        crop_padding: With `augment` true, the most pixels a crop shifts the image by (reflect padding), per side.
        flip: With `augment` true, which images are mirrored: `random`, each with probability 1/2 every epoch;
            `alternate` (airbench), a random half in the first epoch and each image the other way in every epoch
            after that.
        predict_root: Folder of unlabelled images for `predict` (searched recursively); default: the test split.
        cache_dir: Where decoded folders are cached; default `$XDG_CACHE_HOME/cifar-cli` or `~/.cache/cifar-cli`.
        decode_workers: Processes that decode the images; default: one per CPU this process may use.
        placement: Where the uint8 splits live while training: `device` (moved to it once), `host` (host memory,
            each batch copied to the device one batch ahead), `disk` (the cache file, each batch reading its rows:
            host memory stays bounded), `auto` (the first of these the splits fit in half the free memory of).
    """

    def __init__(
        self,
        root: str,
        image_size: PositiveInt = 32,
        batch_size: PositiveInt = 32,
        val_size: PositiveInt = 5000,
        test_size: NonNegativeInt = 0,
        split_seed: int = 42,
        augment: bool | BatchAugment = False,
        crop_padding: PositiveInt = 4,
        predict_root: str | None = None,
        cache_dir: str | None = None,
        decode_workers: PositiveInt | None = None,
        placement: Placement = "auto",
        flip: Flip = "random",
    ) -> None:
        super().__init__(batch_size, val_size, split_seed, augment, crop_padding, predict_root, placement, flip)
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.test_size = test_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if decode_workers is not None:
            self.decode_workers = int(decode_workers)
        # From the checkpoint when predicting from it (see ImageDataModule.saved): `root` may not exist here.
        self._classes = list(self.saved["class_names"]) if self.saved is not None else self._find_classes()
        self._prepared_listings: dict[str, _Listing] | None = None  # `prepare`'s, for the `setup` that follows
        self._stage: str | None = None  # the stage prepared or set up for (`_held_out_sizes`)
        self.save_hyperparameters()

    def _find_classes(self) -> list[str]:
        train = self.root / "train"
        layout = "expected ROOT/train/<class>/<image>.jpg (or .png)"
        try:
            if not self.root.is_dir():
                what = "is a file, not a folder" if self.root.exists() else "does not exist"  # a data.zip, say
                unpack = (
                    "; `make data` in cifar-cli's folder unpacks the CIFAR-10 JPEG copy there (run from that folder, "
                    "or give --data.root)"
                    if self.root.as_posix() == JPEG_COPY and not self.root.exists()
                    else ""
                )
                raise UsageError(f"image folder {self.root} {what}: {layout}{unpack}")
            if not train.is_dir():
                # The train/ folder itself passed as the root, a common slip: which folder to pass instead.
                hint = (
                    f"; it is a train/ folder itself: pass --data.root {self.root.parent}"
                    if self.root.name == "train"
                    else ""
                )
                raise UsageError(f"image folder {self.root} has no train/ folder: {layout}{hint}")
            classes = sorted(class_name(d.name) for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
            forms: dict[str, list[str]] = {}
            for name in classes:
                forms.setdefault(same_name(name), []).append(name)
            twice = next((names for names in forms.values() if len(names) > 1), None)
            if twice:
                # Two classes whose names read alike everywhere they are shown (metrics, confusion matrices).
                raise UsageError(
                    f"{train} has class folders {' and '.join(ascii(name) for name in twice)}, the same name in two "
                    "Unicode forms (macOS writes names decomposed): move the images of one into the other"
                )
        except PermissionError as err:  # the command's own handler reads a denied path as one it cannot write in
            raise UsageError(
                f"cannot read folder {err.filename} (permission denied): make it readable (chmod a+rx)"
            ) from None
        if not classes:
            raise UsageError(f"{train} has no class folders: {layout}")
        if len(classes) == 1:
            # It would train without complaint, to an accuracy of 1.0: the one output is always right.
            raise UsageError(f"{train} has one class folder ({classes[0]}): a classifier needs at least 2")
        return classes

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _missing_split_hint(self, split: str) -> str:
        if split == "test":
            # Not `--data.test_size N` alone: beside a checkpoint, the images it would hold out were trained on.
            return (
                f"add {self.root}/test/<class>/ with images the model has not trained on, or hold out training "
                "images when you fit (--data.test_size N)"
            )
        return super()._missing_split_hint(split)

    def _list_folder(self, split: str) -> _Listing:
        """A labelled split folder's images, checked against the class folders of `train/`."""
        folder = self.root / split
        skipped: list[Skipped] = []
        found = image_parts(folder, skipped, class_folders=True)  # a link to a class folder, as `_find_classes`
        stray = [parts for parts in found if len(parts) < 2]
        if stray:
            raise UsageError(
                f"{folder.joinpath(*stray[0])} is not in a class folder of {folder}: move it into {split}/<class>/ "
                "or remove it"
            )
        paths = [folder.joinpath(*parts) for parts in found]
        names = ["/".join([split, *parts]) for parts in found]
        # Each folder as the train/ class of the same name, in whichever Unicode form train/ spells it.
        spelled = {same_name(name): name for name in self._classes}
        classes = [spelled.get(same_name(name), name) for name in (class_name(parts[0]) for parts in found)]
        unknown = sorted(set(classes) - set(self._classes))
        if unknown:
            raise UsageError(f"{folder} has classes that train/ lacks: {', '.join(unknown)}")
        if not paths:
            # An empty val/ or test/ would validate on nothing (no val_loss for ModelCheckpoint) or test nothing.
            what = f"{folder} has {no_images(skipped)}"
            if split == "train":
                raise UsageError(what)
            raise UsageError(
                f"{what}: put them in {split}/<class>/, or remove the folder to hold out --data.{split}_size images "
                "of train/ instead"
            )
        if split == "train":
            empty = sorted(set(self._classes) - set(classes))
            if empty:
                # A class without training images would be an output the network never learns.
                raise UsageError(
                    f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} in {folder} "
                    f"{'have' if len(empty) > 1 else 'has'} {no_images(skipped)}: "
                    "add images or remove the folder"
                )
        fingerprint = files_fingerprint(paths, names, self.image_size)  # a changed image rebuilds the cache
        index = {name: i for i, name in enumerate(self._classes)}
        labels = torch.tensor([index[c] for c in classes], dtype=torch.long)
        # The labels are not cached: they come from the class folders' names, listed on every run anyway.
        cache = cache_path(self.cache_dir, f"{split}-{self.image_size}px", folder, fingerprint)
        return _Listing(cache, paths, names, labels, fingerprint, skipped)

    def _say_skipped(self, listings: dict[str, _Listing]) -> None:
        """One line on the files the listings skipped, if any, naming their split folder (the root when several
        have some). Every listing says it: the cache may be read without decoding, but the files are still not
        in it."""
        some = {split: listing.skipped for split, listing in listings.items() if listing.skipped}
        if len(some) == 1:
            ((split, skipped),) = some.items()
            self.notice(skipped_line(self.root / split, skipped))
        else:
            self.notice(
                skipped_line(self.root, [([split, *parts], kind) for split in some for parts, kind in some[split]])
            )

    def _cached(self, listing: _Listing) -> DiskImages | None:
        """The listing's decoded images in their cache file, or None when there is none."""
        return open_cache(listing.cache, (len(listing.paths), *self.image_shape))

    def _write_caches(self, listings: list[_Listing]) -> None:
        """Decode the listings' folders into their cache files. Each is written beside its name and renamed when
        every folder has decoded: a bad image, or a kill, leaves no cache (and no cache folder) behind."""
        with contextlib.ExitStack() as written:
            for listing in listings:
                partial = written.enter_context(atomic_file(listing.cache))
                label = f"decoding {self.root / Path(listing.names[0]).parts[0]}" if listing.names else ""
                decode_images_to_npy(listing.paths, self.image_size, partial, self.decode_workers, label)
        for listing in listings:
            remove_other_versions(listing.cache)

    def _legacy_cache(self, split: str) -> Path:
        """Where versions before the `.npy` caches kept the split folder's images (a torch file of a uint8 tensor):
        removed once the `.npy` cache is in place, as nothing reads it any more (at 224 px, 7.5 GB for 50,000)."""
        key = hashlib.sha1(f"{(self.root / split).resolve()}|{self.image_size}".encode()).hexdigest()[:16]
        return self.cache_dir / f"{split}-{self.image_size}px-{key}.pt"

    def _listings(self) -> dict[str, _Listing]:
        """The listings of the split folders there are (train, and val and test where present)."""
        splits = [split for split in ("train", "val", "test") if (self.root / split).is_dir()]
        return {split: self._list_folder(split) for split in splits}

    def _check_split_sizes(self, listings: dict[str, _Listing]) -> None:
        """`check_split_sizes`, naming the split folders that are missing: a `validate` or `test` of a run that had
        its own val/, moved away since, was told that --data.val_size's default left "none to train on", of a
        folder that has a val/ as far as its user knows (a `test` now draws none: `_held_out_sizes`)."""
        sizes = self._held_out_sizes(listings)
        missing = [(split, name) for split, name, size in zip(("val", "test"), ("validation", "test"), sizes) if size]
        note = ""
        if missing:
            folders = " or ".join(f"{split}/" for split, _ in missing)
            note = f"{self.root} has no {folders} folder: {' and '.join(n for _, n in missing)} images are held out "
            note += "of train/"
        self.check_split_sizes(len(listings["train"].paths), sum(sizes), note)

    def prepare_files(self, stage: str) -> None:
        # Every check before any decoding, and every folder decoded before any cache is written: bad data stops
        # the command with nothing written.
        self._stage = stage
        listings = self._listings()
        self._check_split_sizes(listings)
        self.held_out_from = self._held_out_record(listings)
        if stage == "fit":
            self._say_untrained_classes(listings)
        scored = {"fit": "val", "validate": "val", "test": "test"}.get(stage)
        if scored in listings:
            self._say_absent_classes(scored, listings[scored])
        needs_test = stage == "test" or (stage == "predict" and self.predict_root is None)
        if needs_test and "test" not in listings and not self.test_size:
            # predict reads the test split only where it is given no folder of its own
            other = "; or predict a folder of images with --data.predict_root DIR" if stage == "predict" else ""
            raise UsageError(f"{type(self).__name__} has no test split: {self._missing_split_hint('test')}{other}")
        self._say_skipped(listings)
        to_decode = [listing for listing in listings.values() if self._cached(listing) is None]
        if stage == "fit" and to_decode:
            self._say_copies(listings)
        self._write_caches(to_decode)
        self._prepared_listings = listings

    def setup(self, stage: str) -> None:
        self._stage = stage  # (`prepare` sets it on the node's first process only)
        super().setup(stage)

    def _held_out_sizes(self, listings: dict[str, _Listing]) -> list[int]:
        """The validation and test images held out of train/: none for a split that has its own folder, nor for
        validation where `test` and `predict` read a test/ folder and no validation split: the `test` of a run whose
        val/ had since been moved away was refused, as --data.val_size's default (5,000) left none to train on."""
        evaluating = self._stage in ("test", "predict") and "test" in listings
        return [0 if "val" in listings or evaluating else self.val_size, 0 if "test" in listings else self.test_size]

    def _held_out_record(self, listings: dict[str, _Listing]) -> dict[str, int | str]:
        """What decides which images of train/ the validation and test splits hold out (`split_indices`): the
        listing, the sizes held out (none for a split with a folder of its own: one removed since then draws from the
        images trained on) and the seed."""
        val_size, test_size = self._held_out_sizes(listings)
        names = listings["train"].names
        digest = hashlib.sha1("\n".join(names).encode(errors="surrogateescape")).hexdigest()
        # Plain ints: jsonargparse's PositiveInt is a class that weights-only loading of the checkpoint refuses.
        return {"images": len(names), "names": digest, "val_size": int(val_size), "test_size": int(test_size),
                "split_seed": int(self.split_seed)}  # fmt: skip

    def _held_out_source(self) -> str:
        return str(self.root / "train")

    def _say_untrained_classes(self, listings: dict[str, _Listing]) -> None:
        """One line when the held-out splits take every training image of a class (a class of one or two images):
        as with an empty class folder, the network would never learn it, and nothing said so. A line, not a refusal:
        a quick run over many small classes may accept it."""
        labels = listings["train"].labels
        train_index = split_indices(len(labels), self._held_out_sizes(listings), self.split_seed)[-1]
        untrained = sorted(set(range(len(self._classes))) - set(labels[train_index].tolist()))
        if not untrained:
            return
        counts = torch.bincount(labels, minlength=len(self._classes)).tolist()
        named = ", ".join(f"{self._classes[i]} ({counts[i]} image{'s'[: counts[i] - 1]})" for i in untrained[:3])
        more = f" and {len(untrained) - 3} more" if len(untrained) > 3 else ""
        self.notice(
            f"every image of class{'es'[: 2 * (len(untrained) > 1)]} {named}{more} in {self.root / 'train'} is held "
            "out for validation or testing (--data.val_size, --data.test_size): the network never learns "
            f"{'them' if len(untrained) > 1 else 'it'}; add images, hold out fewer, or draw another split "
            "(--data.split_seed)"
        )

    def _say_absent_classes(self, split: str, listing: _Listing) -> None:
        """One line when a val/ or test/ folder has no images of some of train/'s classes: their recall and accuracy
        read 0 (`class_scores`, as torchmetrics gives them) in metrics.csv, the report and W&B, as though the network
        had missed every image of them."""
        absent = sorted(set(range(len(self._classes))) - set(listing.labels.tolist()))
        if not absent:
            return
        names = [self._classes[i] for i in absent]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        scores = (
            f"its {split}_recall/{names[0]} and {split}_acc/{names[0]}"
            if len(names) == 1
            else f"their {split}_recall/<class> and {split}_acc/<class>"
        )
        self.notice(
            f"{self.root / split} has no images of class{'es' if len(names) > 1 else ''} {listed}: {scores} read 0 "
            "with nothing to score"
        )

    def _say_copies(self, listings: dict[str, _Listing]) -> None:
        """One line when images of val/ or test/ are copies of training images, byte for byte (a photo sorted into
        two folders), and one when copies within train/ fall on both sides of the validation or test split drawn
        from it (a photo saved twice): their scores count images the network trained on as unseen. Lines, not
        refusals, as for `_say_untrained_classes`. Said by the `fit` that decodes the folders after they changed,
        which reads every file anyway: only files of another's size are read, which for small images (whose sizes
        collide) is nearly all: 50,000 CIFAR-sized JPEGs with 5,000 held out took 1.2 s, a cost every later `fit` would
        pay again."""
        splits = [split for split in ("val", "test") if split in listings]
        drawn = self._held_out_sizes(listings)
        if not splits and not any(drawn):
            return
        train = listings["train"]
        sizes: dict[int, list[int]] = {}
        for i, path in enumerate(train.paths):
            sizes.setdefault(path.stat().st_size, []).append(i)
        digests: dict[int, bytes] = {}

        def digest(i: int) -> bytes:
            if i not in digests:
                digests[i] = hashlib.sha1(train.paths[i].read_bytes()).digest()
            return digests[i]

        copies: list[tuple[str, str]] = []  # (the copy's name, the training image's)
        for split in splits:
            for path, name in zip(listings[split].paths, listings[split].names):
                same_size = sizes.get(path.stat().st_size, [])
                if not same_size:
                    continue
                mine = hashlib.sha1(path.read_bytes()).digest()
                match = next((i for i in same_size if digest(i) == mine), None)
                if match is not None:
                    copies.append((name, train.names[match]))
        if copies:
            where = " and ".join(f"{split}/" for split in splits if any(n.startswith(f"{split}/") for n, _ in copies))
            self.notice(
                f"{len(copies)} image{'s'[: len(copies) - 1]} of {where} in {self.root} "
                f"{'are copies' if len(copies) > 1 else 'is a copy'} of training images (e.g. {copies[0][0]} of "
                f"{copies[0][1]}): their scores count images the network trained on; remove them from one side"
            )
        if any(drawn):
            self._say_drawn_copies(train, drawn, sizes, digest)

    def _say_drawn_copies(
        self, train: _Listing, drawn: list[int], sizes: dict[int, list[int]], digest: Callable[[int], bytes]
    ) -> None:
        """`_say_copies`' line on copies within train/ that the split drawn from it puts on both sides. The split
        stays as drawn: it depends on the listing alone, which checkpoints record (`_held_out_record`) to refuse
        evaluating on images their run trained on; grouping copies would draw another split from the same record."""
        *held_out, _ = split_indices(len(train.paths), drawn, self.split_seed)
        held = set(torch.cat(held_out).tolist())
        copies: list[tuple[int, int]] = []  # (the held-out copy, an image trained on)
        for same_size in sizes.values():
            if len(same_size) < 2 or all(i in held for i in same_size) or held.isdisjoint(same_size):
                continue
            groups: dict[bytes, list[int]] = {}
            for i in same_size:
                groups.setdefault(digest(i), []).append(i)
            for group in groups.values():
                trained = next((i for i in group if i not in held), None)
                if trained is not None:
                    copies += [(i, trained) for i in group if i in held]
        if not copies:
            return
        copies.sort()
        names = [split for split, size in zip(("validation", "test"), drawn) if size]
        self.notice(
            f"{len(copies)} image{'s'[: len(copies) - 1]} of train/ in {self.root} held out for "
            f"{' and '.join(names)} {'are copies' if len(copies) > 1 else 'is a copy'} of images trained on (e.g. "
            f"{train.names[copies[0][0]]} of {train.names[copies[0][1]]}): their scores count images the network "
            "trained on; remove the copies from train/"
        )

    def load_splits(self) -> None:
        # The listing `prepare` made moments before in this process, if any: listing 50,000 files and reading
        # their sizes and times takes about a second, which every run paid twice.
        prepared, self._prepared_listings = self._prepared_listings, None
        listings = prepared or self._listings()
        self._check_split_sizes(listings)
        self.held_out_from = self._held_out_record(listings)
        if prepared is None:  # `prepare` said it of its listing
            self._say_skipped(listings)
        self.choose_placement(sum(len(listing.paths) for listing in listings.values()) * 3 * self.image_size**2)
        self._write_caches([listing for listing in listings.values() if self._cached(listing) is None])
        files = {split: self._cached(listing) for split, listing in listings.items()}
        for split in listings:
            self._legacy_cache(split).unlink(missing_ok=True)
        images, labels, names = files["train"], listings["train"].labels, listings["train"].names
        val_index, test_index, train_index = split_indices(len(images), self._held_out_sizes(listings), self.split_seed)

        def split(name: str, index: Tensor) -> tuple[Tensor | DiskImages, Tensor, list[str]]:
            """A split: its own folder, or the rows `index` of train/."""
            if name in listings:
                return self.place(files[name]), listings[name].labels, listings[name].names
            return self.place(rows_of(images, index)), labels[index], [names[i] for i in index.tolist()]

        # Only the test split keeps its image names (for predictions.csv).
        self.splits = {"train": TensorImageDataset(self.place(rows_of(images, train_index)), labels[train_index])}
        self.set_statistics(self.splits["train"].images)
        val_images, val_labels, _ = split("val", val_index)
        self.splits["val"] = TensorImageDataset(val_images, val_labels)
        if "test" in listings or self.test_size:
            test_images, test_labels, self.predict_names = split("test", test_index)
            self.splits["test"] = self.splits["predict"] = TensorImageDataset(test_images, test_labels)
