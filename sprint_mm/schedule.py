"""When a training run stops, logs, previews and checkpoints, and the clock it is timed by."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from sprint_mm.errors import check_number
from sprint_mm.preemption import DEFAULT_SIGNALS, signal_numbers

# What the time budget and `elapsed_s` count: wall-clock, or this process's CPU time (with one thread on an otherwise
# idle core the two agree; on a shared machine CPU time is not inflated by the other jobs).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Schedule:
    """The `Trainer` options of the same names. A run stops at `max_steps`, when `time_budget_minutes` (summed over
    resumes, on `clock`) is spent, or on one of `stop_signals`, and always ends with a checkpoint; `max_bad_steps`
    non-finite steps in a row stop it with the last good checkpoint intact."""

    max_steps: int = 1000
    time_budget_minutes: Optional[float] = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    preview_every: int = 0
    max_bad_steps: int = 10
    clock: str = "wall"
    stop_signals: Sequence[str] = DEFAULT_SIGNALS

    def __post_init__(self) -> None:
        for name, low in (("max_steps", 1), ("checkpoint_every", 1), ("log_every", 1), ("keep_checkpoints", 0),
                          ("preview_every", 0), ("max_bad_steps", 1)):
            check_number(f"Trainer.{name}", getattr(self, name), low=low, integer=True)
        check_number("Trainer.time_budget_minutes", self.time_budget_minutes or 0, low=0)
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown Trainer.clock {self.clock!r}; allowed: {', '.join(CLOCKS)}")
        signal_numbers(self.stop_signals)  # an unknown name fails now, not when the signal comes

    @property
    def time(self) -> Callable[[], float]:
        return CLOCKS[self.clock]

    def budget_spent(self, elapsed: float) -> bool:
        return self.time_budget_minutes is not None and elapsed >= 60.0 * self.time_budget_minutes

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0

    def preview_due(self, step: int) -> bool:
        return self.preview_every > 0 and step % self.preview_every == 0
