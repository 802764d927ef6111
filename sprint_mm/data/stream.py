"""A resumable, sharded, endless stream of dataset indices: epoch e is a permutation seeded by (seed, e)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class IndexStream(Sampler[int]):
    """Yields this rank's share of the global index stream, starting after `start` indices of the share.

    The global stream is the concatenation of per-epoch permutations; rank r takes every world-th index from r,
    so the data position of a run is one number (indices consumed per rank) and resume is exact.
    """

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError(f"the dataset is empty (size {dataset_size}); nothing to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, {world_size})")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def _epoch(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        position = self.rank + self.start * self.world_size  # position in the global stream
        epoch, offset = divmod(position, self.dataset_size)
        order = self._epoch(epoch)
        while True:
            while offset >= self.dataset_size:
                epoch, offset = epoch + 1, offset - self.dataset_size
                order = self._epoch(epoch)
            yield int(order[offset])
            offset += self.world_size

    def __len__(self) -> int:  # endless; DataLoader only needs a length for progress estimates
        return 2**62
