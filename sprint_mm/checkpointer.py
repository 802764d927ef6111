"""What a training run resumes from, in one place: the parts of its state, written into a step checkpoint of the run
folder, restored from the newest intact one, or started from another run's weights (stage 2).

    step_NNNNNNN/model.safetensors, ema.safetensors, training_state.pt, rng_rank{r}.pt, [projector.safetensors ...],
                 manifest.json
    sharded (FSDP): .metadata and __{r}_0.distcp (model, EMA and optimizer) instead of the two safetensors files

`training_state.pt` holds the scheduler, the step and elapsed time, the data stream's position and fingerprint, the
bad-data counts and (not sharded) the optimizer; every process writes its RNG; an objective's own modules (REPA's
projector) write their files. A checkpoint is written into a hidden staging folder, checked finite, described by a
manifest (`sprint_mm.runs`) and renamed into place; resume verifies the newest one against its manifest, falls back
past damaged ones, and reshards sharded files onto any number of processes.
"""
from __future__ import annotations

import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from tqdm.auto import tqdm

from sprint_mm.checkpoints import check_fits, load_strict, read_state_dict, save_state_dict, upgrade_keys
from sprint_mm.data.stream import DataStream
from sprint_mm.repa import PROJECTOR_FILE
from sprint_mm.runs import (
    DamagedCheckpoint,
    UnreadableCheckpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    publish_checkpoint,
    resolve_weights,
    staging_folder,
    write_manifest,
)
from sprint_mm.sharded import is_sharded, load_full, load_sharded, local, read_weights, save_sharded

STATE_FILE = "training_state.pt"
# What numpy arrays unpickle through (RNG files written before the states became tensors held numpy's as an array).
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
KINDS = ("DDP (full safetensors)", "FSDP (sharded)")
# Files of parts a configuration may lack, and what resuming them needs.
OPTIONAL_FILES = {PROJECTOR_FILE: "it was trained with REPA alignment: bind Trainer.alignment = @RepaAlignment() "
                                  "to resume it"}


class FilePart(Protocol):
    """A part of the training state that keeps its own files in a checkpoint folder (an objective's modules)."""

    files: tuple[str, ...]

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def start_from(self, folder: Path) -> Optional[str]:
        """Stage 2: load from the stage-1 checkpoint `folder` if it has the files; a line for the log, or None."""


@dataclass
class Progress:
    """How far a run is: optimizer steps taken and the seconds they took (on the run's clock)."""

    step: int = 0
    elapsed: float = 0.0


@dataclass
class TrainingParts:
    """Everything a run resumes from."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataStream
    progress: Progress = field(default_factory=Progress)
    extras: dict[str, FilePart] = field(default_factory=dict)


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm, or non-finite weights at a checkpoint."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""


class Checkpointer:
    """Writes and restores the `parts` of a run in `run_dir` (keeping the newest `keep` checkpoints). `sharded`: the
    model and EMA are FSDP-sharded and write DCP files; `say` prints a line for the user (main process);
    `context_size`: the processes form context groups of that many (process r in data group r // context_size), whose
    members draw the same noise, times and masks."""

    def __init__(self, run_dir: Path, parts: TrainingParts, accelerator: Accelerator, sharded: bool, keep: int,
                 say: Callable[[str], None], context_size: int = 1) -> None:
        self.run_dir, self.parts, self.accelerator = Path(run_dir), parts, accelerator
        self.sharded, self.keep, self.say = sharded, keep, say
        self.context_size = context_size
        self.data_rank = accelerator.process_index // context_size

    # ------------------------------------------------------------------ writing
    def save(self) -> None:
        """Every process writes into a hidden staging folder; the main process (sharded: every process, its shards)
        checks that every tensor is finite, the main process adds the manifest and renames the folder into place. A
        failing write (DCP reports a process's failed write as a CheckpointException) stops the run and leaves the
        previous checkpoint as it was."""
        acc, step = self.accelerator, self.parts.progress.step
        acc.wait_for_everyone()
        staging = self.run_dir / "checkpoints" / f".step_{step:07d}.partial"
        if acc.is_main_process or self.sharded:  # each process checks its own shards
            check_finite(self.parts.model, self.parts.ema, step)
        if acc.is_main_process:
            staging = staging_folder(self.run_dir, step)
        acc.wait_for_everyone()
        try:
            self._write(staging, acc.process_index)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_manifest(staging, step, acc.num_processes, (self.run_dir / "config.gin").read_text())
                publish_checkpoint(staging, step, self.keep)
        except (OSError, CheckpointException) as err:
            shutil.rmtree(staging, ignore_errors=True)
            intact = [p.name for p in list_checkpoints(self.run_dir)]
            raise CheckpointWriteError(f"could not write the checkpoint of step {step} in {staging.parent} ({err}); "
                                       f"the previous checkpoints are intact: {intact or 'none'}") from err
        acc.wait_for_everyone()

    def _write(self, staging: Path, rank: int) -> None:
        parts = self.parts
        torch.save(rng_state(), staging / f"rng_rank{rank}.pt")
        if self.sharded:
            save_sharded(staging, parts.model, parts.ema, parts.optimizer)
        if rank != 0:
            return
        state = {"scheduler": parts.scheduler.state_dict(), "step": parts.progress.step,
                 "elapsed": parts.progress.elapsed, "context_parallel": self.context_size,
                 **parts.data.state_dict(parts.progress.step)}
        if not self.sharded:
            save_state_dict(parts.model.state_dict(), staging / "model.safetensors")
            save_state_dict(parts.ema.state_dict(), staging / "ema.safetensors")
            state["optimizer"] = parts.optimizer.state_dict()
        for part in parts.extras.values():
            part.save(staging)
        torch.save(state, staging / STATE_FILE)

    # ------------------------------------------------------------------ reading
    def resume(self, init_from: Optional[str], seed: int) -> None:
        """Continue from the newest intact checkpoint (falling back past damaged ones); else start from `init_from`'s
        EMA (stage 2); else start fresh. Every process of a data group continues the random state of that data group
        (the file of its first process when the checkpoint was written, whatever the context size then); a data group
        without a saved random state draws from (seed, step, data rank)."""
        folder, damaged = newest_intact_checkpoint(self.run_dir)
        for line in damaged:
            self.say(f"{line}: falling back to the previous checkpoint")
        rank, progress = self.data_rank, self.parts.progress
        if folder is not None:
            written_by = self._read(folder)
            self.say(f"resumed from {folder} at step {progress.step}")
            rng = folder / f"rng_rank{rank * written_by}.pt"
            if rng.is_file():
                set_rng_state(read_rng_state(rng))
                return
            tqdm.write(f"[sprint_mm] process {self.accelerator.process_index}: {folder.name} has no {rng.name} "
                       f"(written by fewer processes); its random stream starts from the seed of (seed {seed}, step "
                       f"{progress.step}, rank {rank})")
        elif damaged:
            raise DamagedCheckpoint(f"run {self.run_dir} has no intact checkpoint to resume: {'; '.join(damaged)}")
        elif init_from:
            self._start_from(init_from)
        torch.manual_seed(process_seed(seed, progress.step, rank))  # each data group draws its own noise and masks

    def _read(self, folder: Path) -> int:
        """Restore the parts from `folder`; returns the context size the checkpoint was written with."""
        parts = self.parts
        if is_sharded(folder) != self.sharded:
            raise ValueError(f"checkpoint {folder} is {KINDS[is_sharded(folder)]} but the run trains with "
                             f"{KINDS[self.sharded].split()[0]}: set Trainer.strategy = "
                             f"{('ddp', 'fsdp')[is_sharded(folder)]!r} to resume it")
        self._check_parts(folder)
        for part in parts.extras.values():  # before the optimizer, whose groups hold their parameters
            part.load(folder)
        state = read_training_state(folder / STATE_FILE)
        if self.sharded:
            load_sharded(folder, parts.model, parts.ema, parts.optimizer)
        else:
            for name, module in (("model", parts.model), ("ema", parts.ema)):
                load_strict(module, read_state_dict(folder / f"{name}.safetensors"), f"checkpoint {folder}/{name}.safetensors")
            parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.progress.step, parts.progress.elapsed = state["step"], state["elapsed"]
        parts.data.load_state_dict(state, parts.progress.step)
        return state.get("context_parallel", 1)  # checkpoints from before context parallelism: 1

    def _check_parts(self, folder: Path) -> None:
        """A checkpoint with the files of a part this configuration lacks (or without the files of one it has) is
        refused: its optimizer groups and losses belong to another configuration."""
        claimed = {file for part in self.parts.extras.values() for file in part.files}
        for file, needs in OPTIONAL_FILES.items():
            if (folder / file).is_file() and file not in claimed:
                raise ValueError(f"checkpoint {folder} holds {file}: {needs}")
        for name, part in self.parts.extras.items():
            missing = [file for file in part.files if not (folder / file).is_file()]
            if missing:
                raise FileNotFoundError(f"checkpoint {folder} has no {', '.join(missing)}: it was trained without "
                                        f"{name}, so it cannot be resumed with it")

    def _start_from(self, source: str) -> None:
        """Stage 2: model and EMA from a stage-1 EMA (strictly); the parts with files of their own from beside it."""
        weights = resolve_weights(source, "ema.safetensors")
        state = upgrade_keys(self.parts.model, read_weights(weights))  # a sharded model loads no other layout
        check_fits(self.parts.model, state, f"stage-1 weights {weights}")
        if self.sharded:
            load_full(self.parts.model, state)
            load_full(self.parts.ema, state)
        else:
            self.parts.model.load_state_dict(state)
            self.parts.ema.load_state_dict(self.parts.model.state_dict())
        self.say(f"initialised model and EMA from {weights} (fresh optimizer)")
        for part in self.parts.extras.values():
            note = part.start_from(weights.parent)
            if note:
                self.say(note)


def check_finite(model: nn.Module, ema: nn.Module, step: int) -> None:
    """No checkpoint is ever published with a non-finite tensor."""
    for name, module in (("model", model), ("EMA", ema)):
        bad = [key for key, tensor in module.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(local(tensor)).all())]
        if bad:
            raise NonFiniteTraining(f"the {name} has non-finite values at step {step} ({', '.join(bad[:5])}); "
                                    "no checkpoint is written, the previous ones are intact")


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and numbers, so the file reads back as data (no pickled objects)."""
    python_version, python_words, python_gauss = random.getstate()
    numpy_kind, numpy_words, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python_version": python_version,
             "python_words": torch.tensor(python_words, dtype=torch.int64), "python_gauss": python_gauss,
             "numpy_kind": numpy_kind, "numpy_words": torch.from_numpy(numpy_words.astype(np.int64)),
             "numpy_pos": numpy_pos, "numpy_has_gauss": numpy_has_gauss, "numpy_gauss": numpy_gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`, or the state of a checkpoint written before it (Python's and numpy's states as
    objects)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:  # the earlier layout
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    else:
        random.setstate((state["python_version"], tuple(state["python_words"].tolist()), state["python_gauss"]))
        np.random.set_state((state["numpy_kind"], state["numpy_words"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_rng_state(path: Path) -> dict[str, Any]:
    """A process's RNG file, read as data: tensors, numbers and (in the earlier layout) numpy arrays, nothing that runs
    code. A file that asks for anything else is refused with one line naming it."""
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpoint(f"{path} is not a random-state file sprint_mm reads: it holds objects other than "
                                   f"tensors and numbers ({refusal_reason(err)}); refusing to load it") from err


def read_training_state(path: Path) -> dict[str, Any]:
    """`training_state.pt`, read as data (tensors, numbers, strings, lists and dicts); anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnreadableCheckpoint(f"{path} holds objects other than tensors and numbers ({refusal_reason(err)}); "
                                   "refusing to load it") from err


def refusal_reason(err: BaseException) -> str:
    """The line of torch's weights-only error that says what the file asked for (e.g. a GLOBAL it would import)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "?")


def process_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of the processes of data group `rank` (without context parallelism: process `rank`) that start
    at `step` without a saved random state (step 0: a fresh run)."""
    return seed * 7919 + rank + 1 + step * 1_000_003
