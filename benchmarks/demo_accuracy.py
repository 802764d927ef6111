"""The digits demo's quality number: how often the judge reads a class-conditional sample as the class asked for.

Works for the image demo and the video demo: a video is read frame by frame (the judge reads the digit-sized window
with the most ink in every frame), counts as its frames' majority class, and its row also reports the fraction of
frames read correctly and how often frames agree with their video's majority (temporal consistency).

Loads a trained run, draws `--per-class` samples of every class from one fixed noise batch under each guidance
(none, CFG, PDG: the same noise for all of them), and scores them with the digits classifier trained in
digits_classifier.py.

    python benchmarks/demo_accuracy.py --run runs/digits_demo/stage2 [--per-class 20] [--guidance none cfg pdg]
                                       [--scale 1.5] [--steps 50] [--solver euler] [--weights ema]

prints one row per guidance and scale and writes benchmarks/results/demo_accuracy.json.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from digits_classifier import (
    RESULTS,
    DigitsClassifier,
    markdown_table,
    read_videos,
    test_split_accuracy,
    write_result,
)
from sprint_mm.checkpoints import load_strict, read_state_dict
from sprint_mm.conditioning import build_conditioning
from sprint_mm.configs import parse_gin
from sprint_mm.flow import trained_time_shift
from sprint_mm.generation import generate
from sprint_mm.latents import LatentCodec, build_codec
from sprint_mm.runs import checkpoint_step, find_checkpoint
from sprint_mm.sampling import GUIDANCES, SOLVERS, Guidance
from sprint_mm.models import build_model
from sprint_mm.sprint import Sprint
from sprint_mm.video_demo import DIGIT_FRACTION, load_moving_digits_maker

WEIGHTS = ("ema", "model")


@dataclass
class LoadedRun:
    """A trained model in eval mode with the codec its samples decode through."""

    model: nn.Module
    codec: LatentCodec
    checkpoint: Path
    step: int

    @property
    def num_classes(self) -> int:
        return self.model.backbone.condition.num_classes


def load_run(run_dir: str | Path, step: Optional[int] = None, weights: str = "ema") -> LoadedRun:
    """Rebuild a class-conditional run from its config.gin and load a checkpoint strictly (newest unless `step`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    run_dir = Path(run_dir)
    checkpoint = find_checkpoint(run_dir, step)
    config = run_dir / "config.gin"
    if not config.is_file():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} has no config.gin")
    parse_gin([str(config)], [])
    kind = build_conditioning().kind
    if kind != "class":
        raise ValueError(f"the digits judge needs a class-conditional run; {str(run_dir)!r} is conditioned on {kind!r}")
    model = build_model()
    file = checkpoint / f"{weights}.safetensors"
    load_strict(model, read_state_dict(file), str(file))
    return LoadedRun(model.eval(), build_codec(), checkpoint, checkpoint_step(checkpoint))


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


def guided_accuracy(
    run: LoadedRun,
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
        samples = generate(run.model, labels, run.codec, noise, steps, solver, guidance, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed + 1), progress=progress,
                           time_shift=trained_time_shift())
        seconds = time.perf_counter() - started
        if samples.dim() == 5:
            frame_reads = read_videos(classifier, samples)  # (N, T)
            majority = frame_reads.mode(dim=1).values
            hits = majority == labels
            row["frame_accuracy"] = float((frame_reads == labels[:, None]).float().mean())
            row["frame_agreement"] = float((frame_reads == majority[:, None]).float().mean())
        else:
            hits = classifier.predict(samples) == labels
        per_class_accuracy = hits.view(run.num_classes, per_class).float().mean(1)
        rows.append({**row, "accuracy": float(hits.float().mean()), "per_class": per_class_accuracy.tolist(),
                     "samples": len(labels), "seconds": seconds})
    return rows


def judge_for(run: LoadedRun, digit_fraction: Optional[float] = DIGIT_FRACTION,
              shape: Optional[Sequence[int]] = None) -> DigitsClassifier:
    """A judge at the resolution of the run's images (of `shape`, default the model's sample shape), or of the digit
    inside its video frames; `digit_fraction` None: the digit fills the frame (stills from a video model)."""
    shape = tuple(shape or run.model.backbone.sample_shape)
    if len(shape) == 4 and digit_fraction is not None:  # (C, T, H, W): the moving digit covers digit_fraction
        resolution = load_moving_digits_maker().digit_side(min(shape[-2:]), digit_fraction)
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
        worst = min(range(len(row["per_class"])), key=row["per_class"].__getitem__)
        cells = [row["guidance"], scale, row["accuracy"], f"{worst}: {row['per_class'][worst]:.2f}"]
        if "frame_accuracy" in row:
            cells += [row["frame_accuracy"], row["frame_agreement"]]
        out.append([*cells, row["seconds"]])
    return out


def table_header(rows: Sequence[dict]) -> list[str]:
    video = any("frame_accuracy" in row for row in rows)
    return ["guidance", "scale", "accuracy", "worst class", *(["frame accuracy", "frame agreement"] * video),
            "sampling s"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Class-conditional accuracy of a digits run, judged by a digits CNN.")
    parser.add_argument("--run", default="runs/digits_demo/stage2", help="run folder (config.gin + checkpoints)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class")
    parser.add_argument("--guidance", nargs="+", choices=GUIDANCES, default=list(GUIDANCES))
    parser.add_argument("--scale", type=float, nargs="+", default=[1.5], help="guidance scales (each is a row)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", choices=SOLVERS, default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digit-fraction", type=float, default=DIGIT_FRACTION,
                        help="video runs: the digit's side / the frame side (the crop the judge reads)")
    parser.add_argument("--out", help="result JSON (default: benchmarks/results/demo_accuracy.json, "
                                      "video runs video_demo_accuracy.json)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    run = load_run(args.run, args.step, args.weights)
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
