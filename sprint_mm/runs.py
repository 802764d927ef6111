"""The run folder: config files, step checkpoints written atomically, retention, finding the newest or a named one.

    RUN/config.gin, RUN/config.json, RUN/metrics.jsonl, RUN/logs/ (TensorBoard), RUN/samples/
    RUN/checkpoints/step_0000100/{model,ema}.safetensors, training_state.pt, rng_rank{r}.pt
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary folders of an interrupted write are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def find_checkpoint(run_dir: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The newest checkpoint of a run, or the one at `step`; clear errors when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"run folder {str(run_dir)!r} has no checkpoints under checkpoints/step_*/")
    if step is None:
        return checkpoints[-1]
    for path in checkpoints:
        if checkpoint_step(path) == step:
            return path
    raise FileNotFoundError(
        f"run {str(run_dir)!r} has no checkpoint at step {step}; available: {[checkpoint_step(p) for p in checkpoints]}"
    )


def resolve_weights(source: str | os.PathLike, file: str = "ema.safetensors") -> Path:
    """A weights file from a run folder (newest checkpoint), a checkpoint folder, or a file path."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / file).is_file():
        return source / file
    if source.is_dir():
        return find_checkpoint(source) / file
    raise FileNotFoundError(f"{str(source)!r} is neither a run folder, a checkpoint folder nor a weights file")


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh hidden folder to write a checkpoint into before it is renamed into place."""
    path = Path(run_dir) / "checkpoints" / f".{checkpoint_name(step)}.partial"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_checkpoint(staging: Path, step: int, keep: int) -> Path:
    """Rename a fully written staging folder into place, then drop the oldest beyond `keep`."""
    final = staging.parent / checkpoint_name(step)
    if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in list_checkpoints(staging.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final
