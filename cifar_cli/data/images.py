"""Image files: finding them and decoding them into one uint8 tensor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from cifar_cli.errors import UsageError

# Suffixes torchvision.io.decode_image reads (and Pillow, for the files it cannot).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, in sorted order, skipping hidden files and folders (`.ipynb_checkpoints/`)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def decode_rgb(path: Path) -> Tensor:
    """One image file as a `(3, H, W)` uint8 RGB tensor: grayscale, palette and alpha images, 16-bit PNGs, CMYK
    JPEGs and animated GIFs (their first frame) included. A file that is no image ends in a UsageError naming it."""
    if path.stat().st_size == 0:
        raise UsageError(f"image {path} is empty (0 bytes): remove or replace the file")
    data = read_file(str(path))
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        image = _decode_with_pillow(path, err)
    if image.ndim == 4:  # an animated GIF: all its frames; Pillow, and every viewer's thumbnail, show the first
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: scaled, not truncated, to 0-255
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pillow(path: Path, error: RuntimeError) -> Tensor:
    # torchvision refuses some valid files that Pillow reads, such as animated WebP ("Animated webp files are not
    # supported"); Pillow is the fallback only, as it is slower and loads lazily (errors surface at convert).
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError for bad files
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UsageError(f"cannot decode image {path} ({reason}): remove or replace the file") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def decode_images(paths: Sequence[Path], size: int) -> Tensor:
    """Decode image files to one `(N, 3, size, size)` uint8 tensor.

    Images of another size are resized (shorter side to `size`, antialiased) and centre-cropped, keeping their
    aspect ratio. 32x32 JPEGs decode at about 15,000 images/s on one core.
    """
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        image = decode_rgb(path)
        if image.shape[1:] != (size, size):
            image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
        out[i] = image
    return out
