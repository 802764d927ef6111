"""Run folders are data, not code: a crafted file in a checkpoint is refused with one line and never runs, and
checkpoint files are readable by the user's group and others as the umask allows."""
from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

import consolidate_checkpoint
from sprint_mm.cli import sample_main
from sprint_mm.runs import MANIFEST, list_checkpoints, write_manifest
from tests import fsdp_worker
from tests.test_fsdp import own_process_group
from tests.test_training import train


class RunsCode:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, wrap=lambda payload: {"torch": payload}) -> None:
    """Replace `path` with a pickle that would create `marker`, and re-describe its checkpoint in the manifest (as an
    attacker would), so that only the file's content can give it away."""
    with open(path, "wb") as file:
        pickle.dump(wrap(RunsCode(marker)), file, protocol=2)  # as torch.save writes
    folder = path.parent
    manifest = json.loads((folder / MANIFEST).read_text())
    write_manifest(folder, manifest["step"], manifest["world_size"], (folder.parent.parent / "config.gin").read_text())


@pytest.mark.parametrize("file", ["rng_rank0.pt", "training_state.pt"])
def test_a_crafted_state_file_is_refused_on_resume_and_never_runs(tmp_path, capsys, file):
    run, marker = tmp_path / "run", tmp_path / "marker"
    assert train(run, 3) == 0
    target = list_checkpoints(run)[-1] / file
    craft(target, marker)
    capsys.readouterr()
    assert train(run, 5) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert len(err.splitlines()) == 1 and str(target) in err and "refusing to load it" in err
    assert "posix.system" in err  # what the file asked for


def test_an_rng_file_of_the_earlier_layout_still_resumes_bit_identically(tmp_path):
    """Checkpoints written before the RNG states became tensors held numpy's state as an array: read as data."""
    import random

    import numpy as np

    assert train(tmp_path / "straight", 5) == 0
    assert train(tmp_path / "resumed", 3) == 0
    folder = list_checkpoints(tmp_path / "resumed")[-1]
    from sprint_mm.checkpointer import read_rng_state, set_rng_state

    set_rng_state(read_rng_state(folder / "rng_rank0.pt"))
    earlier = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(earlier, folder / "rng_rank0.pt")
    write_manifest(folder, 3, 1, (tmp_path / "resumed" / "config.gin").read_text())
    assert train(tmp_path / "resumed", 5) == 0
    for name in ("model", "ema"):
        from safetensors.torch import load_file

        a = load_file(str(list_checkpoints(tmp_path / "straight")[-1] / f"{name}.safetensors"))
        b = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / f"{name}.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_crafted_sharded_index_is_refused_by_every_reader_and_never_runs(tmp_path, capsys):
    run, marker = tmp_path / "sharded", tmp_path / "marker"
    with own_process_group():
        fsdp_worker.train(run, 1)
    metadata = list_checkpoints(run)[-1] / ".metadata"
    craft(metadata, marker, wrap=lambda payload: payload)
    capsys.readouterr()
    assert sample_main(["--run", str(run), "--num", "1", "--steps", "1"]) == 2
    assert consolidate_checkpoint.main([str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert len(lines) == 2 and all(str(metadata) in line and "posix.system" in line for line in lines)


def test_checkpoint_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        assert train(tmp_path / "run", 1) == 0
    finally:
        os.umask(previous)
    folder = list_checkpoints(tmp_path / "run")[-1]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
