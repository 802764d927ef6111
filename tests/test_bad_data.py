"""Bad data: every dataset names what it cannot use (BadItem), SkippingDataset replaces it by the next good item and
carries the records through DataLoader workers, BadDataLedger counts them and stops a run with too many, and a video
decode that hangs times out."""
from __future__ import annotations

import json
import pickle
import re
import threading
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from sprint_mm.data import video as video_module
from sprint_mm.data.captions import CaptionDataset
from sprint_mm.data.faults import (
    BAD_ITEMS,
    BadDataError,
    BadDataLedger,
    BadItem,
    BadRecord,
    SkippingDataset,
    call_with_timeout,
)
from sprint_mm.data.images import ImageFolderDataset
from sprint_mm.data.latents import LatentDataset, VideoLatentDataset, image_member, latent_member
from sprint_mm.data.video import VideoFolderDataset
from sprint_mm.media import save_video
from sprint_mm.text import EmbeddingCache
from tests.latent_layouts import write_latent_layout

COUNT = 6
DAMAGE = {1: "empty", 2: "truncated", 5: "garbage"}  # 1 and 2 in a row; 5 wraps around to 0


def damage(path: Path, how: str) -> Path:
    """Spoil a written file: 'empty', 'truncated' (its first half) or 'garbage' (random bytes)."""
    data = path.read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": garbage}[how])
    return path


def next_good(index: int, bad: dict[int, Path]) -> int:
    return next((index + offset) % COUNT for offset in range(COUNT) if (index + offset) % COUNT not in bad)


# ---------------------------------------------------------------------------------------------- one case per kind


class Case(NamedTuple):
    dataset: Dataset
    bad: dict[int, Path]  # index -> the file its BadItem must name
    kind: str


def _noise_images(folder: Path) -> list[Path]:
    """COUNT small RGB PNGs of random pixels (incompressible, so half a file cuts into the pixel data)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = [folder / f"{index}.png" for index in range(COUNT)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
    return paths


def _videos(folder: Path, frames: int = 3) -> list[Path]:
    """COUNT mp4 clips of 32x32 px: each a ramp at its own level, brightening from frame to frame."""
    paths = [folder / f"{index}.mp4" for index in range(COUNT)]
    brightening = torch.linspace(-0.15, 0.15, frames)[:, None, None]  # (T, 1, 1)
    for index, path in enumerate(paths):
        ramp = torch.linspace(-0.8, 0.8, 32) * (index + 1) / COUNT  # across the width
        save_video((ramp + brightening).expand(3, frames, 32, 32).contiguous(), path)
    return paths


def image_case(root: Path) -> Case:
    paths = _noise_images(root / "images" / "noise")
    bad = {index: damage(paths[index], how) for index, how in DAMAGE.items()}
    return Case(ImageFolderDataset(root / "images", resolution=8), bad, "image")


def video_case(root: Path) -> Case:
    paths = _videos(root / "videos" / "ramps")
    bad = {index: damage(paths[index], how) for index, how in DAMAGE.items()}
    options = dict(clip_length=3, random_crop_time=False, reader="pyav", fallback_reader=None)
    return Case(VideoFolderDataset(root / "videos", **options), bad, "video")


def latent_case(root: Path) -> Case:
    """Posteriors with std 0 (items are deterministic): an empty file, non-finite values, another shape."""
    write_latent_layout(root, {i: np.full((4, 2, 2), float(i)) for i in range(COUNT)},
                        {i: np.zeros((4, 2, 2)) for i in range(COUNT)}, {i: i for i in range(COUNT)})
    paths = {i: root / "vae-sd" / latent_member(i) for i in DAMAGE}
    paths[1].write_bytes(b"")
    np.save(paths[2], np.full((8, 2, 2), np.nan, dtype=np.float32))
    np.save(paths[5], np.zeros((6, 2, 2), dtype=np.float32))
    return Case(LatentDataset(str(root)), paths, "latent")


def caption_case(root: Path) -> Case:
    paths = _noise_images(root / "captioned")
    index = root / "captioned" / "index.jsonl"
    index.write_text("".join(json.dumps({"path": p.name, "caption": f"noise {i}"}) + "\n" for i, p in enumerate(paths)))
    bad = {i: damage(paths[i], how) for i, how in DAMAGE.items()}
    return Case(CaptionDataset(str(index), resolution=8), bad, "caption")


CASES: dict[str, Callable[[Path], Case]] = {
    "image": image_case, "video": video_case, "latent": latent_case, "caption": caption_case,
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path) -> Case:
    return CASES[request.param](tmp_path)


def test_every_dataset_names_its_bad_files_and_the_wrapper_returns_the_next_good_item(case):
    dataset, bad, kind = case
    for index, path in bad.items():
        with pytest.raises(BadItem) as info:
            dataset[index]
        assert (info.value.kind, info.value.path) == (kind, str(path))
    wrapped = SkippingDataset(dataset)
    for index in range(COUNT):
        item = wrapped[index]
        good = next_good(index, bad)
        assert torch.equal(item["x"], dataset[good]["x"])
        passed = [(index + offset) % COUNT for offset in range((good - index) % COUNT)]
        records = [(record.kind, record.path, record.offset) for record in item[BAD_ITEMS]]
        assert records == [(kind, str(bad[i]), offset) for offset, i in enumerate(passed)]
        assert all(record.reason for record in item[BAD_ITEMS])


def test_counts_add_up_through_two_dataloader_workers_and_the_datasets_collate(case):
    dataset, bad, kind = case
    wrapped = SkippingDataset(dataset)
    ledger = BadDataLedger(max_bad_fraction=1.0)
    loader = DataLoader(wrapped, batch_size=4, num_workers=2, collate_fn=wrapped.collate,
                        multiprocessing_context="fork", timeout=60)
    xs = []
    for batch in loader:
        ledger.add(batch.pop(BAD_ITEMS), items=len(batch["x"]))
        ledger.check()
        xs.append(batch["x"])
        if kind == "caption":  # CaptionDataset's own collate made this batch
            assert isinstance(batch["caption"], list)
    expected = torch.stack([dataset[next_good(index, bad)]["x"] for index in range(COUNT)])
    assert torch.equal(torch.cat(xs), expected)
    assert ledger.metrics() == {"bad_fraction": len(bad) / COUNT, f"bad_{kind}": len(bad)}
    assert {record.path for record in ledger.examples} == {str(path) for path in bad.values()}


# ---------------------------------------------------------------------------------------------- BadItem


def test_bad_item_names_kind_file_and_reason_and_crosses_processes():
    bad = BadItem("latent", Path("/data/vae-sd/a.npy"), "the file is empty")
    assert str(bad) == "bad latent /data/vae-sd/a.npy: the file is empty"
    assert isinstance(bad, ValueError)
    copy = pickle.loads(pickle.dumps(bad))
    assert (copy.kind, copy.path, copy.reason) == ("latent", "/data/vae-sd/a.npy", "the file is empty")
    with pytest.raises(ValueError, match="'audio'"):
        BadItem("audio", "a.wav", "unsupported")


# ---------------------------------------------------------------------------------------------- SkippingDataset


class Listed(Dataset):
    """Item i is {"x": tensor([i])}; the indices in `bad` raise BadItem naming `item<i>`."""

    def __init__(self, size: int, bad: set[int]) -> None:
        self.size, self.bad = size, bad

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if index in self.bad:
            raise BadItem("image", f"item{index}", f"broken {index}")
        return {"x": torch.tensor([float(index)])}


def test_skipping_passes_a_run_of_bad_items_and_wraps_around():
    wrapped = SkippingDataset(Listed(6, bad={1, 2, 5}))
    first = wrapped[1]
    assert float(first["x"]) == 3.0
    assert first[BAD_ITEMS] == [BadRecord("image", "item1", "broken 1", 0), BadRecord("image", "item2", "broken 2", 1)]
    assert torch.equal(wrapped[1]["x"], first["x"])  # the same index gives the same item
    last = wrapped[5]
    assert float(last["x"]) == 0.0 and last[BAD_ITEMS] == [BadRecord("image", "item5", "broken 5", 0)]
    assert wrapped[4][BAD_ITEMS] == []
    assert [float(item["x"]) for item in wrapped] == [0.0, 3.0, 3.0, 3.0, 4.0, 0.0]  # iteration ends at the length


def test_skipping_gives_up_when_no_item_can_be_read_naming_examples():
    wrapped = SkippingDataset(Listed(7, bad=set(range(7))))
    with pytest.raises(BadDataError, match=r"no item of the 7 in Listed.*item3 \(image: broken 3\).*and 2 more"):
        wrapped[3]


def test_skipping_needs_dict_items():
    class Pairs(Listed):
        def __getitem__(self, index: int) -> tuple:
            return index, index

    with pytest.raises(TypeError, match="dict items, Pairs gave a tuple"):
        SkippingDataset(Pairs(2, bad=set()))[0]


def test_collate_uses_the_datasets_own_collate_and_joins_the_records():
    plain = SkippingDataset(Listed(6, bad={1, 2}))
    batch = plain.collate([plain[0], plain[1], plain[3]])
    assert torch.equal(batch["x"], torch.tensor([[0.0], [3.0], [3.0]]))
    assert batch[BAD_ITEMS] == [("image", "item1", "broken 1", 0), ("image", "item2", "broken 2", 1)]

    class OwnCollate(Listed):
        @staticmethod
        def collate(items: list[dict]) -> dict:
            return {"x": [float(item["x"]) for item in items], "keys": sorted(items[0])}

    own = SkippingDataset(OwnCollate(6, bad={2}))
    assert own.collate([own[2], own[4]]) == {"x": [3.0, 4.0], "keys": ["x"], BAD_ITEMS: [("image", "item2", "broken 2", 0)]}


# ---------------------------------------------------------------------------------------------- BadDataLedger


def test_ledger_counts_each_requested_bad_item_once_per_kind():
    ledger = BadDataLedger()
    assert ledger.metrics() == {"bad_fraction": 0.0} and ledger.summary() == ""
    ledger.add([("image", "a.png", "empty", 0), ("image", "b.png", "empty", 1)], items=4)  # b counts when asked for
    ledger.add([BadRecord("latent", "c.npy", "non-finite", 0)], items=4)
    ledger.add([], items=2)
    assert ledger.metrics() == {"bad_fraction": 0.2, "bad_image": 1, "bad_latent": 1}
    summary = ledger.summary()
    assert summary.startswith("2 of 10 items read were bad (20.00%; image 1, latent 1)")
    assert "a.png (image: empty); b.png (image: empty); c.npy (latent: non-finite)" in summary
    with pytest.raises(ValueError, match="2 items cannot hold substitutes for 3"):
        ledger.add([("video", f"{i}.mp4", "hangs", 0) for i in range(3)], items=2)


def test_ledger_stops_past_the_fraction_naming_examples_and_not_before():
    ledger = BadDataLedger(max_bad_fraction=0.1)
    ledger.add([("image", "first.png", "cannot decode", 0)], items=2)
    ledger.check()  # half of 2 items: too few to judge
    ledger.add([("video", f"v{i}.mp4", "no reader decodes it", 0) for i in range(4)], items=48)
    ledger.check()  # 5 of 50: exactly the limit
    ledger.add([("video", "v4.mp4", "decode timed out after 60 s", 0)], items=1)
    with pytest.raises(BadDataError) as info:
        ledger.check()
    message = str(info.value)
    assert "6 of 51 items read were bad" in message and "limit is BadDataLedger.max_bad_fraction = 0.1" in message
    assert "'BadDataLedger.max_bad_fraction = 0.12'" in message  # a limit just above what was seen
    assert "first.png (image: cannot decode)" in message and "v3.mp4 (video: no reader decodes it)" in message
    assert "v4.mp4" not in message  # five examples at most


def test_ledger_limits_are_gin_configurable():
    gin.parse_config(["BadDataLedger.max_bad_fraction = 0.05", "BadDataLedger.min_items = 10"])
    ledger = BadDataLedger()
    assert (ledger.max_bad_fraction, ledger.min_items) == (0.05, 10)
    ledger.add([("caption", "row.png", "cannot decode image", 0)], items=10)
    with pytest.raises(BadDataError, match="limit is BadDataLedger.max_bad_fraction = 0.05"):
        ledger.check()
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadDataLedger(max_bad_fraction=1.5)


def test_ledger_state_survives_a_resume():
    ledger = BadDataLedger()
    ledger.add([("video", "a.mp4", "garbage", 0), ("video", "b.mp4", "garbage", 1)], items=8)
    resumed = BadDataLedger()
    resumed.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    resumed.add([("latent", "c.npy", "empty", 0)], items=2)
    assert resumed.metrics() == {"bad_fraction": 0.2, "bad_latent": 1, "bad_video": 1}
    assert [record.path for record in resumed.examples] == ["a.mp4", "b.mp4", "c.npy"]


def test_items_left_out_before_training_count_as_bad_data_from_the_start():
    # A bucketed dataset leaves out the items whose size cannot be read; they were once outside the ledger, so a
    # bucket run trained on with 4.8 % bad files where a plain run stopped.
    ledger = BadDataLedger(max_bad_fraction=0.01, min_items=50)
    ledger.add_left_out([("image", f"{i}.png", "cannot read the header") for i in range(3)], listed=62)
    assert ledger.metrics() == {"bad_fraction": 3 / 62, "bad_image": 3}
    with pytest.raises(BadDataError, match=r"3 of 62 items were left out before training, their size unreadable "
                                           r"\(image 3\): 4.84% bad in all"):
        ledger.check()  # at start: all 62 items were looked at
    lenient = BadDataLedger(max_bad_fraction=0.1)
    lenient.add_left_out([("video", "a.mp4", "no reader reads its size")], listed=10)
    lenient.add([("image", "b.png", "empty", 0)], items=5)  # 1 of 5 of the other items
    assert lenient.bad_fraction == pytest.approx(0.1 + 0.9 * 0.2)
    assert lenient.metrics()["bad_image"] == 1 and lenient.metrics()["bad_video"] == 1


def test_ledger_counts_are_global_over_processes_and_resume_on_any_count():
    ranks = [BadDataLedger(max_bad_fraction=0.2, min_items=10) for _ in range(2)]
    ranks[0].add([("image", "a.png", "empty", 0), ("image", "b.png", "empty", 0)], items=4)  # rank 0 alone: 50 %
    ranks[1].add([], items=8)
    summed = [a + b for a, b in zip(ranks[0].local_counts(), ranks[1].local_counts())]
    for ledger in ranks:
        ledger.share(summed)
        assert (ledger.total_items, dict(ledger.total_bad), ledger.bad_fraction) == (12, {"image": 2}, 2 / 12)
        ledger.check()  # 2 of 12 over both processes: under the limit, on both
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert (state["items"], state["bad"]) == (12, {"image": 2})
    one = BadDataLedger(max_bad_fraction=0.2, min_items=10)  # resumed on one process: continues the global counts
    one.load_state_dict(state)
    one.add([("video", "c.mp4", "garbage", 0)], items=3)
    assert (one.total_items, one.bad_fraction) == (15, 3 / 15)
    one.add([("video", "d.mp4", "garbage", 0)], items=1)
    with pytest.raises(BadDataError, match="4 of 16 items read were bad"):
        one.check()


# ---------------------------------------------------------------------------------------------- video: timeout


def test_call_with_timeout_returns_raises_or_abandons():
    assert call_with_timeout(lambda: 3, 1.0) == 3 and call_with_timeout(lambda: 4, None) == 4
    with pytest.raises(KeyError, match="inner"):
        call_with_timeout(lambda: {}["inner"], 1.0)
    release = threading.Event()
    with pytest.raises(TimeoutError, match="0.05 s"):
        call_with_timeout(lambda: release.wait(30), 0.05)
    release.set()


def test_a_video_decode_that_hangs_times_out_and_is_not_retried(tmp_path, monkeypatch):
    paths = _videos(tmp_path / "ramps")
    release, hung_calls = threading.Event(), []
    real_reader = video_module._READERS["pyav"]

    def hanging_reader(path: Path, pick: Callable[[int], list[int]]) -> np.ndarray:
        if path == paths[1]:
            hung_calls.append(path)
            release.wait(30)
        return real_reader(path, pick)

    monkeypatch.setitem(video_module._READERS, "pyav", hanging_reader)
    dataset = VideoFolderDataset(tmp_path, clip_length=3, random_crop_time=False, reader="pyav",
                                 fallback_reader=None, decode_timeout=0.5)
    wrapped = SkippingDataset(dataset)
    try:
        item = wrapped[1]
        assert item[BAD_ITEMS] == [BadRecord("video", str(paths[1]), "decode timed out after 0.5 s", 0)]
        assert torch.equal(item["x"], dataset[2]["x"])
        assert wrapped[1][BAD_ITEMS] == item[BAD_ITEMS]
        assert len(hung_calls) == 1  # remembered: the second request waits for no second hung thread
    finally:
        release.set()
    with pytest.raises(ValueError, match="decode_timeout"):
        VideoFolderDataset(tmp_path, reader="pyav", decode_timeout=0)


def test_a_remembered_bad_video_leaves_the_random_stream_as_a_fresh_process_sees_it(tmp_path):
    """A resumed run's workers have not seen the bad files yet: they must draw the same clip starts."""
    paths = _videos(tmp_path / "ramps", frames=8)
    damage(paths[1], "garbage")
    options = dict(clip_length=3, reader="pyav", fallback_reader=None)  # random clip starts
    seen, fresh = VideoFolderDataset(tmp_path, **options), VideoFolderDataset(tmp_path, **options)
    with pytest.raises(BadItem):
        seen[1]
    clips = []
    for dataset in (seen, fresh):
        torch.manual_seed(3)
        wrapped = SkippingDataset(dataset)
        clips.append(torch.stack([wrapped[index]["x"] for index in (1, 2, 1, 0, 1, 2)]))
    assert torch.equal(clips[0], clips[1])


# ---------------------------------------------------------------------------------------------- latents


def _three_latents(root: Path) -> Path:
    """Three latents (moments of value i and 1) with their images; returns the file of item 1."""
    write_latent_layout(root, {i: np.full((4, 2, 2), float(i)) for i in range(3)},
                        {i: np.ones((4, 2, 2)) for i in range(3)}, {i: 0 for i in range(3)})
    return root / "vae-sd" / latent_member(1)


def _save_npz(path: Path) -> None:
    with open(path, "wb") as file:
        np.savez(file, moments=np.zeros((8, 2, 2), dtype=np.float32))


LATENT_DAMAGE = {
    "empty": (lambda path: damage(path, "empty"), "the file is empty"),
    "truncated": (lambda path: damage(path, "truncated"), "cannot decode .npy"),
    "garbage": (lambda path: damage(path, "garbage"), "cannot decode .npy"),
    "npz": (_save_npz, "expected float moments, got NpzFile"),
    "integers": (lambda path: np.save(path, np.zeros((8, 2, 2), dtype=np.int32)), "expected float moments, got int32"),
    "odd channels": (lambda path: np.save(path, np.zeros((3, 2, 2), np.float32)), r"expected \(2C, h, w\)"),
    "other shape": (lambda path: np.save(path, np.zeros((6, 2, 2), np.float32)),
                    r"shape \(6, 2, 2\), but the dataset's items have \(8, 2, 2\)"),
    "infinite": (lambda path: np.save(path, np.full((8, 2, 2), np.inf, np.float32)), "non-finite"),
    "negative std": (lambda path: np.save(path, -np.ones((8, 2, 2), np.float32)), "std has negative values"),
}


@pytest.mark.parametrize("how", sorted(LATENT_DAMAGE))
def test_latent_files_that_cannot_be_used_are_bad_items(tmp_path, how):
    spoil, reason = LATENT_DAMAGE[how]
    path = _three_latents(tmp_path)
    spoil(path)
    dataset = LatentDataset(str(tmp_path))
    with pytest.raises(BadItem, match=reason) as info:
        dataset[1]
    assert (info.value.kind, info.value.path) == ("latent", str(path))
    assert dataset[2]["x"].shape == (4, 2, 2)


def test_latent_bad_partner_images_and_damaged_archives_are_bad_items(tmp_path):
    _three_latents(tmp_path)
    image = damage(tmp_path / "images" / image_member(1), "truncated")
    with pytest.raises(BadItem, match="cannot decode image") as info:
        LatentDataset(str(tmp_path), with_images=True)[1]
    assert (info.value.kind, info.value.path) == ("latent", str(image))

    archive = tmp_path / "packed" / "vae-sd.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:  # stored: every member's bytes appear as they are
        for path in sorted((tmp_path / "vae-sd").rglob("*")):
            zipped.write(path, path.relative_to(tmp_path / "vae-sd").as_posix())
    data = bytearray(archive.read_bytes())
    member = (tmp_path / "vae-sd" / latent_member(1)).read_bytes()
    data[data.index(member) + len(member) - 4] ^= 0xFF  # one byte of the array: the CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(BadItem, match="cannot read: BadZipFile") as info:
        LatentDataset(str(archive.parent))[1]
    assert info.value.path == f"{archive}/{latent_member(1)}"


def test_a_latent_dataset_none_of_whose_samples_reads_fails_at_construction(tmp_path):
    _three_latents(tmp_path)
    for index in range(3):
        damage(tmp_path / "vae-sd" / latent_member(index), "empty")
    with pytest.raises(BadDataError, match=r"none of the items \[0, 1, 2\] can be read.*the file is empty"):
        LatentDataset(str(tmp_path))


VIDEO_LATENT_DAMAGE = {
    "garbage": (lambda: b"not safetensors", "cannot decode safetensors"),
    "no std": (lambda: {"mean": torch.zeros(4, 2, 2, 2)}, r"must hold 'mean' and 'std', holds \['mean'\]"),
    "mismatched": (lambda: {"mean": torch.zeros(4, 2, 2, 2), "std": torch.ones(4, 2, 2)}, "one \\(C, T, h, w\\) shape"),
    "other frames": (lambda: {"mean": torch.zeros(4, 3, 2, 2), "std": torch.ones(4, 3, 2, 2)},
                     r"shape \(2, 4, 3, 2, 2\), but the dataset's items have \(2, 4, 2, 2, 2\)"),
    "nan": (lambda: {"mean": torch.full((4, 2, 2, 2), torch.nan), "std": torch.ones(4, 2, 2, 2)}, "non-finite"),
}


@pytest.mark.parametrize("how", sorted(VIDEO_LATENT_DAMAGE))
def test_video_latent_files_that_cannot_be_used_are_bad_items(tmp_path, how):
    content, reason = VIDEO_LATENT_DAMAGE[how]
    for index in range(3):
        save_file({"mean": torch.zeros(4, 2, 2, 2), "std": torch.ones(4, 2, 2, 2)}, tmp_path / f"{index}.safetensors")
    (tmp_path / "index.jsonl").write_text("".join(
        json.dumps({"path": f"{index}.safetensors", "label": index}) + "\n" for index in range(3)))
    spoiled = content()
    if isinstance(spoiled, bytes):
        (tmp_path / "1.safetensors").write_bytes(spoiled)
    else:
        save_file(spoiled, tmp_path / "1.safetensors")
    dataset = VideoLatentDataset(str(tmp_path))
    with pytest.raises(BadItem, match=reason) as info:
        dataset[1]
    assert (info.value.kind, info.value.path) == ("latent", str(tmp_path / "1.safetensors"))
    assert SkippingDataset(dataset)[1]["label"] == 2


# ---------------------------------------------------------------------------------------------- captions


def test_caption_rows_with_a_failing_video_reader_or_cache_file_are_bad_items(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"read by the injected reader")
    index = tmp_path / "videos.jsonl"
    index.write_text("".join(json.dumps({"path": n, "caption": f"clip {n}"}) + "\n" for n in ("a.mp4", "b.mp4")))

    def reader(path: str) -> torch.Tensor:
        if path.endswith("a.mp4"):
            raise RuntimeError("moov atom not found")
        return torch.zeros(3, 2, 8, 8)

    videos = CaptionDataset(str(index), 8, media="video", video_reader=reader)
    with pytest.raises(BadItem, match="video_reader failed: RuntimeError: moov atom not found") as info:
        videos[0]
    assert (info.value.kind, info.value.path) == ("caption", str(tmp_path / "a.mp4"))
    nan = CaptionDataset(str(index), 8, media="video", video_reader=lambda path: torch.full((3, 2, 8, 8), torch.nan))
    with pytest.raises(BadItem, match="non-finite"):
        nan[1]

    def missing_package(path: str) -> torch.Tensor:
        raise ImportError("No module named 'av'")

    with pytest.raises(ImportError):  # a missing package stops the run; it is no bad row
        SkippingDataset(CaptionDataset(str(index), 8, media="video", video_reader=missing_package))[0]

    images = _noise_images(tmp_path / "images")
    captions = tmp_path / "images.jsonl"
    captions.write_text("".join(json.dumps({"path": f"images/{p.name}", "caption": f"noise {i}"}) + "\n"
                                for i, p in enumerate(images[:2])))
    cache = EmbeddingCache(tmp_path / "cache", "tiny")
    for caption in ("noise 0", "noise 1"):
        cache.put(caption, {"text_tokens": torch.ones(3, 4), "text_mask": torch.ones(3, dtype=torch.bool)})
    damage(cache.path("noise 0"), "truncated")
    cached = CaptionDataset(str(captions), 8, cache_dir=str(tmp_path / "cache"), encoder_identity="tiny")
    with pytest.raises(BadItem, match="cannot read the cached text embedding") as info:
        cached[0]
    assert info.value.path == str(cache.path("noise 0"))
    assert torch.equal(SkippingDataset(cached)[0]["text_tokens"], torch.ones(3, 4))


def test_a_video_of_another_size_without_a_resolution_is_a_bad_item_not_a_collate_error(tmp_path):
    # resolution None keeps each clip's frame size: one clip of another size used to fail at step 1 in collate.
    _videos(tmp_path / "0")
    odd = tmp_path / "0" / "odd.mp4"
    save_video(torch.zeros(3, 3, 16, 24), odd)
    dataset = VideoFolderDataset(tmp_path, clip_length=3, resolution=None, reader="pyav", fallback_reader=None)
    assert dataset.frame_size == (32, 32)
    odd_index = [path for path, _ in dataset.samples].index(odd)
    with pytest.raises(BadItem, match=r"odd.mp4: frames of 16x24 px, but the dataset's videos have 32x32"):
        dataset[odd_index]
    loader = DataLoader(SkippingDataset(dataset), batch_size=COUNT + 1, collate_fn=SkippingDataset(dataset).collate)
    batch = next(iter(loader))
    assert batch["x"].shape == (COUNT + 1, 3, 3, 32, 32)
    assert [record.path for record in batch[BAD_ITEMS]] == [str(odd)]


# ---------------------------------------------------------------------------------------------- two processes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_processes_count_and_judge_the_bad_data_of_both(tmp_path, capsys):
    # The plain index stream reads the same global batches on one and on two processes, so the global counts, and the
    # step the run stops at, must be the same; counted per process (as before) two processes saw about half.
    from sklearn.datasets import load_digits

    from sprint_mm.cli import train_main
    from tests.test_distributed import torchrun
    from tests.test_training import TINY

    digits, folder = load_digits(), tmp_path / "images"
    for i in range(48):
        path = folder / str(digits.target[i]) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(path)
    for i in range(4):
        (folder / str(i) / f"bad_{i}.png").write_bytes(b"")
    bindings = [*TINY, f"ImageFolderDataset.root = {str(folder)!r}", "ImageFolderDataset.resolution = 8",
                "Trainer.dataset = @ImageFolderDataset()", "sit.in_channels = 3", "IdentityCodec.channels = 3",
                "Trainer.log_every = 1", "Trainer.max_steps = 12", "BadDataLedger.min_items = 16",
                "BadDataLedger.max_bad_fraction = 0.06", "Trainer.progress = False"]

    def argv(run: str) -> list[str]:
        return [arg for binding in bindings for arg in ("--gin-param", binding)] + [
            "--gin-file", "gin/image/digits_stage1.gin", "--run-dir", str(tmp_path / run)]

    assert train_main(argv("one")) == 2  # 4 bad of 52 (7.7 %) stop the run once enough items are read
    stopped = re.search(r"too much bad data: (\d+ of \d+ items read were bad)", capsys.readouterr().err).group(1)
    assert stopped == "2 of 24 items read were bad"  # at step 3, the third global batch of 8
    done = torchrun("train.py", *argv("two"))
    assert done.returncode != 0
    assert set(re.findall(r"too much bad data: (\d+ of \d+ items read were bad)", done.stderr)) == {stopped}
    one, two = (([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
                for run in ("one", "two"))
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2]
