"""The run folder: config files, step checkpoints written atomically with a manifest, retention, finding the newest
intact one or a named one.

    RUN/config.gin, RUN/config.json, RUN/metrics.jsonl, RUN/logs/ (TensorBoard), RUN/samples/
    RUN/checkpoints/step_0000100/{model,ema}.safetensors, training_state.pt, rng_rank{r}.pt, manifest.json
    (sharded, Trainer.strategy = 'fsdp': .metadata and __{r}_0.distcp instead of the safetensors; sprint_mm.sharded)

The manifest lists every file of the checkpoint with its size and sha256, the step, the number of processes and a
hash of the run's config.gin; it is written last, so a folder whose files do not match it is damaged (a truncated
or missing file). A folder without a manifest is damaged too, unless it is one written before manifests existed:
those have every file the versions of that time wrote (`PRE_MANIFEST_FILES`), are never sharded (sharding came after
manifests), and their run has no checkpoint with a manifest; they are accepted unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import gin

from sprint_mm.checkpoints import atomic_write

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's files (sprint_mm.sharded)
# What every checkpoint held before manifests existed
PRE_MANIFEST_FILES = ("model.safetensors", "ema.safetensors", "training_state.pt", "rng_rank0.pt")
STAGING = re.compile(r"^\.step_\d{7,}\.partial$")
CONFIG_HISTORY = "config_history"


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files do not match its manifest."""


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that holds something other than data (a pickle that would run code): refused, not read."""


def write_run_configs(run_dir: str | os.PathLike, facts: dict[str, Any]) -> None:
    """The run's operative gin configuration (`config.gin`, read back by resume and `sample.py`) and a plain
    `config.json`: its bindings line by line and the `facts` the trainer gives (model, sizes, processes, ...)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    bindings = gin.config_str()
    (run_dir / "config.gin").write_text(bindings)
    (run_dir / "config.json").write_text(json.dumps({"gin_bindings": bindings.splitlines(), **facts}, indent=2))


def remove_staging_folders(run_dir: str | os.PathLike) -> list[str]:
    """Remove the hidden staging folders a killed checkpoint write left (they hold space and nothing to resume);
    returns their names. Only the process that holds the run's lock may call it."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted(p for p in folder.iterdir() if STAGING.match(p.name)) if folder.is_dir() else []
    for path in found:
        shutil.rmtree(path)
    return [path.name for path in found]


def archive_config(run_dir: Path, step: int) -> Path:
    """Keep the config.gin that trained a run up to `step` (before a resume changes it) in config_history/."""
    target = run_dir / CONFIG_HISTORY / f"until_{checkpoint_name(step)}.gin"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(run_dir / "config.gin", target)
    return target


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
    if run_dir.is_file():
        raise ValueError(f"run folder {str(run_dir)!r} is a file, not a run folder (config.gin and checkpoints/)")
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
    if (source / file).is_file() or (source / DCP_METADATA).is_file():  # a sharded one consolidates on reading
        return verify_checkpoint(source) / file
    if source.is_dir():
        return verify_checkpoint(find_checkpoint(source)) / file
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


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, int | str]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def store_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def write_manifest(folder: Path, step: int, world_size: int, config_text: str) -> None:
    """Describe every file of a fully written checkpoint folder (before it is published)."""
    files = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    store_manifest(folder, {"step": step, "world_size": world_size,
                            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(), "files": files})


def add_to_manifest(folder: Path, names: list[str]) -> None:
    """List files added to a published checkpoint (e.g. consolidated weights) in its manifest, if it has one."""
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"].update({name: file_entry(folder / name) for name in names})
        store_manifest(folder, manifest)


def unverified_problems(folder: Path) -> list[str]:
    """Why a checkpoint folder without a manifest is damaged, or [] for one written before manifests existed."""
    with_manifest = [p.name for p in folder.parent.iterdir()
                     if p != folder and CHECKPOINT_PATTERN.match(p.name) and (p / MANIFEST).is_file()]
    if with_manifest:
        return [f"{MANIFEST} is missing, though the run's other checkpoints ({', '.join(sorted(with_manifest))}) "
                "have one"]
    if (folder / DCP_METADATA).is_file():
        return [f"{MANIFEST} is missing (sharded checkpoints are always published with one)"]
    missing = [name for name in PRE_MANIFEST_FILES if not (folder / name).is_file()]
    return [f"{MANIFEST} is missing and so is {', '.join(missing)}"] if missing else []


def checkpoint_problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest: [] when intact (or written before manifests)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return unverified_problems(folder)
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        return [f"{MANIFEST} is unreadable ({err})"]
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}")
        elif file_sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def verify_checkpoint(folder: Path) -> Path:
    """The folder, or a DamagedCheckpoint error that says what is wrong and which intact checkpoints the run has."""
    problems = checkpoint_problems(folder)
    if problems:
        intact = [checkpoint_step(p) for p in list_checkpoints(folder.parent.parent) if not checkpoint_problems(p)]
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged ({'; '.join(problems)}); intact checkpoints of this "
                                f"run: {intact or 'none'}")
    return folder


def newest_intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint whose files match its manifest (None if the run has none) and a line for every newer,
    damaged one that was passed over."""
    passed_over = []
    for folder in reversed(list_checkpoints(run_dir)):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, passed_over
        passed_over.append(f"checkpoint {folder.name} is damaged ({'; '.join(problems)})")
    return None, passed_over
