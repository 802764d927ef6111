"""Guidance quality against sampling cost: CFG, PDG and sparse guidance, at several scales and guidance intervals,
each with a token-density schedule (the middle blocks on a structured fraction of the tokens at the noisy steps), on
one trained model: digits or moving-digit videos.

Every setting samples `--per-class` samples per class from the same noise (`--solver`, `--steps`) and is judged like
the points of quality_curves.py: the digits classifier's accuracy (videos: of every frame's digit crop, and the
videos whose majority reads right), and the Frechet distance between its features of the samples and of the real
test digits. Cost is counted three ways: matmul GFLOPs per sample (`sprint_mm.flops` through
`sampling.sampling_flops`: exact, independent of the machine), the sampling CPU time (one thread) and its wall-clock
time. A guidance interval [low, high] guides only the steps with t in it (t = 1 is noise); a density KEEP:ABOVE runs
the middle on KEEP of the tokens while t > ABOVE. The Pareto points (no other setting is both cheaper and better) are
listed per metric and cost, and `goal` tests "PDG-level quality at >= 40 % fewer sampling FLOPs than PDG": for each
PDG setting on every token (each scale and interval), the cheapest setting at least as good on both metrics (within
`--tolerance`: accuracy down by at most its first value, Frechet up by at most the fraction its second value gives).

    python benchmarks/guidance_pareto.py --run runs/quality_curves/64tok/seed0/stage2_at_10min [--kinds cfg pdg sparse]
        [--scales 1.5 2 3] [--intervals 0:1 0.25:0.75] [--densities 1 0.25:0.5] [--sparse-keeps 0.25]
        [--per-class 20] [--steps 20] [--solver euler] [--out benchmarks/results/guidance_pareto.json]

Writes the result JSON (default benchmarks/results/guidance_pareto.json) and a figure of the same stem (+ TensorBoard
curves beside them).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.curve_plots import COSTS, METRICS, draw_guidance_figure, guidance_label, pareto_front
from benchmarks.demo_accuracy import judge_for
from benchmarks.digits_classifier import test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, add_run_options, load_class_run, markdown_table, write_result
from benchmarks.quality_curves import Judge, sample_quality
from sprint_mm.density import MiddleDensity
from sprint_mm.sampling import GUIDANCES, SOLVERS, Guidance
from sprint_mm.sprint import Sprint

GOAL_SAVING = 0.4  # the goal: PDG-level quality at >= 40 % fewer sampling FLOPs than PDG


def parse_interval(text: str) -> tuple[float, float]:
    """'low:high' -> (low, high)."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an interval is low:high with 0 <= low <= high <= 1, got {text!r}") from None
    return low, high


def parse_density(text: str) -> MiddleDensity:
    """'1' (every token) or 'keep:above' -> MiddleDensity(keep, above)."""
    try:
        parts = [float(part) for part in text.split(":")]
        if len(parts) not in (1, 2) or (len(parts) == 1 and parts[0] != 1.0):
            raise ValueError
        return MiddleDensity(*parts)
    except ValueError as err:
        detail = f" ({err})" if str(err) else ""
        raise argparse.ArgumentTypeError(f"a density is 1 or keep:above, keep in (0, 1] and above in [0, 1], got "
                                         f"{text!r}{detail}") from None


def settings(kinds: Sequence[str], scales: Sequence[float], intervals: Sequence[tuple[float, float]],
             densities: Sequence[MiddleDensity] = (MiddleDensity(),),
             sparse_keeps: Sequence[float] = (0.25,)) -> list[tuple[Guidance, MiddleDensity]]:
    """No guidance once per density, then every kind at every scale, interval and density (sparse guidance also at
    every weak keep)."""
    grid = [(Guidance("none"), density) for density in densities]
    for kind in kinds:
        keeps = sparse_keeps if kind == "sparse" else (0.25,)
        grid += [(Guidance(kind, scale, interval, keep), density) for scale in scales for interval in intervals
                 for density in densities for keep in keeps]
    return grid


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Quality against sampling cost: CFG, PDG, sparse guidance, scales, "
                                                 "intervals and middle-density schedules.")
    add_run_options(parser)
    parser.add_argument("--kinds", nargs="+", choices=[k for k in GUIDANCES if k != "none"],
                        default=["cfg", "pdg", "sparse"])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--intervals", type=parse_interval, nargs="+",
                        default=[(0.0, 1.0), (0.0, 0.75), (0.0, 0.5), (0.25, 0.75)], help="low:high (t = 1 is noise)")
    parser.add_argument("--densities", type=parse_density, nargs="+", default=[MiddleDensity()],
                        help="1 or keep:above: the middle on `keep` of the tokens while t > above")
    parser.add_argument("--sparse-keeps", type=float, nargs="+", default=[0.25],
                        help="sparse guidance: the fraction of the strong branch's middle tokens its weak branch sees")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--solver", choices=SOLVERS, default="euler")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    parser.add_argument("--tolerance", type=float, nargs=2, default=[0.01, 0.05], metavar=("ACCURACY", "FRECHET"),
                        help="the goal's 'at least as good': accuracy down by at most ACCURACY, Frechet up by at most "
                             "the fraction FRECHET")
    add_out_option(parser, RESULTS / "guidance_pareto.json")
    return parser.parse_args(argv)


def goal_rows(rows: Sequence[dict], tolerance: Sequence[float]) -> list[dict]:
    """For every PDG setting on every token: the cheapest setting (in GFLOPs) at least as good on accuracy and
    Frechet distance within `tolerance`, and its saving against that PDG setting."""
    references = [r for r in rows if r["guidance"] == "pdg" and r["middle_keep"] == 1.0]
    goals = []
    for ref in references:
        good = [r for r in rows if r["accuracy"] >= ref["accuracy"] - tolerance[0]
                and r["frechet"] <= ref["frechet"] * (1 + tolerance[1])]
        best = min(good, key=lambda r: r["gflops"])
        saving = 1 - best["gflops"] / ref["gflops"]
        goals.append({"pdg": guidance_label(ref), "pdg_gflops": ref["gflops"], "pdg_accuracy": ref["accuracy"],
                      "pdg_frechet": ref["frechet"], "cheapest": guidance_label(best), "gflops": best["gflops"],
                      "accuracy": best["accuracy"], "frechet": best["frechet"], "saving": saving,
                      "met": saving >= GOAL_SAVING})
    return goals


def print_tables(result: dict) -> None:
    rows = result["settings"]
    for metric, label, higher in METRICS:
        for cost, cost_label in COSTS.items():
            front = pareto_front(rows, metric, higher, cost)
            print(f"\nPareto points, {label} against {cost_label}:")
            print(markdown_table(["setting", "GFLOPs/sample", "sampling CPU s", "wall s", "accuracy", "Frechet"],
                                 [[guidance_label(p), p["gflops"], p["sample_cpu_s"], p["wall_s"], p["accuracy"],
                                   p["frechet"]] for p in front]))
    print(f"\nThe goal: PDG-level quality at >= {GOAL_SAVING:.0%} fewer sampling FLOPs than PDG "
          f"(tolerance: accuracy -{result['tolerance'][0]:g}, Frechet +{result['tolerance'][1]:.0%})")
    print(markdown_table(["PDG setting", "PDG GFLOPs", "PDG acc / FD", "cheapest as good", "GFLOPs", "acc / FD",
                          "saving", "goal met"],
                         [[g["pdg"], g["pdg_gflops"], f"{g['pdg_accuracy']:.3f} / {g['pdg_frechet']:.2f}",
                           g["cheapest"], g["gflops"], f"{g['accuracy']:.3f} / {g['frechet']:.2f}",
                           f"{g['saving']:.0%}", "yes" if g["met"] else "no"] for g in result["goal"]]))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    grid = settings(args.kinds, args.scales, args.intervals, args.densities, args.sparse_keeps)  # fail before loading
    run = load_class_run(args.run, args.step, args.weights)
    if not isinstance(run.model, Sprint):
        raise ValueError(f"{args.run!r} holds a dense model; PDG, sparse guidance and densities need a SPRINT run")
    for guidance, density in grid:  # a keep the grid cannot realise fails before any sampling
        run.sampling_flops(tuple(run.model.backbone.sample_shape), args.steps, args.solver, guidance, density)
    classifier = judge_for(run)
    judge = Judge.from_classifier(classifier)
    rows = []
    for guidance, density in grid:
        rows.append(sample_quality(run, judge, guidance, args.per_class, args.steps, args.seed, args.solver, density))
        print(f"{guidance_label(rows[-1])}: acc {rows[-1]['accuracy']:.3f}, fd {rows[-1]['frechet']:.2f}, "
              f"{rows[-1]['gflops']:.2f} GFLOPs, {rows[-1]['sample_cpu_s']:.1f} CPU s", flush=True)
    samples = 10 * args.per_class
    result = {
        "run": str(args.run), "checkpoint": str(run.checkpoint), "step": run.step, "per_class": args.per_class,
        "samples": samples, "steps": args.steps, "solver": args.solver, "seed": args.seed,
        "sample_shape": list(run.model.backbone.sample_shape),
        "clock": "process CPU time and wall-clock of sampling, 1 thread",
        "judge_test_accuracy": test_split_accuracy(classifier), "frechet_floor": judge.frechet_floor(samples),
        "settings": rows, "tolerance": list(args.tolerance), "goal": goal_rows(rows, args.tolerance),
        "pareto": {f"{metric}_{cost}": [guidance_label(p) for p in pareto_front(rows, metric, higher, cost)]
                   for metric, _, higher in METRICS for cost in COSTS},
    }
    write_result(result, args.out)
    print_tables(result)
    draw_guidance_figure(result, Path(args.out).parent, Path(args.out).stem)
    return result


if __name__ == "__main__":
    main()
