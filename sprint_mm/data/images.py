"""Class-labelled images from a folder tree `root/<class>/<image>`, centre-cropped to a square or a bucket's size."""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape, file_entries, fingerprint
from sprint_mm.data.faults import BadItem
from sprint_mm.data.transforms import resize_center_crop

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LAYOUT = "root/<class>/<image> (one sub-folder per class, images inside, sub-folders allowed)"
SKIPPED_SHOWN = 5  # how many skipped files a warning names before it summarises
# What PIL raises for a file it cannot decode: unknown format (UnidentifiedImageError is an OSError), truncated data,
# broken headers and chunks, a decompression bomb.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def read_rgb(kind: str, path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of the image file `path`, or of its bytes `data` (read from an archive).

    A file PIL cannot decode (empty, truncated, not an image) raises `BadItem(kind, path, reason)`.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))
    except IMAGE_ERRORS as error:
        raise BadItem(kind, path, f"cannot decode image: {type(error).__name__}: {error}") from error


def image_size(kind: str, path: str | os.PathLike) -> Shape:
    """(1, height, width) of the image file `path` from its header (no pixels are decoded); `BadItem` if PIL cannot
    read the header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except IMAGE_ERRORS as error:
        raise BadItem(kind, path, f"cannot read the image header: {type(error).__name__}: {error}") from error
    return (1, height, width)


@gin.configurable
class ImageFolderDataset(Dataset):
    """Items are `{"x": (3, resolution, resolution) float in [-1, 1], "label": int}`.

    Class ids follow the sorted class sub-folder names (`classes[label]` is the folder name).
    Each image is resized so its shorter side is `resolution` (bicubic; PIL's resize filters over
    the whole footprint, so downscaling does not alias), centre-cropped, optionally flipped
    left-right with probability 1/2, and converted to RGB. Files whose extension is not in
    `extensions` are skipped with a warning that names them; an image that cannot be decoded raises
    `BadItem` when read (`SkippingDataset` replaces it by the next good one).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        flip: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if not extensions:
            raise ValueError("extensions must name at least one file extension, e.g. ('.png',)")
        self.root = Path(root)
        self.resolution = resolution
        self.flip = flip
        self.extensions = tuple(sorted({"." + ext.lower().lstrip(".") for ext in extensions}))
        self.classes, self.samples, self.skipped_files = self._scan()
        if self.skipped_files:
            shown = ", ".join(str(path) for path in self.skipped_files[:SKIPPED_SHOWN])
            more = len(self.skipped_files) - SKIPPED_SHOWN
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped_files)} file(s) that are not images by "
                f"extension (allowed: {', '.join(self.extensions)}) or lie outside a class "
                f"folder: {shown}" + (f" and {more} more" if more > 0 else ""),
                stacklevel=2,
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.load(index, (1, self.resolution, self.resolution))

    def load(self, index: int, shape: Shape) -> dict[str, torch.Tensor | int]:
        """Item `index` resized to cover (height, width) = shape[1:] and centre-cropped; shape[0] must be 1."""
        if shape[0] != 1:
            raise ValueError(f"an image has 1 frame, not {shape[0]}: {type(self).__name__} loads shape (1, H, W)")
        path, label = self.samples[index]
        rgb = torch.from_numpy(read_rgb("image", path)).permute(2, 0, 1)  # (3, H, W) uint8
        x = resize_center_crop(rgb, tuple(shape[1:]), Image.Resampling.BICUBIC).float() / 127.5 - 1.0  # [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[-1])
        return {"x": x, "label": label}

    def item_size(self, index: int) -> Shape:
        """(1, height, width) of image `index`, from its header."""
        return image_size("image", self.samples[index][0])

    def cache_key(self) -> tuple[Path, str]:
        """The folder the item sizes are cached beside, and the fingerprint of the image list."""
        paths = [path for path, _ in self.samples]
        return self.root, fingerprint(file_entries(paths, self.root))

    def _scan(self) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
        """Find class folders and their images; return classes, (path, label) pairs and skips."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory; expected {LAYOUT}"
            )
        entries = sorted(self.root.iterdir())
        class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        # Files at the root have no class; hidden ones (the item size cache, .DS_Store) are not data.
        skipped = [p for p in entries if p.is_file() and not p.name.startswith(".")]
        samples = []
        for label, class_dir in enumerate(class_dirs):
            for folder, dir_names, file_names in os.walk(class_dir):
                dir_names.sort()
                for name in sorted(file_names):
                    path = Path(folder) / name
                    if path.suffix.lower() in self.extensions:
                        samples.append((path, label))
                    else:
                        skipped.append(path)
        if not samples:
            raise FileNotFoundError(
                f"no images with extensions {', '.join(self.extensions)} found under {self.root}; "
                f"expected {LAYOUT}"
            )
        return [p.name for p in class_dirs], samples, skipped
