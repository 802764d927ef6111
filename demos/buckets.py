"""The bucket demo, `python video_demo.py --buckets`: one video DiT trained on moving digits of two shapes and still
digits of two sizes in one run, then sampled with PDG at every bucket's shape.

The data are real files read back by the datasets a user would use: two folders of mp4s (VideoFolderDataset, one
per clip shape) and one folder of PNG stills of both sizes (ImageFolderDataset), joined by JointDataset and bucketed
by the BucketTable of gin/video/moving_digits_buckets_stage1.gin. The shapes it samples are the buckets of the
trained run's configuration (`run_bucket_shapes`), so a table changed with --gin-param is sampled as trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from demos.clips import ensure_clips
from demos.two_stages import sample_run, stage_budgets, train_two_stages
from sprint_mm.configs import ConfigError, parse_gin
from sprint_mm.data.buckets import BucketTable, Shape
from sprint_mm.data.digits import DigitsDataset
from sprint_mm.run_config import parse_run_config

BUCKET_STAGES = ("gin/video/moving_digits_buckets_stage1.gin", "gin/video/moving_digits_buckets_stage2.gin")
BUCKET_RUN = "runs/moving_digits_buckets"
CLIPS = ((8, 16), (4, 24))  # (frames, size) of the two moving-digit sets, one mp4 folder each
CLIPS_PER_SHAPE = 300
STILL_SIZES = (16, 24)
BUCKET_SCALE = 6.0  # PDG scale, chosen with benchmarks/bucket_accuracy.py (README, the bucket demo)
BUCKET_SOLVER = "euler"


def bucket_shapes(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> tuple[Shape, ...]:
    """The (frames, height, width) of every bucket of `BucketTable` in a configuration (the demo's gin files), in the
    table's order."""
    parse_gin(gin_files, bindings)
    return configured_shapes(", ".join(gin_files))


def run_bucket_shapes(run: str | Path) -> tuple[Shape, ...]:
    """The bucket shapes of a trained run, from its config.gin read as data (`run_config.parse_run_config`)."""
    parse_run_config(Path(run) / "config.gin")
    return configured_shapes(str(Path(run) / "config.gin"))


def configured_shapes(source: str) -> tuple[Shape, ...]:
    try:
        table = BucketTable()
    except TypeError:  # BucketTable.buckets is not bound
        raise ConfigError(f"{source} binds no BucketTable.buckets: not a bucketed run") from None
    return tuple(bucket.shape for bucket in table)


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
    for seed, (frames, size) in enumerate(CLIPS):
        ensure_clips(clip_folder(root, frames, size), CLIPS_PER_SHAPE, frames, size, seed=seed)
    if not any((root / "images").rglob("*.png")):
        write_still_digits(root / "images")


def bucket_data_bindings(root: Path) -> list[str]:
    """The bindings that point both stages at the demo's data under `root` (two clip folders and the stills)."""
    (frames_a, size_a), (frames_b, size_b) = CLIPS
    return [f"videos_{frames_a}f/VideoFolderDataset.root = {str(clip_folder(root, frames_a, size_a))!r}",
            f"videos_{frames_b}f/VideoFolderDataset.root = {str(clip_folder(root, frames_b, size_b))!r}",
            f"ImageFolderDataset.root = {str(root / 'images')!r}"]


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
    """Write the data if absent, train both stages over the buckets, then sample one PDG sample per digit 0..9 at
    every bucket's shape (`sample.py --frames/--size`). Returns the .mp4 per bucket (a .png strip lies beside)."""
    folder = Path(root)
    ensure_bucket_data(folder)
    shared = [*bucket_data_bindings(folder), *gin_params]
    stage2 = train_two_stages(BUCKET_STAGES, folder, shared, stage_budgets(minutes))
    outputs = [sample_run(stage2, sample_path(folder, (frames, height, width)), "--guidance", "pdg",
                          "--scale", str(scale), "--steps", str(steps), "--solver", solver, "--frames", str(frames),
                          "--size", str(height), str(width), "--labels", *map(str, range(10)))
               for frames, height, width in run_bucket_shapes(stage2)]
    print(f"[sprint_mm] bucket demo done: one strip per bucket in {folder} "
          f"({', '.join(path.with_suffix('.png').name for path in outputs)}; one row per digit, frames left to right)")
    return outputs
