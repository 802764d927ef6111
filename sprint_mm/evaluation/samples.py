"""Samples on disk: an ADM-style ``.npz`` (``arr_0``) or a folder of PNGs, read in batches, never whole."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image

SAMPLE_LAYOUTS = {4: "(N, H, W, 3)", 5: "(N, T, H, W, 3)"}  # array rank -> images or videos


def _check_sample_layout(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    if len(shape) not in SAMPLE_LAYOUTS or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"{source}: shape {shape} is neither images (N, H, W, 3) nor videos (N, T, H, W, 3)")
    if dtype != np.uint8:
        raise ValueError(f"{source}: dtype {dtype}; samples must be uint8 RGB")


class _NpzSamples:
    """``arr_0`` of an ADM-style ``.npz``, read in batches straight from the (possibly compressed) archive."""

    member = "arr_0.npy"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if self.member not in names:
                    keys = [name.removesuffix(".npy") for name in names]
                    raise KeyError(f"{path} has keys {keys}; samples must be stored under 'arr_0' (ADM layout)")
                with archive.open(self.member) as stream:
                    self.shape, dtype = self._read_header(stream)
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not a valid .npz archive") from None
        _check_sample_layout(self.shape, dtype, f"{path} arr_0")

    def _read_header(self, stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{self.path}: unsupported .npy format version {version} for arr_0")
        shape, fortran_order, dtype = readers[version](stream)
        if fortran_order and len(shape) > 1:
            raise ValueError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous")
        return tuple(shape), dtype

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
            self._read_header(stream)
            for start in range(0, self.shape[0], batch_size):
                batch = np.empty((min(batch_size, self.shape[0] - start), *self.shape[1:]), dtype=np.uint8)
                if stream.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                    raise ValueError(f"{self.path}: arr_0 is truncated (ends before sample {start + len(batch)})")
                yield batch


class _PngFolderSamples:
    """A folder of equally sized PNG images, in file-name order."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.png"))
        if not self.files:
            raise FileNotFoundError(f"no .png files in sample folder {folder}")
        self.shape = (len(self.files), *self._read(self.files[0]).shape)

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # what PIL raises on bad files
            raise ValueError(f"sample {path} cannot be read as an image ({type(error).__name__}: {error}); remove or "
                             "replace it") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            images = []
            for path in self.files[start : start + batch_size]:
                image = self._read(path)
                if image.shape != self.shape[1:]:
                    raise ValueError(f"{path} is {image.shape}, but the folder's first image is {self.shape[1:]}")
                images.append(image)
            yield np.stack(images)


def open_samples(path: str | Path) -> _NpzSamples | _PngFolderSamples:
    """Open samples for batched reading: ``.shape`` is the full array shape, ``.batches(n)`` yields uint8 arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.is_dir():
        return _PngFolderSamples(path)
    if path.suffix == ".npz":
        return _NpzSamples(path)
    raise ValueError(f"samples must be an .npz with 'arr_0' (ADM layout) or a folder of PNGs, got {path}")


def load_samples(path: str | Path) -> np.ndarray:
    """All samples of an ``.npz`` (``arr_0``, uint8 (N, H, W, 3) or (N, T, H, W, 3)) or a PNG folder, in memory."""
    samples = open_samples(path)
    [everything] = samples.batches(samples.shape[0])
    return everything
