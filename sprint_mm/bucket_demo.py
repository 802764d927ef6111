"""The bucket demo behind `video_demo.py --buckets`: one video DiT trained on moving digits of two shapes and still
digits of two sizes in one run, then sampled with PDG at every bucket's shape.

The data are real files read back by the datasets a user would use: two folders of mp4s (VideoFolderDataset, one
per clip shape) and one folder of PNG stills of both sizes (ImageFolderDataset), joined by JointDataset and bucketed
by the BucketTable of gin/video/moving_digits_buckets_stage1.gin.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from sprint_mm.cli import sample_main, train_two_stages
from sprint_mm.data.digits import DigitsDataset
from sprint_mm.video_demo import DIGIT_FRACTION, load_moving_digits_maker, stage_budgets

BUCKET_STAGES = ("gin/video/moving_digits_buckets_stage1.gin", "gin/video/moving_digits_buckets_stage2.gin")
BUCKET_RUN = "runs/moving_digits_buckets"
CLIPS = ((8, 16), (4, 24))  # (frames, size) of the two moving-digit sets, one mp4 folder each
CLIPS_PER_SHAPE = 300
STILL_SIZES = (16, 24)
# The shapes the demo samples, (frames, height, width): the buckets of the stage-1 gin file.
BUCKET_SHAPES = ((8, 16, 16), (4, 24, 24), (1, 16, 16), (1, 24, 24))
# PDG scale: judged at 2, 4 and 7 on one run (benchmarks/bucket_accuracy.py), 7 read the stills and the 24 px clips
# best and 4 the 16 px clips; 6 sits between.
BUCKET_SCALE = 6.0
BUCKET_SOLVER = "euler"


def clip_folder(root: Path, frames: int, size: int) -> Path:
    return root / f"videos_{frames}f_{size}px"


def write_still_digits(folder: Path, sizes: Sequence[int] = STILL_SIZES, per_size: Optional[int] = None) -> int:
    """scikit-learn's training digits (the first `per_size`, default all) as gray PNGs at every size in
    folder/<digit>/; returns how many were written."""
    written = 0
    for size in sizes:
        digits = DigitsDataset(resolution=size, split="train")
        for index in range(min(len(digits), per_size or len(digits))):
            item = digits[index]
            pixels = ((item["x"][0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            path = folder / str(item["label"]) / f"{size}px_{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(path)
            written += 1
    return written


def ensure_bucket_data(root: Path) -> None:
    """Write the two clip folders and the stills unless they already hold files."""
    maker = load_moving_digits_maker()
    for seed, (frames, size) in enumerate(CLIPS):
        folder = clip_folder(root, frames, size)
        if not any(folder.rglob("*.mp4")):
            maker.write_moving_digits(folder, CLIPS_PER_SHAPE, frames, size, seed=seed, digit_fraction=DIGIT_FRACTION)
    if not any((root / "images").rglob("*.png")):
        write_still_digits(root / "images")


def sample_path(root: Path, shape: Sequence[int]) -> Path:
    frames, height, width = shape
    return root / f"samples_pdg_{frames}f_{height}x{width}.mp4"


def run_bucket_demo(
    root: str = BUCKET_RUN,
    minutes: Optional[float] = None,
    gin_params: Sequence[str] = (),
    scale: float = BUCKET_SCALE,
    steps: int = 50,
    solver: str = BUCKET_SOLVER,
) -> list[Path]:
    """Write the data if absent, train both stages over the four buckets, then sample one PDG sample per digit 0..9
    at every bucket's shape (`sample.py --frames/--size`). Returns the .mp4 per bucket (a .png strip lies beside)."""
    folder = Path(root)
    ensure_bucket_data(folder)
    (frames_a, size_a), (frames_b, size_b) = CLIPS
    shared = [f"videos_{frames_a}f/VideoFolderDataset.root = {str(clip_folder(folder, frames_a, size_a))!r}",
              f"videos_{frames_b}f/VideoFolderDataset.root = {str(clip_folder(folder, frames_b, size_b))!r}",
              f"ImageFolderDataset.root = {str(folder / 'images')!r}", *gin_params]
    stage2 = train_two_stages(BUCKET_STAGES, folder, shared, stage_budgets(minutes))
    outputs = []
    for shape in BUCKET_SHAPES:
        out = sample_path(folder, shape)
        argv = ["--run", stage2, "--out", str(out), "--guidance", "pdg", "--scale", str(scale), "--steps", str(steps),
                "--solver", solver, "--frames", str(shape[0]), "--size", str(shape[1]), str(shape[2]),
                "--labels", *map(str, range(10))]
        if sample_main(argv) != 0:
            raise ValueError(f"sampling failed: sample.py {' '.join(argv)}")
        outputs.append(out)
    print(f"[sprint_mm] bucket demo done: one strip per bucket in {folder} "
          f"({', '.join(path.with_suffix('.png').name for path in outputs)}; one row per digit, frames left to right)")
    return outputs
