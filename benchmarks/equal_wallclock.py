"""Quality at equal wall-clock on the digits: does token dropping pay?

Two arms get the same training time B (the trainer's step-time budget, summed over resumes):
  dense   the digits stage-1 config with gin/base/dense.gin (no wrapper, every token), for B;
  SPRINT  stage 1 (0.75 structured drop) for 0.75 B, then stage 2 (full tokens, from the stage-1 EMA) for 0.25 B.
The arms advance in `--rounds` alternating chunks of B / rounds each (dense, SPRINT, dense, SPRINT, ...; every chunk
resumes its run exactly), so changes in machine load hit both. Both runs are then sampled with the same noise, steps
and scale and judged by the digits classifier: no guidance and CFG for both, PDG for SPRINT.

    python benchmarks/equal_wallclock.py [--minutes 4] [--rounds 4] [--per-class 20] [--scale 1.5] [--steps 50]
                                         [--root runs/equal_wallclock] [--gin-param 'sit.hidden_size = 64' ...]

Writes benchmarks/results/equal_wallclock.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.demo_accuracy import guidance_settings, guided_accuracy
from benchmarks.digits_classifier import DigitsClassifier, test_split_accuracy
from benchmarks.harness import RESULTS, add_out_option, load_class_run, markdown_table, training_record, write_result
from sprint_mm.cli import add_gin_param_option, run_training

STAGE1 = "gin/image/digits_stage1.gin"
STAGE2 = "gin/image/digits_stage2.gin"
DENSE = "gin/base/dense.gin"
STAGE1_SHARE = 0.75
NO_STEP_LIMIT = 10**9


def budget_schedule(minutes: float, rounds: int, stage1_share: float = STAGE1_SHARE) -> list[dict[str, float]]:
    """Cumulative budgets (minutes) after each round: 'dense', 'stage1', 'stage2' (SPRINT's time line is stage 1
    for `stage1_share` of the budget, then stage 2)."""
    if minutes <= 0 or rounds < 1 or not 0 < stage1_share < 1:
        raise ValueError(f"need minutes > 0, rounds >= 1 and 0 < stage1_share < 1, got {minutes}, {rounds}, {stage1_share}")
    stage1_total = stage1_share * minutes
    schedule = []
    for round_index in range(1, rounds + 1):
        spent = minutes * round_index / rounds
        schedule.append({"dense": spent, "stage1": min(spent, stage1_total), "stage2": max(0.0, spent - stage1_total)})
    return schedule


def common_bindings(run_dir: Path, minutes: float, extra: Sequence[str]) -> list[str]:
    """Time-limited (not step-limited), no previews, one checkpoint per chunk; the user's bindings last."""
    return [
        f"Trainer.run_dir = {str(run_dir)!r}",
        f"Trainer.time_budget_minutes = {minutes!r}",
        f"Trainer.max_steps = {NO_STEP_LIMIT}",
        "Trainer.preview_every = 0",
        f"Trainer.checkpoint_every = {NO_STEP_LIMIT}",
        "Trainer.keep_checkpoints = 1",
        *extra,
    ]


def train_arms(root: Path, minutes: float, rounds: int, extra: Sequence[str]) -> dict[str, Path]:
    """Train both arms chunk by chunk; returns the run folder to sample for each ('dense', 'sprint')."""
    runs = {"dense": root / "dense", "stage1": root / "sprint_stage1", "stage2": root / "sprint_stage2"}
    files = {"dense": [STAGE1, DENSE], "stage1": [STAGE1], "stage2": [STAGE2]}
    done = {name: 0.0 for name in runs}
    for budgets in budget_schedule(minutes, rounds):
        for name in ("dense", "stage1", "stage2"):
            if budgets[name] <= done[name]:
                continue
            bindings = common_bindings(runs[name], budgets[name], extra)
            if name == "stage2":
                bindings.insert(1, f"Trainer.init_from = {str(runs['stage1'])!r}")
            run_training(files[name], bindings)
            done[name] = budgets[name]
    return {"dense": runs["dense"], "sprint": runs["stage2"]}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Digits quality at equal training time: dense vs SPRINT.")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget B of each arm")
    parser.add_argument("--rounds", type=int, default=4, help="alternating chunks per arm")
    parser.add_argument("--root", default="runs/equal_wallclock", help="folder for the runs (must not exist)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    add_gin_param_option(parser, "extra binding for both arms (repeatable)")
    add_out_option(parser, RESULTS / "equal_wallclock.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    root = Path(args.root)
    if root.exists():
        raise ValueError(f"{str(root)!r} exists; give a fresh --root (the runs would resume, not start over)")
    started = time.perf_counter()
    finals = train_arms(root, args.minutes, args.rounds, args.gin_param)
    wall_s = time.perf_counter() - started
    records = {
        "dense": training_record(finals["dense"]),
        "sprint_stage1": training_record(root / "sprint_stage1"),
        "sprint_stage2": training_record(finals["sprint"]),
    }
    loaded = {arm: load_class_run(path) for arm, path in finals.items()}
    shape = loaded["dense"].model.backbone.sample_shape
    classifier = DigitsClassifier.train(shape[-1], shape[0], progress=True)
    guidances = guidance_settings(["none", "cfg", "pdg"], [args.scale])
    scores = {arm: guided_accuracy(run, classifier, guidances, args.per_class, args.steps, seed=args.seed)
              for arm, run in loaded.items()}
    result = {
        "minutes": args.minutes,
        "rounds": args.rounds,
        "stage1_share": STAGE1_SHARE,
        "gin_params": args.gin_param,
        "train_wall_s": wall_s,
        "training": records,
        "per_class": args.per_class,
        "steps": args.steps,
        "scale": args.scale,
        "classifier_test_accuracy": test_split_accuracy(classifier),
        "scores": scores,
    }
    print(f"equal training time: {args.minutes} min per arm in {args.rounds} alternating rounds; "
          f"{args.per_class} samples per class, euler {args.steps} steps, scale {args.scale}")
    steps = {"dense": str(records["dense"]["steps"]),
             "sprint": f"{records['sprint_stage1']['steps']} + {records['sprint_stage2']['steps']}"}
    seconds = {"dense": records["dense"]["train_s"],
               "sprint": records["sprint_stage1"]["train_s"] + records["sprint_stage2"]["train_s"]}
    table = []
    for arm, rows in scores.items():
        accuracy = {row["guidance"]: row.get("accuracy", "-") for row in rows}
        table.append([arm, steps[arm], seconds[arm], accuracy["none"], accuracy["cfg"], accuracy["pdg"]])
    print(markdown_table(["arm", "steps (stage 1 + 2)", "train s", "no guidance", f"CFG {args.scale}",
                          f"PDG {args.scale}"], table))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
