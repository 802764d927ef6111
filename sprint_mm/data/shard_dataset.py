"""Training from a shard set (`sprint_mm.data.shards`): `Trainer.dataset = @ShardDataset()`, `ShardDataset.root`.

The items come back as the source dataset gave them, with two things done at read time: latent items (stored as
their posterior) draw a fresh sample `(mean + std * eps - shift) * scale`, and with buckets an item is cut to its
bucket (latents centre-cropped, never resized; pixels resized to cover and centre-cropped, clips cut to the bucket's
frames around their middle). Sizes for buckets come from the index, without opening an item.

The order of an epoch (`window_order`) shuffles the shards, then the items within each window of `shuffle_window`
consecutive shards of that order, so that at any moment every process reads from the same few shards (a remote set
is downloaded window by window, not all at once) while each epoch still visits every item once in a new order.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import gin
import numpy as np
import torch
from torch.utils.data import Dataset

from sprint_mm.data.bucket_sampler import seed_of
from sprint_mm.data.buckets import Shape
from sprint_mm.data.latents import POSTERIOR_FIELDS, crop_image_with_latent, crop_latent, posterior_sample
from sprint_mm.data.shards import ShardSet
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.data.video import clip_frame_indices
from sprint_mm.errors import check_number


def window_order(shard_items: Sequence[int], window: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch `epoch`'s order of the items of shards holding `shard_items` items each (items numbered shard after
    shard): the shards permuted by (seed, epoch), cut into windows of `window` shards, the items of each window
    permuted. A pure function of its arguments."""
    check_number("shuffle_window", window, low=1, integer=True)
    starts = np.concatenate([[0], np.cumsum(shard_items)])
    shards = torch.randperm(len(shard_items), generator=torch.Generator().manual_seed(seed_of(seed, epoch)))
    order = []
    for first in range(0, len(shard_items), window):
        members = torch.cat([torch.arange(int(starts[shard]), int(starts[shard + 1]))
                             for shard in shards[first:first + window].tolist()])
        shuffle = torch.Generator().manual_seed(seed_of(seed, epoch, first))
        order.append(members[torch.randperm(len(members), generator=shuffle)])
    return torch.cat(order)


def fit_pixels(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """A pixel item (C, H, W) or clip (C, T, H, W) at bucket `shape` (frames, height, width): a clip keeps `frames`
    consecutive frames around its middle (a 1-frame bucket gets the middle frame as an image), then the frames are
    resized to cover (height, width) and centre-cropped."""
    frames, size = shape[0], tuple(shape[1:])
    if x.dim() == 3 and frames != 1:
        raise ValueError(f"an image item has 1 frame, not {frames}")
    if x.dim() == 4:
        x = x[:, clip_frame_indices(x.shape[1], frames, 1, random_start=False)]
        x = x[:, 0] if frames == 1 else x
    return resize_center_crop(x, size, "bilinear")


@gin.configurable
class ShardDataset(Dataset):
    """The items of the shard set at `root` (a folder or an fsspec URL) that `datasets/write_shards.py` wrote.

    Items are dicts as the source dataset gave them (`x`, `label`, `caption`, cached `text_tokens` / `text_mask`,
    `image`), floating tensors in float32. A remote set's shards are cached in `cache_dir` (default: under
    ~/.cache/sprint_mm/shards). `shuffle_window` is the number of shards whose items one stretch of an epoch mixes
    (`window_order`); at least the number of shards, it shuffles the whole set at once. An item whose bytes fail
    their checksum raises `BadItem` (`SkippingDataset` replaces and counts it).
    """

    def __init__(self, root: str, cache_dir: Optional[str | os.PathLike] = None, shuffle_window: int = 8) -> None:
        check_number("ShardDataset.shuffle_window", shuffle_window, low=1, integer=True)
        self.shards = ShardSet(root, cache_dir)
        self.shuffle_window = shuffle_window
        self.crop_only = bool(self.shards.manifest["crop_only"])
        self.shard_items = [int(shard["items"]) for shard in self.shards.shards]

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(index, None)

    def load(self, index: int, shape: Shape) -> dict[str, Any]:
        """Item `index` cut to bucket `shape` (frames, height, width) as the module docstring says."""
        return self._item(index, tuple(shape))

    def item_size(self, index: int) -> Shape:
        """(frames, height, width) of item `index`, from the index."""
        return self.shards.item_size(index)

    def sizes(self) -> np.ndarray:
        """(items, 3): every item's (frames, height, width)."""
        index = self.shards.index
        return np.stack([index["frames"], index["height"], index["width"]], axis=1)

    def cache_key(self) -> None:
        """None: the sizes are in the index, there is nothing to cache."""
        return None

    def _item(self, index: int, shape: Optional[Shape]) -> dict[str, Any]:
        record = {name: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                  for name, value in self.shards.read(index).items()}
        if POSTERIOR_FIELDS[0] in record:
            return self._latent(index, record, shape)
        x = record.pop("x")
        return {"x": x if shape is None else fit_pixels(x, shape), **record}

    def _latent(self, index: int, record: dict[str, Any], shape: Optional[Shape]) -> dict[str, Any]:
        """A fresh sample of the item's posterior (cropped to `shape`, with its image, when given)."""
        mean, std, scale, shift = (record.pop(name) for name in POSTERIOR_FIELDS)
        if shape is not None:
            where = f"{self.shards.root} item {index}"
            size = tuple(shape[1:]) if mean.dim() == 3 else tuple(shape)
            latent = tuple(mean.shape[-2:])
            mean, std = crop_latent(where, torch.stack([mean, std]), size)
            if "image" in record:
                record["image"] = crop_image_with_latent(where, record["image"], latent, size[-2:])
        return {"x": posterior_sample(mean, std, scale, shift), **record}

    # ------------------------------------------------------------------ what the data stream asks
    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The items of epoch `epoch` in training order (`window_order`)."""
        return window_order(self.shard_items, self.shuffle_window, seed, epoch)

    def fingerprint(self) -> dict[str, Any]:
        """What a data position means: the index (items, their places and checksums) and the order's window."""
        return {"items": len(self), "index_sha256": self.shards.manifest["index_sha256"],
                "shuffle_window": self.shuffle_window}

    @property
    def num_classes(self) -> int:
        classes = self.shards.manifest["num_classes"]
        if classes is None:
            raise AttributeError(f"the shard set {self.shards.root} records no number of classes")
        return classes

    @property
    def captions(self) -> list[str]:
        """The source dataset's list of captions (text previews read it)."""
        captions = self.shards.manifest["captions"]
        if captions is None:
            raise AttributeError(f"the shard set {self.shards.root} records no captions")
        return captions
