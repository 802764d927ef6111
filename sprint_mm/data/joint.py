"""Images and videos in one run: datasets concatenated, for buckets to batch by size.

A 1-frame item is an image: loaded at a 1-frame bucket shape, a video part's item is its (C, H, W) frame, so that
it batches with the image parts' items (a 1-frame bucket mixes both; the trainer makes one-frame videos of image
batches for a video model). Each batch comes from one bucket, so a batch is all images or all clips of one length;
how often each kind trains follows the buckets' items and weights (`sprint_mm.data.buckets.Bucket.weight`).
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import gin
import torch
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape, SizedItems
from sprint_mm.data.faults import SkippingDataset


def _describe(part: Dataset) -> tuple[int, str]:
    """(channels, conditioning kind: 'caption' or 'label') of the first good item of `part`, read leaving the RNG
    as it was."""
    with torch.random.fork_rng(devices=[]):
        item = SkippingDataset(part)[0]
    return int(item["x"].shape[0]), "caption" if "caption" in item else "label"


@gin.configurable
class JointDataset(Dataset):
    """The items of `parts` one after another: item i of the whole is item i - offset of its part.

    `item_size`, `load` and `__getitem__` pass through (with the 1-frame rule of the module docstring); the parts
    must agree on channels and conditioning (class labels or captions), checked on each part's first good item;
    `num_classes` is the largest of the parts'. Latent and pixel parts cannot mix (`crop_only` must agree). Wrap it
    in a `BucketedDataset`: its parts' items have different sizes. Each part caches its own item sizes.
    """

    def __init__(self, parts: Sequence[SizedItems]) -> None:
        if isinstance(parts, Dataset) or not isinstance(parts, Sequence) or not parts:
            raise ValueError(f"JointDataset needs a non-empty list of datasets, got {parts!r}")
        empty = [number for number, part in enumerate(parts) if len(part) == 0]
        if empty:
            raise ValueError(f"JointDataset parts {empty} are empty")
        kinds = [_describe(part) for part in parts]
        if len(set(kinds)) > 1:
            listing = "; ".join(f"part {number} ({type(part).__name__}): {channels} channels, {kind}s"
                                for number, (part, (channels, kind)) in enumerate(zip(parts, kinds)))
            raise ValueError(f"the parts of a JointDataset must agree on channels and conditioning: {listing}")
        crop = {bool(getattr(part, "crop_only", False)) for part in parts}
        if len(crop) > 1:
            raise ValueError("a JointDataset cannot mix latent parts (cropped to buckets) with pixel parts (resized)")
        self.parts = list(parts)
        self.crop_only = crop.pop()
        self.offsets = list(itertools.accumulate(len(part) for part in self.parts))  # end of each part

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        part = bisect.bisect_right(self.offsets, index)
        return part, index - (self.offsets[part - 1] if part else 0)

    def __getitem__(self, index: int) -> dict:
        part, local = self.locate(index)
        return self.parts[part][local]

    def item_size(self, index: int) -> Shape:
        part, local = self.locate(index)
        return self.parts[part].item_size(local)

    def load(self, index: int, shape: Shape) -> dict:
        part, local = self.locate(index)
        item = self.parts[part].load(local, shape)
        if shape[0] == 1 and item["x"].dim() == 4:  # a video part's single frame batches with the images
            item = {**item, "x": item["x"][:, 0]}
        return item

    def cache_key(self) -> Optional[tuple[Path, str]]:
        """None: `bucket_index` reads and caches each part's sizes on its own."""
        return None

    @property
    def num_classes(self) -> int:
        classes = [part.num_classes for part in self.parts if getattr(part, "num_classes", None) is not None]
        if not classes:
            raise AttributeError("no part of this JointDataset has num_classes")
        return max(classes)

    @property
    def collate(self) -> Callable[[list[dict]], dict]:
        """The first part's own `collate` (caption parts batch with `collate_captions`); torch's default when no
        part has one."""
        for part in self.parts:
            collate = getattr(part, "collate", None)
            if collate is not None:
                return collate
        raise AttributeError("no part of this JointDataset has collate")
