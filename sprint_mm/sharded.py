"""Sharded training (FSDP2) and its checkpoints (torch.distributed.checkpoint, DCP).

`shard` applies `fully_shard` per transformer block and at the root; the EMA is sharded the same way, so its local
shards line up with the model's and `update_ema` never gathers. A sharded checkpoint folder holds DCP's `.metadata`
and `__{rank}_{i}.distcp` files (model, EMA, optimizer) beside the usual training_state.pt and rng_rank{r}.pt; DCP
reshards on load, so a run resumes on another number of processes. `read_weights` consolidates a folder's model or
EMA in memory (no process group needed); `consolidate` writes them as the usual safetensors files.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sprint_mm.checkpoints import clean_key, read_state_dict, save_state_dict
from sprint_mm.runs import DCP_METADATA, add_to_manifest, find_checkpoint, verify_checkpoint

STRATEGIES = ("ddp", "fsdp")
WEIGHTS = ("model", "ema")


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process, where accelerate starts none: a private one-member group."""
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction under 'bf16'; fp32 throughout otherwise."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(module: torch.nn.Module, device: torch.device, policy: MixedPrecisionPolicy, cpu_offload: bool) -> None:
    """fully_shard every block of `module.backbone` and then the root, in place, over all processes.

    Gradients are averaged over the processes (tests/test_fsdp.py compares a two-process step with a one-process
    step: gloo's FSDP2 reduction has summed instead of averaged in some torch versions, pytorch issue 162338). A
    parameter without a gradient on one process reduces as zeros there, so the collectives of all processes match."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None  # pinning needs CUDA
    options = dict(mesh=mesh, mp_policy=policy, offload_policy=offload)
    for block in module.backbone.blocks:
        fully_shard(block, **options)
    fully_shard(module, **options)
    module.set_reduce_scatter_unused_params(True)


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
