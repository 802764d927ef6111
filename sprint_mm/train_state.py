"""What a training run resumes from, saved and restored in one place: the model, its fp32 EMA, the optimizer and
scheduler, step and elapsed time, bad-data counts, the REPA projector, and every process's RNG.

    step_NNNNNNN/model.safetensors, ema.safetensors, [projector.safetensors], training_state.pt, rng_rank{r}.pt
    sharded (FSDP): step_NNNNNNN/.metadata, __{r}_0.distcp, training_state.pt, rng_rank{r}.pt
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sprint_mm.checkpoints import check_fits, load_strict, read_state_dict, save_state_dict, upgrade_keys
from sprint_mm.data.faults import BadDataLedger
from sprint_mm.repa import RepaAlignment, check_no_projector
from sprint_mm.sharded import STRATEGIES, is_sharded, load_full, load_sharded, local, read_weights, save_sharded


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of update number `step` (0-based). With warm-up it is min(decay, (1 + step) / (10 + step)), so a
    short run's EMA follows the model early instead of holding its random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied. Sharded (FSDP) parameters update
    shard by shard: the EMA is sharded like the model, so each process's local shards line up."""
    for e, p in zip(ema.parameters(), model.parameters()):
        local(e).lerp_(local(p).detach().float(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def process_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a process that starts at `step` without a saved random state (step 0: a fresh run)."""
    return seed * 7919 + rank + 1 + step * 1_000_003


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy that never trains: the EMA."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


class TrainState:
    """What a run resumes from: model, EMA, optimizer, scheduler, step, elapsed time, the bad-data counts and the
    REPA projector (the data position follows from the step); with every process's RNG, saved in one checkpoint
    folder.

        step_NNNNNNN/model.safetensors, ema.safetensors, [projector.safetensors], training_state.pt, rng_rank{r}.pt

    Sharded (FSDP: model and EMA already `shard`ed), model, EMA and optimizer are DCP files instead of the two
    safetensors files and the optimizer entry of training_state.pt (see sprint_mm.sharded):

        step_NNNNNNN/.metadata, __{r}_0.distcp, training_state.pt, rng_rank{r}.pt
    """

    def __init__(self, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, alignment: Optional[RepaAlignment],
                 sharded: bool = False) -> None:
        self.model, self.ema, self.optimizer, self.scheduler = model, ema, optimizer, scheduler
        self.alignment, self.sharded = alignment, sharded
        self.ledger = BadDataLedger()
        self.step, self.elapsed = 0, 0.0
        self.data_fingerprint: Optional[dict[str, Any]] = None  # what the data stream's position refers to (buckets)

    def save(self, staging: Path, data_position: int, process_index: int) -> None:
        """Write this process's RNG (and its shards) and, from the main process, everything else into the staging
        folder."""
        torch.save(rng_state(), staging / f"rng_rank{process_index}.pt")
        if self.sharded:
            save_sharded(staging, self.model, self.ema, self.optimizer)
        if process_index != 0:
            return
        state = {"scheduler": self.scheduler.state_dict(), "step": self.step, "elapsed": self.elapsed,
                 "data_position": data_position, "bad_data": self.ledger.state_dict(), "data": self.data_fingerprint}
        if not self.sharded:
            save_state_dict(self.model.state_dict(), staging / "model.safetensors")
            save_state_dict(self.ema.state_dict(), staging / "ema.safetensors")
            state["optimizer"] = self.optimizer.state_dict()
        if self.alignment is not None:
            self.alignment.save(staging)
        torch.save(state, staging / "training_state.pt")

    def restore(self, folder: Path, process_index: int) -> Optional[dict[str, Any]]:
        """Load a checkpoint of this run; returns this process's RNG state to set once training starts, or None when
        the checkpoint has none for this process (it was written by fewer processes)."""
        if is_sharded(folder) != self.sharded:
            kinds = ("DDP (full safetensors)", "FSDP (sharded)")
            raise ValueError(f"checkpoint {folder} is {kinds[is_sharded(folder)]} but the run trains with "
                             f"{kinds[self.sharded].split()[0]}: set Trainer.strategy = "
                             f"{STRATEGIES[is_sharded(folder)]!r} to resume it")
        if self.alignment is None:  # before the optimizer, whose groups would not match without the projector
            check_no_projector(folder)
        else:
            self.alignment.restore(folder, resuming=True)
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
        if self.sharded:
            load_sharded(folder, self.model, self.ema, self.optimizer)
        else:
            load_strict(self.model, read_state_dict(folder / "model.safetensors"), f"checkpoint {folder}/model.safetensors")
            load_strict(self.ema, read_state_dict(folder / "ema.safetensors"), f"checkpoint {folder}/ema.safetensors")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.data_fingerprint = state.get("data")  # checkpoints written before buckets have none
        if "bad_data" in state:  # checkpoints written before bad data was counted have none
            self.ledger.load_state_dict(state["bad_data"])
        rng = folder / f"rng_rank{process_index}.pt"
        return torch.load(rng, map_location="cpu", weights_only=False) if rng.is_file() else None

    def start_from(self, weights: Path) -> Optional[str]:
        """Stage 2: model and EMA from a stage-1 EMA file (strictly), the projector from beside it when there is one;
        returns a line for the log about the projector, or None."""
        state = upgrade_keys(self.model, read_weights(weights))  # a sharded model loads no other layout
        check_fits(self.model, state, f"stage-1 weights {weights}")
        if self.sharded:
            load_full(self.model, state)
            load_full(self.ema, state)
        else:
            self.model.load_state_dict(state)
            self.ema.load_state_dict(self.model.state_dict())
        return None if self.alignment is None else self.alignment.restore(weights.parent, resuming=False)


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm."""


def check_finite(state: TrainState, step: int) -> None:
    """No checkpoint is ever published with a non-finite tensor."""
    for name, module in (("model", state.model), ("EMA", state.ema)):
        bad = [key for key, tensor in module.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(local(tensor)).all())]
        if bad:
            raise NonFiniteTraining(f"the {name} has non-finite values at step {step} ({', '.join(bad[:5])}); "
                                    "no checkpoint is written, the previous ones are intact")
