"""Class-labelled images from a folder tree `root/<class>/<image>`, centre-cropped to a square."""

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
        path, label = self.samples[index]
        x = self._load_square(path).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[-1])
        return {"x": x, "label": label}

    def _scan(self) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
        """Find class folders and their images; return classes, (path, label) pairs and skips."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory; expected {LAYOUT}"
            )
        entries = sorted(self.root.iterdir())
        class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        skipped = [p for p in entries if p.is_file()]  # files at the root have no class
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

    def _load_square(self, path: Path) -> torch.Tensor:
        """Read `path` as RGB, resize its shorter side to the resolution (PIL bicubic), crop the centre square:
        uint8 (3, resolution, resolution)."""
        rgb = torch.from_numpy(read_rgb("image", path)).permute(2, 0, 1)  # (3, H, W) uint8
        return resize_center_crop(rgb, self.resolution, Image.Resampling.BICUBIC)
