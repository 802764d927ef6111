"""Shard sets: the writer (items in order, parallel and resumable, corrupt source items skipped and listed), the
reader (checksums, remote roots through fsspec), ShardDataset (latent posteriors, buckets) and the shard stream
(an epoch order within windows of shards; the same global sequence of items on any number of processes)."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_record

from sprint_mm.cli import parse_bytes, write_shards_main
from sprint_mm.data.buckets import BucketTable
from sprint_mm.data.digits import DigitsDataset
from sprint_mm.data.faults import BadItem, SkippingDataset
from sprint_mm.data.latents import LatentDataset
from sprint_mm.data.shard_dataset import ShardDataset, window_order
from sprint_mm.data.shard_writer import write_shards
from sprint_mm.data.shards import INDEX, MANIFEST, decode_record, encode_record, shard_name
from sprint_mm.data.stream import Batching, BucketStream, ShardStream, open_stream
from tests.latent_layouts import write_latent_layout
from tests.test_bad_data import CASES, DAMAGE

DIGITS = DigitsDataset(resolution=8, split="test")  # 359 items


def set_files(root: Path) -> dict[str, bytes]:
    """The files a reader reads (the manifest without `source`, which only describes the command)."""
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["source"]
    files = {path.name: path.read_bytes() for path in sorted(root.glob("shard-*.bin"))}
    return {**files, INDEX: (root / INDEX).read_bytes(), MANIFEST: json.dumps(manifest).encode()}


def accelerator(rank: int = 0, processes: int = 1) -> SimpleNamespace:
    """What a data stream reads of an Accelerator, for process `rank` of `processes`."""
    return SimpleNamespace(process_index=rank, num_processes=processes, device=torch.device("cpu"),
                           main_process_first=contextlib.nullcontext,
                           reduce=lambda tensor, reduction: tensor)  # bad-data counts: these sets hold none


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "set"
    assert write_shards(DIGITS, root, items_per_shard=120, progress=False).complete
    return root


# ------------------------------------------------------------------------------------------------ records
def test_a_record_is_a_safetensors_file_that_keeps_every_field():
    item = {"x": torch.randn(3, 2, 4, 4), "image": torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2),
            "text_mask": torch.tensor([True, False]), "label": 7, "caption": "a handwritten seven", "scale": 0.5}
    data = encode_record(item)
    assert load_record(data).keys() == {"x", "image", "text_mask"}  # any safetensors reader opens it
    back = decode_record(data)
    assert back.keys() == item.keys()
    for name, value in item.items():
        assert torch.equal(back[name], value) if isinstance(value, torch.Tensor) else back[name] == value
    with pytest.raises(ValueError, match="item field 'path' is a PosixPath"):
        encode_record({"x": torch.zeros(1, 2, 2), "path": Path("a")})


# ------------------------------------------------------------------------------------------------ the writer
def test_shards_hold_the_datasets_items_in_order_with_sizes_and_checksums(digits_set):
    shards = ShardDataset(str(digits_set))
    manifest = json.loads((digits_set / MANIFEST).read_text())
    assert len(shards) == len(DIGITS) == manifest["items"] == 359 and manifest["bad_items"] == 0
    assert [s["items"] for s in manifest["shards"]] == [120, 120, 119] and shards.num_classes == 10
    for entry in manifest["shards"]:
        data = (digits_set / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    for index in range(len(DIGITS)):
        item, stored = DIGITS[index], shards[index]
        assert torch.equal(item["x"], stored["x"]) and item["label"] == stored["label"]
        assert shards.item_size(index) == (1, 8, 8)
    assert manifest["fields"] == {"label": "int", "x": "tensor float32 3d"}


def test_writers_in_parallel_and_a_resumed_writer_write_the_same_bytes(digits_set, tmp_path):
    one_by_one = tmp_path / "parallel"
    first = write_shards(DIGITS, one_by_one, 120, shard=0, num_shards=2, progress=False)
    assert (first.written, first.complete) == (2, False) and not (one_by_one / MANIFEST).exists()
    second = write_shards(DIGITS, one_by_one, 120, shard=1, num_shards=2, progress=False)
    assert (second.written, second.complete) == (1, True)  # the last writer merges
    assert set_files(one_by_one) == set_files(digits_set)
    # A stop that lost shard 1 (its file written, its part not): the rerun writes that shard only, to the same bytes.
    (one_by_one / "parts" / "shard-00001.json").unlink()
    (one_by_one / MANIFEST).unlink()
    again = write_shards(DIGITS, one_by_one, 120, progress=False)
    assert (again.written, again.already_done, again.complete) == (1, 2, True)
    assert set_files(one_by_one) == set_files(digits_set)
    with pytest.raises(ValueError, match=r"other settings \(items_per_shard, shards: \[120, 3\] then, \[100, 4\] now"):
        write_shards(DIGITS, one_by_one, 100, progress=False)


def test_items_with_random_augmentation_are_written_the_same_by_every_writer(tmp_path):
    class Flipping(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"x": torch.rand(1, 2, 2), "label": index}

    a = write_shards(Flipping(), tmp_path / "a", 3, progress=False)
    torch.rand(5)  # another random state in between
    b = write_shards(Flipping(), tmp_path / "b", 3, shard=0, num_shards=1, progress=False)
    assert a.complete and b.complete and set_files(tmp_path / "a") == set_files(tmp_path / "b")
    items = ShardDataset(str(tmp_path / "a"))
    assert not torch.equal(items[0]["x"], items[1]["x"])  # each item its own draw


@pytest.mark.parametrize("kind", sorted(CASES))
def test_corrupt_source_items_are_skipped_listed_and_counted(kind, tmp_path, capsys):
    case = CASES[kind](tmp_path)
    report = write_shards(case.dataset, tmp_path / "set", 2, progress=False)
    assert report.complete and report.bad_items == len(DAMAGE)
    lines = [json.loads(line) for line in (tmp_path / "set" / "bad_items.jsonl").read_text().splitlines()]
    assert [(line["source"], line["kind"], line["path"]) for line in lines] == [
        (index, case.kind, str(case.bad[index])) for index in sorted(DAMAGE)]
    err = capsys.readouterr().err
    assert all(f"skipped source item {index}: bad {case.kind} {case.bad[index]}" in err for index in DAMAGE)
    shards = ShardDataset(str(tmp_path / "set"))
    good = [index for index in range(len(case.dataset)) if index not in case.bad]
    assert json.loads((tmp_path / "set" / MANIFEST).read_text())["bad_items"] == len(DAMAGE)
    assert shards.shards.index["source"].tolist() == good
    for position, index in enumerate(good):
        torch.manual_seed(0)
        source = case.dataset[index]
        torch.manual_seed(0)
        stored = shards[position]
        assert stored.keys() == source.keys() and torch.equal(stored["x"], source["x"])


def test_the_command_line_writes_the_dataset_of_a_gin_configuration(digits_set, tmp_path, capsys):
    argv = [str(tmp_path / "set"), "--gin-file", "gin/image/digits_stage1.gin", "--items-per-shard", "120",
            "--gin-param", "DigitsDataset.resolution = 8", "--gin-param", "DigitsDataset.split = 'test'"]
    assert write_shards_main(argv) == 0
    assert set_files(tmp_path / "set") == set_files(digits_set)
    assert "the set is complete: Trainer.dataset = @ShardDataset()" in capsys.readouterr().out
    source = json.loads((tmp_path / "set" / MANIFEST).read_text())["source"]
    assert source["gin_files"] == ["gin/image/digits_stage1.gin"]
    assert write_shards_main([str(tmp_path / "none"), "--gin-file", "gin/base/sprint.gin"]) == 2
    assert "Trainer.dataset is not bound" in capsys.readouterr().err
    assert write_shards_main([str(tmp_path / "half"), "--gin-file", "gin/image/digits_stage1.gin", "--dtype",
                              "float16", "--shard-size", "100K"]) == 0
    half = ShardDataset(str(tmp_path / "half"))
    assert len(half.shard_items) > 1 and half.shards.manifest["fields"]["x"] == "tensor float16 3d"
    assert half[0]["x"].dtype == torch.float32  # read back in float32
    assert (parse_bytes("256M"), parse_bytes("1GB"), parse_bytes("1000")) == (256 * 2**20, 2**30, 1000)
    with pytest.raises(ValueError, match="--shard-size 'lots' is not a size in bytes"):
        parse_bytes("lots")


# ------------------------------------------------------------------------------------------------ the reader
def test_a_damaged_item_is_a_bad_item_the_skipping_dataset_replaces(digits_set, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for path in digits_set.iterdir():
        if path.is_file():
            (root / path.name).write_bytes(path.read_bytes())
    shards = ShardDataset(str(root))
    row = shards.shards.index[5]
    data = bytearray((root / shard_name(0)).read_bytes())
    data[int(row["offset"]) + int(row["length"]) - 1] ^= 0xFF  # one flipped bit of item 5's tensor data
    (root / shard_name(0)).write_bytes(bytes(data))
    (root / shard_name(2)).write_bytes((root / shard_name(2)).read_bytes()[:-100])  # the last item cut short
    shards = ShardDataset(str(root))
    with pytest.raises(BadItem, match=r"shard-00000.bin item 5 \(source item 5\): its bytes do not match the checksum"):
        shards[5]
    with pytest.raises(BadItem, match=r"item 358 .*: the shard holds \d+ of the item's \d+ bytes \(truncated\)"):
        shards[358]
    replaced = SkippingDataset(shards)[5]
    assert torch.equal(replaced["x"], DIGITS[6]["x"]) and replaced["bad_items"][0][0] == "shard"
    (root / INDEX).write_bytes((root / INDEX).read_bytes()[:-40])
    with pytest.raises(ValueError, match="does not match the sha256 its manifest.json records"):
        ShardDataset(str(root))
    with pytest.raises(FileNotFoundError, match="has no manifest.json: it is not a complete shard set"):
        ShardDataset(str(tmp_path))


def test_a_remote_root_is_read_through_fsspec_and_its_shards_cached(digits_set, tmp_path):
    memory = fsspec.filesystem("memory")
    for path in digits_set.iterdir():
        if path.is_file():
            memory.pipe_file(f"/remote_set/{path.name}", path.read_bytes())
    remote = ShardDataset("memory://remote_set", cache_dir=str(tmp_path / "cache"), shuffle_window=2)
    for index in (0, 200, 358):
        assert torch.equal(remote[index]["x"], DIGITS[index]["x"])
    assert sorted(path.name for path in (tmp_path / "cache").glob("*.bin")) == [shard_name(n) for n in range(3)]
    memory.rm("/remote_set/shard-00001.bin")  # the cached copy serves every later reader
    assert torch.equal(ShardDataset("memory://remote_set", cache_dir=str(tmp_path / "cache"))[200]["x"],
                       DIGITS[200]["x"])
    memory.rm("/remote_set", recursive=True)


# ------------------------------------------------------------------------------------------------ ShardDataset
def test_latent_shards_store_the_posterior_and_training_samples_it_anew(tmp_path):
    means = {i: np.random.default_rng(i).normal(size=(4, 4, 4)) for i in range(5)}
    stds = {i: np.full((4, 4, 4), 0.5) for i in range(5)}
    write_latent_layout(tmp_path / "latents", means, stds, {i: i % 3 for i in range(5)})
    source = LatentDataset(str(tmp_path / "latents"), with_images=True)
    write_shards(source, tmp_path / "set", 2, progress=False)
    shards = ShardDataset(str(tmp_path / "set"))
    assert shards.crop_only and shards.item_size(3) == (1, 4, 4)
    for index in range(5):
        for shape in (None, (1, 2, 2)):
            torch.manual_seed(index)
            expected = source[index] if shape is None else source.load(index, shape)
            torch.manual_seed(index)
            got = shards[index] if shape is None else shards.load(index, shape)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[key], expected[key]) for key in ("x", "image")) and got["label"] == index % 3
    assert not torch.equal(shards[0]["x"], shards[0]["x"])  # a new sample of the posterior at every read


def test_shards_of_several_sizes_train_with_buckets_and_only_with_them(tmp_path):
    class TwoSizes(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, index):
            frames = 4 if index % 2 else 2
            return {"x": torch.full((3, frames, 6, 8), float(index)), "label": index % 10}

    write_shards(TwoSizes(), tmp_path / "set", 5, progress=False)
    shards = ShardDataset(str(tmp_path / "set"))
    with pytest.raises(ValueError, match="holds items of 2 sizes .*2x6x8, 4x6x8.* train it with Trainer.buckets"):
        open_stream(shards, Batching(batch_size=2), accelerator())
    table = BucketTable([(4, 4, 4, 2), (2, 6, 8, 2), (1, 4, 4, 2)])
    stream = open_stream(shards, Batching(batch_size=2), accelerator(), table)
    assert isinstance(stream, BucketStream) and stream.data.bucket_of == [1, 0] * 6
    assert shards.load(3, (4, 4, 4))["x"].shape == (3, 4, 4, 4) and shards.load(3, (1, 4, 4))["x"].shape == (3, 4, 4)
    assert "shards" in stream.fingerprint()


# ------------------------------------------------------------------------------------------------ the order
def windows_read(order: torch.Tensor, items: list[int]) -> list[set[int]]:
    """The order cut into stretches that each read a set of shards whole: a stretch ends when every item of the
    shards it touched has come."""
    shard_of = np.repeat(np.arange(len(items)), items)
    stretches, touched, seen = [], set(), 0
    for index in order.tolist():
        touched.add(int(shard_of[index]))
        seen += 1
        if seen == sum(items[shard] for shard in touched):
            stretches.append(touched)
            touched, seen = set(), 0
    assert not touched
    return stretches


def test_an_epoch_visits_every_item_once_reading_one_window_of_shards_at_a_time():
    items = [5, 7, 6, 5, 3]  # shard sizes
    for window in (1, 2, 3, 5, 9):
        order = window_order(items, window, seed=3, epoch=1)
        assert sorted(order.tolist()) == list(range(sum(items)))
        assert torch.equal(order, window_order(items, window, seed=3, epoch=1))  # a pure function
        stretches = windows_read(order, items)
        assert max(map(len, stretches)) <= window and sorted(set().union(*stretches)) == list(range(len(items)))
        if window == 1:
            assert len(stretches) == len(items)  # shard by shard
    assert not torch.equal(window_order(items, 2, 3, 1), window_order(items, 2, 3, 2))  # each epoch its own order
    assert windows_read(window_order(items, 2, 3, 1), items) != windows_read(window_order(items, 2, 3, 2), items)
    full = window_order(items, 5, 3, 1)
    assert len(windows_read(full, items)) < len(items)  # one window: items of all shards mixed


def test_the_global_sequence_of_items_is_the_same_on_one_two_or_four_processes_and_after_a_resume(digits_set):
    shards = ShardDataset(str(digits_set), shuffle_window=2)

    def global_batches(processes: int, first_step: int, steps: int, state=None) -> list[list[int]]:
        """The items of each step, every process's micro-batches joined (items named by their source index)."""
        streams = []
        for rank in range(processes):
            stream = open_stream(shards, Batching(batch_size=16, grad_accum=2), accelerator(rank, processes))
            assert isinstance(stream, ShardStream)
            if state is not None:
                stream.load_state_dict(state, first_step)
            stream.start(first_step)
            streams.append(stream)
        return [sorted(hash(x.numpy().tobytes()) for stream in streams for _ in range(2)
                       for x in stream.next_batch()["x"]) for _ in range(steps)]

    one = global_batches(1, 0, 30)  # 30 steps of 16 items: past the first epoch (359 items)
    assert global_batches(2, 0, 30) == one == global_batches(4, 0, 30)
    two = open_stream(shards, Batching(batch_size=16, grad_accum=2), accelerator(1, 2))
    state = two.state_dict(12)  # a checkpoint of step 12 written by two processes ...
    assert state["data_position"] == 12 * 16 // 2 and state["data"]["stream"] == "shards"
    assert global_batches(1, 12, 18, state) == one[12:] == global_batches(4, 12, 18, state)  # ... resumed on 1 or 4


def test_a_resume_on_other_shards_or_from_another_kind_of_data_is_refused(digits_set, tmp_path):
    stream = open_stream(ShardDataset(str(digits_set)), Batching(batch_size=8), accelerator())
    state = stream.state_dict(5)
    other = tmp_path / "other"
    write_shards(DIGITS, other, 100, progress=False)
    with pytest.raises(ValueError, match="the data changed since this run's checkpoint"):
        open_stream(ShardDataset(str(other)), Batching(batch_size=8), accelerator()).load_state_dict(state, 5)
    with pytest.raises(ValueError, match="the data changed since this run's checkpoint"):
        open_stream(ShardDataset(str(digits_set), shuffle_window=2), Batching(batch_size=8),
                    accelerator()).load_state_dict(state, 5)
    plain = open_stream(DIGITS, Batching(batch_size=8), accelerator())
    with pytest.raises(ValueError, match="trained on a shard set up to step 5 and now resumes on a dataset read in"):
        plain.load_state_dict(state, 5)
    with pytest.raises(ValueError, match="trained on a dataset read in a random order .* now resumes on a shard set"):
        stream.load_state_dict(plain.state_dict(5), 5)
    with pytest.raises(ValueError, match="shuffle_window must be an integer >= 1, got 0"):
        ShardDataset(str(digits_set), shuffle_window=0)


def test_the_video_demo_writes_its_clips_into_shards_that_give_the_same_items(tmp_path):
    from demos.clips import ensure_clips
    from demos.video import ensure_shards, video_demo_parser
    from sprint_mm.data.video import VideoFolderDataset

    videos = ensure_clips(tmp_path / "videos", 12, 8, 16)
    shards = ShardDataset(str(ensure_shards(videos, tmp_path / "shards")))
    clips = VideoFolderDataset(videos, clip_length=8, reader="pyav", fallback_reader=None)
    assert len(shards) == len(clips) == 12 and shards.num_classes == 10
    for index in range(12):
        assert torch.equal(shards[index]["x"], clips[index]["x"]) and shards[index]["label"] == clips[index]["label"]
    assert video_demo_parser().parse_args(["--shards"]).shards
