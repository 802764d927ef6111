"""Pre-encoded latent datasets: the REPA/EDM2 image layout and per-video latent files.

Image layout under `path` (each tree a folder, or a `.zip` archive beside it with the same member names):

    images/00000/img00000000.png              RGB uint8 (read only when `with_images`)
    images/dataset.json                       {"labels": [["00000/img00000000.png", class], ...]}
    vae-sd/00000/img-mean-std-00000000.npy    float32 (2C, h, w) = [posterior mean (C); posterior std (C)]
    vae-sd/dataset.json                       {"labels": [["00000/img-mean-std-00000000.npy", class], ...]}

Video layout under `path` (a folder or a `.zip`): `index.jsonl` with one `{"path": ..., "label": ...}` per
line, each path a safetensors file holding `mean` and `std` of shape (C, T, h, w).

Every item draws a fresh posterior sample `z = mean + std * eps` from torch's RNG and returns
`(z - shift) * scale`.

Buckets: latents of several sizes may share a dataset. `item_size` reads a latent's size from the file header
(.npy header, safetensors JSON header) without its data; `load(i, shape)` centre-crops the latent (and, with
images, the image region it encodes) to the bucket's latent size, never resizing. Both datasets are `crop_only`: an
item only goes to buckets no larger than itself.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple, Optional

import gin
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape, file_entries, fingerprint
from sprint_mm.data.faults import BadDataError, BadItem, describe
from sprint_mm.data.images import read_rgb
from sprint_mm.data.index import jsonl_rows
from sprint_mm.data.transforms import center_crop

IMAGES_TREE = "images"
LATENTS_TREE = "vae-sd"
LABELS_FILE = "dataset.json"
CAPTIONS_ENTRY = "captions"  # dataset.json's optional [[name, caption], ...] (captioned images, text-to-image)
VIDEO_INDEX = "index.jsonl"
FILES_PER_FOLDER = 1000
IMAGE_NAME = re.compile(r"img(\d{8})\.png")
LATENT_NAME = re.compile(r"img-mean-std-(\d{8})\.npy")
SHOWN = 5  # how many offending names an error lists
SHAPE_SAMPLES = 5  # how many evenly spaced items set the shapes every item must have
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit on its JSON header
POSTERIOR_FIELDS = ("mean", "std", "posterior_scale", "posterior_shift")  # a latent item in a shard


def image_member(index: int) -> str:
    """Member name of image `index` inside the images tree."""
    return f"{index // FILES_PER_FOLDER:05d}/img{index:08d}.png"


def latent_member(index: int) -> str:
    """Member name of the posterior moments of item `index` inside the latents tree."""
    return f"{index // FILES_PER_FOLDER:05d}/img-mean-std-{index:08d}.npy"


class Tree:
    """Read-only files of a folder or a zip archive, by posix member name.

    A zip handle is opened on first read in each process, so DataLoader workers never share one
    across fork.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = Path(location)
        self.is_zip = self.location.is_file() and self.location.suffix == ".zip"
        if not (self.is_zip or self.location.is_dir()):
            raise FileNotFoundError(f"{str(self.location)!r} is neither a folder nor a .zip archive")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None

    @classmethod
    def find(cls, root: str | os.PathLike, name: str) -> Tree:
        """The tree `root/name` as a folder, else `root/name.zip`."""
        folder = Path(root) / name
        archive = folder.with_name(name + ".zip")
        if not (folder.is_dir() or archive.is_file()):
            raise FileNotFoundError(f"neither a folder {str(folder)!r} nor an archive {str(archive)!r} exists")
        return cls(folder if folder.is_dir() else archive)

    def names(self) -> list[str]:
        if self.is_zip:
            with zipfile.ZipFile(self.location) as archive:
                return [name for name in archive.namelist() if not name.endswith("/")]
        return [path.relative_to(self.location).as_posix() for path in self.location.rglob("*") if path.is_file()]

    def read(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.location / name).read_bytes()
        return self._archive().read(name)

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of member `name`, to read its header without the rest."""
        return self._archive().open(name) if self.is_zip else open(self.location / name, "rb")

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.location), os.getpid()
        return self._zip

    def fingerprint(self, names: list[str]) -> str:
        """Changes when a member is added, removed or rewritten: names with size and mtime, or CRC in an archive."""
        if not self.is_zip:
            return fingerprint(file_entries([self.location / name for name in names], self.location))
        archive = self._archive()
        return fingerprint([(name, archive.getinfo(name).file_size, archive.getinfo(name).CRC) for name in names])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": None}

    def __str__(self) -> str:
        return str(self.location)


def _by_index(tree: Tree, pattern: re.Pattern) -> dict[int, str]:
    """Member names whose file name matches `pattern`, keyed by the 8-digit index in it."""
    members: dict[int, str] = {}
    for name in tree.names():
        match = pattern.fullmatch(PurePosixPath(name).name)
        if match is None:
            continue
        index = int(match.group(1))
        if index in members:
            raise ValueError(f"{tree}: index {index} appears twice, as {members[index]!r} and {name!r}")
        members[index] = name
    return members


def _require_partners(
    have: dict[int, str], partners: dict[int, str], partner_tree: Tree, partner_name: Callable[[int], str]
) -> None:
    """Every index in `have` must also be in `partners`; otherwise name the missing partner files."""
    missing = sorted(set(have) - set(partners))
    if missing:
        listed = ", ".join(f"{partner_name(i)} (for {have[i]})" for i in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise FileNotFoundError(f"{partner_tree} lacks {len(missing)} partner file(s): {listed}{more}")


def _read_labels(tree: Tree) -> tuple[dict[str, int] | None, dict[str, str] | None]:
    """Member name -> class from the tree's dataset.json (None when it says `"labels": null`: unlabeled), and member
    name -> caption when it also lists `"captions"` (None otherwise)."""
    try:
        content = json.loads(tree.read(LABELS_FILE))
    except (FileNotFoundError, KeyError):  # a folder raises the first, a zip archive the second
        raise FileNotFoundError(
            f"{tree} has no {LABELS_FILE} (expected {{\"labels\": [[name, class], ...]}})"
        ) from None
    if "labels" not in content:
        raise KeyError(f"{tree}/{LABELS_FILE} has no 'labels' entry; keys: {sorted(content)}")
    labels = None if content["labels"] is None else {name: int(label) for name, label in content["labels"]}
    captions = content.get(CAPTIONS_ENTRY)
    return labels, None if captions is None else {name: str(caption) for name, caption in captions}


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    z = mean + std * torch.randn_like(std)
    return (z - shift) * scale


def posterior_record(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float) -> dict:
    """A latent item as a shard stores it: the posterior and how a sample of it is scaled (`POSTERIOR_FIELDS`)."""
    return dict(zip(POSTERIOR_FIELDS, (mean, std, float(scale), float(shift))))


# ----------------------------------------------------------------------------------------------
# Bad files: every check names the file and raises BadItem
# ----------------------------------------------------------------------------------------------

# A file moments are read from, and what was read: (where, tensor).
Loaded = tuple[str, torch.Tensor]


def _read_member(tree: Tree, name: str) -> bytes:
    """The bytes of member `name`; `BadItem` when it cannot be read (a damaged archive, a vanished file) or is empty."""
    try:
        data = tree.read(name)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise BadItem("latent", f"{tree}/{name}", f"cannot read: {type(error).__name__}: {error}") from error
    if not data:
        raise BadItem("latent", f"{tree}/{name}", "the file is empty")
    return data


def _check_moments(mean: torch.Tensor, std: torch.Tensor, where: str) -> None:
    """A posterior must be finite with std >= 0; anything else would train on NaN or on noise of the wrong sign."""
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise BadItem("latent", where, "the posterior mean or std has non-finite values")
    if (std < 0).any():
        raise BadItem("latent", where, "the posterior std has negative values")


def _typical_shapes(read: Callable[[int], list[Loaded]], count: int, source: str) -> list[tuple[int, ...]]:
    """The shapes every item must have: the most common among up to SHAPE_SAMPLES evenly spaced items.

    Unreadable samples are left out; a dataset none of whose samples can be read raises `BadDataError`.
    """
    picks = sorted({round(k * (count - 1) / (SHAPE_SAMPLES - 1)) for k in range(SHAPE_SAMPLES)})
    shapes: Counter[tuple[tuple[int, ...], ...]] = Counter()
    failures = []
    for item in picks:
        try:
            shapes[tuple(tuple(tensor.shape) for _, tensor in read(item))] += 1
        except BadItem as bad:
            failures.append((bad.kind, bad.path, bad.reason))
    if not shapes:
        raise BadDataError(f"{source}: none of the items {picks} can be read: {describe(failures)}")
    return list(shapes.most_common(1)[0][0])


def _check_shapes(loaded: list[Loaded], shapes: list[tuple[int, ...]]) -> None:
    for (where, tensor), shape in zip(loaded, shapes):
        if tuple(tensor.shape) != shape:
            raise BadItem("latent", where, f"shape {tuple(tensor.shape)}, but the dataset's items have {shape}")


def _check_channels(loaded: list[Loaded], shapes: list[tuple[int, ...]], sized: int) -> None:
    """In buckets the last `sized` dimensions (the size) may differ between items; the others must be the
    dataset's."""
    for (where, tensor), shape in zip(loaded, shapes):
        if tensor.dim() != len(shape) or tuple(tensor.shape[:-sized]) != shape[:-sized]:
            raise BadItem("latent", where, f"shape {tuple(tensor.shape)}, but the dataset's items have "
                          f"{shape[:-sized]} before their last {sized} dimensions")


def crop_latent(where: str, moments: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """The centre `size` (the trailing dimensions) of the moments, never resized; a latent smaller than `size`
    (its file changed since the sizes were indexed) is a bad item."""
    try:
        return center_crop(moments, size)
    except ValueError as error:
        raise BadItem("latent", where, f"{error} (a bucket larger than the latent: did the file change since the "
                      "item sizes were read?)") from None


def crop_image_with_latent(where: str, image: torch.Tensor, latent: tuple[int, int],
                           crop: tuple[int, int]) -> torch.Tensor:
    """The region of `image` (3, H, W) that the centre `crop` of a latent of size `latent` encodes: the image must
    be a whole multiple f of the latent, the same in height and width."""
    if tuple(crop) == tuple(latent):
        return image
    (height, width), (h, w) = image.shape[-2:], latent
    factor = height // h
    if height != factor * h or width != factor * w:
        raise BadItem("latent", where, f"image {height}x{width} is not one whole multiple of its latent {h}x{w}, so "
                      "it cannot be cropped with it")
    top, left = (h - crop[0]) // 2 * factor, (w - crop[1]) // 2 * factor
    return image[:, top:top + crop[0] * factor, left:left + crop[1] * factor]


def _npy_shape(tree: Tree, name: str) -> tuple[int, ...]:
    """The array shape in the header of .npy member `name`, without reading its data."""
    where = f"{tree}/{name}"
    try:
        with tree.open(name) as file:
            version = np.lib.format.read_magic(file)
            if version not in NPY_HEADERS:
                raise ValueError(f"unknown .npy format version {version}")
            return tuple(NPY_HEADERS[version](file)[0])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise BadItem("latent", where, f"cannot read the .npy header: {error}") from error


def _safetensors_shapes(tree: Tree, name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the JSON header of safetensors member `name` (8-byte little-endian length, then
    JSON), without reading the tensors."""
    where = f"{tree}/{name}"
    try:
        with tree.open(name) as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_SAFETENSORS_HEADER:
                raise ValueError(f"header length {length} exceeds {MAX_SAFETENSORS_HEADER}")
            header = json.loads(file.read(length))
        return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile,
            zlib.error) as error:
        raise BadItem("latent", where, f"cannot read the safetensors header: {error}") from error


# ----------------------------------------------------------------------------------------------
# The datasets
# ----------------------------------------------------------------------------------------------


@gin.configurable
class LatentDataset(Dataset):
    """REPA/EDM2 latents: items `{"x": (C, h, w) float32, "label": int}`, plus `"image"` (3, H, W) uint8, and
    `"caption"` (str) when dataset.json lists captions (`encode_images.py --captions`: text-to-image).

    Images and latents are paired by the index in their names, never by position; a missing partner
    raises naming it. An unlabeled dataset (`"labels": null`) gives every item label 0.

    An item whose files cannot be decoded, whose moments are not finite (or have a negative std), or whose shapes
    differ from the dataset's (the most common among a few evenly spaced items, read at construction: `shapes`)
    raises `BadItem("latent", file, reason)`; `SkippingDataset` replaces it by the next good item. Loaded at a
    bucket's shape (`load`), an item may have another height and width (it is centre-cropped, with its image).
    """

    crop_only = True  # latents are cropped to a bucket, never resized

    def __init__(self, path: str, with_images: bool = False, scale: float = 0.18215, shift: float = 0.0) -> None:
        self.scale, self.shift = scale, shift
        self.latents = Tree.find(path, LATENTS_TREE)
        latents = _by_index(self.latents, LATENT_NAME)
        if not latents:
            raise FileNotFoundError(f"{self.latents} holds no img-mean-std-<8 digits>.npy files")
        labels, captions = _read_labels(self.latents)
        for what, table in (("label", labels), ("caption", captions)):
            lacking = sorted(name for name in latents.values() if table is not None and name not in table)
            if lacking:
                raise KeyError(f"{self.latents}/{LABELS_FILE} has no {what} for {', '.join(lacking[:SHOWN])}")
        self.indices = sorted(latents)
        self.latent_names = [latents[i] for i in self.indices]
        self.labels = [0 if labels is None else labels[name] for name in self.latent_names]
        self.captions = None if captions is None else [captions[name] for name in self.latent_names]
        self.images: Tree | None = None
        if with_images:
            self.images = Tree.find(path, IMAGES_TREE)
            images = _by_index(self.images, IMAGE_NAME)
            _require_partners(latents, images, self.images, image_member)
            _require_partners(images, latents, self.latents, latent_member)
            self.image_names = [images[i] for i in self.indices]
        self.shapes = _typical_shapes(self._read, len(self), str(path))

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, item: int) -> list[Loaded]:
        """The item's moments (2C, h, w) float32 and, with images, its pixels (3, H, W) uint8."""
        name = self.latent_names[item]
        where = f"{self.latents}/{name}"
        data = _read_member(self.latents, name)
        try:
            moments = np.load(io.BytesIO(data))
        except (ValueError, EOFError, OSError) as error:  # not .npy, truncated, a pickle
            raise BadItem("latent", where, f"cannot decode .npy: {error}") from error
        if not isinstance(moments, np.ndarray) or moments.dtype.kind != "f":  # an .npz archive loads as NpzFile
            got = moments.dtype if isinstance(moments, np.ndarray) else type(moments).__name__
            raise BadItem("latent", where, f"expected float moments, got {got}")
        if moments.ndim != 3 or moments.shape[0] % 2:
            raise BadItem("latent", where, f"expected (2C, h, w) moments, got shape {moments.shape}")
        moments = torch.from_numpy(moments).float()
        _check_moments(*moments.chunk(2), where)
        loaded = [(where, moments)]
        if self.images is not None:
            name = self.image_names[item]
            pixels = read_rgb("latent", f"{self.images}/{name}", _read_member(self.images, name))
            loaded.append((f"{self.images}/{name}", torch.from_numpy(pixels).permute(2, 0, 1).contiguous()))
        return loaded

    def __getitem__(self, item: int) -> dict:
        return self._item(item, None)

    def record(self, item: int) -> dict:
        """What a shard stores of `item` (`sprint_mm.data.shard_writer`): the posterior, not a sample of it, at the
        latent's own size, with its label (and image)."""
        loaded = self._read(item)
        _check_channels(loaded, self.shapes, sized=2)
        mean, std = loaded[0][1].chunk(2)
        out = {**posterior_record(mean, std, self.scale, self.shift), **self.tags(item)}
        if self.images is not None:
            out["image"] = loaded[1][1]
        return out

    def tags(self, item: int) -> dict:
        """The item's label, and its caption when the dataset has captions."""
        return {"label": self.labels[item], **({} if self.captions is None else {"caption": self.captions[item]})}

    def load(self, item: int, shape: Shape) -> dict:
        """Item `item` with its latent centre-cropped to (h, w) = shape[1:] (and its image to the region that
        encodes); shape[0] must be 1."""
        if shape[0] != 1:
            raise ValueError(f"an image latent has 1 frame, not {shape[0]}: LatentDataset loads shape (1, h, w)")
        return self._item(item, tuple(shape[1:]))

    def _item(self, item: int, size: tuple[int, int] | None) -> dict:
        """The item at the dataset's one shape (size None), or cropped to `size`."""
        loaded = self._read(item)
        (where, moments), latent = loaded[0], tuple(loaded[0][1].shape[-2:])
        if size is None:
            _check_shapes(loaded, self.shapes)
        else:
            _check_channels(loaded, self.shapes, sized=2)
            moments = crop_latent(where, moments, size)
        mean, std = moments.chunk(2)
        out = {"x": posterior_sample(mean, std, self.scale, self.shift), **self.tags(item)}
        if self.images is not None:
            where, image = loaded[1]
            out["image"] = image if size is None else crop_image_with_latent(where, image, latent, size)
        return out

    def item_size(self, item: int) -> Shape:
        """(1, h, w) of the latent of `item`, from its .npy header."""
        shape = _npy_shape(self.latents, self.latent_names[item])
        if len(shape) != 3:
            raise BadItem("latent", f"{self.latents}/{self.latent_names[item]}", f"expected (2C, h, w) moments, got "
                          f"shape {shape}")
        return (1, shape[1], shape[2])

    def cache_key(self) -> tuple[Path, str]:
        """The latents tree (folder or archive) and the fingerprint of its latent files."""
        return self.latents.location, self.latents.fingerprint(self.latent_names)


class VideoEntry(NamedTuple):
    """One row of a video latent index: the latent file, and its class or its caption (or both)."""

    path: str
    label: Optional[int]
    caption: Optional[str]

    def fields(self) -> dict:
        """What an item carries besides its latent."""
        return {key: value for key, value in (("label", self.label), ("caption", self.caption)) if value is not None}


@gin.configurable
class VideoLatentDataset(Dataset):
    """Per-video latent files listed in `index.jsonl`: items `{"x": (C, T, h, w) float32, "label": int}`, or with a
    `"caption"` (str) where the index rows have one (captioned clips, for text-to-video; `encode_videos.py
    --captions`): rows `{"path", "label"}`, `{"path", "caption"}` or both, every row alike.

    Bad files raise `BadItem` as in `LatentDataset`: undecodable, without float `mean` and `std` of one (C, T, h, w)
    shape, non-finite, or of another shape than the dataset's. Loaded at a bucket's shape (`load`), an item may have
    other (T, h, w) (it is centre-cropped in all three).
    """

    crop_only = True  # latents are cropped to a bucket, never resized

    def __init__(self, path: str, scale: float = 0.18215, shift: float = 0.0) -> None:
        self.scale, self.shift = scale, shift
        self.tree = Tree(path)
        names = set(self.tree.names())
        if VIDEO_INDEX not in names:
            raise FileNotFoundError(f"{self.tree} has no {VIDEO_INDEX} (one {{path, label}} or {{path, caption}} "
                                    "object per line)")
        self.entries: list[VideoEntry] = []
        source = f"{self.tree}/{VIDEO_INDEX}"
        for row in jsonl_rows(self.tree.read(VIDEO_INDEX).decode().splitlines(), source, ("path", "label")):
            entry, where = row.fields, f"{source} line {row.line}"
            if "path" not in entry or not {"label", "caption"} & set(entry):
                raise KeyError(f"{where} needs 'path' and 'label' or 'caption', got {sorted(entry)}")
            if entry["path"] not in names:
                raise FileNotFoundError(f"{where} names a missing file {entry['path']!r}")
            self.entries.append(VideoEntry(entry["path"], int(entry["label"]) if "label" in entry else None,
                                           entry.get("caption")))
        if not self.entries:
            raise ValueError(f"{self.tree}/{VIDEO_INDEX} lists no videos")
        kinds = {tuple(entry.fields()) for entry in self.entries}
        if len(kinds) > 1:
            raise ValueError(f"the rows of {source} carry different fields ({', '.join(map(str, sorted(kinds)))}); "
                             "every row needs the same (label, caption or both)")
        self.shapes = _typical_shapes(self._read, len(self), str(path))

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, item: int) -> list[Loaded]:
        """The item's posterior, mean and std stacked: (2, C, T, h, w) float32."""
        name = self.entries[item].path
        where = f"{self.tree}/{name}"
        data = _read_member(self.tree, name)
        try:
            tensors = load_safetensors(data)
        except SafetensorError as error:
            raise BadItem("latent", where, f"cannot decode safetensors: {error}") from error
        mean, std = tensors.get("mean"), tensors.get("std")
        if mean is None or std is None:
            raise BadItem("latent", where, f"must hold 'mean' and 'std', holds {sorted(tensors)}")
        if not (mean.is_floating_point() and std.is_floating_point() and mean.dim() == 4 and mean.shape == std.shape):
            raise BadItem("latent", where, f"expected float mean and std of one (C, T, h, w) shape, got {mean.dtype} "
                          f"{tuple(mean.shape)} and {std.dtype} {tuple(std.shape)}")
        mean, std = mean.float(), std.float()
        _check_moments(mean, std, where)
        return [(where, torch.stack([mean, std]))]

    def __getitem__(self, item: int) -> dict:
        return self._item(item, None)

    def record(self, item: int) -> dict:
        """What a shard stores of `item`: the posterior at the latent's own size, with its label."""
        loaded = self._read(item)
        _check_channels(loaded, self.shapes, sized=3)
        mean, std = loaded[0][1]
        return {**posterior_record(mean, std, self.scale, self.shift), **self.entries[item].fields()}

    def load(self, item: int, shape: Shape) -> dict:
        """Item `item` with its latent centre-cropped to (T, h, w) = `shape`."""
        return self._item(item, tuple(shape))

    def _item(self, item: int, size: tuple[int, int, int] | None) -> dict:
        """The item at the dataset's one shape (size None), or cropped to `size`."""
        loaded = self._read(item)
        where, moments = loaded[0]
        if size is None:
            _check_shapes(loaded, self.shapes)
        else:
            _check_channels(loaded, self.shapes, sized=3)
            moments = crop_latent(where, moments, size)
        mean, std = moments
        return {"x": posterior_sample(mean, std, self.scale, self.shift), **self.entries[item].fields()}

    def item_size(self, item: int) -> Shape:
        """(T, h, w) of the latent of `item`, from its safetensors header."""
        name = self.entries[item].path
        shape = _safetensors_shapes(self.tree, name).get("mean")
        if shape is None or len(shape) != 4:
            raise BadItem("latent", f"{self.tree}/{name}", f"expected a (C, T, h, w) 'mean', got {shape}")
        return shape[1:]

    def cache_key(self) -> tuple[Path, str]:
        """The tree (folder or archive) and the fingerprint of the files its index lists."""
        return self.tree.location, self.tree.fingerprint([entry.path for entry in self.entries])
