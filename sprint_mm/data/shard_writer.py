"""Writing shard sets (`sprint_mm.data.shards`): the items of any dataset, resumable, by any number of writers.

Shard k holds the source items [k * items_per_shard, (k + 1) * items_per_shard) that can be read, in order. Writer w
of n writes the shards k with k % n == w; each shard is written under a temporary name and renamed into place, then
recorded in `parts/` (its index rows and a JSON summary), which marks it done: a rerun skips it. The writer that
finds every shard done merges the parts into `index.npy`, `bad_items.jsonl` and, last, `manifest.json`, so a set
with a manifest is complete. `plan.json`, written first, holds the settings every writer of the set must share.

What is stored is what the dataset gives (`dataset[i]`), read under a seed of (seed, i), so every writer and every
rerun stores the same bytes; a dataset with a `record(i)` method gives that instead (the latent datasets give their
posterior moments, so that training draws a new sample of the posterior every time, as it does from the files). A
source item that raises `BadItem` is skipped, named in one line on stderr and in `bad_items.jsonl`, and counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from sprint_mm.data.bucket_sampler import seed_of
from sprint_mm.data.faults import BadItem
from sprint_mm.data.shards import (
    BAD_ITEMS_FILE, FORMAT, INDEX, INDEX_DTYPE, MANIFEST, PARTS, VERSION, checksum, encode_record, record_size,
    shard_name,
)
from sprint_mm.errors import check_number

PLAN = "plan.json"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIZE_PROBES = 8  # items read to estimate the items per shard of a shard size in bytes


@dataclass(frozen=True)
class WriteReport:
    """What one call of `write_shards` did: shards it wrote and found done, source items it skipped as corrupt, and
    whether the set is complete (its manifest written)."""

    written: int
    already_done: int
    bad_items: int
    complete: bool


def read_source_item(dataset: Dataset, index: int, seed: int) -> dict[str, Any]:
    """What the shards store for source item `index`: `dataset.record(index)` if the dataset has it, else
    `dataset[index]`, read under a torch seed of (seed, index) and leaving the caller's random state as it was."""
    record = getattr(dataset, "record", None)
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed_of(seed, index))  # the CPU generator only: torch.manual_seed is 70x slower
    try:
        item = record(index) if record is not None else dataset[index]
    finally:
        torch.set_rng_state(state)
    if not isinstance(item, dict):
        raise ValueError(f"{type(dataset).__name__} gives items of type {type(item).__name__}; a shard stores dicts")
    return item


def cast_floats(item: dict[str, Any], dtype: Optional[str]) -> dict[str, Any]:
    """The item with its floating-point tensors in `dtype` (one of FLOAT_DTYPES; None: as they are)."""
    if dtype is None:
        return item
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return {name: value.to(FLOAT_DTYPES[dtype]) if isinstance(value, torch.Tensor) and value.is_floating_point()
            else value for name, value in item.items()}


def field_types(item: dict[str, Any]) -> dict[str, str]:
    """The type of each field of an item ('tensor float32 3d', 'int', 'str', ...): items of one set share them."""
    return {name: f"tensor {str(value.dtype).replace('torch.', '')} {value.dim()}d" if isinstance(value, torch.Tensor)
            else type(value).__name__ for name, value in sorted(item.items())}


def items_per_shard_for(dataset: Dataset, shard_bytes: int, seed: int = 0, dtype: Optional[str] = None) -> int:
    """How many items make shards of about `shard_bytes`: from the mean record size of the first readable items."""
    check_number("shard size in bytes", shard_bytes, low=1, integer=True)
    sizes = []
    for index in range(len(dataset)):
        try:
            sizes.append(len(encode_record(cast_floats(read_source_item(dataset, index, seed), dtype))))
        except BadItem:
            continue
        if len(sizes) == SIZE_PROBES:
            break
    if not sizes:
        raise ValueError(f"no item of the {len(dataset)} in {type(dataset).__name__} can be read")
    return max(1, shard_bytes * len(sizes) // sum(sizes))


def write_shards(dataset: Dataset, out: str | os.PathLike, items_per_shard: int, shard: int = 0, num_shards: int = 1,
                 seed: int = 0, dtype: Optional[str] = None, source: Optional[dict[str, Any]] = None,
                 progress: bool = True) -> WriteReport:
    """Write writer `shard`'s share (of `num_shards` writers) of `dataset` into the shard set `out`, then merge the
    set if every shard is done. `source` describes where the items came from (recorded in the manifest)."""
    check_number("items_per_shard", items_per_shard, low=1, integer=True)
    check_number("num_shards", num_shards, low=1, integer=True)
    check_number("shard", shard, low=0, high=num_shards, integer=True, below_high=True)
    cast_floats({}, dtype)  # an unknown dtype is refused before anything is read
    if len(dataset) == 0:
        raise ValueError(f"{type(dataset).__name__} is empty: there is nothing to write")
    out = Path(out)
    count = math.ceil(len(dataset) / items_per_shard)
    plan = {"items": len(dataset), "items_per_shard": items_per_shard, "shards": count, "seed": seed, "dtype": dtype,
            "dataset": type(dataset).__name__, "source": source or {}, **describe_dataset(dataset)}
    _agree_on_plan(out, plan)
    mine = range(shard, count, num_shards)
    todo = {number: range(number * items_per_shard, min((number + 1) * items_per_shard, len(dataset)))
            for number in mine if not _part_done(out, number)}
    bad = 0
    with tqdm(total=sum(map(len, todo.values())), desc=f"writing shards (writer {shard} of {num_shards})",
              unit="item", disable=not progress) as bar:
        for number, items in todo.items():
            bad += _write_shard(dataset, out, number, items, seed, dtype, bar.update)
    complete = merge_parts(out)
    return WriteReport(len(todo), len(mine) - len(todo), bad, complete)


def describe_dataset(dataset: Dataset) -> dict[str, Any]:
    """What a reader of the shards needs to know of the source dataset besides its items: its number of classes,
    whether its items are cropped to buckets and never resized (latents), and its list of captions (previews)."""
    try:
        classes = dataset.num_classes
    except AttributeError:
        classes = None
    captions = getattr(dataset, "captions", None)
    return {"num_classes": classes, "crop_only": bool(getattr(dataset, "crop_only", False)),
            "captions": list(captions) if isinstance(captions, (list, tuple)) else None}


def _agree_on_plan(out: Path, plan: dict[str, Any]) -> None:
    """Record the settings of the set, or refuse settings other than those it was started with (`source`, which
    only describes, may differ: the writers of one set may spell their paths differently)."""
    path = out / PLAN
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(key for key in set(before) | set(plan) if before.get(key) != plan.get(key) and key != "source")
        if changed:
            raise ValueError(f"{out} holds a shard set written with other settings ({', '.join(changed)}: "
                             f"{[before.get(key) for key in changed]} then, {[plan.get(key) for key in changed]} now); "
                             "finish it with the same command, or write into another folder")
        return
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda file: file.write(json.dumps(plan, indent=1).encode()))


def _part_paths(out: Path, number: int) -> tuple[Path, Path]:
    stem = out / PARTS / shard_name(number).removesuffix(".bin")
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _part_done(out: Path, number: int) -> bool:
    return all(path.is_file() for path in _part_paths(out, number)) and (out / shard_name(number)).is_file()


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_shard(dataset: Dataset, out: Path, number: int, items: range, seed: int, dtype: Optional[str],
                 advance: Callable[[int], Any]) -> int:
    """Write shard `number` from the source `items` (calling `advance(1)` after each) and record its part; returns
    how many items were bad."""
    rows, bad, labels = [], [], []
    types: Optional[dict[str, str]] = None
    digest = hashlib.sha256()

    def write(file: Any) -> None:
        nonlocal types
        offset, first = 0, None
        for index in items:
            advance(1)
            try:
                item = cast_floats(read_source_item(dataset, index, seed), dtype)
            except BadItem as error:
                bad.append({"source": index, "kind": error.kind, "path": error.path, "reason": error.reason})
                print(f"[sprint_mm] skipped source item {index}: {error}", file=sys.stderr)
                continue
            if types is None:
                types, first = field_types(item), index
            if field_types(item) != types:
                raise ValueError(f"{type(dataset).__name__} item {index} has fields {field_types(item)}, but item "
                                 f"{first} {types}: the items of a shard set must agree")
            data = encode_record(item)
            rows.append((number, offset, len(data), checksum(data), *record_size(item), index))
            if isinstance(item.get("label"), int):
                labels.append(item["label"])
            file.write(data)
            digest.update(data)
            offset += len(data)

    _write_atomically(out / shard_name(number), write)
    table, summary = _part_paths(out, number)
    _write_atomically(table, lambda file: np.save(file, np.array(rows, dtype=INDEX_DTYPE)))
    part = {"items": len(rows), "bytes": sum(row[2] for row in rows), "sha256": digest.hexdigest(), "bad": bad,
            "fields": types, "max_label": max(labels, default=None)}
    _write_atomically(summary, lambda file: file.write(json.dumps(part).encode()))
    return len(bad)


def merge_parts(out: str | os.PathLike) -> bool:
    """Write the index, the list of bad items and the manifest of `out` from its parts; False while a shard is
    not done."""
    out = Path(out)
    plan = json.loads((out / PLAN).read_text())
    numbers = range(plan["shards"])
    if not all(_part_done(out, number) for number in numbers):
        return False
    parts = [json.loads(_part_paths(out, number)[1].read_text()) for number in numbers]
    fields = {json.dumps(part["fields"]) for part in parts if part["fields"] is not None}
    if len(fields) > 1:
        raise ValueError(f"the shards of {out} hold items with different fields ({sorted(fields)}): the source "
                         "dataset changed between writers; write the set again into an empty folder")
    if not fields:
        raise ValueError(f"no item of the {plan['items']} of {plan['dataset']} could be read: see "
                         f"{out / BAD_ITEMS_FILE}")
    index = np.concatenate([np.load(_part_paths(out, number)[0]) for number in numbers])
    buffer = _npy_bytes(index)
    _write_atomically(out / INDEX, lambda file: file.write(buffer))
    bad = [line for part in parts for line in part["bad"]]
    _write_atomically(out / BAD_ITEMS_FILE, lambda file: file.write("".join(json.dumps(line) + "\n"
                                                                             for line in bad).encode()))
    labels = [part["max_label"] for part in parts if part["max_label"] is not None]
    classes = plan["num_classes"] if plan["num_classes"] is not None else (max(labels) + 1 if labels else None)
    manifest = {
        "format": FORMAT, "version": VERSION, "items": len(index), "index_sha256": hashlib.sha256(buffer).hexdigest(),
        "fields": json.loads(fields.pop()), "bad_items": len(bad),
        "shards": [{"name": shard_name(number), "items": part["items"], "bytes": part["bytes"],
                    "sha256": part["sha256"]} for number, part in zip(numbers, parts)],
        "num_classes": classes,
        **{key: plan[key] for key in ("crop_only", "captions", "dataset", "source", "seed", "dtype",
                                      "items_per_shard")},
        "source_items": plan["items"]}
    _write_atomically(out / MANIFEST, lambda file: file.write(json.dumps(manifest, indent=1).encode()))
    return True


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
