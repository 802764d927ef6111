"""The video demo, `python video_demo.py`: 300 moving-digit mp4s (8 frames of 16 px), stage 1, stage 2, then one
class-conditional PDG video per digit in runs/moving_digits/samples_pdg.mp4 (+ a .png strip), on a CPU in minutes.
`--shards` trains from a shard set written from the mp4s; `--buckets` runs the bucket demo of `demos.buckets`
instead."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from demos.buckets import BUCKET_RUN, BUCKET_SCALE, BUCKET_SOLVER, run_bucket_demo
from demos.clips import ensure_clips
from demos.two_stages import sample_run, stage_budgets, train_two_stages
from sprint_mm.cli import add_gin_param_option, report_training, write_shards_main
from sprint_mm.data.shards import MANIFEST
from sprint_mm.sampling import SOLVERS

VIDEO_STAGES = ("gin/video/moving_digits_stage1.gin", "gin/video/moving_digits_stage2.gin")
VIDEO_RUN = "runs/moving_digits"
NUM_VIDEOS = 300
FRAMES = 8
SIZE = 16
# The guidance scale and the sampler that read the most frames as the digit asked for (README, the video demo).
DEFAULT_SCALE = 4.0
SOLVER = "sde"
ITEMS_PER_SHARD = 100  # --shards: the 300 clips in three shards


def ensure_videos(folder: Path) -> Path:
    """The demo's clips in `folder`, written unless it already holds videos."""
    return ensure_clips(folder, NUM_VIDEOS, FRAMES, SIZE)


def ensure_shards(videos: Path, out: Path, gin_params: Sequence[str] = ()) -> Path:
    """The clips that stage 1 reads from the mp4s in `videos`, written into the shard set `out` by the shard
    writer's command line (a complete set is left as it is)."""
    if not (out / MANIFEST).is_file():
        argv = [str(out), "--gin-file", VIDEO_STAGES[0], "--items-per-shard", str(ITEMS_PER_SHARD)]
        for binding in (f"VideoFolderDataset.root = {str(videos)!r}", *gin_params):
            argv += ["--gin-param", binding]
        if write_shards_main(argv) != 0:
            raise ValueError(f"writing the shards failed: datasets/write_shards.py {' '.join(argv)}")
    return out


def run_video_demo(
    root: str = VIDEO_RUN,
    minutes: Optional[float] = None,
    gin_params: Sequence[str] = (),
    scale: float = DEFAULT_SCALE,
    steps: int = 50,
    solver: str = SOLVER,
    shards: bool = False,
) -> Path:
    """Write the videos if absent, train stage 1 and stage 2 from it, then sample one PDG video per digit 0..9.

    The stages stop at the gin files' step counts, so the result does not depend on the machine's speed or load;
    `minutes` (opt-in) also stops them at a training time of both stages together (split 3:1).
    With `shards`, the clips are first written into a shard set (ROOT/shards) and both stages read them from there.
    Returns the .mp4 of the samples (a .png strip with one row per digit lies beside it).
    """
    folder = Path(root)
    videos = ensure_videos(folder / "videos")
    shared = [f"VideoFolderDataset.root = {str(videos)!r}", *gin_params]
    if shards:
        shared += ["Trainer.dataset = @ShardDataset()",
                   f"ShardDataset.root = {str(ensure_shards(videos, folder / 'shards', gin_params))!r}"]
    stage2 = train_two_stages(VIDEO_STAGES, folder, shared, stage_budgets(minutes))
    out = sample_run(stage2, folder / "samples_pdg.mp4", "--guidance", "pdg", "--scale", str(scale),
                     "--steps", str(steps), "--solver", solver, "--labels", *map(str, range(10)))
    print(f"[sprint_mm] video demo done: {out} (a grid of digits 0-9) and {out.with_suffix('.png')} "
          "(one row per digit, frames left to right)")
    return out


def video_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and sample the moving-digits video demo (CPU, minutes).")
    parser.add_argument("--root", default=VIDEO_RUN, help="folder for the videos, both stages and the samples")
    parser.add_argument("--minutes", type=float,
                        help="also stop both stages at this training time, split 3:1 (default: no time budget; the "
                             "stages stop at their step counts, so the result does not depend on the machine's load)")
    add_gin_param_option(parser, "a gin binding applied to both stages (repeatable)")
    parser.add_argument("--scale", type=float,
                        help=f"PDG guidance scale (default {DEFAULT_SCALE}; --buckets: {BUCKET_SCALE})")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--solver", choices=SOLVERS, help=f"sampler (default {SOLVER}; --buckets: {BUCKET_SOLVER})")
    parser.add_argument("--shards", action="store_true",
                        help="write the clips into a shard set (ROOT/shards, datasets/write_shards.py) and train from "
                             "it instead of the mp4s")
    parser.add_argument("--buckets", action="store_true",
                        help="the bucket demo instead: one model on 8-frame 16 px and 4-frame 24 px clips plus 16 and "
                             "24 px stills, sampled at every bucket (gin/video/moving_digits_buckets_stage1.gin)")
    return parser


def video_demo_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = video_demo_parser()
    args = parser.parse_args(argv)
    if args.buckets and args.shards:
        parser.error("--shards writes the single-size demo's clips into shards; the bucket demo (--buckets) reads its "
                     "folders")
    if args.buckets:
        root = BUCKET_RUN if args.root == VIDEO_RUN else args.root
        scale = BUCKET_SCALE if args.scale is None else args.scale
        return report_training(run_bucket_demo, root, args.minutes, args.gin_param, scale, args.steps,
                               args.solver or BUCKET_SOLVER)
    scale = DEFAULT_SCALE if args.scale is None else args.scale
    return report_training(run_video_demo, args.root, args.minutes, args.gin_param, scale, args.steps,
                           args.solver or SOLVER, args.shards)
