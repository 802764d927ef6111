"""Sharded checkpoint files (torch.distributed.checkpoint, DCP), as FSDP runs write them.

A sharded checkpoint folder holds DCP's `.metadata` and `__{rank}_{i}.distcp` files (model, EMA, optimizer) beside the
usual training_state.pt and rng_rank{r}.pt; DCP reshards on load, so a run resumes on another number of processes.
`read_weights` consolidates a folder's model or EMA in memory (no process group needed); `consolidate` writes them as
the usual safetensors files.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from sprint_mm.checkpoints import clean_key, read_state_dict, save_state_dict
from sprint_mm.runs import DCP_METADATA, add_to_manifest, find_checkpoint, verify_checkpoint

WEIGHTS = ("model", "ema")


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_sharded(folder: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of model, EMA and optimizer into `folder` (collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "ema": ema.state_dict(), "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model, EMA and optimizer from a sharded checkpoint written by any number of processes (collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "ema": ema.state_dict(), "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)  # in place into this process's shards, resharded as needed
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors, read by every process, into this process's shards of a sharded module."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def read_sharded_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) model or EMA tensors of a sharded checkpoint, read in this one process."""
    prefix = f"{name}."
    entries = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    state = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items() if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"sharded checkpoint {folder} holds no {name!r} tensors")
    with warnings.catch_warnings():  # DCP says that it assumes one process: so it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({name: state}, checkpoint_id=folder, no_dist=True)
    return {clean_key(k): v for k, v in state.items()}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` / `ema.safetensors` in a checkpoint folder, consolidated in memory from the
    sharded files when the folder has no such file."""
    path = Path(path)
    if not path.is_file() and is_sharded(path.parent) and path.name.removesuffix(".safetensors") in WEIGHTS:
        return read_sharded_weights(path.parent, path.name.removesuffix(".safetensors"))
    return read_state_dict(path)


def consolidate(run_or_checkpoint: str | os.PathLike, step: Optional[int] = None) -> Path:
    """Write full `model.safetensors` and `ema.safetensors` into a sharded checkpoint folder (the run's newest, or
    the one at `step`) and add them to its manifest; returns the folder."""
    source = Path(run_or_checkpoint)
    folder = verify_checkpoint(source if is_sharded(source) else find_checkpoint(source, step))
    if not is_sharded(folder):
        raise ValueError(f"checkpoint {folder} is not sharded (no {DCP_METADATA}): its safetensors files are already full")
    files = [f"{name}.safetensors" for name in WEIGHTS]
    for name, file in zip(WEIGHTS, files):
        save_state_dict(read_sharded_weights(folder, name), folder / file)
    add_to_manifest(folder, files)
    return folder
