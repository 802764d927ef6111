"""The "moving digits" toy video set: scikit-learn's bundled 8x8 handwritten digits (no download) gliding across a
black square canvas and bouncing off the walls, written as real mp4 files in DIR/<digit>/<index>.mp4.

The digit is upsampled to `digit_fraction` of the canvas side (0.45 by default: a larger digit reads better on a
small canvas but has less room to move; the video demo puts 12 px digits on 16 px frames). Digits cycle 0..9 so the
classes stay balanced; everything else comes from the seed. `datasets/make_moving_digits.py` is its command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from sprint_mm.media import save_video

MIN_SIZE = 16
DIGIT_FRACTION = 0.45  # digit side / canvas side
MIN_ROOM = 2  # pixels the digit can travel along each axis
SPEED_RANGE = (0.04, 0.08)  # distance per frame, as a fraction of the canvas side
FPS = 8


def _bounce(position: float, velocity: float, limit: float) -> tuple[float, float]:
    """Advance one frame inside [0, limit], reflecting off either wall."""
    position += velocity
    if position < 0:
        position, velocity = -position, -velocity
    elif position > limit:
        position, velocity = 2 * limit - position, -velocity
    return position, velocity


def digit_side(size: int, digit_fraction: float) -> int:
    """The digit's side in pixels on a `size` canvas; an error when it leaves the digit no room to move."""
    if not 0.0 < digit_fraction < 1.0:
        raise ValueError(f"digit_fraction must be in (0, 1) (digit side / canvas side), got {digit_fraction}")
    side = max(1, round(size * digit_fraction))
    if size - side < MIN_ROOM:
        raise ValueError(
            f"digit_fraction {digit_fraction} makes a {side} px digit on a {size} px canvas, leaving "
            f"{size - side} px to move; allowed: at most {(size - MIN_ROOM) / size:.3f} for this size"
        )
    return side


def moving_digit_frames(
    digit: np.ndarray, frames: int, size: int, rng: np.random.Generator, digit_fraction: float = DIGIT_FRACTION
) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1]: an 8x8 digit image (values 0..16) moving and bouncing."""
    digit_size = digit_side(size, digit_fraction)
    sprite = Image.fromarray((digit / 16.0).astype(np.float32))  # mode "F"
    sprite = np.clip(np.asarray(sprite.resize((digit_size, digit_size), Image.Resampling.BILINEAR)), 0.0, 1.0)
    limit = size - digit_size
    y, x = rng.uniform(0, limit, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(*SPEED_RANGE) * size
    velocity_y, velocity_x = speed * np.sin(angle), speed * np.cos(angle)
    video = np.zeros((frames, size, size), dtype=np.float32)
    for t in range(frames):
        top, left = round(y), round(x)
        video[t, top : top + digit_size, left : left + digit_size] = sprite
        y, velocity_y = _bounce(y, velocity_y, limit)
        x, velocity_x = _bounce(x, velocity_x, limit)
    return video


def moving_digit_videos(
    num: int, frames: int = 16, size: int = 32, seed: int = 0, digit_fraction: float = DIGIT_FRACTION
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `num` (digit, (frames, size, size) float32 video in [0, 1]) pairs; digit = index % 10."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} px so a digit has room to move, got {size}")
    digit_side(size, digit_fraction)  # fail before the first video
    digits = load_digits()
    by_class = [np.flatnonzero(digits.target == digit) for digit in range(10)]
    rng = np.random.default_rng(seed)
    for index in range(num):
        digit = index % 10
        image = digits.images[rng.choice(by_class[digit])]
        yield digit, moving_digit_frames(image, frames, size, rng, digit_fraction)


def write_moving_digits(
    out_dir: str | Path,
    num: int,
    frames: int = 16,
    size: int = 32,
    seed: int = 0,
    digit_fraction: float = DIGIT_FRACTION,
) -> list[Path]:
    """Write `num` videos to out_dir/<digit>/<index>.mp4 and return their paths in index order."""
    out_dir = Path(out_dir)
    videos = moving_digit_videos(num, frames, size, seed, digit_fraction)
    paths = []
    for index, (digit, video) in enumerate(tqdm(videos, total=num, desc="moving digits", unit="video")):
        clip = torch.from_numpy(video)[None] * 2.0 - 1.0  # (1, T, S, S) in [-1, 1]
        paths.append(save_video(clip, out_dir / str(digit) / f"{index:06d}.mp4", fps=FPS))
    return paths
