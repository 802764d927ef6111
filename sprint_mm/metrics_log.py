"""What a run reports: a progress bar with loss, rates and the FLOPs SPRINT saves, and every `log_every` steps the
window's mean losses and rates as one line of `metrics.jsonl` and scalars of its trackers (TensorBoard, wandb: main
process only)."""
from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from sprint_mm.data.faults import BadDataLedger
from sprint_mm.flops import sprint_step_ratio
from sprint_mm.sprint import Sprint
from sprint_mm.trackers import open_trackers


@dataclass
class StepResult:
    """What one optimizer step reports: mean losses, gradient norm, tokens of this process, what was not finite
    (None: the step trained), whether fp16's loss scaler skipped it and the bucket it trained on."""

    losses: dict[str, float]
    grad_norm: float
    tokens: int
    problem: Optional[str] = None
    scaler_skipped: bool = False
    bucket: Optional[str] = None  # the bucket of the step's batch (runs with buckets)
    seconds: float = 0.0  # wall-clock of the step alone (no checkpoint, preview or log)


class SlowdownWatch:
    """Says once when the steps of a run have become far slower than at its start: the usual cause on a CPU is
    another busy process, beside which torch's CPU threads wait for each other (README, threads on a shared machine).

    The start is the median step time of the `reference` steps after the first `skip` (start-up, first allocations);
    "now" is the median of the last `recent` steps. Medians, so a single slow step (a collection, a page-in) says
    nothing. Only wall-clock step times count, never checkpoints, previews or logs.
    """

    def __init__(self, factor: float = 4.0, skip: int = 5, reference: int = 20, recent: int = 20) -> None:
        self.factor, self.skip, self.reference_steps = factor, skip, reference
        self.seen, self.start_times, self.recent = 0, [], deque(maxlen=recent)
        self.reference: Optional[float] = None
        self.said = False

    def add(self, seconds: float) -> Optional[str]:
        """Count one step; the message, once, when the recent steps are `factor` times slower than the start."""
        self.seen += 1
        if self.said or self.seen <= self.skip:
            return None
        if self.reference is None:
            self.start_times.append(seconds)
            if len(self.start_times) == self.reference_steps:
                self.reference = statistics.median(self.start_times)
            return None
        self.recent.append(seconds)
        if len(self.recent) < self.recent.maxlen:
            return None
        now = statistics.median(self.recent)
        if now < self.factor * self.reference:
            return None
        self.said = True
        return slowdown_message(now, self.reference, torch.get_num_threads())


def slowdown_message(now: float, start: float, threads: int) -> str:
    """What a slowed-down run tells its user, with the setting to change."""
    rates = (f"training steps now take {now:.3g} s, {now / start:.1f}x the {start:.3g} s of the run's start: another "
             "process is probably using the CPU cores")
    if threads > 1:
        return (f"{rates}, and beside it torch's {threads} CPU threads per process wait for each other. Set "
                "Trainer.num_threads = 1 (or OMP_NUM_THREADS=1) on a shared machine")
    return (f"{rates} (this run uses one CPU thread, Trainer.num_threads = 1, so it only gets its share of the "
            "cores: free them, or expect the run to take longer)")


class Window:
    """Losses (also per bucket), steps, skipped steps and tokens since the last log line."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = {}
        self.steps, self.good_steps, self.tokens, self.start = 0, 0, 0, time.perf_counter()
        self.skipped, self.scaler_skipped = 0, 0
        self.bucket_losses: dict[str, list[float]] = {}

    def add(self, result: StepResult) -> None:
        self.steps, self.tokens = self.steps + 1, self.tokens + result.tokens
        self.skipped += result.problem is not None
        self.scaler_skipped += result.scaler_skipped
        if result.problem is None:
            self.good_steps += 1
            for name, value in result.losses.items():
                self.losses[name] = self.losses.get(name, 0.0) + value
            if result.bucket is not None:
                self.bucket_losses.setdefault(result.bucket, []).append(result.losses["loss"])

    def means(self, processes: int) -> dict[str, float]:
        """Mean losses of the steps that trained, the rates of the window (tokens over all processes) and the
        counts of skipped steps (non-finite; fp16 loss-scaler skips)."""
        seconds = time.perf_counter() - self.start
        return {**{name: total / self.good_steps for name, total in self.losses.items()},
                **{f"loss/{bucket}": sum(losses) / len(losses) for bucket, losses in self.bucket_losses.items()},
                "steps_per_s": self.steps / seconds, "tokens_per_s": self.tokens * processes / seconds,
                "skipped_steps": self.skipped, "fp16_skipped_steps": self.scaler_skipped}


def bad_counts(ledger: BadDataLedger) -> dict[str, int]:
    """The bad items counted so far by kind (read and left out), to tell whether a log line has news."""
    return dict(ledger.total_bad + ledger.left_out)


def flops_saved(model: nn.Module, objective: Any) -> Optional[float]:
    """Fraction of forward FLOPs SPRINT saves per training step against the same backbone dense (None: dense)."""
    if not isinstance(model, Sprint):
        return None
    backbone = model.backbone
    grid = backbone.token_grid((1, *backbone.sample_shape))
    tokens = math.prod(grid)
    return 1.0 - 1.0 / sprint_step_ratio(backbone.flop_shape(), model.flop_shape(), tokens, objective.kept_tokens(grid))


class MetricsLog:
    """The lines a run says to its user (`say`), its progress bar, `metrics.jsonl` and its trackers (`trackers`,
    names from `sprint_mm.trackers.TRACKERS`; main process)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, max_steps: int, log_every: int, progress: bool,
                 ledger: BadDataLedger, trackers: Sequence[str] = ("tensorboard",)) -> None:
        self.run_dir, self.accelerator, self.log_every, self.max_steps = Path(run_dir), accelerator, log_every, max_steps
        self.main, self.progress, self.window, self.saving = accelerator.is_main_process, progress, Window(), None
        self.ledger, self.reported_bad = ledger, bad_counts(ledger)
        self.bar, self.tracker_names, self.trackers = None, tuple(trackers), []
        self.watch = SlowdownWatch()

    def open(self, step: int, saving: Optional[float], config: Optional[dict[str, Any]] = None) -> None:
        """Start logging at `step` (a resumed run drops the lines of `metrics.jsonl` after it: those steps train
        again); `saving` is the fraction of FLOPs SPRINT saves (None: dense), shown on the progress bar; `config`
        the run's description, which trackers keep beside the scalars."""
        self.saving, self.reported_bad = saving, bad_counts(self.ledger)
        self.bar = tqdm(total=self.max_steps, initial=step, disable=not (self.progress and self.main),
                        desc=self.run_dir.name, dynamic_ncols=True)
        if self.main:
            self._forget_after(step)
            self.trackers = open_trackers(self.tracker_names, self.run_dir, config or {})

    def _forget_after(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def say(self, message: str) -> None:
        """A line for the user, above the progress bar (main process)."""
        if self.main:
            tqdm.write(f"[sprint_mm] {message}")

    def step(self, step: int, result: StepResult, extra: Callable[[], dict[str, float]]) -> None:
        """Count one step; at every `log_every` steps (and the last) write the window's means, the bad-data counts
        and the `extra()` values, and say what bad data was met since the last line."""
        self.window.add(result)
        self.bar.update(1)
        slower = self.watch.add(result.seconds)
        if slower is not None:
            self.say(slower)
        if step % self.log_every and step != self.max_steps:
            return
        metrics = {"step": step, **self.window.means(self.accelerator.num_processes), "grad_norm": result.grad_norm,
                   **extra(), **self.ledger.metrics()}
        if bad_counts(self.ledger) != self.reported_bad:
            self.say(self.ledger.summary())
            self.reported_bad = bad_counts(self.ledger)
        postfix = {"loss": f"{metrics.get('loss', math.nan):.4f}", "it/s": f"{metrics['steps_per_s']:.2f}",
                   "tok/s": f"{metrics['tokens_per_s']:.0f}"}
        if self.saving:  # stage 2 (no drop) saves nothing
            postfix["flops saved"] = f"{100 * self.saving:.0f}%"
        self.bar.set_postfix(postfix)
        self.window = Window()
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            scalars = {key: value for key, value in metrics.items() if key != "step"}
            for tracker in self.trackers:
                tracker.log(scalars, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
