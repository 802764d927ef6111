"""scikit-learn's digits with short English captions: the toy text-to-image (and text-to-video) set of the text demo.

Every digit gets one caption drawn from several phrasings ("a handwritten seven", "the digit 7", ...), chosen once per
item by a seeded generator, so an item always carries the same caption. `HELD_OUT_PROMPTS` are phrasings that never
occur in training: a text-conditioned model that understands its encoder's embeddings should still draw the digit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import gin
import torch
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape
from sprint_mm.data.digits import NATIVE, DigitsDataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# `{word}` becomes "seven", `{numeral}` becomes "7".
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {numeral}",
    "number {word}",
    "{numeral} written by hand",
    "an image of the digit {word}",
    "a picture of a handwritten {numeral}",
)
HELD_OUT_TEMPLATES = (
    "a drawing of the number {word}",
    "{word}",
    "handwritten digit {numeral} on black",
)
PLACEHOLDERS = ("{word}", "{numeral}")


def digit_caption(template: str, digit: int) -> str:
    """`template` with `{word}` / `{numeral}` filled in for `digit` (0..9)."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return template.format(word=DIGIT_WORDS[digit], numeral=digit)


def prompts_for(templates: Sequence[str]) -> dict[str, int]:
    """{caption: digit} for every template and digit, template by template (each template's digits 0..9 in order)."""
    return {digit_caption(template, digit): digit for template in templates for digit in range(10)}


HELD_OUT_PROMPTS = prompts_for(HELD_OUT_TEMPLATES)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple, or one ValueError naming the first that does not name its digit."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty sequence of strings, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or not any(key in template for key in PLACEHOLDERS):
            raise ValueError(f"template {template!r} must be a string containing {' or '.join(PLACEHOLDERS)}")
        try:
            digit_caption(template, 0)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"template {template!r} has a placeholder other than {' and '.join(PLACEHOLDERS)}: {error!r}"
            ) from None
    return tuple(templates)


@gin.configurable
class CaptionedDigitsDataset(Dataset):
    """Items `{"x": (channels, resolution, resolution) in [-1, 1], "caption": str, "label": 0..9}`.

    With `frames` the item is a short video `(channels, frames, resolution, resolution)`: the digit drifts by one
    pixel per frame in a per-item direction (wrapping at the border), under the same caption. `captions` lists
    every distinct caption, template by template, so its first ten are the digits 0..9 (preview order).
    In buckets (`load`) an item has the bucket's frames and size; a set of images (`frames` None) loads 1 frame.
    """

    num_classes = 10

    def __init__(
        self,
        resolution: int = 16,
        split: str = "train",
        channels: int = 1,
        templates: Sequence[str] = TRAIN_TEMPLATES,
        frames: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise ValueError(f"frames must be None (images) or a positive int, got {frames!r}")
        self.digits = DigitsDataset(resolution=resolution, split=split, channels=channels)
        self.templates = check_templates(templates)
        self.frames = frames
        self.captions = list(prompts_for(self.templates))
        generator = torch.Generator().manual_seed(seed)
        self.template_ids = torch.randint(len(self.templates), (len(self.digits),), generator=generator)
        self.directions = torch.randint(-1, 2, (len(self.digits), 2), generator=generator)  # (dy, dx) per item

    def __len__(self) -> int:
        return len(self.digits)

    def caption(self, index: int) -> str:
        """The caption of item `index` (the same on every call)."""
        label = int(self.digits.labels[index])
        return digit_caption(self.templates[int(self.template_ids[index])], label)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        resolution = self.digits.resolution
        return self._item(index, self.frames, (resolution, resolution))

    def load(self, index: int, shape: Shape) -> dict[str, torch.Tensor | str | int]:
        """Item `index` at bucket shape (frames, height, width); a set of images needs frames 1."""
        if self.frames is None and shape[0] != 1:
            raise ValueError(f"these digits are images of 1 frame, not {shape[0]}: set frames for videos")
        return self._item(index, None if self.frames is None else shape[0], tuple(shape[1:]))

    def _item(self, index: int, frames: Optional[int], size: tuple[int, int]) -> dict[str, torch.Tensor | str | int]:
        item = self.digits.load(index, (1, *size))
        x = item["x"]  # (C, H, W)
        if frames is not None:
            dy, dx = self.directions[index].tolist()
            x = torch.stack(
                [torch.roll(x, shifts=(t * dy, t * dx), dims=(-2, -1)) for t in range(frames)], dim=1
            )  # (C, T, H, W)
        return {"x": x, "caption": self.caption(index), "label": item["label"]}

    def item_size(self, index: int) -> Shape:
        return (1 if self.frames is None else self.frames, NATIVE, NATIVE)

    def cache_key(self) -> None:
        """Sizes cost nothing to read: no cache."""
        return None
