"""Bad data: items that fail to decode or hold wrong values are skipped, counted and reported, never trained on.

Three parts, one per layer of the data path:

- a dataset's `__getitem__` raises `BadItem(kind, path, reason)` for an item it cannot use (a file no decoder reads,
  an empty file, a shape unlike the dataset's others, non-finite values); every other exception is a real error;
- `SkippingDataset(dataset)` turns that into a substitute: item i that is bad gives item i+1 (or the next good one,
  wrapping around) and carries the records of the bad items it passed under `BAD_ITEMS`, so the records travel with
  the batch out of DataLoader workers and counts do not depend on the number of workers;
- `BadDataLedger` sums the records of every batch, gives the counts to log, and stops the run once the bad fraction
  of the items read exceeds `max_bad_fraction`, naming examples.
"""
from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple, TypeVar

import gin
from torch.utils.data import Dataset, default_collate

KINDS = ("image", "video", "latent", "caption", "shard")
BAD_ITEMS = "bad_items"  # the item and batch key that holds the records of the bad items passed
EXAMPLES = 5  # how many bad items an error or summary names

T = TypeVar("T")


class BadItem(ValueError):
    """One item of a dataset cannot be used; `kind` says what the dataset holds, `path` names the bad file (or row)."""

    def __init__(self, kind: str, path: str | os.PathLike, reason: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"bad item kind {kind!r} is not one of {KINDS}")
        # args are the constructor's arguments, so the exception pickles across DataLoader workers.
        super().__init__(kind, str(path), reason)
        self.kind, self.path, self.reason = kind, str(path), reason

    def __str__(self) -> str:
        return f"bad {self.kind} {self.path}: {self.reason}"


class BadRecord(NamedTuple):
    """A bad item that `SkippingDataset` passed: `offset` is its distance past the requested index (0: the requested
    item itself was bad and the batch holds a substitute)."""

    kind: str
    path: str
    reason: str
    offset: int


class BadDataError(ValueError):
    """The run stops because of bad data: too much of it, or nothing else. A ValueError, so that a command line
    reports it in one line, as it does a user's other mistakes (`sprint_mm.errors`)."""


def describe(records: Iterable[tuple], limit: int = EXAMPLES) -> str:
    """'path (kind: reason); ...' for the first `limit` distinct bad files among `records`."""
    shown = list({(kind, path): reason for kind, path, reason, *_ in records}.items())
    text = "; ".join(f"{path} ({kind}: {reason})" for (kind, path), reason in shown[:limit])
    return text + (f"; and {len(shown) - limit} more" if len(shown) > limit else "")


class SkippingDataset(Dataset):
    """`dataset` with bad items replaced by the next good one: item i is `dataset[i]`, or, when that raises `BadItem`,
    `dataset[i + 1]`, `dataset[i + 2]`, ... (modulo the length), plus `BAD_ITEMS`: the `BadRecord`s of the items passed.

    The same index always gives the same item (for the same RNG state), so a resumed run reads what an uninterrupted
    one would. Items must be dicts. Batch with `collate`: it batches the items with the dataset's own `collate` if it
    has one (else torch's default) and joins the records of the batch into one list. A dataset with no good item at
    all raises `BadDataError` after trying every index.

    A dataset may choose the substitutes itself: `dataset.substitutes(i)` gives the indices to try, in order, from
    i itself (`BucketedDataset` keeps the substitute in i's bucket, so a batch keeps one shape).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self.dataset)
        if not 0 <= index < count:  # also ends a plain `for item in dataset` loop
            raise IndexError(f"index {index} is out of range for {count} items")
        substitutes = getattr(self.dataset, "substitutes", None)
        order = substitutes(index) if substitutes is not None else ((index + step) % count for step in range(count))
        records: list[BadRecord] = []
        for offset, candidate in enumerate(order):
            try:
                item = self.dataset[candidate]
            except BadItem as bad:
                records.append(BadRecord(bad.kind, bad.path, bad.reason, offset))
                continue
            if not isinstance(item, dict):
                raise TypeError(f"SkippingDataset needs dict items, {type(self.dataset).__name__} gave a "
                                f"{type(item).__name__}")
            return {**item, BAD_ITEMS: records}
        among = "" if substitutes is None else f" that may replace item {index}"
        raise BadDataError(f"no item of the {len(records)} in {type(self.dataset).__name__}{among} can be read: "
                           f"{describe(records)}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch_items = getattr(self.dataset, "collate", None) or default_collate
        batch = batch_items([{key: value for key, value in item.items() if key != BAD_ITEMS} for item in items])
        batch[BAD_ITEMS] = [record for item in items for record in item[BAD_ITEMS]]
        return batch


@gin.configurable
class BadDataLedger:
    """The bad items of a run: fed each micro-batch's records, it gives counts to log and stops a run with too many.

    The bad fraction read is (requested items that were bad) / (items delivered): each bad item an index asked for
    counts once, under its kind, and was replaced by a good one; further bad items a replacement passed on the way
    (`offset` > 0) are named in reports but counted when their own index is requested. Over an epoch that is exactly
    the share of bad files. Items a bucketed dataset leaves out because their size cannot be read (`left_out`) are
    never requested: their share of the listed items is known at start and adds to it, so a bucket run stops on bad
    data as a plain run does. `check` raises `BadDataError` once the fraction exceeds `max_bad_fraction`, judged only
    after `min_items` items, so one bad file in the first batch does not stop a run.

    Counts are global over the processes: `share` adds the other processes' counts (every process calls it at the
    same point), so every process judges the same fraction and stops at the same step. A checkpoint holds the global
    counts (`state_dict`), and a resumed run continues from them on any number of processes.
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_items: int = 50) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        if min_items < 1:
            raise ValueError(f"min_items must be >= 1, got {min_items}")
        self.max_bad_fraction, self.min_items = max_bad_fraction, min_items
        self.items, self.bad = 0, Counter()  # this process's, since it started
        self.restored_items, self.restored_bad = 0, Counter()  # every process's, up to the resumed checkpoint
        self.elsewhere_items, self.elsewhere_bad = 0, Counter()  # the other processes', as of the last `share`
        self.left_out, self.listed = Counter(), 0  # items with no readable size, of how many listed
        self.examples: list[BadRecord] = []  # the first EXAMPLES distinct bad files

    def add(self, records: Iterable[tuple], items: int) -> None:
        """Count one batch: its `BAD_ITEMS` records and the number of items it holds."""
        records = [BadRecord(*record) for record in records]
        requested = Counter(record.kind for record in records if record.offset == 0)
        if items < sum(requested.values()):
            raise ValueError(f"a batch of {items} items cannot hold substitutes for {sum(requested.values())} bad ones")
        self.items += items
        self.bad += requested
        self._remember(records)

    def add_left_out(self, records: Iterable[tuple], listed: int) -> None:
        """The items a dataset of `listed` items leaves out before training (their size cannot be read); every
        process reads the same list, so these are not summed over processes."""
        records = [BadRecord(*record[:3], 0) for record in records]
        self.left_out, self.listed = Counter(record.kind for record in records), listed
        self._remember(records)

    def _remember(self, records: list[BadRecord]) -> None:
        known = {(record.kind, record.path) for record in self.examples}
        for record in records:
            if len(self.examples) < EXAMPLES and (record.kind, record.path) not in known:
                self.examples.append(record)
                known.add((record.kind, record.path))

    def local_counts(self) -> list[float]:
        """This process's counts as numbers to sum over processes: items, then bad items per kind of KINDS."""
        return [float(self.items), *(float(self.bad[kind]) for kind in KINDS)]

    def share(self, summed: list[float]) -> None:
        """Take the sum of every process's `local_counts` (the others' are the difference to this one's)."""
        mine = self.local_counts()
        self.elsewhere_items = round(summed[0] - mine[0])
        self.elsewhere_bad = Counter({kind: round(total - own) for kind, total, own in zip(KINDS, summed[1:], mine[1:])
                                      if round(total - own)})

    @property
    def total_items(self) -> int:
        return self.restored_items + self.elsewhere_items + self.items

    @property
    def total_bad(self) -> Counter:
        return self.restored_bad + self.elsewhere_bad + self.bad

    @property
    def bad_fraction(self) -> float:
        """The share of bad items: left out at start, plus bad among those read from the rest."""
        left_out = sum(self.left_out.values()) / self.listed if self.listed else 0.0
        read = sum(self.total_bad.values()) / self.total_items if self.total_items else 0.0
        return left_out + (1.0 - left_out) * read

    def metrics(self) -> dict[str, float]:
        """`bad_fraction` and `bad_<kind>` (bad requested items so far, over every process, and items left out) for
        every kind seen."""
        counts = self.total_bad + self.left_out
        return {"bad_fraction": self.bad_fraction, **{f"bad_{kind}": count for kind, count in sorted(counts.items())}}

    def summary(self) -> str:
        """One line for a log: the counts and examples; empty while nothing was bad."""
        parts = []
        if self.total_bad:
            counts = ", ".join(f"{kind} {count}" for kind, count in sorted(self.total_bad.items()))
            read = sum(self.total_bad.values()) / self.total_items
            parts.append(f"{sum(self.total_bad.values())} of {self.total_items} items read were bad ({read:.2%}; "
                         f"{counts}), each replaced by the next good item")
        if self.left_out:
            counts = ", ".join(f"{kind} {count}" for kind, count in sorted(self.left_out.items()))
            parts.append(f"{sum(self.left_out.values())} of {self.listed} items were left out before training, their "
                         f"size unreadable ({counts}): {self.bad_fraction:.2%} bad in all")
        return f"{'; '.join(parts)}; e.g. {describe(self.examples)}" if parts else ""

    def check(self) -> None:
        """Raise `BadDataError` if more than `max_bad_fraction` of at least `min_items` items were bad."""
        judged = self.total_items >= self.min_items or (self.left_out and self.listed >= self.min_items)
        if judged and self.bad_fraction > self.max_bad_fraction:
            above = math.ceil(self.bad_fraction * 100) / 100  # the next whole percent
            raise BadDataError(
                f"too much bad data: {self.summary()}. The limit is BadDataLedger.max_bad_fraction = "
                f"{self.max_bad_fraction}: fix or remove these files, or raise the limit (e.g. "
                f"--gin_param 'BadDataLedger.max_bad_fraction = {above:g}')"
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready counts over every process (as of the last `share`), so a resumed run continues them."""
        return {"items": self.total_items, "bad": dict(self.total_bad),
                "examples": [list(record) for record in self.examples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored_items, self.restored_bad = state["items"], Counter(state["bad"])
        self.items, self.bad, self.elsewhere_items, self.elsewhere_bad = 0, Counter(), 0, Counter()
        self.examples = [BadRecord(*record) for record in state["examples"]]


def call_with_timeout(function: Callable[[], T], timeout: float | None) -> T:
    """`function()`, or `TimeoutError` once it has run `timeout` seconds (None: no limit).

    The call runs in a daemon thread that is abandoned on timeout: a thread cannot be stopped, so a hung call holds
    its thread (not the caller, not the exit of the process) until it returns. Its exceptions reach the caller.
    """
    if timeout is None:
        return function()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="sprint_mm-timed-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
