"""The bucket demo's quality per bucket: how often the digits judge reads a PDG sample at each bucket's shape as the
digit asked for (videos frame by frame, correct when more than half of their frames read right, as demo_accuracy.py
reads them; stills whole).

    python benchmarks/bucket_accuracy.py [--run runs/moving_digits_buckets/stage2] [--per-class 20] [--scale 6]

Samples every bucket shape of the run's own configuration (`demos.buckets.run_bucket_shapes`) from one run, judges it with
a digits classifier trained at that shape's digit size, prints one row per bucket and writes
benchmarks/results/bucket_demo_accuracy.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.demo_accuracy import guided_accuracy, judge_for
from benchmarks.digits_classifier import test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, add_run_options, load_class_run, markdown_table, write_result
from demos.buckets import BUCKET_RUN, BUCKET_SCALE, BUCKET_SOLVER, run_bucket_shapes
from demos.clips import DIGIT_FRACTION
from sprint_mm.sampling import SOLVERS, Guidance
from sprint_mm.trained import TrainedRun


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-bucket class-conditional accuracy of the bucket demo.")
    add_run_options(parser, default=f"{BUCKET_RUN}/stage2")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class and bucket")
    parser.add_argument("--scale", type=float, default=BUCKET_SCALE, help="PDG scale")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", choices=SOLVERS, default=BUCKET_SOLVER)
    parser.add_argument("--seed", type=int, default=0)
    add_out_option(parser, RESULTS / "bucket_demo_accuracy.json")
    return parser.parse_args(argv)


def judge_buckets(run_dir: str | Path, run: TrainedRun, scale: float = BUCKET_SCALE, per_class: int = 20,
                  steps: int = 50, solver: str = BUCKET_SOLVER, seed: int = 0) -> list[dict]:
    """One row per bucket of the run's configuration: PDG samples at its shape judged by a digits CNN at its digit's
    size (clips count when a strict majority of their frames read right)."""
    channels = run.model.backbone.sample_shape[0]
    buckets = []
    for frames, height, width in run_bucket_shapes(run_dir):
        shape = (channels, frames, height, width)
        judge = judge_for(run, DIGIT_FRACTION if frames > 1 else None, shape)  # stills: the digit fills the frame
        (row,) = guided_accuracy(run, judge, [Guidance("pdg", scale)], per_class, steps, solver, seed, shape=shape)
        buckets.append({"bucket": [frames, height, width], "judge_resolution": judge.resolution,
                        "judge_test_accuracy": test_split_accuracy(judge), **row})
    return buckets


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    run = load_class_run(args.run, args.step, args.weights)
    buckets = judge_buckets(args.run, run, args.scale, args.per_class, args.steps, args.solver, args.seed)
    result = {"run": args.run, "checkpoint": str(run.checkpoint), "step": run.step, "weights": args.weights,
              "per_class": args.per_class, "scale": args.scale, "steps": args.steps, "solver": args.solver,
              "seed": args.seed, "buckets": buckets}
    header = ["bucket (T x H x W)", "judge px", "PDG accuracy (video: more than half of its frames)", "frame accuracy",
              "worst class"]
    rows = []
    for b in buckets:
        worst = min(range(len(b["per_class"])), key=b["per_class"].__getitem__)
        rows.append(["x".join(map(str, b["bucket"])), b["judge_resolution"], b["accuracy"],
                     b.get("frame_accuracy", "-") if b["bucket"][0] > 1 else "-", f"{worst}: {b['per_class'][worst]:.2f}"])
    print(f"run {args.run} (step {run.step}), PDG scale {args.scale}, {args.per_class} samples per class and bucket")
    print(markdown_table(header, rows))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
