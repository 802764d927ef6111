"""Data throughput: shard sets against the folder datasets, and the shard index at scale (README "Data at scale").

    python benchmarks/data_speed.py [--items 384] [--repeats 3] [--index-items 1000000]

Reading: for each source, the first-batch latency (from opening the dataset to its first batch of --batch items: the
folder scans, index loads and shard opens a run pays at start) and the items/s of the next --items items, read in the
main process in training order (a random order for the folder datasets, the window order for shards), with the page
cache warm (every file was just written). The sources hold the same items three ways:

- the video demo's moving-digit mp4s (8 frames, 16 px; `VideoFolderDataset`, decoded at every read) and their shards;
- video latents of Wan's shape for 17 frames at 256 px, (16, 5, 32, 32) mean and std, one safetensors file each
  (`VideoLatentDataset`), and their shards, also read through wids (the same records in webdataset tar shards,
  indexed by wids) and streamed by webdataset (a shuffle buffer of 1000);
- image latents of SD's shape at 256 px, (4, 32, 32), REPA's .npy layout (`LatentDataset`), and their shards.

Index: --index-items tiny items written into shards of 10 000 items: the writer's time, the index's build time (the
merge of the parts), its size, and the time to open the set (manifest, index, its sha256); for wids the same items
in tar shards: the time to write them and to index every tar (which wids does when it first opens each shard).
The variants are measured in interleaved rounds (`harness.time_interleaved`) and their medians reported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import RESULTS, add_out_option, apply_threads, markdown_table, time_interleaved, write_result
from sprint_mm.data.faults import SkippingDataset
from sprint_mm.data.latents import LatentDataset, VideoLatentDataset, latent_member, posterior_sample
from sprint_mm.data.moving_digits import write_moving_digits
from sprint_mm.data.shard_dataset import ShardDataset
from sprint_mm.data.shard_writer import merge_parts, write_shards
from sprint_mm.data.shards import decode_record, shard_name
from sprint_mm.data.video import VideoFolderDataset

VIDEO_LATENT = (16, 5, 32, 32)  # Wan 2.1: 17 frames at 256 px
IMAGE_LATENT = (4, 32, 32)  # SD VAE at 256 px
INDEX_SHARD_ITEMS = 10_000


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def write_video_latents(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for index in range(count):
        name = f"{index:06d}.safetensors"
        save_file({"mean": torch.randn(VIDEO_LATENT, generator=rng), "std": torch.rand(VIDEO_LATENT, generator=rng)},
                  str(folder / name))
        rows.append(json.dumps({"path": name, "label": index % 10}))
    (folder / "index.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_image_latents(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        path = folder / "vae-sd" / latent_member(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        moments = rng.standard_normal((2 * IMAGE_LATENT[0], *IMAGE_LATENT[1:]), dtype=np.float32)
        np.save(path, np.concatenate([moments[:IMAGE_LATENT[0]], np.abs(moments[IMAGE_LATENT[0]:])]))
    labels = [[latent_member(index), index % 10] for index in range(count)]
    (folder / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


def write_tars(shards: ShardDataset, folder: Path) -> list[dict[str, Any]]:
    """The records of a shard set in webdataset tar shards (member `<item>.safetensors`), one tar per shard, and the
    shard list wids reads."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    listing, item, index = [], 0, shards.shards.index
    for number, count in enumerate(shards.shard_items):
        path = folder / shard_name(number).replace(".bin", ".tar")
        content = (Path(shards.shards.path) / shard_name(number)).read_bytes()
        with webdataset.TarWriter(str(path)) as tar:
            for row in index[item:item + count]:
                start = int(row["offset"])
                tar.write({"__key__": f"{item:09d}", "safetensors": content[start:start + int(row["length"])]})
                item += 1
        listing.append({"url": str(path), "nsamples": count})
    return listing


def latent_item(record: dict[str, Any]) -> dict[str, Any]:
    """What ShardDataset makes of a latent record: a sample of the posterior and the label."""
    return {"x": posterior_sample(record["mean"].float(), record["std"].float(), 1.0, 0.0), "label": record["label"]}


def wids_dataset(listing: list[dict[str, Any]]) -> Dataset:
    import wids

    dataset = wids.ShardListDataset(listing, localname=lambda url: url, transformations=[])
    return MappedDataset(dataset, lambda sample: latent_item(decode_record(sample[".safetensors"].getvalue())))


class MappedDataset(Dataset):
    def __init__(self, dataset: Dataset, function: Callable[[Any], Any]) -> None:
        self.dataset, self.function = dataset, function

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.function(self.dataset[index])


def webdataset_stream(listing: list[dict[str, Any]]) -> Any:
    import webdataset

    urls = [entry["url"] for entry in listing]
    return (webdataset.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False).shuffle(1000)
            .map(lambda sample: latent_item(decode_record(sample["safetensors"]))))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def measure(open_data: Callable[[], Any], order: Optional[Callable[[Any], Sequence[int]]], batch: int,
            items: int) -> tuple[float, float]:
    """(first-batch seconds, items per second after it) of a dataset opened by `open_data` and read in `order`
    (None: an iterable dataset, read as it streams)."""
    started = time.perf_counter()
    data = open_data()
    if order is None:
        loader = DataLoader(data, batch_size=batch)
    else:
        skipping = SkippingDataset(data)
        loader = DataLoader(skipping, batch_size=batch, sampler=list(order(data))[:batch + items],
                            collate_fn=skipping.collate)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(items // batch):
        next(batches)
    return first, (items // batch) * batch / (time.perf_counter() - started)


def random_order(data: Dataset) -> Sequence[int]:
    """The plain stream's order of a folder dataset's first epoch."""
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()


def shard_order(data: ShardDataset) -> Sequence[int]:
    """A shard set's first epoch (its window order)."""
    return data.epoch_order(0, 0).tolist()


def read_speeds(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write every source, then time reading each in interleaved rounds."""
    count = args.items + args.batch
    clips = work / "clips"
    write_moving_digits(clips, count, frames=8, size=16, digit_fraction=0.75)
    video = dict(clip_length=8, reader="pyav", fallback_reader=None)
    latents = write_video_latents(work / "video_latents", count)
    images = write_image_latents(work / "image_latents", count)
    sources = {"mp4 clips": lambda: VideoFolderDataset(clips, **video),
               "video latents": lambda: VideoLatentDataset(str(latents), scale=1.0),
               "image latents": lambda: LatentDataset(str(images))}
    variants: dict[str, tuple[str, Callable[[], Any], Any]] = {}
    for name, open_folder in sources.items():
        root = work / f"{name.replace(' ', '_')}_shards"
        write_shards(open_folder(), root, args.items_per_shard, progress=False)
        variants[f"{name}: files"] = (name, open_folder, random_order)
        variants[f"{name}: shards"] = (name, lambda root=root: ShardDataset(str(root)), shard_order)
    if not args.no_webdataset:
        video_shards = ShardDataset(str(work / "video_latents_shards"))
        listing = write_tars(video_shards, work / "tars")
        variants["video latents: wids (tar shards)"] = ("video latents", lambda: wids_dataset(listing),
                                                        lambda _: shard_order(video_shards))
        variants["video latents: webdataset (streamed)"] = ("video latents", lambda: webdataset_stream(listing), None)
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    time_interleaved({name: (lambda name=name: found[name].append(
        measure(variants[name][1], variants[name][2], args.batch, args.items))) for name in variants},
        repeats=args.repeats, warmup=0)
    return [{"source": variants[name][0], "reader": name.split(": ")[1],
             "first_batch_s": statistics.median(first for first, _ in found[name]),
             "items_per_s": statistics.median(rate for _, rate in found[name])} for name in variants]


# ----------------------------------------------------------------------------------------------
# The index at scale
# ----------------------------------------------------------------------------------------------

class TinyItems(Dataset):
    """`count` items of a (1, 2, 2) float16 tensor and a label: what the index costs, not the data."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": torch.full((1, 2, 2), float(index % 251), dtype=torch.float16), "label": index % 10}


def index_costs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    root = work / "index_set"
    started = time.perf_counter()
    write_shards(TinyItems(args.index_items), root, INDEX_SHARD_ITEMS, progress=False)
    written = time.perf_counter() - started
    (root / "manifest.json").unlink()
    started = time.perf_counter()
    merge_parts(root)
    merged = time.perf_counter() - started
    started = time.perf_counter()
    shards = ShardDataset(str(root))
    opened = time.perf_counter() - started
    started = time.perf_counter()
    shards.epoch_order(0, 0)
    ordered = time.perf_counter() - started
    result = {"items": args.index_items, "shards": len(shards.shard_items), "write_s": written,
              "index_build_s": merged, "index_bytes": (root / "index.npy").stat().st_size,
              "manifest_bytes": (root / "manifest.json").stat().st_size, "open_s": opened, "epoch_order_s": ordered}
    if not args.no_webdataset:
        import wids

        started = time.perf_counter()
        listing = write_tars(shards, work / "index_tars")
        result["wids_write_tars_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for entry in listing:
            wids.wids.IndexedTarSamples(path=entry["url"]).close()
        result["wids_index_tars_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Items/s and first-batch latency from shards against the folder "
                                                 "datasets; the shard index at scale.")
    parser.add_argument("--items", type=int, default=384, help="items timed per source after the first batch")
    parser.add_argument("--batch", type=int, default=32, help="the batch whose latency is timed")
    parser.add_argument("--items-per-shard", type=int, default=100, help="items per shard of the read sources")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--index-items", type=int, default=1_000_000, help="items of the index measurement (0: skip)")
    parser.add_argument("--no-webdataset", action="store_true", help="leave out wids and webdataset")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--work", help="folder for the data (default: a temporary folder, removed after)")
    add_out_option(parser, RESULTS / "data_speed.json")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="sprint_mm_data_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        reads = read_speeds(work, args)
        index = index_costs(work, args) if args.index_items else None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"settings": {key: value for key, value in vars(args).items() if key != "out"}, "reads": reads,
              "index": index}
    print(markdown_table(["source", "reader", "first batch (s)", "items/s"],
                         [[row["source"], row["reader"], row["first_batch_s"], row["items_per_s"]] for row in reads]))
    if index:
        print(json.dumps(index, indent=1))
    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
