"""`PhotoAugment`: ImageNet-style training augmentation of a whole batch on its device, every draw per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cifar_cli.data.augment import BatchAugment
from cifar_cli.errors import UsageError

# Candidates drawn per image for a crop (or an erased rectangle) that fits in the image: torchvision's
# RandomResizedCrop and RandomErasing try 10 times, one after another, before they fall back.
TRIES = 10
# RGB to YIQ (NTSC luma and two chroma axes). Its first row is the luma of torchvision's rgb_to_grayscale
# (0.2989, 0.587, 0.114 there); the chroma rows sum to 0, so scaling chroma blends with grey exactly as
# torchvision's adjust_saturation does, and rotating it turns the hue while grey stays grey.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(
    low: float, high: float, shape: tuple[int, ...], device: torch.device, generator: torch.Generator
) -> Tensor:
    return low + (high - low) * torch.rand(shape, device=device, generator=generator)


def _first_fit(candidates: Tensor, fits: Tensor) -> Tensor:
    """Per row, the first candidate whose `fits` is true (the first row element where none fits)."""
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    return candidates.gather(1, first).squeeze(1)


def sample_beta(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """One Beta(alpha, alpha) draw per element of `alpha`, from `generator`: the ratio of two Gamma draws.

    torch.distributions.Beta takes no generator; torch._standard_gamma, the sampler behind its Gamma, does (on CPU
    and CUDA), and clamps its draws to the smallest positive float, so the ratio is never 0/0.
    """
    gamma = torch._standard_gamma(torch.stack((alpha, alpha)), generator=generator)
    return gamma[0] / gamma.sum(0)


class PhotoAugment(BatchAugment):
    """Random-resized crop, flip, colour jitter, random erasing and MixUp/CutMix of a uint8 training batch, as one
    set of batched operations on its device; every factor, crop and rectangle is drawn per image.

    Written by hand because torchvision's transforms draw one set of parameters per call: a loop over the images
    of a 64-image 224 px batch (RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4, 0.1)) took 709 ms on one CPU
    thread, against 300 ms here; on a GPU each image would launch kernels of its own. Its MixUp and CutMix draw
    from the global generator (`torch.distributions.Beta.sample`, and `torch.randint` without a generator, in
    torchvision/transforms/v2/_augment.py), which would break the exact resume and give every DDP rank the same
    draws; they also draw one lambda per batch, where here each image has its own.

    The crop and the flip are one `affine_grid` + `grid_sample` (bilinear) per batch: each image's crop size,
    position and mirroring are its affine matrix. The crop is drawn as torchvision's RandomResizedCrop draws it
    (area uniform in `scale`, aspect ratio log-uniform in `ratio`, up to 10 tries, then the whole image) and
    resized back to the stored image size, so the crop is taken from the image as stored (`image_size` for an
    image folder), not from the original file. Colour jitter follows torchvision's ColorJitter in a fixed order
    (brightness, contrast, then saturation and hue together, clamped to 0-255 after each); the hue turns the
    chroma in YIQ space, a per-image 3x3 matrix, where torchvision goes through HSV. Erasing fills its rectangle
    with the batch's mean colour, which normalisation takes to about 0, as torchvision's RandomErasing(value=0)
    after Normalize. MixUp and CutMix pair each image with its neighbour in the (shuffled) batch, as torchvision
    does, and return probability labels `(N, num_classes)`.

    Returns float images on the 0-255 scale, which `ImageDataModule.preprocess` normalises as it does uint8.
    The defaults are timm's ImageNet training defaults (crop, flip, colour jitter 0.4; no erasing, MixUp or
    CutMix); DeiT's recipe adds `--data.augment.erasing 0.25 --data.augment.mixup 0.8 --data.augment.cutmix 1.0`.

    Args:
        scale: Range of the crop's area, as fractions of the image's, drawn uniformly; `[1, 1]`: no cropping.
        ratio: Range of the crop's aspect ratio (width / height), drawn log-uniformly.
        flip: Mirror each image left to right with probability 1/2.
        brightness: Multiply each image by a factor drawn from `[1 - brightness, 1 + brightness]`; 0: off.
        contrast: Blend each image with its mean grey level by a factor from `[1 - contrast, 1 + contrast]`; 0: off.
        saturation: Blend each image with its grey version by a factor from `[1 - saturation, 1 + saturation]`;
            0: off.
        hue: Turn each image's hue by a fraction of a full turn drawn from `[-hue, hue]`, at most 0.5; 0: off.
        erasing: Probability that an image gets a rectangle filled with the mean colour (random erasing); 0: off.
        erasing_scale: Range of the erased rectangle's area, as fractions of the image's.
        erasing_ratio: Range of the erased rectangle's aspect ratio (height / width), drawn log-uniformly.
        mixup: MixUp's alpha: each image is blended with its neighbour by a weight drawn from Beta(alpha, alpha),
            and so are the labels; 0: off.
        cutmix: CutMix's alpha: each image gets a rectangle of its neighbour, of area fraction 1 - Beta(alpha,
            alpha), and the labels mix by area; 0: off. With both on, each image gets one of the two, at even odds.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.0,
        erasing: float = 0.0,
        erasing_scale: tuple[float, float] = (0.02, 0.33),
        erasing_ratio: tuple[float, float] = (0.3, 3.3),
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        self.scale, self.ratio, self.flip = _pair(scale), _pair(ratio), flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.erasing, self.erasing_scale, self.erasing_ratio = erasing, _pair(erasing_scale), _pair(erasing_ratio)
        self.mixup, self.cutmix = mixup, cutmix
        self._colour_on: dict[torch.device, tuple[Tensor, Tensor]] = {}  # RGB_TO_YIQ and its inverse per device

    def check(self) -> None:
        _check_range("scale", self.scale, "fractions of the image's area", top=1.0)
        _check_range("ratio", self.ratio, "aspect ratios, width / height")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise UsageError(f"--data.augment.{name} {value} must be 0 (off) or more: the factor's spread")
        if not 0 <= self.hue <= 0.5:
            raise UsageError(f"--data.augment.hue {self.hue} must be from 0 to 0.5, a fraction of a full turn of hue")
        if not 0 <= self.erasing <= 1:
            raise UsageError(f"--data.augment.erasing {self.erasing} must be a probability, from 0 to 1")
        _check_range("erasing_scale", self.erasing_scale, "fractions of the image's area", top=1.0)
        _check_range("erasing_ratio", self.erasing_ratio, "aspect ratios, height / width")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise UsageError(f"--data.augment.{name} {value} must be 0 (off) or a positive Beta alpha")

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        x = self.crop_flip(images, generator)
        x = self.jitter(x, generator)
        x = self.erase(x, generator)
        return self.mix(x, labels, generator, num_classes)

    def crop_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Random-resized crops, mirrored at random: `(N, C, H, W)` in any dtype, float32 out, on the 0-255 scale
        where the input was."""
        n, c, h, w = images.shape
        device = images.device
        (area_low, area_high), (ratio_low, ratio_high) = self.scale, self.ratio
        area = _uniform(area_low, area_high, (n, TRIES), device, generator)
        ratio = torch.exp(_uniform(math.log(ratio_low), math.log(ratio_high), (n, TRIES), device, generator))
        # The crop's sides as fractions of the image's.
        aspect = w / h
        width, height = torch.sqrt(area * ratio / aspect), torch.sqrt(area * aspect / ratio)
        fits = (width <= 1) & (height <= 1)
        found = fits.any(dim=1)
        # No candidate fits: the largest centred crop of an allowed aspect ratio (the whole image, for a square
        # image and a ratio range that holds 1), as torchvision's fallback.
        fallback = min(max(aspect, ratio_low), ratio_high)
        width = torch.where(found, _first_fit(width, fits), min(1.0, fallback / aspect))
        height = torch.where(found, _first_fit(height, fits), min(1.0, aspect / fallback))
        # The crop's centre in grid_sample's coordinates (-1 to 1 across the image), anywhere that keeps the crop
        # inside the image.
        x0 = (1 - width) * _uniform(-1.0, 1.0, (n,), device, generator)
        y0 = (1 - height) * _uniform(-1.0, 1.0, (n,), device, generator)
        if self.flip:
            width = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -width, width)
        zero = torch.zeros_like(width)
        theta = torch.stack((width, zero, x0, zero, height, y0), dim=1).view(n, 2, 3)
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        # Reflection only matters half a pixel beyond the border, where bilinear sampling reads one neighbour.
        return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Brightness, contrast, saturation and hue of a float RGB batch on the 0-255 scale, per-image factors.

        Works in place on `x` where it can, as `erase` and `mix` do: on a CPU, a new 224 px batch of 64 costs
        more than the operation (39 ms against 16 ms for a multiply and clamp, 2 cores), as each 38 MB tensor is
        a fresh memory mapping whose pages fault in."""
        n, c = x.shape[:2]
        device = x.device
        if not (self.brightness or self.contrast or self.saturation or self.hue):
            return x
        if c != 3:
            raise ValueError(f"colour jitter needs RGB images, got {c} channels")
        to_yiq, from_yiq = self._colour_matrices(device)
        if self.brightness:
            factor = _uniform(max(0.0, 1 - self.brightness), 1 + self.brightness, (n, 1, 1, 1), device, generator)
            x.mul_(factor).clamp_(0, 255)
        if self.contrast:
            factor = _uniform(max(0.0, 1 - self.contrast), 1 + self.contrast, (n, 1, 1, 1), device, generator)
            grey = (x.mean(dim=(2, 3)) @ to_yiq[0]).view(n, 1, 1, 1)  # the mean of the luma, per image
            x.lerp_(grey, 1 - factor).clamp_(0, 255)
        if self.saturation or self.hue:
            ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
            s = _uniform(max(0.0, 1 - self.saturation), 1 + self.saturation, (n,), device, generator)
            turn = 2 * math.pi * _uniform(-self.hue, self.hue, (n,), device, generator) if self.hue else zeros
            cos, sin = s * torch.cos(turn), s * torch.sin(turn)
            # Per image: to YIQ, scale and turn the chroma (I, Q), back to RGB; one batched matrix product.
            chroma = torch.stack((ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos), dim=1).view(n, 3, 3)
            matrix = from_yiq @ chroma @ to_yiq
            x = torch.bmm(matrix, x.flatten(2)).view_as(x).clamp_(0, 255)
        return x

    def erase(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Fill a random rectangle of a random `erasing` share of the images with the batch's mean colour, in
        place."""
        if not self.erasing:
            return x
        n, _, h, w = x.shape
        device = x.device
        (area_low, area_high), (ratio_low, ratio_high) = self.erasing_scale, self.erasing_ratio
        area = h * w * _uniform(area_low, area_high, (n, TRIES), device, generator)
        ratio = torch.exp(_uniform(math.log(ratio_low), math.log(ratio_high), (n, TRIES), device, generator))
        # Whole pixels, as torchvision's RandomErasing; a candidate must leave part of the image on both axes.
        rect_h, rect_w = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        fits = (rect_h < h) & (rect_w < w)
        rect_h, rect_w = _first_fit(rect_h, fits), _first_fit(rect_w, fits)
        erased = fits.any(dim=1) & (torch.rand(n, device=device, generator=generator) < self.erasing)
        top = torch.floor(torch.rand(n, device=device, generator=generator) * (h - rect_h + 1))
        left = torch.floor(torch.rand(n, device=device, generator=generator) * (w - rect_w + 1))
        inside = _box_mask(top, top + rect_h, left, left + rect_w, h, w, erased)
        fill = x.mean(dim=(0, 2, 3), keepdim=True)
        return torch.where(inside.unsqueeze(1), fill, x, out=x)

    def mix(self, x: Tensor, labels: Tensor, generator: torch.Generator, num_classes: int) -> tuple[Tensor, Tensor]:
        """MixUp and CutMix, in place: each image with its neighbour in the batch, per-image weights; probability
        labels."""
        if not (self.mixup or self.cutmix):
            return x, labels
        n, _, h, w = x.shape
        device = x.device
        if self.mixup and self.cutmix:
            cut = torch.rand(n, device=device, generator=generator) < 0.5
            alpha = torch.where(cut, self.cutmix, self.mixup)
        else:
            cut = torch.full((n,), bool(self.cutmix), device=device)
            alpha = torch.full((n,), self.cutmix or self.mixup, device=device)
        share = sample_beta(alpha, generator)  # of the image itself; the neighbour has the rest
        partner = (1 - share).view(n, 1, 1, 1)  # the neighbour's weight in each pixel
        if self.cutmix:
            # CutMix's box as torchvision's: centred on a random pixel, sides sqrt(1 - share) of the image's,
            # clipped at the border; the labels mix by the area actually kept.
            half = 0.5 * torch.sqrt(1 - share)
            cy = torch.floor(torch.rand(n, device=device, generator=generator) * h)
            cx = torch.floor(torch.rand(n, device=device, generator=generator) * w)
            half_h, half_w = torch.floor(half * h), torch.floor(half * w)
            top, bottom = (cy - half_h).clamp(min=0), (cy + half_h).clamp(max=h)
            left, right = (cx - half_w).clamp(min=0), (cx + half_w).clamp(max=w)
            kept = 1 - (bottom - top) * (right - left) / (h * w)
            pasted = _box_mask(top, bottom, left, right, h, w, cut).unsqueeze(1)
            partner = torch.where(pasted, 1.0, torch.where(cut.view(n, 1, 1, 1), 0.0, partner))
            share = torch.where(cut, kept, share)
        # Rolled, as torchvision's MixUp and CutMix pair images: the batch order is a random permutation already.
        x.lerp_(x.roll(1, 0), partner)
        one_hot = F.one_hot(labels, num_classes).float()
        return x, one_hot.lerp(one_hot.roll(1, 0), (1 - share).view(n, 1))

    def _colour_matrices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Made once per device: a tensor built from Python numbers is a host-to-device copy every batch.
        if device not in self._colour_on:
            to_yiq = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
            self._colour_on[device] = (to_yiq.float().to(device), torch.linalg.inv(to_yiq).float().to(device))
        return self._colour_on[device]


def _box_mask(top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, h: int, w: int, on: Tensor) -> Tensor:
    """`(N, H, W)` bool: inside rows `[top, bottom)` and columns `[left, right)` of the images where `on`."""
    rows = torch.arange(h, device=top.device, dtype=top.dtype)
    cols = torch.arange(w, device=top.device, dtype=top.dtype)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None]) & on[:, None]
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def _pair(value: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    return low, high


def _check_range(name: str, value: tuple[float, float], meaning: str, top: float = math.inf) -> None:
    """A UsageError unless 0 < low <= high <= top."""
    low, high = value
    if not 0 < low <= high <= top:
        bound = f" <= {top:g}" if top < math.inf else ""
        raise UsageError(
            f"--data.augment.{name} [{low:g}, {high:g}] must be [low, high] with 0 < low <= high{bound}: {meaning}"
        )
