"""PhotoAugment: per-image draws from the caller's generator, what each part does, its flags, and exact resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import CSV_LOGGER, checkpoints, fails, metrics_rows, values
from test_resume import EVERY_STEP, FAST, assert_identical, cifar, tensors
from torchvision.transforms.v2 import functional as TF

from cifar_cli.cli import main
from cifar_cli.data import DeviceBatches, ImageFolderDataModule, PhotoAugment, TensorImageDataset
from cifar_cli.data.photo import sample_beta
from cifar_cli.errors import UsageError

# Every part off: the crop is the whole image, unmirrored, colours untouched.
IDENTITY = {"scale": (1.0, 1.0), "flip": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator(seed))
    return images, torch.arange(n) % 5


def test_shapes_dtypes_and_the_same_seed_gives_the_same_batch() -> None:
    images, labels = batch()
    full = PhotoAugment(hue=0.1, erasing=0.5, mixup=0.2, cutmix=1.0)
    out, soft = full(images, labels, generator(3), 5)
    assert out.shape == images.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    assert soft.shape == (16, 5) and soft.dtype == torch.float32
    again, soft_again = full(images, labels, generator(3), 5)
    assert torch.equal(out, again) and torch.equal(soft, soft_again)
    other, _ = full(images, labels, generator(4), 5)
    assert not torch.equal(out, other)
    # Without MixUp and CutMix the labels pass through as class indices.
    plain_out, plain_labels = PhotoAugment()(images, labels, generator(3), 5)
    assert plain_labels is labels and plain_out.dtype == torch.float32


def test_every_image_of_a_batch_gets_its_own_draw() -> None:
    one = batch(1, 32)[0].expand(64, -1, -1, -1)
    out, _ = PhotoAugment(hue=0.1, erasing=0.5)(one, torch.zeros(64, dtype=torch.long), generator(), 1)
    assert len({tuple(image.flatten()[::97].tolist()) for image in out}) == 64
    # Brightness alone: one factor per image, drawn from [0.6, 1.4] (where nothing clips).
    grey = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    bright, _ = PhotoAugment(**{**IDENTITY, "brightness": 0.4})(grey, torch.zeros(64, dtype=torch.long), generator(), 1)
    factors = bright.mean(dim=(1, 2, 3)) / 100
    assert torch.allclose(bright, factors.view(64, 1, 1, 1) * 100, atol=1e-3)
    assert 0.6 <= factors.min() < 0.7 and 1.3 < factors.max() <= 1.4 and len(set(factors.tolist())) == 64


def test_identity_settings_leave_the_images_as_they_are() -> None:
    images, labels = batch(8, 20)
    out, same = PhotoAugment(**IDENTITY)(images, labels, generator(), 5)
    assert (out - images.float()).abs().max() < 1e-3 and same is labels  # bilinear at the pixel centres
    flipped, _ = PhotoAugment(**{**IDENTITY, "flip": True})(images, labels, generator(), 5)
    mirrored = [bool((f - i.float().flip(-1)).abs().max() < 1e-3) for f, i in zip(flipped, images)]
    unchanged = [bool((f - i.float()).abs().max() < 1e-3) for f, i in zip(flipped, images)]
    assert all(m != u for m, u in zip(mirrored, unchanged)) and 0 < sum(mirrored) < 8


def test_a_crop_of_a_quarter_of_the_area_doubles_the_image() -> None:
    # A ramp along x: bilinear resizing keeps it a ramp, with the slope scaled by the crop's width (1/2 here).
    ramp = torch.arange(32.0).expand(16, 3, 32, 32)
    crop = PhotoAugment(scale=(0.25, 0.25), ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
    out = crop.crop_flip(ramp, generator())
    steps = out[..., 1:-1].diff(dim=-1)  # inside the border, where reflection plays no part
    slopes = steps.mean(dim=(1, 2, 3))
    assert torch.allclose(steps, slopes.view(16, 1, 1, 1).expand_as(steps), atol=1e-3)
    assert torch.allclose(slopes.abs(), torch.full((16,), 0.5), atol=1e-4)
    assert (slopes < 0).any() and (slopes > 0).any()  # some mirrored
    starts = out[:, 0, 0, 0]
    assert len(set(starts.round(decimals=3).tolist())) > 8  # each image at its own offset


def test_contrast_and_saturation_match_torchvision_per_image() -> None:
    images, _ = batch(8, 16)
    for name, reference in (("contrast", TF.adjust_contrast), ("saturation", TF.adjust_saturation)):
        augment = PhotoAugment(**{**IDENTITY, name: 0.5})
        out = augment.jitter(images.float(), generator(1))
        factors = 0.5 + torch.rand(8, generator=generator(1))  # the draws jitter made: [1 - 0.5, 1 + 0.5]
        expected = torch.stack([reference(image, float(f)) for image, f in zip(images.float() / 255, factors)])
        # torchvision's grey is 0.2989 R where YIQ's luma is 0.299: well below a level of 0-255.
        assert (out - 255 * expected).abs().max() < 0.1, name


def test_hue_turns_colours_and_keeps_grey() -> None:
    images, _ = batch(8, 16)
    images[:, :, :4] = 77  # a grey band in every image
    out = PhotoAugment(**{**IDENTITY, "hue": 0.25}).jitter(images.float(), generator())
    assert (out[:, :, :4] - 77).abs().max() < 1e-3
    assert (out - images.float()).abs().amax(dim=(1, 2, 3)).min() > 10


def test_erasing_fills_one_rectangle_per_image_with_the_mean_colour() -> None:
    images, labels = batch(16, 32)
    erase = PhotoAugment(**{**IDENTITY, "erasing": 1.0})
    out = erase.erase(images.float(), generator())
    fill = images.float().mean(dim=(0, 2, 3))
    changed = (out != images.float()).any(dim=1)  # (N, H, W)
    areas = []
    for image, mask in zip(out, changed):
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = image[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert torch.allclose(box, fill.view(3, 1, 1).expand_as(box))  # a rectangle, all of it the mean colour
        areas.append(box[0].numel() / 32**2)
    assert all(0.015 < a < 0.34 for a in areas) and len(set(areas)) > 8
    assert torch.equal(PhotoAugment(**{**IDENTITY, "erasing": 0.0}).erase(images.float(), generator()), images.float())


def test_mixup_labels_are_the_pixel_weights() -> None:
    images, _ = batch(16, 8)
    labels = torch.arange(16)  # one class per image: each label row shows both shares
    out, soft = PhotoAugment(**IDENTITY, mixup=0.4)(images, labels, generator(), 16)
    assert torch.allclose(soft.sum(dim=1), torch.ones(16)) and (soft >= 0).all()
    share = soft[torch.arange(16), labels]
    partner = labels.roll(1)
    assert torch.allclose(soft[torch.arange(16), partner], 1 - share)
    expected = share.view(16, 1, 1, 1) * images.float() + (1 - share.view(16, 1, 1, 1)) * images.float().roll(1, 0)
    assert (out - expected).abs().max() < 1e-3
    assert len(set(share.tolist())) == 16  # a weight per image


def test_cutmix_labels_are_the_pasted_area() -> None:
    # Plain images of 16 levels: each output pixel shows which image it came from.
    images = (torch.arange(16) * 15).view(16, 1, 1, 1).expand(16, 3, 20, 20).to(torch.uint8)
    labels = torch.arange(16)
    out, soft = PhotoAugment(**IDENTITY, cutmix=1.0)(images, labels, generator(), 16)
    out = out.round()  # the identity crop's interpolation leaves errors of about 1e-4
    own = (out[:, 0] == images[:, 0].float()).float().mean(dim=(1, 2))
    pasted = (out[:, 0] == images.roll(1, 0)[:, 0].float()).float().mean(dim=(1, 2))
    assert torch.allclose(own + pasted, torch.ones(16))  # every pixel from one of the two
    assert torch.allclose(soft[torch.arange(16), labels], own) and torch.allclose(soft.sum(dim=1), torch.ones(16))
    assert torch.allclose(soft[torch.arange(16), labels.roll(1)], pasted)
    assert (pasted > 0).sum() > 8 and len(set(pasted.tolist())) > 4


def test_mixup_and_cutmix_together_give_each_image_one_of_them() -> None:
    images = (torch.arange(32) * 7).view(32, 1, 1, 1).expand(32, 3, 12, 12).to(torch.uint8)
    out, soft = PhotoAugment(**IDENTITY, mixup=1.0, cutmix=1.0)(images, torch.arange(32), generator(), 32)
    out = out.round(decimals=2)
    levels = [len(image[0].unique()) for image in out]
    # CutMix: two levels (or one, for an empty box); MixUp: one blended level that neither image has.
    blended = [not bool(torch.isin(image[0].unique(), images[:, 0, 0, 0].float()).all()) for image in out]
    assert all(n <= 2 for n in levels) and 4 < sum(blended) < 28
    assert torch.allclose(soft.sum(dim=1), torch.ones(32))


def test_beta_draws_from_the_generator_with_the_right_moments() -> None:
    alpha = torch.full((20000,), 0.2)
    draws = sample_beta(alpha, generator(5))
    assert torch.equal(draws, sample_beta(alpha, generator(5)))
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / (4 * (2 * 0.2 + 1))) < 0.01  # Beta(a, a)
    assert torch.isfinite(sample_beta(torch.full((1000,), 0.01), generator())).all()


def test_device_batches_pass_labels_through_the_augmentation() -> None:
    images, labels = batch(32, 16)
    augment = PhotoAugment(mixup=0.2)
    loader = DeviceBatches(
        TensorImageDataset(images, labels), 8, shuffle=True, drop_last=True, seed=1,
        augment=lambda x, y, g, *position: augment(x, y, g, 5),
    )  # fmt: skip
    first = list(loader)
    assert all(x.dtype == torch.float32 and y.shape == (8, 5) for x, y in first)
    again = list(loader)  # the same epoch again: the same draws
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"scale": (0.0, 1.0)}, r"--data.augment.scale \[0, 1\] must be \[low, high\] with 0 < low <= high <= 1"),
        ({"scale": (0.5, 1.5)}, r"--data.augment.scale \[0.5, 1.5\]"),
        ({"ratio": (2.0, 1.0)}, r"--data.augment.ratio \[2, 1\]"),
        ({"brightness": -0.1}, "--data.augment.brightness -0.1 must be 0"),
        ({"hue": 0.6}, "--data.augment.hue 0.6 must be from 0 to 0.5"),
        ({"erasing": 1.5}, "--data.augment.erasing 1.5 must be a probability"),
        ({"mixup": float("nan")}, "--data.augment.mixup nan must be 0"),
    ],
)
def test_bad_settings_stop_the_data_module(image_folder: Path, settings: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ImageFolderDataModule(str(image_folder), val_size=30, augment=PhotoAugment(**settings))


def test_bad_setting_on_the_command_line_is_one_line(image_folder: Path, capsys) -> None:
    message = fails(capsys, "fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder),
                    "--data.augment", "PhotoAugment", "--data.augment.scale", "[0, 1]")  # fmt: skip
    assert message.endswith("--data.augment.scale [0, 1] must be [low, high] with 0 < low <= high <= 1: fractions "
                            "of the image's area")  # fmt: skip
    assert not Path("runs").exists()


def fit_args(root: Path) -> list[str]:
    return ["fit", "--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "30",
            "--data.batch_size", "16", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", *CSV_LOGGER]  # fmt: skip


def saved_augment() -> object:
    (config,) = Path("runs").glob("**/config.yaml")
    return yaml.safe_load(config.read_text())["data"]["init_args"]["augment"]


def test_the_flag_forms_reach_the_data_module(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    mix = PhotoAugment.mix

    def spy(self, x, labels, generator, num_classes):
        out = mix(self, x, labels, generator, num_classes)
        seen.append((type(self).__name__, tuple(out[1].shape), out[1].dtype))
        return out

    monkeypatch.setattr(PhotoAugment, "mix", spy)
    os.chdir(tmp_path / "short" if (tmp_path / "short").mkdir() is None else tmp_path)
    main([*fit_args(image_folder), "--data.augment", "PhotoAugment", "--data.augment.mixup", "0.2",
          "--data.augment.hue", "0.05"])  # fmt: skip
    assert seen == [("PhotoAugment", (16, 3), torch.float32)] * 2  # two training steps, probability labels
    augment = saved_augment()
    assert augment["class_path"] == "cifar_cli.data.PhotoAugment"
    assert augment["init_args"]["mixup"] == 0.2 and augment["init_args"]["hue"] == 0.05
    losses = values(metrics_rows("runs"), "train_loss_step")
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    # The checkpoint brings the augmentation back: validate with it alone.
    (ckpt,) = checkpoints()
    main(["validate", "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])

    # The YAML form, class_path and init_args.
    config = tmp_path / "photo.yaml"
    config.write_text(
        "data:\n  init_args:\n    augment:\n      class_path: cifar_cli.data.PhotoAugment\n"
        "      init_args: {cutmix: 1.0, scale: [0.5, 1.0]}\n"
    )
    seen.clear()
    os.chdir(tmp_path / "yaml" if (tmp_path / "yaml").mkdir() is None else tmp_path)
    main([*fit_args(image_folder)[:3], "--config", str(config), *fit_args(image_folder)[3:]])
    assert seen == [("PhotoAugment", (16, 3), torch.float32)] * 2
    assert saved_augment()["init_args"]["scale"] == [0.5, 1.0] and saved_augment()["init_args"]["cutmix"] == 1.0

    # `true` is still the CIFAR crop and flip: uint8 batches, class-index labels, PhotoAugment never called.
    seen.clear()
    os.chdir(tmp_path / "true" if (tmp_path / "true").mkdir() is None else tmp_path)
    main([*fit_args(image_folder), "--data.augment", "true", "--data.crop_padding", "2"])
    assert seen == [] and saved_augment() is True


def test_resumed_run_with_photo_augment_and_mixup_ends_with_the_uninterrupted_weights(
    fake_cifar10: Path, tmp_path: Path
) -> None:
    photo = ["--data.augment", "PhotoAugment", "--data.augment.mixup", "0.2", "--data.augment.cutmix", "1.0",
             "--data.augment.erasing", "0.25", "--data.augment.hue", "0.05"]  # fmt: skip
    args = [*FAST, *cifar(fake_cifar10), *photo, *EVERY_STEP, "--trainer.max_epochs", "2"]
    os.chdir(tmp_path / "full" if (tmp_path / "full").mkdir() is None else tmp_path)
    main(["fit", *args, *CSV_LOGGER])
    full = {p.name: p.resolve() for p in Path("steps").glob("epoch=*.ckpt")}  # absolute: the cwd changes
    assert len(full) == 10  # 5 steps x 2 epochs
    os.chdir(tmp_path / "resumed" if (tmp_path / "resumed").mkdir() is None else tmp_path)
    main(["fit", *args, *CSV_LOGGER, "--ckpt_path", str(tmp_path / "full" / "steps" / "epoch=0-step=2.ckpt")])
    resumed = {p.name: p for p in Path("steps").glob("epoch=*.ckpt")}
    assert len(resumed) == 8
    for name in resumed:
        assert_identical(tensors(resumed[name]), tensors(full[name]))
    # Other MixUp draws end in other weights: the equality above is not vacuous.
    os.chdir(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    main(["fit", *args, *CSV_LOGGER, "--data.augment.mixup", "0.3", "--trainer.max_epochs", "1"])
    other, same_run = tensors(Path("steps") / "epoch=0-step=5.ckpt"), tensors(full["epoch=0-step=5.ckpt"])
    assert not all(torch.equal(other[k], same_run[k]) for k in other)
