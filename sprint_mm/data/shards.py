"""Shard sets: many items of a dataset in a few large files, with an index of every item's place, size and checksum.

A shard set is a folder, local or at any fsspec URL (`s3://...`, `gs://...`, `memory://...`):

    manifest.json       the format and version, the item count, every shard (name, items, bytes, sha256), the fields
                        of an item, the index's sha256, the source (dataset, configuration), the skipped source items
    index.npy           one row per item, in order (`INDEX_DTYPE`): shard, offset, length, checksum (xxh3-64 of the
                        record), frames, height, width, and the item's index in the source dataset
    shard-00000.bin     the items of shard 0 back to back, each one safetensors record
    bad_items.jsonl     one line per corrupt source item the writer skipped
    parts/              what each shard's writer recorded, merged into the manifest and the index when all are done

An item is one safetensors record: its tensors, and its other fields (label, caption, ...) as JSON in the record's
metadata, so any safetensors reader opens one. `sprint_mm.data.shard_writer` writes shard sets; `ShardSet` reads
them: local shards through a memory map, remote ones downloaded whole into a local cache on first use (the
manifest's size is checked after the download) and read the same way. Every item is checked against its checksum
as it is read (xxh3-64: 11x faster than zlib's crc32, 35 us for a 640 KiB video latent); a mismatch or an
undecodable record is a `BadItem` of kind "shard".
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Optional

import fsspec
import numpy as np
import torch
import xxhash
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.numpy import save as save_numpy_record
from safetensors.torch import load as load_record
from safetensors.torch import save as save_torch_record

from sprint_mm.data.buckets import Shape
from sprint_mm.data.faults import BadItem

FORMAT = "sprint_mm-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npy"
BAD_ITEMS_FILE = "bad_items.jsonl"
PARTS = "parts"
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("checksum", "<u8"),
                        ("frames", "<u4"), ("height", "<u4"), ("width", "<u4"), ("source", "<u8")])
DOWNLOAD_TRIES = 3
WRITER_HINT = "write one with `python datasets/write_shards.py OUT --gin-file ...`"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


# ----------------------------------------------------------------------------------------------------------------
# Records: one item as safetensors bytes
# ----------------------------------------------------------------------------------------------------------------

def checksum(data: bytes | memoryview) -> int:
    """The checksum the index keeps of a record."""
    return xxhash.xxh3_64_intdigest(data)


def encode_record(item: dict[str, Any]) -> bytes:
    """An item as one safetensors record: its tensors as tensors, every other field as JSON in the metadata."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in item.items()
               if isinstance(value, torch.Tensor)}
    metadata = {}
    for name, value in item.items():
        if isinstance(value, torch.Tensor):
            continue
        try:
            metadata[name] = json.dumps(value)
        except TypeError:
            raise ValueError(f"item field {name!r} is a {type(value).__name__}: a shard stores tensors and JSON values "
                             "(numbers, strings, lists, dicts)") from None
    if any(tensor.dtype == torch.bfloat16 for tensor in tensors.values()):  # numpy has no bfloat16
        return save_torch_record(tensors, metadata=metadata)
    # The same file through numpy, 5x faster for small items (torch's writer checks storages first).
    return save_numpy_record({name: tensor.numpy() for name, tensor in tensors.items()}, metadata=metadata)


def decode_record(data: bytes) -> dict[str, Any]:
    """The item of a record written by `encode_record`."""
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    return {**load_record(data), **{name: json.loads(value) for name, value in metadata.items()}}


def record_size(item: dict[str, Any]) -> Shape:
    """(frames, height, width) of an item from the shape of its data: latent moments `mean` (C, [T,] h, w), else
    `x` (C, [T,] H, W); an image has 1 frame."""
    data = item.get("mean", item.get("x"))
    if not isinstance(data, torch.Tensor) or data.dim() not in (3, 4):
        raise ValueError(f"an item must hold 'x' (or latent moments 'mean' and 'std') of shape (C, [T,] H, W); this "
                         f"one holds {sorted(item)}" + ("" if data is None else f" with shape {tuple(data.shape)}"))
    return (1, *data.shape[1:]) if data.dim() == 3 else tuple(data.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Reading a shard set
# ----------------------------------------------------------------------------------------------------------------

def default_cache_dir(root: str) -> Path:
    """Where the shards of a remote `root` are kept: ~/.cache/sprint_mm/shards/<hash of the URL>."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sprint_mm" / "shards" / hashlib.sha256(root.encode()).hexdigest()[:16]


class ShardSet:
    """A shard set at `root` (a folder or an fsspec URL), read item by item (`read`).

    The manifest and the index are read at construction and checked (format, version, the index's sha256 and
    length); shards open on first use, in each process (memory maps do not cross a pickle). Shards of a remote
    root are downloaded whole into `cache_dir` (default `default_cache_dir(root)`), one process at a time per shard
    (a file lock), and reused by every later run.
    """

    def __init__(self, root: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> None:
        self.root = str(root).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = None if self.local else Path(cache_dir or default_cache_dir(self.root))
        self.manifest = self._read_manifest()
        index_bytes = self._read_small(INDEX)
        if hashlib.sha256(index_bytes).hexdigest() != self.manifest["index_sha256"]:
            raise ValueError(f"{self.root}/{INDEX} does not match the sha256 its {MANIFEST} records: the shard set "
                             "is damaged or was rewritten while being read; write it again")
        self.index = np.load(io.BytesIO(index_bytes), allow_pickle=False)
        if self.index.dtype != INDEX_DTYPE or len(self.index) != self.manifest["items"]:
            raise ValueError(f"{self.root}/{INDEX} has {len(self.index)} rows of {self.index.dtype}, but the manifest "
                             f"promises {self.manifest['items']} rows of {INDEX_DTYPE}")
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._maps: dict[int, bytes | mmap.mmap] = {}

    def _read_small(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self.path}/{name}")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.root} has no {name}: it is not a complete shard set ({WRITER_HINT}; a "
                                    "set whose writers have not all finished has no manifest yet)") from None

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self._read_small(MANIFEST))
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.root}/{MANIFEST} is not JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root}/{MANIFEST} is not the manifest of a {FORMAT} set ({WRITER_HINT})")
        if manifest.get("version") != VERSION:
            raise ValueError(f"{self.root} is a {FORMAT} set of version {manifest.get('version')}; this sprint_mm "
                             f"reads version {VERSION}")
        return manifest

    def __len__(self) -> int:
        return len(self.index)

    def item_size(self, index: int) -> Shape:
        row = self.index[index]
        return (int(row["frames"]), int(row["height"]), int(row["width"]))

    def read(self, index: int) -> dict[str, Any]:
        """Item `index` as written; `BadItem("shard", ...)` when its bytes fail their checksum or do not decode."""
        row = self.index[index]
        number, offset, length = int(row["shard"]), int(row["offset"]), int(row["length"])
        data = self._shard(number)[offset:offset + length]
        where = f"{self.root}/{shard_name(number)} item {index} (source item {int(row['source'])})"
        if len(data) != length:
            raise BadItem("shard", where, f"the shard holds {len(data)} of the item's {length} bytes (truncated)")
        if checksum(data) != int(row["checksum"]):
            raise BadItem("shard", where, "its bytes do not match the checksum of the index (damaged)")
        try:
            return decode_record(data)
        except (SafetensorError, ValueError, struct.error) as error:
            raise BadItem("shard", where, f"cannot decode the record: {error}") from error

    def _shard(self, number: int) -> bytes | mmap.mmap:
        """The bytes of shard `number`, memory-mapped (an empty shard is b"")."""
        if number not in self._maps:
            path = self._local_path(number)
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                self._maps[number] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._maps[number]

    def _local_path(self, number: int) -> Path:
        name = shard_name(number)
        if self.local:
            path = Path(self.path) / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {self.root}/{MANIFEST} does not exist")
            return path
        return self._download(name, int(self.shards[number]["bytes"]))

    def _download(self, name: str, size: int) -> Path:
        """The cached copy of remote shard `name`, downloaded first if absent (by one process at a time)."""
        target = self.cache_dir / name
        if target.is_file() and target.stat().st_size == size:
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for _ in range(DOWNLOAD_TRIES):
                if target.is_file() and target.stat().st_size == size:
                    return target
                partial = self.cache_dir / f".{name}.{os.getpid()}.partial"
                try:
                    self.fs.get_file(f"{self.path}/{name}", str(partial))
                    got = partial.stat().st_size
                    if got == size:
                        os.replace(partial, target)
                        return target
                    problem = f"{got} bytes arrived, the manifest says {size}"
                except OSError as error:  # also FileNotFoundError
                    problem = f"{type(error).__name__}: {error}"
                finally:
                    partial.unlink(missing_ok=True)
        raise OSError(f"could not download shard {self.root}/{name} into {self.cache_dir} in {DOWNLOAD_TRIES} tries "
                      f"(last: {problem})")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}
