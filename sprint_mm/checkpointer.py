"""What a training run resumes from, in one place: the parts of its state, written into a step checkpoint of the run
folder, restored from the newest intact one, or started from another run's weights (stage 2).

    step_NNNNNNN/model.safetensors, ema.safetensors, training_state.pt, rng_rank{r}.pt, [projector.safetensors,
                 adapter_config.json + adapter_model.safetensors (LoRA) ...], manifest.json
    sharded (FSDP): .metadata and __{r}_0.distcp (model, EMA and optimizer) instead of the two safetensors files

`training_state.pt` holds the scheduler, the step and elapsed time, the data stream's position and fingerprint, the
bad-data counts and (not sharded) the optimizer; every process writes its RNG; an objective's own modules (REPA's
projector) and a LoRA model's adapters write their files. A checkpoint is written into a hidden staging folder, checked finite, described by a
manifest (`sprint_mm.runs`) and renamed into place; resume verifies the newest one against its manifest, falls back
past damaged ones, and reshards sharded files onto any number of processes.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from tqdm.auto import tqdm

from sprint_mm.checkpoints import check_fits, load_strict, read_state_dict, save_state_dict
from sprint_mm.conversion import describe_fresh, starting_state
from sprint_mm.data.stream import DataStream
from sprint_mm.lora import ADAPTER_CONFIG
from sprint_mm.parallelize import agreed
from sprint_mm.repa import PROJECTOR_FILE
from sprint_mm.runs import (
    DamagedCheckpoint,
    UnreadableCheckpoint,
    checkpoint_name,
    list_checkpoints,
    newest_intact_checkpoint,
    publish_checkpoint,
    remove_staging_folders,
    resolve_weights,
    staging_folder,
    write_manifest,
)
from sprint_mm.sharded import full_tensor, is_sharded, load_full, load_sharded, local, read_weights, save_sharded

STATE_FILE = "training_state.pt"
# What numpy arrays unpickle through (RNG files written before the states became tensors held numpy's as an array).
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
KINDS = ("DDP (full safetensors)", "FSDP (sharded)")
# Files of parts a configuration may lack, and what resuming them needs.
OPTIONAL_FILES = {PROJECTOR_FILE: "it was trained with REPA alignment: bind Trainer.alignment = @RepaAlignment() "
                                  "to resume it",
                  ADAPTER_CONFIG: "it was trained with LoRA adapters: bind build_model.lora = @LoRA() as it did to "
                                  "resume it"}


class FilePart(Protocol):
    """A part of the training state that keeps its own files in a checkpoint folder (an objective's modules, a LoRA
    model's adapters). The main process saves it; a part that reads sharded tensors may also have a `gather()`, which
    every process calls first (gathering is collective)."""

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
        checks that every tensor is finite, the main process adds the manifest and renames the folder into place.

        Each phase (room for the files, the writes, the manifest and the rename) ends with every process agreeing on
        whether it failed anywhere: a failed write (a full disk, a read-only folder; DCP reports a process's failed
        write as a CheckpointException) removes the staging folder and stops the run with one line naming the folder
        and the bytes the checkpoint needs, the previous checkpoints as they were."""
        acc, step = self.accelerator, self.parts.progress.step
        acc.wait_for_everyone()
        if acc.is_main_process or self.sharded:  # each process checks its own shards
            check_finite(self.parts.model, self.parts.ema, step)
        staging = self.run_dir / "checkpoints" / f".{checkpoint_name(step)}.partial"
        needed = self.bytes_needed() * (acc.num_processes if self.sharded else 1)
        phases = (lambda: self._make_room(staging, needed), lambda: self._write(staging), lambda: self._publish(staging))
        for phase in phases:
            error = None
            try:
                phase()
            except (Exception, CheckpointException) as err:  # (DCP's error is a BaseException)
                error = err  # every process learns of a failure before any raises
            (failed,) = agreed(acc, error is not None)
            if failed:
                if acc.is_main_process:
                    shutil.rmtree(staging, ignore_errors=True)
                if error is not None and not is_write_failure(error):
                    raise error
                raise CheckpointWriteError(self._failure_line(staging, needed, error)) from error
        acc.wait_for_everyone()

    def bytes_needed(self) -> int:
        """What this process writes into a checkpoint, at least: its model, EMA and optimizer tensors (sharded: its
        shards; not sharded: the main process writes them all)."""
        if not (self.sharded or self.accelerator.is_main_process):
            return 0
        parts = self.parts
        tensors = [*parts.model.state_dict().values(), *parts.ema.state_dict().values(),
                   *(value for state in parts.optimizer.state.values() for value in state.values())]
        return sum(local(t).nbytes for t in tensors if isinstance(t, torch.Tensor))

    def _make_room(self, staging: Path, needed: int) -> None:
        """The main process creates the staging folder and refuses to start a write the disk cannot hold."""
        if not self.accelerator.is_main_process:
            return
        staging_folder(self.run_dir, self.parts.progress.step)
        if shutil.disk_usage(staging).free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging.parent))

    def _publish(self, staging: Path) -> None:
        if self.accelerator.is_main_process:
            write_manifest(staging, self.parts.progress.step, self.accelerator.num_processes,
                           (self.run_dir / "config.gin").read_text())
            publish_checkpoint(staging, self.parts.progress.step, self.keep)

    def _failure_line(self, staging: Path, needed: int, error: Optional[BaseException]) -> str:
        """The one line of a failed checkpoint write: where, why, what it needs, and what is intact."""
        step, folder = self.parts.progress.step, staging.parent
        try:
            free = f"{size_text(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "its free space unknown"
        cause = "another process failed to write its part" if error is None else write_failure_cause(error)
        intact = [p.name for p in list_checkpoints(self.run_dir)]
        return (f"could not write the checkpoint of step {step} in {folder}: {cause} (the checkpoint needs at least "
                f"{size_text(needed)}; the folder has {free}); its partial folder was removed, the previous "
                f"checkpoints are intact: {intact or 'none'}")

    def _write(self, staging: Path) -> None:
        parts, rank = self.parts, self.accelerator.process_index
        torch.save(rng_state(), staging / f"rng_rank{rank}.pt")
        if self.sharded:
            save_sharded(staging, parts.model, parts.ema, parts.optimizer)
        for part in parts.extras.values():
            if hasattr(part, "gather"):
                part.gather()
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
        without a saved random state draws from (seed, step, data rank). The staging folders of a write that was
        killed are removed first (the caller holds the run's lock)."""
        if self.accelerator.is_main_process:
            for name in remove_staging_folders(self.run_dir):
                self.say(f"removed {name}, the unfinished write of a checkpoint (the process writing it was stopped)")
        self.accelerator.wait_for_everyone()
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
        """Stage 2 (or a start from a dense run, a converted SiT/REPA file, a plain model under LoRA): model and EMA
        from the source's EMA, every tensor it has loaded strictly, the ones it lacks (SPRINT's fusion and mask token,
        LoRA adapters; `sprint_mm.conversion`) kept as initialised and named in the log; the parts with files of their
        own from beside it."""
        model = self.parts.model
        weights = resolve_weights(source, "ema.safetensors")
        state, fresh = starting_state(model, read_weights(weights), f"init_from weights {weights}")
        own = model.state_dict()
        state.update({key: full_tensor(own[key]).detach().clone() for key in fresh})  # a sharded model loads full ones
        check_fits(model, state, f"init_from weights {weights}")
        if self.sharded:
            load_full(model, state)
            load_full(self.parts.ema, state)
        else:
            model.load_state_dict(state)
            self.parts.ema.load_state_dict(model.state_dict())
        new = describe_fresh(model, fresh)
        self.say(f"initialised model and EMA from {weights} (fresh optimizer)" + (f"; new here: {new}" if new else ""))
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


# What a write that ran out of room says, in the errors of Python, safetensors and torch's zip writer.
DISK_FULL_WORDS = ("No space left", "StorageFull", "Disk quota", "File too large", "FileTooLarge")


def is_write_failure(error: BaseException) -> bool:
    """Whether an error of a checkpoint write is the machine's (a file that could not be written), not a bug."""
    if isinstance(error, (OSError, CheckpointException, SafetensorError)):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in ("write", *DISK_FULL_WORDS))


def write_failure_cause(error: BaseException) -> str:
    """What stopped a checkpoint write, in words: a full disk, a file-size limit, or the error's first line (an
    OSError's own words are kept; DCP's error speaks through the first process's)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text, said = str(error), f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else ""
    number = error.errno if isinstance(error, OSError) else None
    if number == errno.EFBIG or "File too large" in text or "FileTooLarge" in text:
        return f"a file outgrew the largest file this process may write (ulimit -f){said}"
    if number in (errno.ENOSPC, errno.EDQUOT) or any(word in text for word in DISK_FULL_WORDS):
        return f"the disk is full{said}"
    if said:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return (text.strip().splitlines() or [type(error).__name__])[0]


def size_text(count: int) -> str:
    """Bytes as a short text (kB, MB, GB: powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
