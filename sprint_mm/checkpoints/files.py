"""Checkpoint files: atomic safetensors writes, and reading a state dict with training wrapper prefixes removed."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# `module.` from DDP and `_orig_mod.` from torch.compile, anywhere in a key (per-block compile puts it mid-key).
# The look-behind does not consume the dot, so stacked wrappers (`module._orig_mod.`) all go.
WRAPPER_PREFIXES = re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod)\.")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path) then rename over `path`, so a stop at any moment never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from a teammate's account
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write tensors as safetensors atomically (contiguous CPU copies; shared storage is fine)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def folder_hint(path: Path) -> str:
    """What to give instead of a folder: a checkpoint folder's weights file, or its consolidation first."""
    if (path / ".metadata").is_file() or any(path.glob("*.distcp")):
        return (f"{str(path)!r} is a sharded checkpoint folder (FSDP): write its full weights first with `python "
                f"consolidate_checkpoint.py RUN --step N`, then give {str(path / 'ema.safetensors')!r} (or "
                "model.safetensors)")
    weights = [name for name in ("ema.safetensors", "model.safetensors") if (path / name).is_file()]
    if weights:
        return f"{str(path)!r} is a checkpoint folder: give one of its files, e.g. {str(path / weights[0])!r}"
    return f"{str(path)!r} is a folder, not a checkpoint file (.safetensors, .pt, .pth or .bin)"


def clean_key(key: str) -> str:
    """`key` without the DDP / torch.compile wrapper prefixes, wherever they stand."""
    return WRAPPER_PREFIXES.sub("", key)


def read_state_dict(path: str | os.PathLike, entry: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch file; `entry` picks a sub-dict such as "ema" of a training checkpoint.
    Wrapper prefixes (`module.`, `_orig_mod.`) are removed wherever they stand. A file that cannot be read as either
    (damaged, truncated, random bytes, a pickle of other objects) is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(folder_hint(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # SiT/REPA training checkpoints carry their argparse Namespace beside the tensors.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (weights only: tensors and plain data)"
        text = str(error).split("WeightsUnpickler error:", 1)[-1]  # past torch's advice to load it unsafely
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:200]
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read as a {kind} file ({type(error).__name__}: "
                         f"{reason}): it is damaged, truncated or of another format") from None
    if entry is not None:
        if not isinstance(state, dict) or entry not in state:
            keys = list(state)[:10] if isinstance(state, dict) else type(state).__name__
            raise KeyError(f"checkpoint {str(path)!r} has no entry {entry!r}; its top-level keys: {keys}")
        state = state[entry]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a flat state dict of tensors; "
            "pass entry='ema' or entry='model' for a training checkpoint"
        )
    return {clean_key(k): v for k, v in state.items()}
