"""The two-process half of tests/test_distributed.py's shard test, and the hook both halves record their items with.

    python -m torch.distributed.run --nproc_per_node 2 tests/shard_worker.py ROOT

trains ROOT/resumed for 4 steps on the shard set ROOT/shards with two processes, each recording the items it reads in
ROOT/two.rank{r}.jsonl; the test resumes that run on one process.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from sprint_mm.configs import parse_gin
from sprint_mm.data.stream import DataStream
from sprint_mm.parallelize import end_processes
from sprint_mm.training import Trainer
from tests.test_training import STAGE1, TINY

RECORDING: dict[str, Path] = {}  # "prefix": where the hook appends (ROOT/NAME, one file per process)


def recording_next_batch(read):
    """`DataStream.next_batch` that also appends the sorted hashes of the micro-batch's rows to
    RECORDING['prefix'].rank{r}.jsonl, one line per micro-batch."""

    def next_batch(self: DataStream) -> dict:
        batch = read(self)
        rows = sorted(hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in batch["x"])
        path = Path(f"{RECORDING['prefix']}.rank{self.accelerator.process_index}.jsonl")
        with open(path, "a") as file:
            file.write(json.dumps(rows) + "\n")
        return batch

    return next_batch


def recorded(prefix: Path, rank: int = 0) -> list[list[str]]:
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()]


def train_on_shards(root: Path, run: str, steps: int) -> None:
    data = ["Trainer.dataset = @ShardDataset()", f"ShardDataset.root = '{root / 'shards'}'",
            "ShardDataset.shuffle_window = 2", "Trainer.num_threads = 1"]
    parse_gin([STAGE1], TINY + data + [f"Trainer.max_steps = {steps}", f"Trainer.run_dir = '{root / run}'"])
    Trainer().run()


if __name__ == "__main__":
    ROOT = Path(sys.argv[1])
    RECORDING["prefix"] = ROOT / "two"
    DataStream.next_batch = recording_next_batch(DataStream.next_batch)
    train_on_shards(ROOT, "resumed", 4)
    end_processes(0)
