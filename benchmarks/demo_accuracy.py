"""The digits demo's quality number: how often the judge reads a class-conditional sample as the class asked for.

Works for the image demo and the video demo: a video is read frame by frame (the judge reads the digit-sized window
with the most ink in every frame) and counts as correct only when MORE than half of its frames read as the digit asked
for (`video_hits`: a strict majority; the most common class alone would count a video whose frames read 3 3 3 5 5 8 8 1
as a 3); its row also reports the fraction of frames read correctly and how often frames agree with their video's most
common reading (temporal consistency).

Loads a trained run (`harness.load_class_run`: its config.gin, the checkpoint verified and loaded strictly, the path and
time shift it trained with), draws `--per-class` samples of every class from one fixed noise batch under each guidance
(none, CFG, PDG: the same noise for all of them), and scores them with the digits classifier trained in
digits_classifier.py.

    python benchmarks/demo_accuracy.py --run runs/digits_demo/stage2 [--per-class 20] [--guidance none cfg pdg]
                                       [--scale 1.5] [--steps 50] [--solver euler] [--weights ema]

prints one row per guidance and scale and writes benchmarks/results/demo_accuracy.json.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from benchmarks.digits_classifier import DigitsClassifier, read_videos, test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, add_run_options, load_class_run, markdown_table, write_result
from demos.clips import DIGIT_FRACTION
from sprint_mm.data.moving_digits import digit_side
from sprint_mm.evaluation import load_samples
from sprint_mm.sampling import GUIDANCES, SOLVERS, Guidance
from sprint_mm.sprint import Sprint
from sprint_mm.trained import TrainedRun


def guidance_settings(kinds: Sequence[str], scales: Sequence[float]) -> list[Guidance]:
    """'none' once, every other kind at every scale, in the order given."""
    settings = []
    for kind in dict.fromkeys(kinds):
        settings += [Guidance("none")] if kind == "none" else [Guidance(kind, scale) for scale in scales]
    return settings


def class_major_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[0] * per_class + [1] * per_class + ..."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return torch.arange(num_classes).repeat_interleave(per_class)


def video_hits(frame_reads: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: a video is correct when a strict majority of its frames (more than half) read as its label."""
    right = (frame_reads == labels[:, None]).sum(dim=1)
    return 2 * right > frame_reads.shape[1]


def guided_accuracy(
    run: TrainedRun,
    classifier: DigitsClassifier,
    guidances: Sequence[Guidance],
    per_class: int = 20,
    steps: int = 50,
    solver: str = "euler",
    seed: int = 0,
    batch_size: int = 200,
    progress: bool = True,
    shape: Optional[Sequence[int]] = None,
) -> list[dict]:
    """One row per guidance: accuracy overall and per class, on samples from the same seeded noise, of `shape`
    (C, [T,] H, W; default the model's sample shape).

    PDG needs a SPRINT model: on a dense model its rows say so instead of a number.
    """
    labels = class_major_labels(run.num_classes, per_class)
    shape = tuple(shape or run.model.backbone.sample_shape)
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    rows = []
    for guidance in guidances:
        row = {"guidance": guidance.kind, "scale": guidance.scale if guidance.kind != "none" else None}
        if guidance.kind == "pdg" and not isinstance(run.model, Sprint):
            rows.append({**row, "skipped": "PDG needs a SPRINT model; this run is dense"})
            continue
        started = time.perf_counter()
        samples = run.generate(labels, noise, steps, solver, guidance, batch_size=batch_size,
                               generator=torch.Generator().manual_seed(seed + 1), progress=progress)
        seconds = time.perf_counter() - started
        rows.append({**row, **score(classifier, samples, labels, run.num_classes), "seconds": seconds})
    return rows


def score(classifier: DigitsClassifier, samples: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy overall and per class of `samples` (N, C, [T,] H, W) in [-1, 1] asked for `labels` (N,); videos
    also give the fraction of frames read right and how often frames agree with their video's most common reading."""
    row = {}
    if samples.dim() == 5:
        frame_reads = read_videos(classifier, samples)  # (N, T)
        hits = video_hits(frame_reads, labels)
        most_common = frame_reads.mode(dim=1).values
        row["frame_accuracy"] = float((frame_reads == labels[:, None]).float().mean())
        row["frame_agreement"] = float((frame_reads == most_common[:, None]).float().mean())
    else:
        hits = classifier.predict(samples) == labels
    per_class = [float(hits[labels == c].float().mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {**row, "accuracy": float(hits.float().mean()), "per_class": per_class, "samples": len(labels)}


def judge_file(path: str, labels: Sequence[int], digit_fraction: Optional[float] = DIGIT_FRACTION) -> dict:
    """Judge the samples sample.py wrote to an .npz (`arr_0`, uint8 (N, [T,] H, W, 3)), asked for `labels` cycled to
    N as sample.py cycles --labels: the user's own command, then the judge. Videos are read frame by frame at the
    digit's size inside the frame, images whole."""
    pixels = torch.from_numpy(load_samples(path)).float() / 127.5 - 1.0
    samples = pixels.movedim(-1, 1)  # (N, 3, [T,] H, W)
    asked = torch.tensor([labels[i % len(labels)] for i in range(samples.shape[0])])
    video = samples.dim() == 5
    side = min(samples.shape[-2:])
    resolution = digit_side(side, digit_fraction) if video and digit_fraction is not None else samples.shape[-1]
    classifier = DigitsClassifier.train(resolution, 3, progress=True)
    return {"samples_file": str(path), "labels": list(labels), "judge_resolution": resolution,
            **score(classifier, samples, asked, max(labels) + 1)}


def judge_for(run: TrainedRun, digit_fraction: Optional[float] = DIGIT_FRACTION,
              shape: Optional[Sequence[int]] = None) -> DigitsClassifier:
    """A judge at the resolution of the run's images (of `shape`, default the model's sample shape), or of the digit
    inside its video frames; `digit_fraction` None: the digit fills the frame (stills from a video model)."""
    shape = tuple(shape or run.model.backbone.sample_shape)
    if len(shape) == 4 and digit_fraction is not None:  # (C, T, H, W): the moving digit covers digit_fraction
        resolution = digit_side(min(shape[-2:]), digit_fraction)
    else:
        resolution = shape[-1]
    return DigitsClassifier.train(resolution, shape[0], progress=True)


def table_rows(rows: Sequence[dict]) -> list[list]:
    """Markdown rows: guidance, scale, accuracy, worst class, seconds (or the reason a row was skipped)."""
    out = []
    for row in rows:
        scale = "-" if row["scale"] is None else row["scale"]
        if "skipped" in row:
            out.append([row["guidance"], scale, row["skipped"], "-", "-"])
            continue
        worst = worst_class(row["per_class"])
        cells = [row["guidance"], scale, row["accuracy"], f"{worst}: {row['per_class'][worst]:.2f}"]
        if "frame_accuracy" in row:
            cells += [row["frame_accuracy"], row["frame_agreement"]]
        out.append([*cells, row["seconds"]])
    return out


def worst_class(per_class: Sequence[Optional[float]]) -> int:
    return min((c for c, value in enumerate(per_class) if value is not None), key=per_class.__getitem__)


def table_header(rows: Sequence[dict]) -> list[str]:
    video = any("frame_accuracy" in row for row in rows)
    return ["guidance", "scale", "accuracy", "worst class", *(["frame accuracy", "frame agreement"] * video),
            "sampling s"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Class-conditional accuracy of a digits run, judged by a digits CNN.")
    add_run_options(parser, default="runs/digits_demo/stage2")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class")
    parser.add_argument("--guidance", nargs="+", choices=GUIDANCES, default=list(GUIDANCES))
    parser.add_argument("--scale", type=float, nargs="+", default=[1.5], help="guidance scales (each is a row)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", choices=SOLVERS, default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digit-fraction", type=float, default=DIGIT_FRACTION,
                        help="video runs: the digit's side / the frame side (the crop the judge reads)")
    parser.add_argument("--samples", help="judge this .npz of sample.py instead of sampling the run (--labels: what "
                                           "its --labels were; they cycle as sample.py cycles them)")
    parser.add_argument("--labels", type=int, nargs="+", default=list(range(10)), help="with --samples")
    add_out_option(parser, None, "result JSON (default: benchmarks/results/demo_accuracy.json, video runs "
                                 "video_demo_accuracy.json; --samples: print only)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.samples:
        result = judge_file(args.samples, args.labels, args.digit_fraction)
        frames = f", {result['frame_accuracy']:.3f} of frames" if "frame_accuracy" in result else ""
        print(f"{args.samples}: {result['samples']} samples, {result['accuracy']:.3f} read as the digit asked for "
              f"(videos: more than half of their frames){frames}; worst digit {worst_class(result['per_class'])}")
        if args.out:
            write_result(result, args.out)
        return result
    run = load_class_run(args.run, args.step, args.weights)
    classifier = judge_for(run, args.digit_fraction)
    video = len(run.model.backbone.sample_shape) == 4
    rows = guided_accuracy(run, classifier, guidance_settings(args.guidance, args.scale), args.per_class,
                           args.steps, args.solver, args.seed)
    result = {
        "run": str(args.run),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "weights": args.weights,
        "per_class": args.per_class,
        "steps": args.steps,
        "solver": args.solver,
        "seed": args.seed,
        **({"digit_fraction": args.digit_fraction} if video else {}),
        "classifier_test_accuracy": test_split_accuracy(classifier),
        "rows": rows,
    }
    print(f"run {args.run} (step {run.step}, {args.weights} weights), {args.per_class} samples per class, "
          f"{args.solver} {args.steps} steps; judge accuracy on real test digits {result['classifier_test_accuracy']:.3f}")
    print(markdown_table(table_header(rows), table_rows(rows)))
    write_result(result, args.out or RESULTS / ("video_demo_accuracy.json" if video else "demo_accuracy.json"))
    return result


if __name__ == "__main__":
    main()
