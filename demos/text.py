"""The text-to-image demo, `python text_demo.py`: captioned 16 px digits, MiniLM captions, stage 1, stage 2, then
CFG and PDG grids of prompts in runs/text_demo/samples_{cfg,pdg}.png, on a CPU in minutes.

The sample grids have one row per phrasing and one column per digit 0..9: the first rows use phrasings seen in
training, the last rows phrasings that never occur in training (HELD_OUT_PROMPTS).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from demos.two_stages import sample_run, train_two_stages
from sprint_mm.cli import add_gin_param_option, report_training
from sprint_mm.data.captioned_digits import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, prompts_for

TEXT_STAGES = ("gin/text/digits_minilm_stage1.gin", "gin/text/digits_minilm_stage2.gin")
TEXT_RUN = "runs/text_demo"
GRID_GUIDANCES = ("cfg", "pdg")  # one grid each
DEFAULT_SCALE = 2.0
GRID_TEMPLATES = (*TRAIN_TEMPLATES[:2], *HELD_OUT_TEMPLATES)


def demo_prompts() -> list[str]:
    """Ten prompts (digits 0..9) per phrasing: two training phrasings, then every held-out one."""
    return list(prompts_for(GRID_TEMPLATES))


def stage_params(run_root: str) -> list[str]:
    """Bindings both stages share: the caption cache lives in the demo folder, so captions are encoded once."""
    return [f"TextConditioner.cache_dir = {str(Path(run_root) / 'text_cache')!r}"]


def run_text_demo(
    run_root: str = TEXT_RUN, gin_params: Sequence[str] = (), scale: float = DEFAULT_SCALE, steps: int = 50
) -> dict[str, Path]:
    """Train stage 1 and stage 2, then write one CFG and one PDG grid of demo_prompts(); returns {guidance: png}."""
    stage2 = train_two_stages(TEXT_STAGES, run_root, stage_params(run_root) + list(gin_params))
    prompts = Path(run_root) / "prompts.txt"
    prompts.write_text("\n".join(demo_prompts()) + "\n")
    grids = {}
    for guidance in GRID_GUIDANCES:
        grids[guidance] = sample_run(stage2, Path(run_root) / f"samples_{guidance}.png", "--prompts", str(prompts),
                                     "--guidance", guidance, "--scale", str(scale), "--steps", str(steps))
    print(f"[sprint_mm] text demo done: {', '.join(map(str, grids.values()))} "
          f"(columns: digits 0-9; rows: {' | '.join(GRID_TEMPLATES)}; the last {len(HELD_OUT_TEMPLATES)} "
          "phrasings never occur in training)")
    return grids


def text_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and sample the text-to-image digits demo (CPU, minutes).")
    parser.add_argument("--run-root", "--run_root", default=TEXT_RUN,
                        help="folder for both stages, the caption cache and the grids")
    add_gin_param_option(parser, "a gin binding applied to both stages (repeatable)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="guidance scale of the CFG and PDG grids")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the trainer's choice, one on a machine of at most "
                             "4 cores, where two threads wait on each other beside any other busy process)")
    return parser


def text_demo_main(argv: Optional[Sequence[str]] = None) -> int:
    args = text_demo_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = [] if args.threads is None else [f"Trainer.num_threads = {args.threads}"]
    return report_training(run_text_demo, args.run_root, [*threads, *args.gin_param], args.scale, args.steps)
