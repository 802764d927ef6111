"""The runs of tests/test_fsdp.py, in one torchrun launch per process count (starting processes is the slow part).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py two ROOT   # then: ... 1 ... one ROOT

`grown`, the other way round (one process, then two), starts in the test's own process before these launches.

`KeyedFlow` draws each sample's time and noise from its own pixels instead of the process's random stream, so a run
computes the same global loss on any number of processes and their weights can be compared.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from sprint_mm.configs import parse_gin
from sprint_mm.flow import FlowMatching, mean_squared_error
from sprint_mm.parallelize import end_processes
from sprint_mm.training import Trainer
from tests.test_training import STAGE1, TINY

FSDP = ["Trainer.strategy = 'fsdp'", "Trainer.num_threads = 1"]


class KeyedFlow(FlowMatching):
    """Flow matching without token or path drop whose time and noise are a function of each sample's content."""

    def __init__(self) -> None:
        super().__init__(label_dropout=0.0, path_drop=0.0)

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Any,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        keyed = [torch.Generator().manual_seed(int(row.double().abs().sum() * 1e4)) for row in x0]
        t = torch.cat([torch.rand(1, generator=g) for g in keyed])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in keyed])
        x_t, target = self.interpolate(x0, eps, t)
        cond = model.backbone.drop_condition(cond, torch.zeros(x0.shape[0], dtype=torch.bool))
        return mean_squared_error(model(x_t, t, cond), target)


def train(run: Path, steps: int, objective: Optional[FlowMatching] = None) -> None:
    parse_gin([STAGE1], TINY + FSDP + [f"Trainer.max_steps = {steps}", f"Trainer.run_dir = {str(run)!r}"])
    (Trainer(objective=objective) if objective else Trainer()).run()


def two_processes(root: Path) -> None:
    train(root / "straight", 6)
    train(root / "resumed", 4)  # a stop after step 4 (checkpoints at 3 and 4) ...
    train(root / "resumed", 6)  # ... and a fresh start of the same command
    train(root / "step_two", 1, KeyedFlow())
    train(root / "keyed", 4, KeyedFlow())
    if dist.get_rank() == 0:  # the one-process launch resumes this copy at step 4
        shutil.copytree(root / "keyed", root / "keyed_one")
    dist.barrier()
    train(root / "keyed", 6, KeyedFlow())
    train(root / "grown_two", 3, KeyedFlow())  # a one-process checkpoint of step 2, resumed on two processes


def one_process(root: Path) -> None:
    train(root / "step_one", 1, KeyedFlow())
    train(root / "keyed_one", 6, KeyedFlow())


if __name__ == "__main__":
    {"two": two_processes, "one": one_process}[sys.argv[1]](Path(sys.argv[2]))
    end_processes(0)
