"""Tests for sprint_mm.data.video, sprint_mm.data.moving_digits and its command line datasets/make_moving_digits.py, on
real mp4 files."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sprint_mm.data import moving_digits
from sprint_mm.data import video as video_module
from sprint_mm.data.faults import BAD_ITEMS, BadDataError, BadDataLedger, SkippingDataset
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.data.video import VideoFolderDataset, clip_frame_indices
from sprint_mm.media import save_video
from tests.helpers import dataset_script

NUM_VIDEOS, FRAMES, SIZE, SEED = 6, 8, 32, 7
LEVEL = 2.0 / 255.0  # one uint8 step in [-1, 1] units


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    moving_digits.write_moving_digits(root, NUM_VIDEOS, FRAMES, SIZE, SEED)
    return root


@pytest.fixture(scope="module")
def corrupt_root(digits_root, tmp_path_factory) -> tuple[Path, set[Path]]:
    """A copy of the digits with random bytes and a truncated mp4 among the good files."""
    root = tmp_path_factory.mktemp("corrupt") / "videos"
    shutil.copytree(digits_root, root)
    random_bytes = root / "2" / "zz_random.mp4"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = root / "4" / "zz_truncated.mp4"
    whole = (root / "4" / "000004.mp4").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    return root, {random_bytes, truncated}


def _decode_all_pyav(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _as_model_input(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) in [-1, 1], the dataset's documented mapping."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _expected_labels(dataset: VideoFolderDataset, bad: set[Path]) -> list[int]:
    """Each bad index yields the next decodable sample, wrapping around."""
    count = len(dataset.samples)
    labels = []
    for index in range(count):
        following = (dataset.samples[(index + offset) % count] for offset in range(count))
        labels.append(next(label for path, label in following if path not in bad))
    return labels


# ---------------------------------------------------------------------------------------------- the script


def test_script_writes_balanced_class_folders_of_readable_videos(digits_root):
    expected = list(moving_digits.moving_digit_videos(NUM_VIDEOS, FRAMES, SIZE, SEED))
    for index, (digit, video) in enumerate(expected):
        assert digit == index % 10
        path = digits_root / str(digit) / f"{index:06d}.mp4"
        decoded = _decode_all_pyav(path)
        assert decoded.shape == (FRAMES, SIZE, SIZE, 3)
        gray = decoded.astype(np.float32).mean(axis=-1) / 255.0
        # A low crf keeps the small white-on-black digit close to the frames that were drawn.
        assert np.abs(gray - video).mean() < 0.01
        assert np.abs(gray - video).max() < 0.25


@pytest.mark.parametrize("digit_fraction", [moving_digits.DIGIT_FRACTION, 0.75])
def test_moving_digit_stays_whole_on_the_canvas_and_moves(digit_fraction):
    videos = [video for _, video in moving_digits.moving_digit_videos(10, 40, SIZE, 1, digit_fraction)]
    grid = np.arange(SIZE, dtype=np.float32)
    speed_limit = moving_digits.SPEED_RANGE[1] * SIZE
    for video in videos:
        assert video.min() >= 0.0 and video.max() <= 1.0
        mass = video.sum(axis=(1, 2))
        np.testing.assert_allclose(mass, mass[0], rtol=1e-5)  # never clipped by a wall
        centre_y = (video.sum(axis=2) * grid).sum(axis=1) / mass
        centre_x = (video.sum(axis=1) * grid).sum(axis=1) / mass
        steps = np.hypot(np.diff(centre_y), np.diff(centre_x))
        assert steps.max() <= speed_limit + 1.5  # rounding to whole pixels adds at most ~1.4 px
        assert np.hypot(centre_y - centre_y[0], centre_x - centre_x[0]).max() > 1.0
        lit_rows = np.flatnonzero(video[0].max(axis=1) > 0)  # the sprite's extent: its side in pixels
        assert lit_rows[-1] - lit_rows[0] + 1 <= moving_digits.digit_side(SIZE, digit_fraction)


@pytest.mark.parametrize("digit_fraction", [0.0, 1.0, 0.95, -0.2])
def test_digit_fraction_that_leaves_no_room_is_rejected(digit_fraction):
    with pytest.raises(ValueError, match="digit_fraction"):
        next(moving_digits.moving_digit_videos(1, 4, 16, 0, digit_fraction))


def test_script_command_line_is_deterministic(tmp_path):
    argv = ["--num", "3", "--frames", "4", "--size", "16", "--seed", "3"]
    command = dataset_script("make_moving_digits")
    first = command.main(["--out", str(tmp_path / "a"), *argv, "--digit-fraction", "0.5"])
    second = command.main(["--out", str(tmp_path / "b"), *argv, "--digit_fraction", "0.5"])  # the older spelling
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    other = next(moving_digits.moving_digit_videos(1, 4, 16, seed=4))[1]
    assert not np.array_equal(other, next(moving_digits.moving_digit_videos(1, 4, 16, seed=3))[1])
    with pytest.raises(ValueError, match="size"):
        moving_digits.write_moving_digits(tmp_path / "c", 1, 4, 8, 0)


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("frame_count, clip_length, stride", [(20, 4, 3), (8, 4, 5), (9, 1, 4), (8, 8, 2)])
def test_clip_indices_use_the_largest_stride_that_fits_and_are_centred(frame_count, clip_length, stride):
    indices = clip_frame_indices(frame_count, clip_length, stride, random_start=False)
    assert len(indices) == clip_length
    used = indices[1] - indices[0] if clip_length > 1 else stride
    assert all(b - a == used for a, b in zip(indices, indices[1:]))
    assert used <= stride and indices[-1] < frame_count
    if used < stride:  # one more would not fit
        assert (clip_length - 1) * (used + 1) + 1 > frame_count
    slack = frame_count - 1 - indices[-1] - indices[0]
    assert slack in (0, 1)  # as much room after the clip as before it, up to one frame


def test_clip_indices_loop_short_videos_and_random_starts_cover_the_range():
    assert clip_frame_indices(3, 7, 2, random_start=True) == [0, 1, 2, 0, 1, 2, 0]
    torch.manual_seed(0)
    starts = {clip_frame_indices(10, 3, 2, random_start=True)[0] for _ in range(200)}
    assert starts == set(range(10 - 5 + 1))
    with pytest.raises(ValueError, match="0 frames"):
        clip_frame_indices(0, 4, 1, random_start=False)


def test_resize_then_centre_crop():
    wide = torch.rand(2, 3, 16, 40)
    torch.testing.assert_close(resize_center_crop(wide, 16, "bilinear"), wide[..., :, 12:28], rtol=0, atol=0)
    tall = torch.rand(2, 3, 40, 16)
    torch.testing.assert_close(resize_center_crop(tall, 16, "bilinear"), tall[..., 12:28, :], rtol=0, atol=0)

    ramp = torch.linspace(0, 255, 60).expand(1, 3, 30, 60)  # resized to 16 x 32, crop columns 8..23
    out = resize_center_crop(ramp, 16, "bilinear")
    assert out.shape == (1, 3, 16, 16)
    assert abs(out.mean().item() - 127.5) < 2.0  # the centre of a symmetric ramp
    assert (out[..., 1:] > out[..., :-1]).all()


# ---------------------------------------------------------------------------------------------- the dataset


def test_folder_labels_and_item_layout(digits_root):
    dataset = VideoFolderDataset(digits_root, clip_length=FRAMES, random_crop_time=False, reader="pyav")
    assert dataset.classes == sorted(p.name for p in digits_root.iterdir())
    assert len(dataset) == NUM_VIDEOS
    for path, label in dataset.samples:
        assert label == dataset.classes.index(path.parent.name)
    item = dataset[3]
    assert item["label"] == dataset.samples[3][1]
    assert item["x"].shape == (3, FRAMES, SIZE, SIZE) and item["x"].dtype == torch.float32
    torch.testing.assert_close(item["x"], _as_model_input(_decode_all_pyav(dataset.samples[3][0])))


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_clip_length_stride_and_resolution(digits_root, reader):
    dataset = VideoFolderDataset(
        digits_root, clip_length=3, frame_stride=2, random_crop_time=False, reader=reader, fallback_reader=None
    )
    path = dataset.samples[0][0]
    everything = _decode_all_pyav(path)
    chosen = everything[[1, 3, 5]]  # span 5 of 8 frames, centred: starts at (8 - 5) // 2
    torch.testing.assert_close(dataset[0]["x"], _as_model_input(chosen), rtol=0, atol=2 * LEVEL)

    small = VideoFolderDataset(digits_root, clip_length=12, resolution=16, reader=reader, fallback_reader=None)
    x = small[0]["x"]
    assert x.shape == (3, 12, 16, 16)
    looped = _as_model_input(everything[[i % FRAMES for i in range(12)]])
    pooled = torch.nn.functional.avg_pool2d(looped, 2)  # square frames: nothing is cropped
    assert (x - pooled).abs().mean() < 0.05


def _count_pyav_reads(monkeypatch) -> list[Path]:
    """Every path the PyAV reader is asked to decode from now on."""
    reads: list[Path] = []
    original = video_module._READERS["pyav"]
    monkeypatch.setitem(video_module._READERS, "pyav", lambda path, pick: reads.append(path) or original(path, pick))
    return reads


def test_cached_frames_give_the_same_clips_and_decode_each_file_once(digits_root, monkeypatch):
    options = dict(clip_length=3, frame_stride=2, reader="pyav", fallback_reader=None)
    plain = VideoFolderDataset(digits_root, **options)
    cached = VideoFolderDataset(digits_root, cache_frames=True, **options)
    expected = []
    for epoch in range(2):
        torch.manual_seed(epoch)  # the same random clip starts for both datasets
        expected.append([plain[i]["x"] for i in range(len(plain))])
    reads = _count_pyav_reads(monkeypatch)
    for epoch in range(2):
        torch.manual_seed(epoch)
        assert all(torch.equal(cached[i]["x"], clip) for i, clip in enumerate(expected[epoch]))
    assert sorted(reads) == sorted(path for path, _ in cached.samples)  # each file decoded once, in epoch 0


def test_cached_frames_still_skip_corrupt_files(corrupt_root, monkeypatch):
    root, bad = corrupt_root
    dataset = VideoFolderDataset(root, clip_length=4, reader="pyav", fallback_reader=None, cache_frames=True)
    wrapped = SkippingDataset(dataset)
    reads = _count_pyav_reads(monkeypatch)
    for _ in range(2):
        items = [wrapped[i] for i in range(len(dataset))]
        assert [item["label"] for item in items] == _expected_labels(dataset, bad)
        assert {Path(record.path) for item in items for record in item[BAD_ITEMS]} == bad
    assert len(dataset._frame_cache) == len(dataset) - len(bad)
    assert len(reads) == len(dataset)  # a corrupt file is tried once, a good one decoded once


def test_both_readers_give_the_same_frames(digits_root):
    by_reader = {
        reader: VideoFolderDataset(
            digits_root, clip_length=6, frame_stride=1, random_crop_time=False, reader=reader, fallback_reader=None
        )
        for reader in ("decord", "pyav")
    }
    for index in range(NUM_VIDEOS):
        a, b = by_reader["decord"][index]["x"], by_reader["pyav"][index]["x"]
        torch.testing.assert_close(a, b, rtol=0, atol=2 * LEVEL)


def test_decord_failures_fall_back_to_pyav(tmp_path):
    # decord 0.6 raises on frames 48 px wide; PyAV decodes them.
    video = torch.linspace(-0.9, 0.9, 48).expand(3, 4, 32, 48).contiguous()
    save_video(video, tmp_path / "wide" / "ramp.mp4")
    with_fallback = VideoFolderDataset(tmp_path, clip_length=4, random_crop_time=False, reader="decord")
    pyav = VideoFolderDataset(tmp_path, clip_length=4, random_crop_time=False, reader="pyav")
    item = SkippingDataset(with_fallback)[0]
    torch.testing.assert_close(item["x"], pyav[0]["x"])
    assert item[BAD_ITEMS] == []


def test_pyav_counts_frames_when_the_container_does_not_record_them(tmp_path):
    import imageio.v2 as imageio

    frames = np.linspace(20, 230, 9)[:, None, None, None] + np.random.default_rng(0).uniform(0, 20, (9, 32, 32, 3))
    path = tmp_path / "ramp" / "clip.mkv"  # Matroska stores no frame count
    path.parent.mkdir()
    writer = imageio.get_writer(path, format="FFMPEG", fps=8, codec="libx264", output_params=["-crf", "10"])
    for frame in frames.astype(np.uint8):
        writer.append_data(frame)
    writer.close()
    pyav = VideoFolderDataset(tmp_path, clip_length=4, frame_stride=2, random_crop_time=False, reader="pyav")
    chosen = _decode_all_pyav(path)[[1, 3, 5, 7]]  # span 7 of 9 frames, centred
    torch.testing.assert_close(pyav[0]["x"], _as_model_input(chosen), rtol=0, atol=0)


def test_csv_and_jsonl_indexes(digits_root, tmp_path):
    folder = VideoFolderDataset(digits_root, clip_length=4, random_crop_time=False, reader="pyav")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    index_dir = tmp_path / "lists"
    index_dir.mkdir()

    with (index_dir / "index.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"])
        for path, _ in folder.samples:
            writer.writerow([os.path.relpath(path, index_dir), names[int(path.parent.name)]])
    by_name = VideoFolderDataset(index_dir / "index.csv", clip_length=4, random_crop_time=False, reader="pyav")
    assert by_name.classes == sorted(names[int(p.parent.name)] for p, _ in folder.samples)
    assert [label for _, label in by_name.samples] == [
        by_name.classes.index(names[int(p.parent.name)]) for p, _ in folder.samples
    ]
    torch.testing.assert_close(by_name[2]["x"], folder[2]["x"])

    lines = [
        {"path": str(path) if i % 2 else os.path.relpath(path, index_dir), "label": 10 * int(path.parent.name)}
        for i, (path, _) in enumerate(folder.samples)
    ]
    (index_dir / "index.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    by_id = VideoFolderDataset(index_dir / "index.jsonl", clip_length=4, random_crop_time=False, reader="pyav")
    assert by_id.classes is None
    assert [label for _, label in by_id.samples] == [line["label"] for line in lines]
    for index in (0, 1):
        assert by_id[index]["label"] == lines[index]["label"]
        torch.testing.assert_close(by_id[index]["x"], folder[index]["x"])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.csv", "file,label\na.mp4,1\n", "path,label"),
        ("bad.csv", "path,label\na.mp4,1\n,2\n", "line 3 has no path"),
        ("bad.csv", "path,label\na.mp4,\n", "line 2 .* has no label"),
        ("bad.csv", "path,label\n", "lists no videos"),
        ("bad.jsonl", '{"path": "a.mp4", "label": 1}\n{"label": 2}\n', "line 2 has no path"),
        ("bad.jsonl", '{"path": "a.mp4", "label": 1}\nnot json\n', "line 2 is not JSON"),
        ("bad.jsonl", '{"path": "a.mp4", "label": 1.5}\n', "integer id or a class name"),
        ("bad.jsonl", '{"path": "a.mp4", "label": -1}\n', ">= 0"),
        ("bad.txt", "a.mp4 1\n", r"\.csv"),
    ],
)
def test_bad_index_files_get_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        VideoFolderDataset(tmp_path / name, reader="pyav")


def test_bad_roots_and_options_get_one_clear_error(tmp_path, digits_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFolderDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class sub-folders"):
        VideoFolderDataset(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="cats holds no videos"):
        VideoFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="'opencv'.*decord, pyav"):
        VideoFolderDataset(digits_root, reader="opencv")
    with pytest.raises(ValueError, match="clip_length"):
        VideoFolderDataset(digits_root, clip_length=0)


def test_missing_reader_package_is_an_error_not_a_skipped_file(digits_root, monkeypatch):
    real_find_spec = importlib.util.find_spec
    def find_spec_without_decord(name, *args):
        return None if name == "decord" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_decord)
    with pytest.raises(ImportError, match=r"'decord'.*sprint-mm\[video\]"):
        VideoFolderDataset(digits_root)
    monkeypatch.undo()

    dataset = VideoFolderDataset(digits_root, reader="pyav")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV vanished after construction
    with pytest.raises(ImportError, match=r"'pyav'.*sprint-mm\[video\]"):
        SkippingDataset(dataset)[0]  # stops the run: it is no bad file to skip
    assert not dataset._failed


def test_dataset_is_gin_configurable(digits_root):
    gin.parse_config(["VideoFolderDataset.clip_length = 5", "VideoFolderDataset.reader = 'pyav'"])
    try:
        dataset = VideoFolderDataset(digits_root)
    finally:
        gin.clear_config()
    assert dataset.clip_length == 5 and dataset.readers == ["pyav"]
    assert dataset[0]["x"].shape[1] == 5


# ---------------------------------------------------------------------------------------------- bad files


def _read_counting(dataset: VideoFolderDataset, num_workers: int) -> tuple[list[int], BadDataLedger]:
    """Every item's label through SkippingDataset and a DataLoader, and the ledger of the bad items met."""
    wrapped = SkippingDataset(dataset)
    ledger = BadDataLedger()
    workers = dict(num_workers=num_workers, multiprocessing_context="fork", timeout=60) if num_workers else {}
    loader = DataLoader(wrapped, batch_size=3, collate_fn=wrapped.collate, **workers)
    labels = []
    for batch in loader:
        assert batch["x"].abs().max() <= 1.0
        ledger.add(batch.pop(BAD_ITEMS), items=len(batch["x"]))
        labels += batch["label"].tolist()
    return labels, ledger


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_corrupt_files_are_skipped_and_counted_in_the_main_process(corrupt_root, reader):
    root, bad = corrupt_root
    dataset = VideoFolderDataset(root, clip_length=4, reader=reader, fallback_reader=None)
    assert len(dataset) == NUM_VIDEOS + 2
    labels, ledger = _read_counting(dataset, num_workers=0)
    assert labels == _expected_labels(dataset, bad)
    assert ledger.metrics() == {"bad_fraction": 2 / len(dataset), "bad_video": 2}
    assert {Path(record.path) for record in ledger.examples} == bad
    assert all(record.reason.startswith(f"no reader decodes it: {reader}:") for record in ledger.examples)


def test_corrupt_files_are_skipped_inside_forked_workers(corrupt_root):
    root, bad = corrupt_root
    dataset = VideoFolderDataset(root, clip_length=4, reader="decord", fallback_reader="pyav")
    labels, ledger = _read_counting(dataset, num_workers=2)
    assert labels == _expected_labels(dataset, bad)
    assert ledger.metrics() == {"bad_fraction": 2 / len(dataset), "bad_video": 2}  # the records came with the batches
    assert {Path(record.path) for record in ledger.examples} == bad
    assert not dataset._failed  # each worker remembered them in its own copy


def test_a_folder_of_only_corrupt_files_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"not a video")
    dataset = SkippingDataset(VideoFolderDataset(tmp_path, reader="pyav"))
    with pytest.raises(BadDataError, match=f"{tmp_path / 'a' / 'x.mp4'}.*no reader decodes it"):
        dataset[0]
