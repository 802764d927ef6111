"""Sharded checkpoint files (torch.distributed.checkpoint, DCP), as FSDP runs write them.

A sharded checkpoint folder holds DCP's `.metadata` and `__{rank}_{i}.distcp` files (model, EMA, optimizer) beside the
usual training_state.pt and rng_rank{r}.pt; DCP reshards on load, so a run resumes on another number of processes.
`read_weights` consolidates a folder's model or EMA in memory (no process group needed); `consolidate` writes them as
the usual safetensors files.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from sprint_mm.checkpoints import checkpoint_mismatch, clean_key, read_state_dict, save_state_dict, upgrade_keys
from sprint_mm.errors import check_writable_folder
from sprint_mm.runs import DCP_METADATA, UnreadableCheckpoint, add_to_manifest, find_checkpoint, verify_checkpoint

WEIGHTS = ("model", "ema")
# What DCP's `.metadata` pickle may name: its own metadata classes, tensor sizes, dtypes and layouts, and paths.
METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                    *(("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath",
                                                     "PureWindowsPath"))}
METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` as data: a name outside METADATA_GLOBALS (and the dtypes) is refused, so a crafted
    file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module == METADATA_MODULE or (module, name) in METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint's metadata")


class MetadataReader(dcp.FileSystemReader):
    """DCP's file reader whose `.metadata` is read with `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as file:
                metadata = MetadataUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise UnreadableCheckpoint(f"{path} is not a checkpoint index sprint_mm reads ({err}); refusing to load "
                                       "it") from err
        if not isinstance(metadata, Metadata):
            raise UnreadableCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP's Metadata; refusing it")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every process (collective: every process must call it), a plain
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def save_sharded(folder: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of model, EMA and optimizer into `folder` (collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "ema": ema.state_dict(), "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model, EMA and optimizer from a sharded checkpoint written by any number of processes (collective).

    A checkpoint of an earlier layout (`upgrade_keys`: e.g. a text DiT's condition tensors before condition modules)
    is read under its own names; a model tensor it lacks under either name is one CheckpointMismatch."""
    reader = MetadataReader(folder)
    stored = {key.removeprefix("model.") for key in reader.read_metadata().state_dict_metadata
              if key.startswith("model.")}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    then = stored_names(model, stored)
    missing = sorted(key for key in model_state if then.get(key, key) not in stored)
    if missing:
        raise checkpoint_mismatch(f"sharded checkpoint {folder}", missing)
    state = {"model": renamed(model_state, then), "ema": renamed(ema.state_dict(), then),
             "optimizer": renamed_optimizer_state(optimizer_state, then)}
    dcp.load(state, storage_reader=reader)  # in place into this process's shards, resharded
    now = {old: current for current, old in then.items()}
    set_state_dict(model, optimizer, model_state_dict=renamed(state["model"], now),
                   optim_state_dict=renamed_optimizer_state(state["optimizer"], now))


def stored_names(model: torch.nn.Module, stored: set[str]) -> dict[str, str]:
    """{the model's key: the checkpoint's} for the keys a checkpoint of an earlier layout holds under another name."""
    upgraded = upgrade_keys(model, {key: key for key in stored})  # renames keys only: the values name the originals
    return {current: original for current, original in upgraded.items() if current != original}


def renamed(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(key, key): value for key, value in state.items()}


def renamed_optimizer_state(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (DCP's) with those names renamed."""
    groups = [dict(group, params=[names.get(key, key) for key in group["params"]]) for group in state["param_groups"]]
    return {"state": renamed(state["state"], names), "param_groups": groups}


def load_full(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors, read by every process, into this process's shards of a sharded module."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def read_sharded_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) model or EMA tensors of a sharded checkpoint, read in this one process."""
    prefix = f"{name}."
    entries = MetadataReader(folder).read_metadata().state_dict_metadata
    state = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items() if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"sharded checkpoint {folder} holds no {name!r} tensors")
    with warnings.catch_warnings():  # DCP says that it assumes one process: so it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({name: state}, storage_reader=MetadataReader(folder), no_dist=True)
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
    check_writable_folder(folder, "the checkpoint folder")
    files = [f"{name}.safetensors" for name in WEIGHTS]
    for name, file in zip(WEIGHTS, files):
        save_state_dict(read_sharded_weights(folder, name), folder / file)
    add_to_manifest(folder, files)
    return folder
