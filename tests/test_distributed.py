"""Two real processes on the CPU (torchrun + accelerate): training, resume and sharded sampling."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sprint_mm.cli import sample_main
from sprint_mm.runs import list_checkpoints
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, processes: str = "2") -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", processes, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def train_args(run_dir: Path, steps: int) -> list[str]:
    args = ["train.py", "--gin_file", "gin/image/digits_stage1.gin", "--run_dir", str(run_dir)]
    for p in TINY + [f"Trainer.max_steps = {steps}"]:
        args += ["--gin_param", p]
    return args


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_process_training_resume_and_sampling(tmp_path):
    run = tmp_path / "run"
    done = torchrun(*train_args(run, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    first = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert sorted(p.name for p in list_checkpoints(run)[-1].glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    done = torchrun(*train_args(run, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout + done.stderr
    second = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)

    # Each process samples its share; the result equals a single-process run (one noise stream, ODE sampler).
    shared, single = tmp_path / "two.npz", tmp_path / "one.npz"
    common = ["--run_dir", str(run), "--num_samples", "5", "--steps", "2", "--guidance", "pdg", "--scale", "2.0", "--solver", "euler"]
    done = torchrun("sample.py", *common, "--out", str(shared))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sample_main([*common, "--out", str(single)]) == 0
    a, b = np.load(shared)["arr_0"], np.load(single)["arr_0"]
    assert a.shape == (5, 8, 8, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float reductions may differ by one level
    assert not list(tmp_path.glob(".two.npz.part*"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_ddp_runs_a_static_graph_when_whole_micro_batches_skip_the_middle(tmp_path):
    """One row per process and path drop 0.5: some steps every row of a process skips the middle blocks, others
    none. DDP runs with static_graph and no unused-parameter scan, which fails if a parameter leaves the graph."""
    args = train_args(tmp_path / "run", 8)
    args += ["--gin_param", "Trainer.batch_size = 2", "--gin_param", "FlowMatching.path_drop = 0.5",
             "--gin_param", "Trainer.log_every = 1"]
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(str(list_checkpoints(tmp_path / "run")[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_a_run_on_shards_resumed_on_another_process_count_reads_the_same_global_sequence_of_items(tmp_path,
                                                                                                monkeypatch):
    from sprint_mm.data.digits import DigitsDataset
    from sprint_mm.data.shard_writer import write_shards
    from sprint_mm.data.stream import DataStream
    from tests import shard_worker

    assert write_shards(DigitsDataset(resolution=8, split="test"), tmp_path / "shards", 120, progress=False).complete
    done = torchrun("tests/shard_worker.py", str(tmp_path))  # two processes, steps 1-4, checkpoint at step 4
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setattr(DataStream, "next_batch", shard_worker.recording_next_batch(DataStream.next_batch))
    monkeypatch.setitem(shard_worker.RECORDING, "prefix", tmp_path / "one")
    shard_worker.train_on_shards(tmp_path, "resumed", 8)  # one process, steps 5-8
    monkeypatch.setitem(shard_worker.RECORDING, "prefix", tmp_path / "straight")
    shard_worker.train_on_shards(tmp_path, "straight", 8)  # one process, never stopped
    straight = shard_worker.recorded(tmp_path / "straight")
    two = [sorted(a + b) for a, b in zip(*(shard_worker.recorded(tmp_path / "two", rank) for rank in (0, 1)))]
    assert [len(rows) for rows in straight] == [8] * 8 and len(two) == 4
    assert two + shard_worker.recorded(tmp_path / "one") == straight
    assert len({row for rows in straight for row in rows}) == 64  # 64 distinct items: the hashes tell them apart
