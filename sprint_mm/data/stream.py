"""The data a run trains on, as a stream that owns its position: the plain index stream (epoch e a permutation
seeded by (seed, e)) or buckets, read by a DataLoader from the position of any step, with bad items counted."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler

from sprint_mm.data.bucket_sampler import BucketBatchSampler
from sprint_mm.data.buckets import BucketedDataset, BucketTable
from sprint_mm.data.faults import BAD_ITEMS, BadDataLedger, SkippingDataset
from sprint_mm.data.shard_dataset import ShardDataset
from sprint_mm.errors import check_number

SHOWN_SIZES = 5  # how many item sizes an error names


EpochOrder = Callable[[int, int], torch.Tensor]  # (seed, epoch) -> a permutation of the dataset's indices


def random_order(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The plain stream's epoch: a uniform permutation seeded by (seed, epoch)."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class IndexStream(Sampler[int]):
    """Yields this rank's share of the global index stream, starting after `start` indices of the share.

    The global stream is the concatenation of per-epoch permutations (`order(seed, epoch)`, by default
    `random_order`); rank r takes every world-th index from r, so the data position of a run is one number (indices
    consumed per rank) and resume is exact.
    """

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 order: Optional[EpochOrder] = None) -> None:
        if dataset_size < 1:
            raise ValueError(f"the dataset is empty (size {dataset_size}); nothing to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, {world_size})")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.order = order or partial(random_order, dataset_size)

    def _epoch(self, epoch: int) -> torch.Tensor:
        order = self.order(self.seed, epoch)
        if order.shape != (self.dataset_size,):
            raise ValueError(f"an epoch order must hold each of the {self.dataset_size} indices once, got a tensor of "
                             f"shape {tuple(order.shape)}")
        return order

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


@dataclass(frozen=True)
class Batching:
    """How a run batches its data (the `Trainer` options of the same names): `batch_size` is global, split over the
    processes and `grad_accum` micro-batches; `num_workers` DataLoader workers; `seed` orders the data."""

    batch_size: int = 256
    grad_accum: int = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("num_workers", 0), ("seed", None)):
            check_number(f"Trainer.{name}", getattr(self, name), low=low, integer=True)


@dataclass(frozen=True)
class DataShare:
    """Which share of every global batch a process reads: `count` equal shares, one per data-parallel group; this
    process reads share `index`. The processes of a context group read the same share (they spread its tokens)."""

    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, accelerator: Accelerator) -> DataShare:
        """One share per process: no context parallelism."""
        return cls(accelerator.process_index, accelerator.num_processes)


class DataStream:
    """The micro-batches one process trains on, from the data position of any step on.

    The position is a function of the step (`position`), so a checkpoint's step says where the data continues, on
    the same or another number of processes; `fingerprint` says what the position refers to (None: the plain index
    stream, whose position means the same on any data). Bad items are replaced by the next good one and counted in
    `ledger` (a part of the checkpoint), which stops the run past its limit.
    """

    def __init__(self, dataset: Dataset, batching: Batching, accelerator: Accelerator,
                 share: Optional[DataShare] = None) -> None:
        self.dataset, self.batching, self.accelerator = dataset, batching, accelerator
        self.share = share or DataShare.of(accelerator)
        self.data: Dataset = dataset  # what the loader reads (bucketed in BucketStream)
        self.ledger = BadDataLedger()
        self._loader: Optional[Iterator[dict]] = None
        split = self.share.count * batching.grad_accum
        if batching.batch_size % split:
            groups = ("processes" if self.share.count == accelerator.num_processes
                      else "data-parallel groups (processes / Trainer.context_parallel)")
            raise ValueError(f"batch_size {batching.batch_size} must be divisible by {groups} "
                             f"({self.share.count}) x grad_accum ({batching.grad_accum})")
        self.micro_batch: Optional[int] = batching.batch_size // split

    # ------------------------------------------------------------------ what the position means
    def position(self, step: int) -> int:
        """Dataset indices this process has consumed after `step` steps. Times the number of shares (data-parallel
        groups) it is the global position, step x batch_size, so a run resumed on another number of processes or
        another context size reads the same global sequence of samples (each global batch split anew)."""
        return step * self.batching.grad_accum * self.micro_batch

    def fingerprint(self) -> Optional[dict[str, Any]]:
        return None

    def label(self, step: int) -> Optional[str]:
        """What the batch of `step` is, for per-bucket metrics (None: one kind of batch)."""
        return None

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"data_position": self.position(step), "data": self.fingerprint(), "bad_data": self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue a checkpoint's counts; refuse data whose position would now point at other items."""
        saved, now = (state.get("data") if step > 0 else None), self.fingerprint()
        if step > 0 and stream_kind(saved) != stream_kind(now):
            raise ValueError(f"this run was trained on {stream_kind(saved)} up to step {step} and now resumes on "
                             f"{stream_kind(now)}, which would read other items at this position: keep its "
                             "configuration, or start a new run with Trainer.init_from = <this run>")
        if saved is not None:
            self.check_resumable(saved)
        if "bad_data" in state:  # checkpoints written before bad data was counted have none
            self.ledger.load_state_dict(state["bad_data"])

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """Raise a ValueError when the data changed since `saved` (a `fingerprint()`) was written."""
        if saved != self.fingerprint():
            raise ValueError(f"the data changed since this run's checkpoint ({saved} then, {self.fingerprint()} now): "
                             "resuming would read other items at this position; restore it, or start a new run with "
                             "Trainer.init_from = <this run>")

    # ------------------------------------------------------------------ the model it feeds
    def check_fits(self, backbone: torch.nn.Module) -> None:
        """Refuse data the model is not built for: more classes than the model has (the extra ids would train as the
        null class) and items of another shape than the model samples (it would train at one size and sample at
        another). The first good item is read as training reads it, leaving the RNG as it was."""
        classes = getattr(self.data, "num_classes", None)
        condition = backbone.condition
        if condition.kind == "class" and classes is not None and classes > condition.num_classes:
            raise ValueError(f"the dataset has {classes} classes but the model {condition.num_classes} "
                             f"(the backbone's num_classes), whose labels lie in [0, {condition.num_classes}): "
                             f"set num_classes to at least {classes}")
        self._check_shapes(backbone)

    def _check_shapes(self, backbone: torch.nn.Module) -> None:
        item = self.first_item_shape(0)
        if item != tuple(backbone.sample_shape):
            raise ValueError(f"the dataset's items have shape {item} but the model takes {tuple(backbone.sample_shape)} "
                             "(C, [T,] H, W): make the dataset's size and channels match the backbone's input_size "
                             "and in_channels")

    def sample_shapes(self, backbone: torch.nn.Module) -> list[tuple[int, ...]]:
        """The sample shapes (C, [T,] H, W) the model trains on: the configured one."""
        return [tuple(backbone.sample_shape)]

    def first_item_shape(self, index: int) -> tuple[int, ...]:
        with torch.random.fork_rng(devices=[]):
            return tuple(SkippingDataset(self.data)[index]["x"].shape)

    # ------------------------------------------------------------------ the batches
    def start(self, step: int) -> None:
        """Read from the data position of `step` on."""
        data = SkippingDataset(self.data)  # a bad item is replaced by the next good one, and reported
        self._loader = iter(DataLoader(
            data, **self._batching(step), num_workers=self.batching.num_workers, collate_fn=data.collate,
            generator=torch.Generator().manual_seed(self.batching.seed),  # keeps the global RNG untouched
            persistent_workers=self.batching.num_workers > 0, pin_memory=self.accelerator.device.type == "cuda"))

    def _batching(self, step: int) -> dict[str, Any]:
        sampler = IndexStream(len(self.data), self.batching.seed, self.share.index, self.share.count,
                              start=self.position(step), order=self.epoch_order())
        return {"batch_size": self.micro_batch, "drop_last": True, "sampler": sampler}

    def epoch_order(self) -> Optional[EpochOrder]:
        """The order of an epoch (None: `random_order`)."""
        return None

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch, its bad items counted over every process (and the run stopped past the ledger's
        limit, on every process at the same micro-batch)."""
        batch = next(self._loader)
        self.ledger.add(batch.pop(BAD_ITEMS), batch["x"].shape[0])
        if self.accelerator.num_processes > 1:
            counts = torch.tensor(self.ledger.local_counts(), dtype=torch.float64, device=self.accelerator.device)
            self.ledger.share(self.accelerator.reduce(counts, reduction="sum").tolist())
        self.ledger.check()
        return batch

    def describe(self) -> dict[str, Any]:
        """For the run's config.json."""
        return {"batch_size": self.batching.batch_size, "micro_batch": self.micro_batch, "buckets": None}


class BucketStream(DataStream):
    """Mixed sizes and durations: every item goes to its nearest bucket of `table` (resized and cropped to it), every
    step is one bucket's global batch (`Bucket.batch_size`, which replaces `batch_size`), and the sequence of batches
    depends only on (seed, step), so resume is exact on any number of processes. The fingerprint names the table and
    the item assignment: a run whose dataset or table changed since its checkpoint refuses to resume."""

    def __init__(self, dataset: Dataset, batching: Batching, accelerator: Accelerator, table: BucketTable,
                 share: Optional[DataShare] = None) -> None:
        self.dataset, self.batching, self.accelerator, self.table = dataset, batching, accelerator, table
        self.share = share or DataShare.of(accelerator)
        self.ledger = BadDataLedger()
        self._loader = None
        self.micro_batch = None  # each bucket has its own batch size (the sampler checks it divides)
        with accelerator.main_process_first():  # the main process writes the cached size index, the others read it
            self.data = BucketedDataset(dataset, table)
        self.ledger.add_left_out(self.data.unreadable, len(self.data))
        self.ledger.check()  # items whose size cannot be read: counted as bad data from the start
        self.sampler = BucketBatchSampler(self.data.bucket_of, table, batching.seed, self.share.index,
                                          self.share.count, batching.grad_accum)

    def position(self, step: int) -> int:
        return step  # global batches consumed: one per step

    def fingerprint(self) -> dict[str, Any]:
        """The sampler's (table and assignment), and a shard set's own (its content, which sizes alone miss)."""
        shards = {"shards": self.dataset.fingerprint()} if isinstance(self.dataset, ShardDataset) else {}
        return {**self.sampler.fingerprint(), **shards}

    def check_resumable(self, saved: dict[str, Any]) -> None:
        self.sampler.check_resumable(saved)
        if saved.get("shards") != self.fingerprint().get("shards"):
            raise ValueError(f"the shard set changed since this run's checkpoint ({saved.get('shards')} then, "
                             f"{self.fingerprint().get('shards')} now): resuming would read other items at this "
                             "position; restore it, or start a new run with Trainer.init_from = <this run>")

    def label(self, step: int) -> str:
        return "x".join(map(str, self.table[self.sampler.bucket_at(step)].shape))

    def _check_shapes(self, backbone: torch.nn.Module) -> None:
        """Every bucket that has items must be a shape the backbone takes: its patch divides it, an image model gets
        one-frame buckets only, and the first item of the bucket reads at the bucket's shape with the model's
        channels."""
        channels, image_model = backbone.sample_shape[0], len(backbone.sample_shape) == 3
        for number, (bucket, members) in enumerate(zip(self.table, self.data.members)):
            if not members:
                continue
            if image_model and bucket.frames != 1:
                raise ValueError(f"bucket {number} {bucket.shape} has {bucket.frames} frames but the model takes images "
                                 f"{tuple(backbone.sample_shape)}: use a video backbone or one-frame buckets")
            shape = (channels, *bucket.shape[1:]) if bucket.frames == 1 else (channels, *bucket.shape)
            backbone.token_grid((1, *shape))  # a size the patch does not divide is refused here, naming the patch
            item = self.first_item_shape(members[0])
            if item not in (shape, (channels, *bucket.shape)):
                raise ValueError(f"bucket {number} {bucket.shape} gives items of shape {item}, but the model takes "
                                 f"{shape} (C, [T,] H, W) there: make the dataset's channels match the backbone's "
                                 f"in_channels ({channels})")

    def sample_shapes(self, backbone: torch.nn.Module) -> list[tuple[int, ...]]:
        """The shapes of the buckets that have items, in the model's input layout."""
        channels = backbone.sample_shape[0]
        return [(channels, *bucket.shape[1:]) if bucket.frames == 1 else (channels, *bucket.shape)
                for bucket, members in zip(self.table, self.data.members) if members]

    def _batching(self, step: int) -> dict[str, Any]:
        self.sampler.start = self.position(step)
        return {"batch_sampler": self.sampler}

    def describe(self) -> dict[str, Any]:
        return {"batch_size": None, "micro_batch": None, "buckets": self.table.to_list()}


class ShardStream(DataStream):
    """A shard set (`ShardDataset`): the plain stream's position (step x batch_size items) over the set's own epoch
    order, which shuffles within windows of shards so that every process reads from the same few shards at a time.
    The fingerprint names the set (its index's sha256) and the window: a resume on other shards is refused."""

    def __init__(self, dataset: ShardDataset, batching: Batching, accelerator: Accelerator,
                 share: Optional[DataShare] = None) -> None:
        super().__init__(dataset, batching, accelerator, share)
        sizes = np.unique(dataset.sizes(), axis=0)
        if len(sizes) > 1:
            shown = ", ".join("x".join(map(str, size)) for size in sizes[:SHOWN_SIZES].tolist())
            raise ValueError(f"the shard set {dataset.shards.root} holds items of {len(sizes)} sizes (frames x height "
                             f"x width: {shown}{' ...' if len(sizes) > SHOWN_SIZES else ''}), which cannot share a "
                             "batch: train it with Trainer.buckets = @BucketTable()")

    def fingerprint(self) -> dict[str, Any]:
        return {"stream": "shards", **self.dataset.fingerprint()}

    def epoch_order(self) -> EpochOrder:
        return self.dataset.epoch_order


def stream_kind(fingerprint: Optional[dict[str, Any]]) -> str:
    """What a stream with this fingerprint reads, in words."""
    if fingerprint is None:
        return "a dataset read in a random order of its indices"
    return "a shard set" if fingerprint.get("stream") == "shards" else "Trainer.buckets"


def open_stream(dataset: Dataset, batching: Batching, accelerator: Accelerator,
                buckets: Optional[BucketTable] = None, share: Optional[DataShare] = None) -> DataStream:
    """The stream a run reads (this process's `share` of every global batch; default one share per process): from
    buckets when a table is given, else from a shard set, or plain."""
    if buckets is not None:
        return BucketStream(dataset, batching, accelerator, buckets, share)
    if isinstance(dataset, ShardDataset):
        return ShardStream(dataset, batching, accelerator, share)
    return DataStream(dataset, batching, accelerator, share)
