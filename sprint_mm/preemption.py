"""Stopping a run on a scheduler's signal: the first signal asks the trainer to finish its step, write a checkpoint
and exit with EXIT_PREEMPTED; a second one exits at once (checkpoints are published by an atomic rename, so the
previous one stays intact whatever is being written).

Under `sprint_mm.launch` a process can get one request twice: from the scheduler, which signals every process of a
job, and from the launcher, which forwards what it gets. There the same signal again within `REPEAT_WINDOW_S` of the
first is the same request, not a second one."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Callable, Optional, Sequence

from sprint_mm.errors import LAUNCH_REPORTS

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". A cluster wrapper requeues on it.
EXIT_PREEMPTED = 75
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
REPEAT_WINDOW_S = 1.0


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"stopped by {signal_name} at step {step} after writing its checkpoint; run the same command "
                         "again to resume")
        self.signal_name, self.step = signal_name, step


def signal_numbers(names: Sequence[str]) -> list[signal.Signals]:
    """Signals by name ('SIGTERM', 'SIGUSR1', ...); an unknown name is one clear error."""
    numbers = []
    for name in names:
        if not hasattr(signal.Signals, str(name)):
            raise ValueError(f"Trainer.stop_signals: unknown signal {name!r}; use names such as {', '.join(DEFAULT_SIGNALS)}")
        numbers.append(signal.Signals[name])
    return numbers


class StopSignals:
    """While entered, the given signals set `received` (the first) or exit at once (the second)."""

    def __init__(self, names: Sequence[str], announce: Callable[[str], None]) -> None:
        self.numbers = signal_numbers(names)
        self.announce = announce
        self.received: Optional[str] = None
        self._received_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, number: int, _frame: Optional[FrameType]) -> None:
        name = signal.Signals(number).name
        if self.received == name and os.environ.get(LAUNCH_REPORTS) and \
                time.monotonic() - self._received_at < REPEAT_WINDOW_S:
            return  # the launcher's copy of the scheduler's signal
        if self.received is not None:
            sys.stderr.write(f"[sprint_mm] second signal {name}: exiting now; the previous checkpoint is intact\n")
            os._exit(128 + number)
        self.received, self._received_at = name, time.monotonic()
        self.announce(f"received {name}: finishing this step, writing a checkpoint, then exiting "
                      f"(status {EXIT_PREEMPTED}); send it again to exit at once")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for number in self.numbers:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
