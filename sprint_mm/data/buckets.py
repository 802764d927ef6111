"""Buckets of frame count, height and width: a run trains on items of several sizes, each batch from one bucket.

A `BucketTable` lists the buckets. Sizes are in the model's input units (pixels for pixel data; latent frames and
latent pixels for latent data). A bucket's `batch_size` is its GLOBAL batch, split over processes and gradient
accumulation exactly like `Trainer.batch_size`: a bucket of batch 32 on 4 processes with 2 accumulation steps
reads micro-batches of 32 / (4 * 2) = 4 items per process. The batch sequence therefore does not depend on the
process count, and a run resumes exactly on another count. `weight` repeats a bucket's items per epoch (see `Bucket`).

Each item goes to one bucket by `BucketTable.assign` from its native size, read once from file headers by
`bucket_index` (cached beside the data), and `BucketedDataset` loads it at its bucket's size.
`sprint_mm.data.bucket_sampler.BucketBatchSampler` turns the assignment into batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import gin
from torch.utils.data import Dataset
from tqdm import tqdm

from sprint_mm.data.faults import BadDataError, BadItem, describe
from sprint_mm.tokens import as_patch

Shape = tuple[int, int, int]  # (frames, height, width)
SHOWN = 5  # how many examples a report names
CACHE_PREFIX = ".sprint_mm-item-sizes"
PROGRESS_FROM = 1000  # scans of at least this many items show a progress bar
TIE_DIGITS = 9  # log distances equal to this many decimals are a tie (float noise must not break ties)


@dataclass(frozen=True)
class Bucket:
    """One bucket: items resized and centre-cropped to (frames, height, width), in global batches of `batch_size`.

    `weight` is a per-epoch repeat factor: each epoch the bucket contributes round(weight * items) item slots
    (1: every item once; 2: every item twice; 0.5: a random half, drawn anew each epoch), so the share of steps
    per bucket follows the weights.
    """

    frames: int
    height: int
    width: int
    batch_size: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"bucket {self.describe()}: {name} must be a positive int, got {value!r}")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"bucket {self.describe()}: weight must be a finite number > 0, got {weight!r}")

    @property
    def shape(self) -> Shape:
        return (self.frames, self.height, self.width)

    def describe(self) -> str:
        """'FxHxW (batch B[, weight W])' for messages."""
        weight = "" if self.weight == 1 else f", weight {self.weight:g}"
        return f"{self.frames}x{self.height}x{self.width} (batch {self.batch_size}{weight})"


BucketLike = Union[Bucket, Sequence[Any]]


@gin.configurable
class BucketTable:
    """The buckets of a run, from `Bucket`s or gin-friendly tuples `(frames, height, width, batch_size[, weight])`.

    The assignment rule (`assign`): an item of F frames (an image has F = 1) can go only to buckets with at most F
    frames, and among those only to the buckets with the most frames: an image goes only to 1-frame buckets; a clip
    shorter than every multi-frame bucket goes to a 1-frame bucket if there is one (it gives one frame), else
    nowhere. Among the buckets left, the nearest aspect ratio, |log(h/w) - log(H/W)|, wins, then the nearest area,
    |log(h*w) - log(H*W)|; remaining ties go to the earlier bucket (distances are compared to 9 decimals, so float
    noise does not decide a tie). The item is then resized to cover the bucket and centre-cropped. With `crop_only`
    (latents, which are cropped and never resized) only buckets no larger than the item in height and width count.
    """

    def __init__(self, buckets: Sequence[BucketLike]) -> None:
        if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
            raise ValueError("BucketTable needs a non-empty list of buckets (frames, height, width, batch_size"
                             f"[, weight]), got {buckets!r}")
        self.buckets: tuple[Bucket, ...] = tuple(_as_bucket(entry, number) for number, entry in enumerate(buckets))
        first: dict[Shape, int] = {}
        for number, bucket in enumerate(self.buckets):
            if bucket.shape in first:
                raise ValueError(f"buckets {first[bucket.shape]} and {number} have the same size "
                                 f"{bucket.frames}x{bucket.height}x{bucket.width}: each size may appear once")
            first[bucket.shape] = number

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, number: int) -> Bucket:
        return self.buckets[number]

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.buckets)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketTable) and self.buckets == other.buckets

    def __repr__(self) -> str:
        return f"BucketTable({[astuple(bucket) for bucket in self.buckets]})"

    def to_list(self) -> list[list[float]]:
        """JSON-ready rows [frames, height, width, batch_size, weight]."""
        return [list(astuple(bucket)) for bucket in self.buckets]

    def assign(self, frames: int, height: int, width: int, crop_only: bool = False) -> Optional[int]:
        """The bucket an item of native size (frames, height, width) goes to, None when no bucket can take it (the
        rule is in the class docstring)."""
        fits = [number for number, bucket in enumerate(self.buckets) if bucket.frames <= frames
                and (not crop_only or (bucket.height <= height and bucket.width <= width))]
        if not fits:
            return None
        most = max(self.buckets[number].frames for number in fits)
        aspect, area = math.log(height / width), math.log(height * width)

        def distance(number: int) -> tuple[float, float, int]:
            bucket = self.buckets[number]
            return (round(abs(aspect - math.log(bucket.height / bucket.width)), TIE_DIGITS),
                    round(abs(area - math.log(bucket.height * bucket.width)), TIE_DIGITS), number)

        return min((number for number in fits if self.buckets[number].frames == most), key=distance)

    def describe(self, world_size: int = 1, grad_accum: int = 1) -> str:
        """One line per bucket: its size, global batch and the micro-batch each process reads."""
        split = world_size * grad_accum
        return "\n".join(f"bucket {number}: {bucket.describe()}, micro-batch {bucket.batch_size / split:g} per "
                         f"process ({world_size} process(es) x {grad_accum} accumulation step(s))"
                         for number, bucket in enumerate(self.buckets))


def _as_bucket(entry: BucketLike, number: int) -> Bucket:
    if isinstance(entry, Bucket):
        return entry
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) not in (4, 5):
        raise ValueError(f"bucket {number} must be (frames, height, width, batch_size) or (frames, height, width, "
                         f"batch_size, weight), got {entry!r}")
    try:
        return Bucket(*entry)
    except ValueError as error:
        raise ValueError(f"bucket {number}: {error}") from None


def tokens_per_sample(shape: Sequence[int], patch_size: int | Sequence[int]) -> int:
    """Tokens of a (T, H, W) sample cut into (pt, ph, pw) patches: ceil(T / pt) * (H / ph) * (W / pw)."""
    (frames, height, width), (pt, ph, pw) = shape, as_patch(patch_size)
    if height % ph or width % pw:
        raise ValueError(f"a {frames}x{height}x{width} sample does not split into {ph}x{pw} patches: "
                         "height and width must be multiples of the patch size")
    return math.ceil(frames / pt) * (height // ph) * (width // pw)


def propose_batch_sizes(shapes: Sequence[Sequence[int]], tokens_per_step: int, patch_size: int | Sequence[int],
                        multiple_of: int = 1) -> list[int]:
    """Global batch sizes that keep the tokens per step near `tokens_per_step`: tokens_per_step / tokens of each
    (T, H, W) shape, rounded to a multiple of `multiple_of` (processes x gradient accumulation) and at least that."""
    if isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, int) or tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be a positive int, got {tokens_per_step!r}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int (processes x grad_accum), got {multiple_of!r}")
    sizes = []
    for shape in shapes:
        batch = tokens_per_step / tokens_per_sample(shape, patch_size)
        sizes.append(max(multiple_of, round(batch / multiple_of) * multiple_of))
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# The bucket index: each item's native size, read from headers once and cached beside the data
# ----------------------------------------------------------------------------------------------------------------

class SizedItems(Protocol):
    """What a dataset offers for bucketing. `item_size(i)` reads item i's native (frames, height, width) without
    decoding pixels (an image has 1 frame); `load(i, shape)` reads it at bucket size `shape` (`__getitem__` is
    `load` at the dataset's own size); `cache_key()` gives the data's location (a folder or an index file; the size
    cache goes beside it) and a fingerprint of the item list, or None when sizes cost no reading."""

    def item_size(self, index: int) -> Shape: ...

    def load(self, index: int, shape: Shape) -> dict: ...

    def cache_key(self) -> Optional[tuple[Path, str]]: ...


def fingerprint(entries: Sequence[Any]) -> str:
    """sha256 of a JSON-able list (item names, their sizes and times...): the item list a cache was built for."""
    return hashlib.sha256(json.dumps(list(entries), default=str).encode()).hexdigest()


def file_entries(paths: Sequence[Path], root: Path) -> list[tuple[str, int, int]]:
    """(path relative to `root` where it lies below it, size in bytes, mtime in ns) of each file: changes when a
    file is added, removed or rewritten. A file that cannot be stat-ed gives (path, -1, -1); reading it reports it."""
    entries = []
    for path in paths:
        name = str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)
        try:
            stat = os.stat(path)
            entries.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            entries.append((name, -1, -1))
    return entries


def cache_path(dataset: SizedItems, location: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Where the sizes of `dataset` at `location` are cached: in the data's folder (named by dataset class, and
    by the index file's name when the location is one), so the cache moves with the data; or in `cache_dir`, named
    also by a hash of the full location, as one folder may hold the caches of many datasets."""
    location = Path(location)
    name = f"{CACHE_PREFIX}-{type(dataset).__name__}" + ("" if location.is_dir() else f"-{location.name}")
    if cache_dir is None:
        return (location if location.is_dir() else location.parent) / f"{name}.json"
    return Path(cache_dir) / f"{name}-{hashlib.sha256(str(location.absolute()).encode()).hexdigest()[:12]}.json"


def item_sizes(dataset: SizedItems, cache_dir: str | os.PathLike | None = None) -> list[Optional[Shape]]:
    """Every item's native (frames, height, width), None for an item whose header cannot be read (`BadItem`).

    The sizes are cached (`cache_path`) with the fingerprint of the item list, and reused while that is unchanged,
    else read again and the cache rewritten. A folder that cannot be written only costs the cache (a warning). A
    dataset made of `parts` (`JointDataset`) is the concatenation of its parts' sizes, each cached on its own.
    """
    return sizes_and_unreadable(dataset, cache_dir)[0]


def sizes_and_unreadable(dataset: SizedItems, cache_dir: str | os.PathLike | None = None
                         ) -> tuple[list[Optional[Shape]], list[tuple[str, str, str]]]:
    """`item_sizes`, and the (kind, path, reason) of every item whose size cannot be read."""
    parts = getattr(dataset, "parts", None)
    if parts is not None:
        read = [sizes_and_unreadable(part, cache_dir) for part in parts]
        return [size for sizes, _ in read for size in sizes], [record for _, records in read for record in records]
    key = dataset.cache_key()
    path = None if key is None else cache_path(dataset, key[0], cache_dir)
    cached = None if path is None else _read_cache(path, key[1], len(dataset))
    if cached is not None:
        sizes, unreadable = cached
    else:
        sizes, unreadable = _read_sizes(dataset)
        if path is not None:
            _write_cache(path, {"fingerprint": key[1], "sizes": sizes, "unreadable": describe(unreadable),
                                "unreadable_items": unreadable})
    missing = sum(size is None for size in sizes)
    if missing == len(sizes):
        raise BadDataError(f"no item of the {len(sizes)} in {type(dataset).__name__} has a readable size: "
                           f"{describe(unreadable)}")
    if missing:
        warnings.warn(f"{missing} of {len(sizes)} items of {type(dataset).__name__} have no readable size and are "
                      f"left out (counted as bad data): {describe(unreadable)}", stacklevel=2)
    return sizes, unreadable


def _read_sizes(dataset: SizedItems) -> tuple[list[Optional[Shape]], list[tuple[str, str, str]]]:
    """Every item's size from `item_size` (None where it raises `BadItem`) and the records of those bad items."""
    sizes: list[Optional[Shape]] = []
    bad = []
    for index in tqdm(range(len(dataset)), desc=f"reading item sizes of {type(dataset).__name__}", unit="item",
                      disable=len(dataset) < PROGRESS_FROM, delay=2.0):  # a bar only when it takes a while
        try:
            size = tuple(int(value) for value in dataset.item_size(index))
        except BadItem as error:
            sizes.append(None)
            bad.append((error.kind, error.path, error.reason))
            continue
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"{type(dataset).__name__}.item_size({index}) must be a positive (frames, height, "
                             f"width), got {size}")
        sizes.append(size)  # type: ignore[arg-type]
    return sizes, bad


def _read_cache(path: Path, print_: str, count: int) -> Optional[tuple[list[Optional[Shape]], list[tuple]]]:
    """The cached sizes and records of unreadable items, None when there is no cache for this item list (or one
    written before the records were kept, that has unreadable items)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("fingerprint") != print_ or len(content.get("sizes", ())) != count:
        return None
    sizes = [None if size is None else tuple(size) for size in content["sizes"]]
    if None in sizes and "unreadable_items" not in content:
        return None
    return sizes, [tuple(record) for record in content.get("unreadable_items", [])]


def _write_cache(path: Path, content: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed into place), so a reader never sees half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(content))
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        warnings.warn(f"cannot write the item size cache {path} ({error}); sizes are read again next time; "
                      "set cache_dir to a writable folder to keep them", stacklevel=3)


def bucket_index(dataset: SizedItems, table: BucketTable, cache_dir: str | os.PathLike | None = None,
                 crop_only: Optional[bool] = None) -> list[Optional[int]]:
    """The bucket of every item (None: no bucket takes it, or its size cannot be read). `crop_only` defaults to
    the dataset's `crop_only` attribute (latent datasets set it: they are cropped, never resized)."""
    return _assign_all(item_sizes(dataset, cache_dir), table, _crop_only(dataset, crop_only))


def _crop_only(dataset: SizedItems, crop_only: Optional[bool]) -> bool:
    return bool(getattr(dataset, "crop_only", False)) if crop_only is None else crop_only


def _assign_all(sizes: Sequence[Optional[Shape]], table: BucketTable, crop_only: bool) -> list[Optional[int]]:
    return [None if size is None else table.assign(*size, crop_only=crop_only) for size in sizes]


@gin.configurable
class BucketedDataset(Dataset):
    """`dataset` with each item loaded at its bucket's size: item i is `dataset.load(i, table[bucket_of[i]].shape)`.

    `x` is (C, H, W) for an image dataset and (C, T, H, W) for a video dataset, T = the bucket's frames. Items that
    no bucket takes (see `BucketTable.assign`) or whose size cannot be read are left out (`bucket_of[i]` is None)
    and reported once, by count with examples; `BucketBatchSampler(bucket_of, table, ...)` never asks for them. The
    unreadable ones (`unreadable`: (kind, path, reason) each) are bad data: a run counts them in its ledger.
    `len` is the wrapped dataset's. With `SkippingDataset`, a bad item is replaced by the next good item of the SAME
    bucket (`substitutes`), so every batch keeps one shape.
    """

    def __init__(self, dataset: SizedItems, table: BucketTable, cache_dir: Optional[str] = None,
                 crop_only: Optional[bool] = None) -> None:
        missing = [name for name in ("item_size", "load", "cache_key") if not callable(getattr(dataset, name, None))]
        if missing:
            raise ValueError(f"{type(dataset).__name__} cannot be bucketed: it lacks {', '.join(missing)} (a dataset "
                             "for buckets reads item sizes from headers and loads items at a given shape)")
        if not isinstance(table, BucketTable):
            raise ValueError(f"table must be a BucketTable, got {type(table).__name__}")
        self.dataset, self.table = dataset, table
        sizes, self.unreadable = sizes_and_unreadable(dataset, cache_dir)
        crop = _crop_only(dataset, crop_only)
        self.bucket_of: list[Optional[int]] = _assign_all(sizes, table, crop)
        self.members: list[list[int]] = [[] for _ in table]
        self._rank = [-1] * len(self.bucket_of)  # item -> its place among its bucket's members
        for index, bucket in enumerate(self.bucket_of):
            if bucket is not None:
                self._rank[index] = len(self.members[bucket])
                self.members[bucket].append(index)
        _report_left_out(dataset, sizes, self.bucket_of, table, crop)

    def __len__(self) -> int:
        return len(self.bucket_of)

    def __getitem__(self, index: int) -> dict:
        bucket = self.bucket_of[index]
        if bucket is None:
            raise ValueError(f"item {index} of {type(self.dataset).__name__} is in no bucket (left out); sample "
                             "indices with BucketBatchSampler")
        return self.dataset.load(index, self.table[bucket].shape)

    def substitutes(self, index: int) -> Iterator[int]:
        """The items `SkippingDataset` tries for `index`, in order: itself, then the next items of its bucket
        (wrapping around). For an item in no bucket (which the sampler never asks for; a check that reads "the first
        item" may), the next items in any bucket."""
        bucket = self.bucket_of[index]
        if bucket is None:
            count = len(self.bucket_of)
            yield from (item for item in ((index + step) % count for step in range(count))
                        if self.bucket_of[item] is not None)
            return
        members, first = self.members[bucket], self._rank[index]
        for offset in range(len(members)):
            yield members[(first + offset) % len(members)]

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes  # an AttributeError when the wrapped dataset has none, as without buckets

    @property
    def collate(self):
        return self.dataset.collate  # likewise: SkippingDataset falls back to torch's default_collate


def _report_left_out(dataset: SizedItems, sizes: Sequence[Optional[Shape]], bucket_of: Sequence[Optional[int]],
                     table: BucketTable, crop_only: bool) -> None:
    """One warning: how many items fit no bucket, with examples of their sizes (`item_sizes` names the unreadable
    ones)."""
    unfit = [index for index, (size, bucket) in enumerate(zip(sizes, bucket_of)) if size is not None and bucket is None]
    if not unfit:
        return
    examples = ", ".join(f"item {index} ({'x'.join(map(str, sizes[index]))})" for index in unfit[:SHOWN])
    rule = "at most its frames" + (" and no larger than itself (latents are cropped, not resized)" if crop_only else "")
    warnings.warn(
        f"{len(unfit)} of {len(sizes)} items of {type(dataset).__name__} fit no bucket and are left out, e.g. "
        f"{examples}{' ...' if len(unfit) > SHOWN else ''} (frames x height x width); an item needs a bucket with "
        f"{rule}, an image a 1-frame bucket; buckets: {', '.join(bucket.describe() for bucket in table)}", stacklevel=3)
