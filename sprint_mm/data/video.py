"""Class-labelled video clips from a folder per class or from a CSV / JSONL index.

Decoding is robust by design: a reader (decord or PyAV) is created inside `__getitem__` and released
before it returns, because a decord reader that crosses a DataLoader fork can deadlock; a file the
reader fails on is retried with a fallback reader; a file that no reader decodes, or whose decode hangs
past a timeout, raises `BadItem`, which `sprint_mm.data.faults.SkippingDataset` skips, counts and reports.
For buckets, `item_size` reads a file's frame count and frame size from its container metadata (PyAV stream info;
decord, which must decode one frame for the size, only when PyAV is not a configured reader), under the same rules.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable

import gin
import numpy as np
import torch
from torch.utils.data import Dataset

from sprint_mm.data.buckets import Shape, file_entries, fingerprint
from sprint_mm.data.faults import BadItem, call_with_timeout
from sprint_mm.data.index import read_index
from sprint_mm.data.transforms import resize_center_crop

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
INSTALL_HINT = "pip install 'sprint-mm[video]'"
# reader name -> the module it imports
READER_MODULES = {"decord": "decord", "pyav": "av"}
_INT_LABEL = re.compile(r"-?\d+")
SIZE_SAMPLES = 5  # how many evenly spaced videos set the frame size of a dataset without a resolution


# ----------------------------------------------------------------------------------------------
# Readers: each returns the frames at the indices `pick(frame_count)` chose, as uint8 (L, H, W, 3)
# ----------------------------------------------------------------------------------------------


def _missing_package(reader: str) -> ImportError:
    return ImportError(
        f"video reader {reader!r} needs the package {READER_MODULES[reader]!r}, which is not installed: "
        f"{INSTALL_HINT} (decord has wheels for x86_64 only; elsewhere use reader='pyav')"
    )


def _import_reader_module(reader: str):
    """Import the package behind `reader` (lazily: only the process that decodes imports it)."""
    try:
        return importlib.import_module(READER_MODULES[reader])
    except ImportError as error:
        raise _missing_package(reader) from error


def _check_reader(reader: str) -> None:
    if reader not in READER_MODULES:
        raise ValueError(f"unknown video reader {reader!r}; allowed: {', '.join(READER_MODULES)}")
    if importlib.util.find_spec(READER_MODULES[reader]) is None:  # fail now, not later in a worker
        raise _missing_package(reader)


def _read_with_decord(path: Path, pick: Callable[[int], list[int]]) -> np.ndarray:
    decord = _import_reader_module("decord")
    # One decoding thread: DataLoader workers already decode in parallel.
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        return reader.get_batch(pick(len(reader))).asnumpy()
    finally:
        del reader


def _pyav_video_stream(container):
    """The first video stream of an open PyAV container and its frame count (counted from the packets, without
    decoding, when the container does not record it; the container is rewound after)."""
    if not container.streams.video:
        raise ValueError("the file has no video stream")
    stream = container.streams.video[0]
    frame_count = stream.frames
    if frame_count == 0:
        frame_count = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    return stream, frame_count


def _read_with_pyav(path: Path, pick: Callable[[int], list[int]]) -> np.ndarray:
    av = _import_reader_module("pyav")
    with av.open(str(path)) as container:
        stream, frame_count = _pyav_video_stream(container)
        stream.thread_type = "AUTO"
        indices = pick(frame_count)
        wanted = set(indices)
        decoded: dict[int, np.ndarray] = {}
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                decoded[position] = frame.to_ndarray(format="rgb24")
            if len(decoded) == len(wanted):
                break
    if len(decoded) < len(wanted):
        raise ValueError(f"the stream ended before frame {max(wanted)} of the {frame_count} its header promised")
    return np.stack([decoded[index] for index in indices])


def _size_with_decord(path: Path) -> Shape:
    decord = _import_reader_module("decord")
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    try:
        height, width = reader[0].shape[:2]  # decord exposes the frame size only through a frame
        return (len(reader), height, width)
    finally:
        del reader


def video_size(path: str | os.PathLike) -> Shape:
    """(frames, height, width) of a video file from its container metadata, without decoding a frame."""
    av = _import_reader_module("pyav")
    with av.open(str(path)) as container:
        stream, frame_count = _pyav_video_stream(container)
        return (frame_count, stream.codec_context.height, stream.codec_context.width)


_READERS = {"decord": _read_with_decord, "pyav": _read_with_pyav}
_SIZERS = {"decord": _size_with_decord, "pyav": video_size}


# ----------------------------------------------------------------------------------------------
# Sources: a folder per class, or an index file
# ----------------------------------------------------------------------------------------------


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def _scan_class_folders(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """root/<class>/**/<video>: classes are the sorted sub-folder names."""
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} holds no class sub-folders; expected root/<class>/<video>{VIDEO_SUFFIXES[0]}")
    samples = []
    for class_id, name in enumerate(classes):
        videos = sorted(path for path in (root / name).rglob("*") if _is_video(path))
        if not videos:
            raise ValueError(f"class folder {root / name} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        samples.extend((path, class_id) for path in videos)
    return samples, classes


def _resolve_labels(raw_labels: list[object], index: Path) -> tuple[list[int], list[str] | None]:
    """Integer labels are kept as ids; otherwise labels are class names numbered in sorted order."""
    for label in raw_labels:
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"{index}: label {label!r} must be an integer id or a class name")
    if all(isinstance(label, int) or _INT_LABEL.fullmatch(label.strip()) for label in raw_labels):
        ids = [int(label) for label in raw_labels]
        if min(ids) < 0:
            raise ValueError(f"{index}: class ids must be >= 0, got {min(ids)}")
        return ids, None
    classes = sorted({str(label).strip() for label in raw_labels})
    class_ids = {name: class_id for class_id, name in enumerate(classes)}
    return [class_ids[str(label).strip()] for label in raw_labels], classes


def _read_index(index: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(path, label) of every video a CSV (header path,label) or JSONL index lists, and the class names if any."""
    rows = read_index(index, ("path", "label"), items="videos")
    for row in rows:
        path, label = row.fields.get("path") or "", row.fields.get("label")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{index}: line {row.line} has no path")
        if label is None or label == "":
            raise ValueError(f"{index}: line {row.line} ({path}) has no label")
    labels, classes = _resolve_labels([row.fields["label"] for row in rows], index)
    paths = [index.parent / row.fields["path"].strip() for row in rows]  # absolute paths stay absolute
    return list(zip(paths, labels)), classes


# ----------------------------------------------------------------------------------------------
# Clip geometry
# ----------------------------------------------------------------------------------------------


def clip_frame_indices(
    frame_count: int, clip_length: int, frame_stride: int, random_start: bool, generator: torch.Generator | None = None
) -> list[int]:
    """Frame indices of one clip of `clip_length` frames, `frame_stride` apart.

    A video too short for the stride gets the largest stride that fits; a video with fewer frames
    than `clip_length` is looped from its first frame (0, 1, .., n-1, 0, 1, ..). The start is random
    (from `generator`, by default torch's global one, so DataLoader workers differ) or centred.
    """
    if frame_count < 1:
        raise ValueError(f"the video has {frame_count} frames")
    if frame_count < clip_length:
        return [index % frame_count for index in range(clip_length)]
    stride = frame_stride if clip_length == 1 else min(frame_stride, (frame_count - 1) // (clip_length - 1))
    span = (clip_length - 1) * stride + 1
    slack = frame_count - span
    start = int(torch.randint(slack + 1, (), generator=generator)) if random_start else slack // 2
    return list(range(start, start + span, stride))


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


@gin.configurable
class VideoFolderDataset(Dataset):
    """Video clips with class labels: items `{"x": (C, T, H, W) float in [-1, 1], "label": int}`.

    `root` is either a folder `root/<class>/<video>` (classes numbered in sorted name order) or an
    index file: CSV with header `path,label` or JSONL lines `{"path": ..., "label": ...}`; relative
    paths are relative to the index file's folder; labels are integer ids, or class names numbered
    in sorted order (`classes` then lists them; it is None for integer ids).

    A file that `reader` cannot decode is tried with `fallback_reader` (decord 0.6 fails on some
    frame widths, e.g. 16, 24, 48 or 72 px, that PyAV reads fine). A file that no reader decodes, or whose decode
    takes longer than `decode_timeout` seconds (None: no limit), raises `BadItem("video", path, reason)`, and
    `SkippingDataset` replaces it by the next good item. A process remembers the files that failed and does not
    decode them again (a timed-out decode holds a thread until it returns; a retry would hold another).
    A missing reader package is an ImportError, never a bad file.

    With `resolution` None the clips keep their frames' size, which must be the dataset's: the most common among a
    few evenly spaced videos, read from their container metadata when the dataset is built (`frame_size`); a video
    of another size raises `BadItem` (it could not be batched with the others).

    `cache_frames` keeps every file's decoded frames in memory after its first read and cuts later clips from
    them: for small sets of short videos (the moving-digits demo), where decoding would cost as much as the
    training step. Each DataLoader worker holds its own cache, so it costs the decoded size per worker.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        clip_length: int = 16,
        frame_stride: int = 1,
        random_crop_time: bool = True,
        resolution: int | None = None,
        reader: str = "decord",
        fallback_reader: str | None = "pyav",
        cache_frames: bool = False,
        decode_timeout: float | None = 60.0,
    ) -> None:
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be None or >= 1, got {resolution}")
        if decode_timeout is not None and decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be None or > 0 seconds, got {decode_timeout}")
        self.readers = [reader] if fallback_reader in (None, reader) else [reader, fallback_reader]
        for name in self.readers:
            _check_reader(name)
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"video root or index file not found: {self.root}")
        if self.root.is_dir():
            self.samples, self.classes = _scan_class_folders(self.root)
        else:
            self.samples, self.classes = _read_index(self.root)
        self.clip_length = clip_length
        self.frame_stride = frame_stride
        self.random_crop_time = random_crop_time
        self.resolution = resolution
        self.cache_frames = cache_frames
        self.decode_timeout = decode_timeout
        self._frame_cache: dict[Path, np.ndarray] = {}
        self._failed: dict[Path, BadItem] = {}  # this process's files that no reader decoded in time
        self.frame_size = self._typical_frame_size() if resolution is None else None

    def _typical_frame_size(self) -> tuple[int, int] | None:
        """The most common (height, width) among up to SIZE_SAMPLES evenly spaced videos (None when none of them
        reports its size: every clip is then taken as it is)."""
        count = len(self.samples)
        picks = sorted({round(k * (count - 1) / (SIZE_SAMPLES - 1)) for k in range(SIZE_SAMPLES)}) if count else []
        sizes: Counter[tuple[int, int]] = Counter()
        for index in picks:
            try:
                sizes[tuple(self.item_size(index)[1:])] += 1
            except BadItem:
                continue
        return sizes.most_common(1)[0][0] if sizes else None

    def __len__(self) -> int:
        return len(self.samples)

    def _timed(self, path: Path, what: str, work: Callable[[], object]):
        """`work()` within `decode_timeout` seconds; `BadItem` once the time is spent."""
        try:
            return call_with_timeout(work, self.decode_timeout)
        except TimeoutError:  # a reader's own TimeoutError is a reader failure inside `work`
            raise BadItem("video", path, f"{what} timed out after {self.decode_timeout:g} s") from None

    def _first_reader(self, path: Path, readers: list[str], what: str, attempt: Callable[[str], object]):
        """`attempt(reader)` for the first of `readers` that succeeds; `BadItem` naming every failure when none
        does. A missing reader package is an ImportError, never a bad file."""
        failures = []
        for name in readers:
            try:
                return attempt(name)
            except ImportError:
                raise
            except Exception as error:  # decoders raise many types; none may stop a run
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                failures.append(f"{name}: {type(error).__name__}: {reason}")
        raise BadItem("video", path, f"no reader {what}: " + "; ".join(failures))

    def _decode(self, path: Path, pick: Callable[[int], list[int]], length: int | None) -> np.ndarray:
        """(T, H, W, 3) uint8 frames at `pick(frame_count)` from the first reader that succeeds within
        `decode_timeout`; T must be `length` unless that is None."""

        def attempt(name: str) -> np.ndarray:
            frames = _READERS[name](path, pick)
            if frames.ndim != 4 or frames.shape[-1] != 3 or length not in (None, frames.shape[0]):
                raise ValueError(f"got frames of shape {frames.shape}")
            return frames

        return self._timed(path, "decode", partial(self._first_reader, path, self.readers, "decodes it", attempt))

    def _clip_frames(self, path: Path, pick: Callable[[int], list[int]], length: int) -> np.ndarray:
        """(length, H, W, 3) uint8: decoded now, or cut from the file's cached frames."""
        if not self.cache_frames:
            return self._decode(path, pick, length)
        if path not in self._frame_cache:
            self._frame_cache[path] = self._decode(path, lambda count: list(range(count)), None)
        frames = self._frame_cache[path]
        return frames[pick(len(frames))]

    def _load_clip(self, path: Path, pick: Callable[[int], list[int]], length: int,
                   size: tuple[int, int] | None) -> torch.Tensor:
        clip = torch.from_numpy(self._clip_frames(path, pick, length)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        if size is not None:
            clip = resize_center_crop(clip, size, "bilinear")
        return (clip / 127.5 - 1.0).clamp(-1.0, 1.0).transpose(0, 1).contiguous()  # (3, T, H, W)

    def item_size(self, index: int) -> Shape:
        """(frames, height, width) of video `index` from its container metadata, without decoding (PyAV; decord
        decodes one frame, and is used only when PyAV is not one of the readers)."""
        path = self.samples[index][0]
        readers = sorted(self.readers, key=lambda name: name != "pyav")
        return self._timed(path, "reading the size", partial(
            self._first_reader, path, readers, "reads its size", lambda name: _SIZERS[name](path)))

    def cache_key(self) -> tuple[Path, str]:
        """The data's location (the class folder root or the index file) and the fingerprint of its video list."""
        folder = self.root if self.root.is_dir() else self.root.parent
        return self.root, fingerprint(file_entries([path for path, _ in self.samples], folder))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        size = None if self.resolution is None else (self.resolution, self.resolution)
        return self._item(index, self.clip_length, size)

    def load(self, index: int, shape: Shape) -> dict[str, torch.Tensor | int]:
        """Item `index` as a clip of shape[0] frames (`frame_stride` apart where the video is long enough),
        resized to cover (height, width) = shape[1:] and centre-cropped: x is (3, shape[0], height, width)."""
        return self._item(index, shape[0], tuple(shape[1:]))

    def _item(self, index: int, length: int, size: tuple[int, int] | None) -> dict[str, torch.Tensor | int]:
        path, label = self.samples[index]
        # One draw from torch's RNG per item, good or bad, remembered or not, so the stream does not depend on what
        # this process saw before; the clip start then comes from a generator of its own, because a decode abandoned
        # after a timeout may still pick its frames later and must not draw from the global RNG then.
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))

        def pick(frame_count: int) -> list[int]:
            return clip_frame_indices(frame_count, length, self.frame_stride, self.random_crop_time, generator)

        if path in self._failed:
            raise self._failed[path].with_traceback(None)
        try:
            clip = self._load_clip(path, pick, length, size)
        except BadItem as bad:
            self._failed[path] = bad
            raise
        if size is None and self.frame_size is not None and tuple(clip.shape[-2:]) != self.frame_size:
            (height, width), (h, w) = clip.shape[-2:], self.frame_size  # bad at its own size only: not remembered
            raise BadItem("video", path, f"frames of {height}x{width} px, but the dataset's videos have {h}x{w} "
                          "(VideoFolderDataset.resolution = None keeps the frames' size; set a resolution to resize "
                          "every clip to it)")
        return {"x": clip, "label": label}
