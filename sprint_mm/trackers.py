"""Where a run's logged scalars go beside `metrics.jsonl`: TensorBoard (`logs/`) and Weights & Biases.

`Trainer.trackers` names them (default `('tensorboard',)`). The wandb run lives in the run folder (`wandb/`), its id
in `wandb_id.txt`, so a resumed run continues the same wandb run; `WANDB_MODE=offline` logs without a network (send it
later with `wandb sync RUN/wandb/offline-run-*`), and `WANDB_PROJECT` / `WANDB_ENTITY` choose where it goes (project
`sprint_mm` by default). Steps a resumed run trains again (those after its checkpoint) are the same numbers, since
resume is exact; wandb keeps the points it has and drops the repeats.
"""
from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

WANDB_ID_FILE = "wandb_id.txt"


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    """The tracker names as a tuple, or one line naming the value and what is allowed."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"Trainer.trackers must be a list of tracker names from {', '.join(TRACKERS)}; got {names!r}")
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"Trainer.trackers has {unknown[0]!r}; allowed: {', '.join(TRACKERS)}")
    if "wandb" in names:
        wandb_module()  # a missing package is said before the run starts
    return tuple(dict.fromkeys(names))


def wandb_module() -> Any:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ValueError("Trainer.trackers has 'wandb', but the wandb package is not installed: pip install wandb "
                         "(WANDB_MODE=offline logs without a network)") from None


class TensorBoard:
    """Scalars under `RUN/logs`, as `train/<name>`."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "logs"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run in `RUN/wandb`, named after the run folder, resumed under the id kept in `RUN/wandb_id.txt`; the
    run's description (config.json's values) and its config.gin as its config; scalars as `train/<name>`."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        wandb = wandb_module()
        bindings = run_dir / "config.gin"
        config = {**config, "gin": bindings.read_text()} if bindings.is_file() else config
        id_file = run_dir / WANDB_ID_FILE
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sprint_mm"), name=run_dir.name,
                              id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({f"train/{key}": value for key, value in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}  # name -> the tracker it opens


def open_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any]) -> list[Any]:
    """The trackers `names` (checked by `check_trackers`) opened on the run folder."""
    return [TRACKERS[name](Path(run_dir), config) for name in names]
