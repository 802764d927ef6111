"""The digits demo, `python train.py` with no arguments: stage 1 (0.75 structured drop), stage 2 (full tokens) from
stage 1's EMA, then class-conditional PDG samples (five rows of 0-9), on a CPU in minutes, from scikit-learn's
bundled digits (no download)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from demos.two_stages import sample_run, train_two_stages
from sprint_mm.cli import report_training

DIGITS_STAGES = ("gin/image/digits_stage1.gin", "gin/image/digits_stage2.gin")
DIGITS_RUN = "runs/digits_demo"
ROWS = 5  # of the digits 0-9 in the sample grid


def run_digits_demo(run_root: str = DIGITS_RUN, gin_params: Sequence[str] = ()) -> Path:
    """Train both stages into RUN_ROOT/stage1 and RUN_ROOT/stage2 (`gin_params` apply to both), then write
    RUN_ROOT/samples_pdg.png."""
    stage2 = train_two_stages(DIGITS_STAGES, run_root, gin_params)
    labels = [str(i % 10) for i in range(10 * ROWS)]
    out = sample_run(stage2, Path(run_root) / "samples_pdg.png", "--guidance", "pdg", "--labels", *labels)
    print(f"[sprint_mm] demo done: samples in {out} (rows of 0-9)")
    return out


def digits_demo_main() -> int:
    """The demo's exit status (see `sprint_mm.cli.report_training`)."""
    return report_training(run_digits_demo)
