"""What every demo does: stage 1 into ROOT/stage1, stage 2 into ROOT/stage2 from stage 1's EMA, then samples of the
stage-2 run through sample.py's command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from sprint_mm.cli import run_training, sample_main

STAGE1_SHARE = 0.75  # of a demo's training time; stage 2 gets the rest


def train_two_stages(
    stage_files: Sequence[str],
    run_root: str | Path,
    shared: Sequence[str] = (),
    per_stage: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> str:
    """Stage 1 into RUN_ROOT/stage1, then stage 2 into RUN_ROOT/stage2 from stage 1's EMA; returns the stage-2 run.

    `shared` bindings apply to both stages, `per_stage` to each.
    """
    stage1, stage2 = str(Path(run_root) / "stage1"), str(Path(run_root) / "stage2")
    run_training([stage_files[0]], [f"Trainer.run_dir = {stage1!r}", *per_stage[0], *shared])
    run_training([stage_files[1]], [f"Trainer.run_dir = {stage2!r}", f"Trainer.init_from = {stage1!r}",
                                    *per_stage[1], *shared])
    return stage2


def stage_budgets(minutes: Optional[float], stage1_share: float = STAGE1_SHARE) -> tuple[list[str], list[str]]:
    """Time-budget bindings of stage 1 and stage 2 for a total of `minutes` (None: none; the stages stop at their step
    counts)."""
    if minutes is None:
        return [], []
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0 (the total training time of both stages), got {minutes}")
    stage1 = minutes * stage1_share
    return [f"Trainer.time_budget_minutes = {stage1!r}"], [f"Trainer.time_budget_minutes = {minutes - stage1!r}"]


def sample_run(run: str | Path, out: str | Path, *options: str) -> Path:
    """`sample.py --run RUN --out OUT OPTIONS...` in this process; its failure (already reported on stderr by
    sample.py's command line) stops the demo."""
    argv = ["--run", str(run), "--out", str(out), *options]
    if sample_main(argv) != 0:
        raise ValueError(f"sampling failed: sample.py {' '.join(argv)}")
    return Path(out)
