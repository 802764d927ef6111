"""What the benchmark scripts share: interleaved timing with medians, markdown tables, result files, the command-line
options several scripts take, and reading trained runs (`sprint_mm.trained.load_run`, a checkpoint's training record).

Timing: the compared variants run interleaved (A B, B A, A B, ...) after untimed warm-up rounds and their medians
are compared, so a change of machine load hits every variant alike; a speed-up is measured in one run, never across
runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from sprint_mm.runs import find_checkpoint
from sprint_mm.sharded import WEIGHTS
from sprint_mm.trained import TrainedRun, load_run

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = ("cpu", "cuda")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work before a clock is read (a no-op on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed rounds, then `repeats` timed rounds alternating the order
    (A B, B A, A B, ...) so that load changes and order effects hit every variant alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize()
            started = time.perf_counter()
            variants[name]()
            synchronize()
            times[name].append(time.perf_counter() - started)
    return times


def median_seconds(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def peak_cuda_bytes(run: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated CUDA memory during `run()`; None on other devices."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply_threads(count: Optional[int]) -> None:
    """`--threads`: set torch's intra-op threads for the rest of the script (None: torch's choice)."""
    if count is not None:
        if count < 1:
            raise ValueError(f"--threads must be >= 1, got {count}")
        torch.set_num_threads(count)


# ----------------------------------------------------------------------------------------------
# Tables and result files
# ----------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 3 significant decimals."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(result: dict, path: str | Path) -> Path:
    """Write a benchmark's JSON result, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Command-line options several scripts share (kebab-case; the snake_case spellings stay accepted)
# ----------------------------------------------------------------------------------------------


def add_timing_options(parser: argparse.ArgumentParser, repeats: int = 5, warmup: int = 1,
                       device: bool = True) -> argparse.ArgumentParser:
    """--repeats, --warmup, --threads and (unless `device` is False) --device."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds per variant first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    if device:
        parser.add_argument("--device", choices=DEVICES, default="cpu")
    return parser


def add_run_options(parser: argparse.ArgumentParser, default: Optional[str] = None) -> argparse.ArgumentParser:
    """--run (a run folder: config.gin + checkpoints), --step and --weights."""
    parser.add_argument("--run", "--run-dir", "--run_dir", dest="run", default=default, required=default is None,
                        help="run folder (config.gin + checkpoints)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema")
    return parser


def add_out_option(parser: argparse.ArgumentParser, default: Optional[Path | str],
                   help_text: str = "result JSON") -> argparse.ArgumentParser:
    parser.add_argument("--out", default=None if default is None else str(default), help=help_text)
    return parser


# ----------------------------------------------------------------------------------------------
# Trained runs
# ----------------------------------------------------------------------------------------------


def load_class_run(run: str | Path, step: Optional[int] = None, weights: str = "ema") -> TrainedRun:
    """A class-conditional run (`sprint_mm.trained.load_run`), as the digits judge needs: its samples are asked for
    by class id."""
    loaded = load_run(run, step, weights)
    if loaded.kind != "class":
        raise ValueError(f"the digits judge needs a class-conditional run; {str(run)!r} is conditioned on "
                         f"{loaded.kind!r}")
    return loaded


def training_record(run_dir: Path) -> dict:
    """Steps done and training seconds (the budgeted step time) of a run's newest checkpoint."""
    state = torch.load(find_checkpoint(run_dir) / "training_state.pt", map_location="cpu", weights_only=False)
    return {"steps": int(state["step"]), "train_s": float(state["elapsed"])}
