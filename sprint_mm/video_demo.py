"""The video demo behind video_demo.py: moving digits as real mp4 files, stage 1, stage 2, class-conditional PDG videos.

The videos are written once by datasets/make_moving_digits.py (loaded by path: datasets/ is not a package) and read
back through VideoFolderDataset like any user's class-folder video set.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from sprint_mm.cli import report_training, sample_main, train_two_stages
from sprint_mm.sampling import SOLVERS

VIDEO_STAGES = ("gin/video/moving_digits_stage1.gin", "gin/video/moving_digits_stage2.gin")
VIDEO_RUN = "runs/moving_digits"
MAKER_SCRIPT = Path(__file__).resolve().parents[1] / "datasets" / "make_moving_digits.py"
NUM_VIDEOS = 300
FRAMES = 8
SIZE = 16
DIGIT_FRACTION = 0.75  # a 12 px digit on 16 px frames: large enough to read, with 4 px to travel
STAGE1_SHARE = 0.75  # of the time budget; stage 2 gets the rest
DEFAULT_SCALE = 4.0  # 0.82 of PDG frames read as their digit (README, the video demo); scale 3 read fewer
# The stochastic sampler read more frames as the digit asked for than Euler or Heun at every scale tried (README).
SOLVER = "sde"


def load_moving_digits_maker() -> ModuleType:
    """datasets/make_moving_digits.py as a module."""
    if not MAKER_SCRIPT.is_file():
        raise FileNotFoundError(f"the moving-digits script {MAKER_SCRIPT} is missing from this checkout")
    spec = importlib.util.spec_from_file_location("make_moving_digits", MAKER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_videos(folder: Path, num: int = NUM_VIDEOS, frames: int = FRAMES, size: int = SIZE) -> Path:
    """Write `num` moving-digit mp4s to folder/<digit>/ unless the folder already holds videos."""
    if not any(folder.rglob("*.mp4")):
        load_moving_digits_maker().write_moving_digits(folder, num, frames, size, digit_fraction=DIGIT_FRACTION)
    return folder


def stage_budgets(minutes: Optional[float]) -> tuple[list[str], list[str]]:
    """Time-budget bindings of stage 1 and stage 2 for a total of `minutes` (None: the gin files' budgets)."""
    if minutes is None:
        return [], []
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0 (the total training time of both stages), got {minutes}")
    stage1 = minutes * STAGE1_SHARE
    return [f"Trainer.time_budget_minutes = {stage1!r}"], [f"Trainer.time_budget_minutes = {minutes - stage1!r}"]


def run_video_demo(
    root: str = VIDEO_RUN,
    minutes: Optional[float] = None,
    gin_params: Sequence[str] = (),
    scale: float = DEFAULT_SCALE,
    steps: int = 50,
    solver: str = SOLVER,
) -> Path:
    """Write the videos if absent, train stage 1 and stage 2 from it, then sample one PDG video per digit 0..9.

    `minutes` is the training time of both stages together (split 3:1); None keeps the gin files' 4.5 + 1.5 minutes.
    Returns the .mp4 of the samples (a .png strip with one row per digit lies beside it).
    """
    folder = Path(root)
    videos = ensure_videos(folder / "videos")
    shared = [f"VideoFolderDataset.root = {str(videos)!r}", *gin_params]
    stage2 = train_two_stages(VIDEO_STAGES, folder, shared, stage_budgets(minutes))
    out = folder / "samples_pdg.mp4"
    argv = ["--run", stage2, "--out", str(out), "--guidance", "pdg", "--scale", str(scale), "--steps", str(steps),
            "--solver", solver, "--labels", *map(str, range(10))]
    if sample_main(argv) != 0:
        raise ValueError(f"sampling failed: sample.py {' '.join(argv)}")
    print(f"[sprint_mm] video demo done: {out} (a grid of digits 0-9) and {out.with_suffix('.png')} "
          "(one row per digit, frames left to right)")
    return out


def video_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and sample the moving-digits video demo (CPU, minutes).")
    parser.add_argument("--root", default=VIDEO_RUN, help="folder for the videos, both stages and the samples")
    parser.add_argument("--minutes", type=float, help="training time of both stages (default: 4.5 + 1.5 minutes)")
    parser.add_argument("--gin_param", action="append", default=[], help="a gin binding applied to both stages")
    parser.add_argument("--scale", type=float,
                        help=f"PDG guidance scale (default {DEFAULT_SCALE}; --buckets: the bucket demo's own)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--solver", choices=SOLVERS, help=f"sampler (default {SOLVER}; --buckets: the bucket demo's own)")
    parser.add_argument("--buckets", action="store_true",
                        help="the bucket demo instead: one model on 8-frame 16 px and 4-frame 24 px clips plus 16 and "
                             "24 px stills, sampled at every bucket (gin/video/moving_digits_buckets_stage1.gin)")
    return parser


def video_demo_main(argv: Optional[Sequence[str]] = None) -> int:
    args = video_demo_parser().parse_args(argv)
    if args.buckets:
        from sprint_mm.bucket_demo import BUCKET_RUN, BUCKET_SCALE, BUCKET_SOLVER, run_bucket_demo  # it imports this module

        root = BUCKET_RUN if args.root == VIDEO_RUN else args.root
        scale = BUCKET_SCALE if args.scale is None else args.scale
        return report_training(run_bucket_demo, root, args.minutes, args.gin_param, scale, args.steps,
                               args.solver or BUCKET_SOLVER)
    scale = DEFAULT_SCALE if args.scale is None else args.scale
    return report_training(run_video_demo, args.root, args.minutes, args.gin_param, scale, args.steps,
                           args.solver or SOLVER)
