"""The moving-digit clips of the video and bucket demos: real mp4 files written once by
`sprint_mm.data.moving_digits` and read back through `VideoFolderDataset` like any user's class-folder video set."""
from __future__ import annotations

from pathlib import Path

from sprint_mm.data.moving_digits import write_moving_digits

# A 12 px digit on 16 px frames: large enough to read, with 4 px to travel; the demos' judge reads crops of this size.
DIGIT_FRACTION = 0.75


def ensure_clips(folder: Path, num: int, frames: int, size: int, seed: int = 0) -> Path:
    """Write `num` moving-digit mp4s of `frames` frames at `size` px to folder/<digit>/ unless it already holds
    videos; returns the folder."""
    folder = Path(folder)
    if not any(folder.rglob("*.mp4")):
        write_moving_digits(folder, num, frames, size, seed=seed, digit_fraction=DIGIT_FRACTION)
    return folder
