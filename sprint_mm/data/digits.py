"""scikit-learn's bundled 8x8 handwritten digits as a tiny class-conditional image set (no network)."""

from __future__ import annotations

from typing import Optional, Sequence

import gin
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape
from sprint_mm.data.transforms import resize_center_crop

SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.2  # the last 20% of the (fixed) sklearn order is the test split
MAX_PIXEL = 16.0  # sklearn digits store ink counts 0..16
NATIVE = 8  # every digit is 8x8


@gin.configurable
class DigitsDataset(Dataset):
    """Items are `{"x": (channels, resolution, resolution) float in [-1, 1], "label": 0..9}`.

    The 8x8 images are scaled from 0..16 to [-1, 1] and resized bilinearly to `resolution` (with buckets: to cover
    the bucket's height and width, then centre-cropped).
    The train/test split is deterministic: the first 80% train, the last 20% test. `classes` keeps only the digits
    it lists (e.g. 0-4 to pretrain a model that later learns the others); labels stay the digits themselves.
    """

    num_classes = 10

    def __init__(self, resolution: int = 16, split: str = "all", channels: int = 1,
                 classes: Optional[Sequence[int]] = None) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.resolution = resolution
        self.split = split
        self.channels = channels
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32) / (MAX_PIXEL / 2) - 1.0
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        first_test = len(labels) - round(TEST_FRACTION * len(labels))
        rows = {"all": slice(None), "train": slice(None, first_test), "test": slice(first_test, None)}
        self.images = images[rows[split]].unsqueeze(1)  # (count, 1, NATIVE, NATIVE)
        self.labels = labels[rows[split]]  # (count,)
        if classes is not None:
            unknown = sorted(set(classes) - set(range(self.num_classes)))
            if unknown or not classes:
                raise ValueError(f"DigitsDataset.classes must list digits 0-9, got {list(classes)!r}")
            keep = torch.isin(self.labels, torch.tensor(list(classes)))
            self.images, self.labels = self.images[keep], self.labels[keep]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.load(index, (1, self.resolution, self.resolution))

    def load(self, index: int, shape: Shape) -> dict[str, torch.Tensor | int]:
        """Item `index` resized to cover (height, width) = shape[1:] and centre-cropped; shape[0] must be 1."""
        if shape[0] != 1:
            raise ValueError(f"a digit is an image of 1 frame, not {shape[0]}: DigitsDataset loads shape (1, H, W)")
        x = resize_center_crop(self.images[index], tuple(shape[1:]), "bilinear")  # (1, H, W)
        return {"x": x.expand(self.channels, -1, -1).clone(), "label": int(self.labels[index])}

    def item_size(self, index: int) -> Shape:
        return (1, NATIVE, NATIVE)

    def cache_key(self) -> None:
        """Sizes cost nothing to read: no cache."""
        return None
