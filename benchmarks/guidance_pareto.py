"""Guidance quality against sampling cost: CFG vs PDG at several scales and guidance intervals, one trained model.

Every setting samples `--per-class` digits per class from the same noise (Euler, `--steps`) and is judged like the
points of quality_curves.py: the digits classifier's accuracy, and the Frechet distance between its features of the
samples and of the real test digits. Cost is the sampling CPU time (one thread). A guidance interval [low, high]
guides only the steps with t in it (t = 1 is noise): outside it one unguided evaluation per step replaces the
doubled batch, so a shorter interval is cheaper. The Pareto points (no other setting is both cheaper and better) are
listed per metric.

    python benchmarks/guidance_pareto.py --run runs/quality_curves/64tok/seed0/stage2_at_10min [--scales 1.5 2 3]
        [--intervals 0:1 0:0.75 0:0.5 0.25:0.75] [--per-class 20] [--steps 20]

Writes benchmarks/results/guidance_pareto.json and guidance_pareto.png (+ TensorBoard curves beside them).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.curve_plots import METRICS, draw_guidance_figure, guidance_label, pareto_front
from benchmarks.digits_classifier import test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, add_run_options, load_class_run, markdown_table, write_result
from benchmarks.quality_curves import Judge, sample_quality
from sprint_mm.sampling import Guidance
from sprint_mm.sprint import Sprint


def parse_interval(text: str) -> tuple[float, float]:
    """'low:high' -> (low, high)."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an interval is low:high with 0 <= low <= high <= 1, got {text!r}") from None
    return low, high


def settings(kinds: Sequence[str], scales: Sequence[float], intervals: Sequence[tuple[float, float]]) -> list[Guidance]:
    """No guidance once, then every kind at every scale and interval."""
    return [Guidance("none"), *(Guidance(kind, scale, interval) for kind in kinds for scale in scales
                                for interval in intervals)]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Digits quality against sampling cost: CFG vs PDG, scales, intervals.")
    add_run_options(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--intervals", type=parse_interval, nargs="+",
                        default=[(0.0, 1.0), (0.0, 0.75), (0.0, 0.5), (0.25, 0.75)], help="low:high (t = 1 is noise)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    add_out_option(parser, RESULTS / "guidance_pareto.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    grid = settings(["cfg", "pdg"], args.scales, args.intervals)  # bad scales or intervals fail before loading
    run = load_class_run(args.run, args.step, args.weights)
    if not isinstance(run.model, Sprint):
        raise ValueError(f"{args.run!r} holds a dense model; PDG needs a SPRINT run")
    judge = Judge.train(run.model.backbone.sample_shape[-1], run.model.backbone.sample_shape[0])
    rows = []
    for guidance in grid:
        rows.append(sample_quality(run, judge, guidance, args.per_class, args.steps, args.seed))
        print(f"{guidance_label(rows[-1])}: acc {rows[-1]['accuracy']:.3f}, fd {rows[-1]['frechet']:.2f}, "
              f"{rows[-1]['sample_cpu_s']:.1f} CPU s", flush=True)
    fronts = {metric: [guidance_label(p) for p in pareto_front(rows, metric, higher)]
              for metric, _, higher in METRICS}
    result = {
        "run": str(args.run), "checkpoint": str(run.checkpoint), "step": run.step, "per_class": args.per_class,
        "samples": 10 * args.per_class, "steps": args.steps, "seed": args.seed,
        "clock": "process CPU time of sampling, 1 thread", "judge_test_accuracy": test_split_accuracy(judge.classifier),
        "frechet_floor": judge.frechet_floor(10 * args.per_class), "settings": rows, "pareto": fronts,
    }
    write_result(result, args.out)
    for metric, label, higher in METRICS:
        front = pareto_front(rows, metric, higher)
        print(f"\nPareto points, {label}:")
        print(markdown_table(["guidance", "sampling CPU s", "accuracy", "Frechet"],
                             [[guidance_label(p), p["sample_cpu_s"], p["accuracy"], p["frechet"]] for p in front]))
    draw_guidance_figure(result, Path(args.out).parent)
    return result


if __name__ == "__main__":
    main()
