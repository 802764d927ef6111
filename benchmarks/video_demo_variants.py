"""Which video-demo configuration reads best: each variant trains both stages for a fixed number of steps, then the
digits judge reads its PDG videos frame by frame as demo_accuracy.py does (a video is correct when more than half of
its frames read as the digit asked for). `--buckets` does the same for the bucket demo, judged per bucket as
bucket_accuracy.py does.

The demos stop at step counts; to compare configurations at equal cost, give each variant the step counts its own
step time affords (measure them with the trainer's steps_per_s, one thread, on an idle machine).

    python benchmarks/video_demo_variants.py \
        --variant "mlp4:1600:450" \
        --variant "mlp0.5:3100:850:video_dit.mlp_ratio = 0.5" [--per-class 20] [--scale 4] [--solver sde]
    python benchmarks/video_demo_variants.py --buckets --variant "b6000:6000:1500"

A variant is NAME:STAGE1_STEPS:STAGE2_STEPS[:BINDING[;BINDING...]] (gin bindings applied to both stages). Runs go to
runs/video_demo_variants/NAME (--buckets: runs/bucket_demo_variants/NAME); the rows go to
benchmarks/results/video_demo_variants.json (--buckets: bucket_demo_variants.json).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.bucket_accuracy import judge_buckets
from benchmarks.demo_accuracy import guided_accuracy, judge_for
from benchmarks.harness import RESULTS, add_out_option, load_class_run, markdown_table, write_result
from demos.buckets import (BUCKET_RUN, BUCKET_SCALE, BUCKET_SOLVER, BUCKET_STAGES, bucket_data_bindings,
                           ensure_bucket_data)
from demos.two_stages import train_two_stages
from demos.video import DEFAULT_SCALE, SOLVER, VIDEO_RUN, VIDEO_STAGES, ensure_videos
from sprint_mm.sampling import SOLVERS, Guidance

RUNS = Path("runs/video_demo_variants")
BUCKET_RUNS = Path("runs/bucket_demo_variants")


@dataclass(frozen=True)
class Variant:
    name: str
    stage1_steps: int
    stage2_steps: int
    bindings: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """NAME:STAGE1_STEPS:STAGE2_STEPS[:BINDING[;BINDING...]]."""
    parts = text.split(":", 3)
    if len(parts) < 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"variant {text!r} is not NAME:STAGE1_STEPS:STAGE2_STEPS[:BINDING[;BINDING...]] "
                         "(e.g. 'mlp0.5:3100:850:video_dit.mlp_ratio = 0.5')")
    bindings = tuple(b.strip() for b in parts[3].split(";") if b.strip()) if len(parts) == 4 else ()
    if int(parts[1]) < 1 or int(parts[2]) < 1:
        raise ValueError(f"variant {text!r}: both stages need at least one step")
    return Variant(parts[0], int(parts[1]), int(parts[2]), bindings)


def train_variant(variant: Variant, videos: Path, root: Path = RUNS, stages: Sequence[str] = VIDEO_STAGES,
                  data: Sequence[str] = ()) -> tuple[str, float]:
    """Both stages at fixed step counts (no time budget, one thread) into root/NAME; returns the stage-2 run and the
    training seconds. `data` binds the data (default: the video demo's `videos` folder)."""
    data = list(data) or [f"VideoFolderDataset.root = {str(videos)!r}"]
    shared = [*data, "Trainer.time_budget_minutes = None", "Trainer.num_threads = 1", *variant.bindings]
    steps = ([f"Trainer.max_steps = {variant.stage1_steps}"], [f"Trainer.max_steps = {variant.stage2_steps}"])
    started = time.perf_counter()
    stage2 = train_two_stages(stages, root / variant.name, shared, steps)
    return stage2, time.perf_counter() - started


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Video-demo variants at fixed step counts, judged frame by frame.")
    parser.add_argument("--variant", action="append", required=True, type=parse_variant,
                        help="NAME:STAGE1_STEPS:STAGE2_STEPS[:BINDING[;BINDING...]] (repeatable)")
    parser.add_argument("--buckets", action="store_true", help="variants of the bucket demo, judged per bucket")
    parser.add_argument("--per-class", type=int, default=20, help="PDG videos per digit")
    parser.add_argument("--scale", type=float, help=f"PDG scale (default {DEFAULT_SCALE}; --buckets {BUCKET_SCALE})")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--solver", choices=SOLVERS, help=f"sampler (default {SOLVER}; --buckets {BUCKET_SOLVER})")
    add_out_option(parser, None, "result JSON (default: benchmarks/results/video_demo_variants.json, --buckets "
                                 "bucket_demo_variants.json)")
    args = parser.parse_args(argv)
    args.scale = args.scale or (BUCKET_SCALE if args.buckets else DEFAULT_SCALE)
    args.solver = args.solver or (BUCKET_SOLVER if args.buckets else SOLVER)
    args.out = args.out or RESULTS / ("bucket_demo_variants.json" if args.buckets else "video_demo_variants.json")
    return args


def bucket_main(args: argparse.Namespace) -> dict:
    """The bucket-demo variants: every bucket of each judged, one row per variant and bucket."""
    root = Path(BUCKET_RUN)
    ensure_bucket_data(root)
    rows = []
    for variant in args.variant:
        stage2, seconds = train_variant(variant, root, BUCKET_RUNS, BUCKET_STAGES, bucket_data_bindings(root))
        buckets = judge_buckets(stage2, load_class_run(stage2), args.scale, args.per_class, args.steps, args.solver)
        rows.append({"variant": variant.name, "bindings": list(variant.bindings), "stage1_steps": variant.stage1_steps,
                     "stage2_steps": variant.stage2_steps, "training_s": seconds, "buckets": buckets})
        print(f"{variant.name}: " + ", ".join(f"{'x'.join(map(str, b['bucket']))} {b['accuracy']:.3f}"
                                              for b in buckets), flush=True)
    result = {"per_class": args.per_class, "scale": args.scale, "steps": args.steps, "solver": args.solver,
              "rows": rows}
    shapes = ["x".join(map(str, b["bucket"])) for b in rows[0]["buckets"]]
    print(markdown_table(["variant", "stage 1 / 2 steps", *shapes],
                         [[r["variant"], f"{r['stage1_steps']} / {r['stage2_steps']}",
                           *(b["accuracy"] for b in r["buckets"])] for r in rows]))
    write_result(result, args.out)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.buckets:
        return bucket_main(args)
    videos = ensure_videos(Path(VIDEO_RUN) / "videos")
    rows = []
    for variant in args.variant:
        stage2, seconds = train_variant(variant, videos)
        run = load_class_run(stage2)
        row, = guided_accuracy(run, judge_for(run), [Guidance("pdg", args.scale)], args.per_class, args.steps,
                               args.solver)
        rows.append({"variant": variant.name, "bindings": list(variant.bindings), "stage1_steps": variant.stage1_steps,
                     "stage2_steps": variant.stage2_steps, "training_s": seconds,
                     "frame_accuracy": row["frame_accuracy"], "video_accuracy": row["accuracy"],
                     "per_class": row["per_class"]})
        print(f"{variant.name}: {row['frame_accuracy']:.3f} of frames, {row['accuracy']:.3f} of videos", flush=True)
    result = {"per_class": args.per_class, "scale": args.scale, "steps": args.steps, "solver": args.solver,
              "rows": rows}
    print(markdown_table(["variant", "stage 1 / 2 steps", "frames read as the digit", "videos", "worst digit"],
                         [[r["variant"], f"{r['stage1_steps']} / {r['stage2_steps']}", r["frame_accuracy"],
                           r["video_accuracy"], min(range(10), key=r["per_class"].__getitem__)] for r in rows]))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
