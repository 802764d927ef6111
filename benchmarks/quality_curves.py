"""Quality against training time on the digits, dense vs SPRINT, at a chosen token count.

For every seed, a dense run and a SPRINT stage-1 run advance to each budget point B in turn (dense to B, stage 1 to
(1 - s) B, both resumed exactly between points), and each SPRINT point gets its own short stage 2 of s B started from
the stage-1 checkpoint of that point (s = `--stage2-share`, 0.25 by default: the split of equal_wallclock.py). A
SPRINT point's training time is its stage-1 time plus its stage-2 time, so both arms have a point at every B.

Training time is the CPU time of the training steps alone (no set-up, checkpoints or evaluation): the trainer's step
clock is the process CPU clock (`Trainer.clock = 'cpu'`) and runs use one thread, so on an otherwise idle
core it equals wall-clock, and on a shared machine it is not inflated by other processes. The trainer's time budget
then counts CPU seconds too.

Every point is judged the same way: `--per-class` class-conditional samples per digit from one fixed noise batch
(Euler, `--steps`), CFG at `--scale` for both arms and PDG for SPRINT; the digits classifier gives the accuracy, and
the Frechet distance compares the classifier's penultimate features of the samples with those of the real test
digits (`frechet_floor`: the distance of as many real train digits, what a perfect generator would score).

The token count sets the patch: patch = resolution / sqrt(tokens) (16 px: 16 -> patch 4, 64 -> 2, 256 -> 1).

    python benchmarks/quality_curves.py --tokens 64 [--budgets 1.5 3 6] [--seeds 0 1] [--batch 32] [--stage2-share 0.25]
        [--per-class 20] [--steps 20] [--scale 1.5] [--resolution 16] [--root runs/quality_curves]
        [--gin-param 'sit.hidden_size = 64' ...]

Writes benchmarks/results/quality_curves_<tokens>.json after every point (a cut-short run leaves partial curves),
then redraws benchmarks/results/quality_curves.png and the TensorBoard curves from every quality_curves_*.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from benchmarks.curve_plots import curve, draw_quality_figures, time_to_reach
from benchmarks.demo_accuracy import class_major_labels
from benchmarks.digits_classifier import DigitsClassifier, digit_crops, digits_tensors, test_split_accuracy
from benchmarks.equal_wallclock import DENSE, NO_STEP_LIMIT, STAGE1, STAGE2
from benchmarks.harness import RESULTS, add_out_option, load_class_run, markdown_table, training_record, write_result
from sprint_mm.cli import add_gin_param_option, run_training
from sprint_mm.density import DENSE as EVERY_TOKEN
from sprint_mm.density import MiddleDensity
from sprint_mm.evaluation.frechet import FeatureStats, frechet_distance
from sprint_mm.runs import find_checkpoint
from sprint_mm.sampling import Guidance
from sprint_mm.sprint import Sprint
from sprint_mm.trained import TrainedRun

STAGE2_SHARE = 0.25


# ----------------------------------------------------------------------------------------------
# The judge: accuracy and Frechet distance on the digits classifier's features
# ----------------------------------------------------------------------------------------------


@dataclass
class Judge:
    """The digits classifier and the statistics of its features on the real test digits."""

    classifier: DigitsClassifier
    real: FeatureStats

    @classmethod
    def train(cls, resolution: int, channels: int = 1) -> Judge:
        return cls.from_classifier(DigitsClassifier.train(resolution, channels))

    @classmethod
    def from_classifier(cls, classifier: DigitsClassifier) -> Judge:
        """The judge of a trained classifier: the real test digits at its resolution and channels."""
        images, _ = digits_tensors("test", classifier.resolution, classifier.channels)
        return cls(classifier, FeatureStats.from_features(judge_features(classifier, images)))

    def frechet(self, images: torch.Tensor) -> float:
        """Frechet distance between the features of `images` and of the real test digits."""
        stats = FeatureStats.from_features(judge_features(self.classifier, images))
        return frechet_distance(stats.mu, stats.sigma, self.real.mu, self.real.sigma)

    def frechet_floor(self, count: int, seed: int = 0) -> float:
        """The distance of `count` real train digits (drawn with `seed`) to the real test digits."""
        images, _ = digits_tensors("train", self.classifier.resolution, self.classifier.channels)
        rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
        return self.frechet(images[rows])


def judge_features(classifier: DigitsClassifier, images: torch.Tensor) -> np.ndarray:
    """(N, F) penultimate features of the judge, as float64 for the Frechet statistics."""
    return classifier.features(images).double().numpy()


def sample_quality(run: TrainedRun, judge: Judge, guidance: Guidance, per_class: int, steps: int,
                   seed: int = 0, solver: str = "euler", density: MiddleDensity = EVERY_TOKEN) -> dict:
    """Accuracy, Frechet distance, sampling CPU and wall seconds and matmul GFLOPs per sample of `per_class` samples
    per class under `guidance` and `density` (noise from `seed`: the same for every run and setting of one sample
    shape; the SDE's noise from seed + 1). Videos are judged frame by frame on the digit crop of every frame
    (`digit_crops` at the judge's resolution): accuracy is the fraction of frames read as the digit asked for,
    `video_accuracy` that of videos whose frames' majority is, and the Frechet distance compares the crops' features
    with the real test digits'."""
    labels = class_major_labels(run.num_classes, per_class)
    shape = tuple(run.model.backbone.sample_shape)
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    started, started_wall = time.process_time(), time.perf_counter()
    samples = run.generate(labels, noise, steps, solver, guidance, batch_size=len(labels),
                           generator=torch.Generator().manual_seed(seed + 1), density=density)
    seconds, wall = time.process_time() - started, time.perf_counter() - started_wall
    row = {"guidance": guidance.kind, "scale": guidance.scale, "interval": list(guidance.interval),
           "middle_keep": density.keep, "keep_above": density.above, "sparse_keep": guidance.sparse_keep,
           "sample_cpu_s": seconds, "wall_s": wall,
           "gflops": run.sampling_flops(shape, steps, solver, guidance, density) / 1e9}
    if samples.dim() == 5:
        crops = digit_crops(samples, judge.classifier.resolution)
        reads = judge.classifier.predict(crops).view(samples.shape[0], samples.shape[2])  # (N, T)
        return {**row, "accuracy": float((reads == labels[:, None]).float().mean()),
                "video_accuracy": float((reads.mode(dim=1).values == labels).float().mean()),
                "frechet": judge.frechet(crops)}
    return {**row, "accuracy": judge.classifier.score(samples, labels), "frechet": judge.frechet(samples)}


# ----------------------------------------------------------------------------------------------
# Training on the CPU clock
# ----------------------------------------------------------------------------------------------


def patch_for(tokens: int, resolution: int) -> int:
    """The patch side that cuts a resolution x resolution image into `tokens` tokens."""
    side = math.isqrt(tokens)
    if tokens < 1 or side * side != tokens or resolution % side:
        raise ValueError(f"tokens must be a square number whose side divides the resolution {resolution}, got {tokens}")
    return resolution // side


def model_bindings(tokens: int, resolution: int, batch: int, seed: int, extra: Sequence[str]) -> list[str]:
    """The digits config at `tokens` tokens: one thread, no previews, time-limited, every checkpoint kept."""
    return [
        f"sit.patch_size = {patch_for(tokens, resolution)}",
        f"sit.input_size = {resolution}",
        f"DigitsDataset.resolution = {resolution}",
        f"Trainer.batch_size = {batch}",
        f"Trainer.seed = {seed}",
        "Trainer.num_threads = 1",
        "Trainer.preview_every = 0",
        "Trainer.progress = False",
        f"Trainer.max_steps = {NO_STEP_LIMIT}",
        f"Trainer.checkpoint_every = {NO_STEP_LIMIT}",
        "Trainer.keep_checkpoints = 0",
        *extra,
    ]


def train_until(files: Sequence[str], run_dir: Path, minutes: float, bindings: Sequence[str],
                init_from: Optional[Path] = None) -> dict:
    """Train (or resume) `run_dir` until `minutes` of step CPU time; its newest checkpoint's steps and seconds."""
    params = [*bindings, f"Trainer.run_dir = {str(run_dir)!r}", f"Trainer.time_budget_minutes = {minutes!r}"]
    if init_from is not None:
        params.append(f"Trainer.init_from = {str(init_from)!r}")
    run_training(files, [*params, "Trainer.clock = 'cpu'"])
    return training_record(run_dir)


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


def evaluate_point(run_dir: Path, judge: Judge, args: argparse.Namespace) -> list[dict]:
    """CFG (and PDG for a SPRINT run) quality of the newest checkpoint of `run_dir`."""
    run = load_class_run(run_dir)
    kinds = ["cfg", "pdg"] if isinstance(run.model, Sprint) else ["cfg"]
    return [sample_quality(run, judge, Guidance(kind, args.scale), args.per_class, args.steps, args.sample_seed)
            for kind in kinds]


def run_seed(seed: int, root: Path, judge: Judge, args: argparse.Namespace, result: dict, out: Path) -> None:
    """Every budget point of one seed not yet in `result`, both arms; the result file is rewritten after each point."""
    bindings = model_bindings(args.tokens, args.resolution, args.batch, seed, args.gin_param)
    folder = root / f"seed{seed}"
    measured = {point["budget_min"] for point in result["points"] if point["seed"] == seed}
    for budget in args.budgets:
        if budget in measured:
            continue
        dense = train_until([STAGE1, DENSE], folder / "dense", budget, bindings)
        stage1 = train_until([STAGE1], folder / "stage1", (1 - args.stage2_share) * budget, bindings)
        stage2_dir = folder / f"stage2_at_{budget:g}min"
        stage2 = train_until([STAGE2], stage2_dir, args.stage2_share * budget, bindings,
                             init_from=find_checkpoint(folder / "stage1"))
        points = [
            {"arm": "dense", "seed": seed, "budget_min": budget, "train_s": dense["train_s"],
             "steps": dense["steps"], "quality": evaluate_point(folder / "dense", judge, args)},
            {"arm": "sprint", "seed": seed, "budget_min": budget, "train_s": stage1["train_s"] + stage2["train_s"],
             "stage1_s": stage1["train_s"], "stage2_s": stage2["train_s"], "stage1_steps": stage1["steps"],
             "stage2_steps": stage2["steps"], "quality": evaluate_point(stage2_dir, judge, args)},
        ]
        result["points"] += points
        result["summary"] = summarize(result["points"], args.accuracy_levels, args.frechet_levels)
        write_result(result, out)
        for point in points:
            cells = ", ".join(f"{q['guidance']} acc {q['accuracy']:.3f} fd {q['frechet']:.2f}"
                              for q in point["quality"])
            print(f"[{args.tokens} tokens] seed {seed} {point['arm']} at {budget:g} min "
                  f"({point['train_s']:.0f} CPU s): {cells}", flush=True)


def summarize(points: Sequence[dict], accuracy_levels: Sequence[float], frechet_levels: Sequence[float]) -> list[dict]:
    """Training seconds each arm needs to reach each level on its seed-mean curve (CFG for both, and SPRINT with
    PDG), and dense / SPRINT; None where a curve never reaches the level within its budgets."""
    rows = []
    for metric, levels, higher_is_better in (("accuracy", accuracy_levels, True), ("frechet", frechet_levels, False)):
        for level in levels:
            dense = time_to_reach(*curve(points, "dense", "cfg", metric), level, higher_is_better)
            for guidance in ("cfg", "pdg"):
                sprint = time_to_reach(*curve(points, "sprint", guidance, metric), level, higher_is_better)
                ratio = None if dense is None or sprint is None else dense / sprint
                rows.append({"metric": metric, "level": level, "sprint_guidance": guidance,
                             "dense_s": dense, "sprint_s": sprint, "dense_over_sprint": ratio})
    return rows


def extended(settings: dict, out: Path) -> dict:
    """The earlier result in `out`, which must have been measured with the same `settings`."""
    if not out.is_file():
        raise FileNotFoundError(f"--extend continues the result {str(out)!r}, which does not exist")
    earlier = json.loads(out.read_text())
    differ = {key: (earlier.get(key), value) for key, value in settings.items() if earlier.get(key) != value}
    if differ:
        raise ValueError(f"--extend needs the settings of {str(out)!r}; these differ (earlier, now): {differ}")
    return earlier


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Digits quality against training CPU time, dense vs SPRINT.")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per image (a square; its side divides "
                                                                 "the resolution)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 3.0, 6.0],
                        help="training CPU minutes of each point (both arms)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stage2-share", type=float, default=STAGE2_SHARE,
                        help="fraction of a SPRINT point's budget spent in stage 2")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    parser.add_argument("--scale", type=float, default=1.5, help="CFG and PDG scale")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the judged samples' noise")
    parser.add_argument("--accuracy-levels", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    parser.add_argument("--frechet-levels", type=float, nargs="+", default=[20.0, 10.0, 5.0])
    parser.add_argument("--root", default="runs/quality_curves", help="folder for the runs (<root>/<tokens>tok "
                                                                      "must not exist)")
    parser.add_argument("--extend", action="store_true", help="continue the runs under --root and the result file: "
                        "measured points are kept, new budgets or seeds are trained (runs resume) and judged")
    add_gin_param_option(parser, "extra binding for every run (repeatable)")
    add_out_option(parser, None, "result JSON (default benchmarks/results/quality_curves_<tokens>.json)")
    args = parser.parse_args(argv)
    if not 0 < args.stage2_share < 1:
        parser.error(f"--stage2-share must be in (0, 1), got {args.stage2_share}")
    if sorted(args.budgets) != args.budgets or args.budgets[0] <= 0:
        parser.error(f"--budgets must be positive and increasing, got {args.budgets}")
    patch_for(args.tokens, args.resolution)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    root = Path(args.root) / f"{args.tokens}tok"
    out = Path(args.out or RESULTS / f"quality_curves_{args.tokens}.json")
    if root.exists() and not args.extend:
        raise ValueError(f"{str(root)!r} exists; give a fresh --root (the runs would resume, not start over), "
                         "or --extend to add budgets or seeds to its result")
    judge = Judge.train(args.resolution)
    samples = 10 * args.per_class
    result = {
        "tokens": args.tokens, "resolution": args.resolution, "patch": patch_for(args.tokens, args.resolution),
        "batch": args.batch, "stage2_share": args.stage2_share, "gin_params": args.gin_param,
        "clock": "process CPU time of the training steps, 1 thread", "per_class": args.per_class,
        "steps": args.steps, "scale": args.scale, "sample_seed": args.sample_seed,
    }
    if args.extend:
        result = extended(result, out)
    result["budgets_min"] = sorted({*result.get("budgets_min", []), *args.budgets})
    result["seeds"] = sorted({*result.get("seeds", []), *args.seeds})
    result.update(judge_test_accuracy=test_split_accuracy(judge.classifier), frechet_floor=judge.frechet_floor(samples))
    result.setdefault("points", [])
    started = time.perf_counter()
    for seed in args.seeds:
        run_seed(seed, root, judge, args, result, out)
    result["summary"] = summarize(result["points"], args.accuracy_levels, args.frechet_levels)  # --extend: new levels
    result["wall_s"] = result.get("wall_s", 0.0) + time.perf_counter() - started  # summed over extensions
    write_result(result, out)
    rows = [[r["metric"], r["level"], r["sprint_guidance"], r["dense_s"] or "not reached",
             r["sprint_s"] or "not reached", r["dense_over_sprint"] or "-"] for r in result["summary"]]
    print(markdown_table(["metric", "level", "SPRINT guidance", "dense s", "SPRINT s", "dense / SPRINT"], rows))
    draw_quality_figures(sorted(out.parent.glob("quality_curves_*.json")), out.parent)
    return result


if __name__ == "__main__":
    main()
