"""Batches from buckets: a resumable, sharded, endless stream of global batches, each from one bucket.

The global batch sequence is a pure function of (seed, epoch), independent of the process count:

- per bucket, its items are permuted by a generator seeded from (seed, epoch, bucket), repeated or subsampled to
  round(weight * items) slots (independent permutations end to end, cut to length), and cut into global batches of
  the bucket's batch_size; the incomplete tail of each bucket (a different random few each epoch) sits out that
  epoch and is listed in `EpochPlan.left_out`;
- the batches of all buckets are put in an order drawn from (seed, epoch).

Every epoch has the same number of batches, so global batch `position` is batch `position % per_epoch` of epoch
`position // per_epoch`, and the data position of a run is one number: the global batches consumed. Each process
reads its contiguous share of every global batch (batch_size / world_size items), split into `grad_accum`
micro-batches in order, so the union of the shares is the global batch on any number of processes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch.utils.data import Sampler

from sprint_mm.data.buckets import BucketTable

RESTART_HINT = "restore it, or start a new run with Trainer.init_from = <old run>"


class EpochPlan(NamedTuple):
    """The global batches of one epoch as (bucket, items), in training order, and the items that sit it out."""

    batches: list[tuple[int, list[int]]]
    left_out: list[int]


def seed_of(*parts: int) -> int:
    """A 63-bit generator seed from integers; distinct tuples give unrelated streams."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BucketBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices) endlessly, from global batch `start` on.

    `bucket_of[i]` is item i's bucket in `table` (None: the item is in no bucket and never read). Every bucket's
    batch_size must divide by world_size * grad_accum, and every bucket with items must fill at least one batch
    per epoch.
    """

    def __init__(self, bucket_of: Sequence[Optional[int]], table: BucketTable, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, start: int = 0) -> None:
        for name, value, low in (("world_size", world_size, 1), ("grad_accum", grad_accum, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, {world_size})")
        self.table, self.seed, self.rank, self.world_size, self.grad_accum = table, seed, rank, world_size, grad_accum
        self.start = start
        self.bucket_of = list(bucket_of)
        self.members: list[list[int]] = [[] for _ in table]
        for index, bucket in enumerate(self.bucket_of):
            if bucket is None:
                continue
            if isinstance(bucket, bool) or not isinstance(bucket, int) or not 0 <= bucket < len(table):
                raise ValueError(f"item {index} is assigned to bucket {bucket!r}, but the table has buckets "
                                 f"0..{len(table) - 1}")
            self.members[bucket].append(index)
        self._check()
        self.slots = [round(bucket.weight * len(items)) for bucket, items in zip(table, self.members)]
        self.per_epoch = sum(slots // bucket.batch_size for slots, bucket in zip(self.slots, table))
        self._cached: tuple[int, EpochPlan] | None = None

    def _check(self) -> None:
        split = self.world_size * self.grad_accum
        for number, bucket in enumerate(self.table):
            if bucket.batch_size % split:
                raise ValueError(
                    f"bucket {number} {bucket.describe()}: its batch_size {bucket.batch_size} does not split over "
                    f"{self.world_size} process(es) x {self.grad_accum} accumulation step(s) = {split}: make every "
                    f"bucket's batch_size a multiple of {split}")
        if not any(self.members):
            raise ValueError(f"no item of the {len(self.bucket_of)} fits a bucket of the table {self.table.to_list()} "
                             "(an item needs a bucket with at most its frames; an image needs a 1-frame bucket): add "
                             "buckets that match the data's sizes")
        starved = [(number, bucket, len(items)) for number, (bucket, items) in enumerate(zip(self.table, self.members))
                   if items and round(bucket.weight * len(items)) < bucket.batch_size]
        listing = "; ".join(f"bucket {number} {bucket.describe()} has {count} item(s), {round(bucket.weight * count)} "
                            f"slot(s) per epoch" for number, bucket, count in starved)
        fix = "use a smaller batch_size, a higher weight, or remove the bucket"
        if len(starved) == sum(1 for items in self.members if items):
            raise ValueError(f"an epoch would have zero batches: no bucket fills one batch ({listing}); {fix} "
                             "(or add data)")
        if starved:
            raise ValueError(f"some buckets can never fill one batch, so their items would never train: {listing}; "
                             f"for each, {fix}")

    # ------------------------------------------------------------------------------------------ the plan
    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The global batches of `epoch` and the items left out of it: a pure function of (seed, epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        batches: list[tuple[int, list[int]]] = []
        left_out: list[int] = []
        for number, (bucket, items, slots) in enumerate(zip(self.table, self.members, self.slots)):
            if not items:
                continue
            generator = torch.Generator().manual_seed(seed_of(self.seed, epoch, number))
            copies = -(-slots // len(items))  # enough permutations to fill the slots
            order = torch.cat([torch.randperm(len(items), generator=generator) for _ in range(copies)])[:slots]
            chosen = [items[position] for position in order.tolist()]
            full = slots - slots % bucket.batch_size
            batches.extend((number, chosen[first:first + bucket.batch_size])
                           for first in range(0, full, bucket.batch_size))
            left_out.extend(chosen[full:])
        shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed_of(self.seed, epoch)))
        plan = EpochPlan([batches[position] for position in shuffle.tolist()], left_out)
        self._cached = (epoch, plan)
        return plan

    def global_batch(self, position: int) -> tuple[int, list[int]]:
        """(bucket, items) of global batch `position` (0-based, counted from the start of training)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be an int >= 0, got {position!r}")
        epoch, offset = divmod(position, self.per_epoch)
        return self.epoch_plan(epoch).batches[offset]

    def bucket_at(self, position: int) -> int:
        """The bucket global batch `position` comes from."""
        return self.global_batch(position)[0]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            _, items = self.global_batch(position)
            share = len(items) // self.world_size
            mine = items[self.rank * share:(self.rank + 1) * share]
            micro = share // self.grad_accum
            for first in range(0, share, micro):
                yield mine[first:first + micro]
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a length for progress estimates
        return 2**62

    # ------------------------------------------------------------------------------------------ resume
    def fingerprint(self) -> dict[str, Any]:
        """JSON-ready identity of what the batch sequence depends on besides (seed, epoch): the table and which item
        is in which bucket. A checkpoint stores it; `check_resumable` compares."""
        assignment = json.dumps([-1 if bucket is None else bucket for bucket in self.bucket_of]).encode()
        return {"items": len(self.bucket_of), "items_per_bucket": [len(items) for items in self.members],
                "bucket_of_sha256": hashlib.sha256(assignment).hexdigest(), "table": self.table.to_list()}

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """Raise a ValueError when the table or the dataset changed since `saved` (a `fingerprint()`) was written:
        the same position would then read other items."""
        keys = set(self.fingerprint())
        if not isinstance(saved, dict) or not keys <= set(saved):
            raise ValueError(f"the checkpoint's bucket fingerprint {saved!r} lacks {sorted(keys)}: it was not written "
                             "by BucketBatchSampler.fingerprint")
        now = self.fingerprint()
        if [list(row) for row in saved["table"]] != now["table"]:
            raise ValueError(f"the bucket table changed since this run's checkpoint: it was {saved['table']}, now "
                             f"{now['table']}; resuming would read other items at this position; {RESTART_HINT}")
        if saved["bucket_of_sha256"] != now["bucket_of_sha256"]:
            raise ValueError(
                f"the dataset changed since this run's checkpoint: it had {saved['items']} items, "
                f"{saved['items_per_bucket']} per bucket, now {now['items']}, {now['items_per_bucket']}"
                f"{' (same counts, other items)' if saved['items_per_bucket'] == now['items_per_bucket'] else ''}; "
                f"resuming would read other items at this position; {RESTART_HINT}")
