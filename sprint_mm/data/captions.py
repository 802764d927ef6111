"""Captioned images and videos listed in a JSONL or CSV index, with text embeddings from the cache when present."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import gin
import torch
from safetensors import SafetensorError

from sprint_mm.data.buckets import Shape, file_entries, fingerprint
from sprint_mm.data.faults import BadItem
from sprint_mm.data.images import image_size, read_rgb
from sprint_mm.data.index import read_index
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.data.video import clip_frame_indices, video_size
from sprint_mm.text import TEXT_KEYS, EmbeddingCache, condition_keys

MEDIA = ("image", "video")
INDEX_FIELDS = ("path", "caption")
SHOWN = 5  # how many missing files an error names


class CaptionRecord(NamedTuple):
    path: Path
    caption: str
    where: str = ""  # file:line of the index row, for errors


# ----------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------

def read_caption_index(index: str | Path) -> list[CaptionRecord]:
    """The (path, caption) records of a JSONL (`{"path": ..., "caption": ...}` per line) or CSV (`path,caption`,
    read with the csv module: quote a caption that holds a comma) index.

    Relative paths resolve against the index's folder.
    """
    index = Path(index)
    rows = read_index(index, INDEX_FIELDS)
    return [record_from_row(row.fields, f"{index}:{row.line}", index.parent) for row in rows]


def record_from_row(row: dict, where: str, root: Path) -> CaptionRecord:
    """The record of one index row; `where` (file:line) locates it in errors."""
    for field in INDEX_FIELDS:
        if field not in row:
            raise KeyError(f"{where} lacks key {field!r} (every item needs {INDEX_FIELDS})")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: {field} must be a string, got {row[field]!r}")
    if not row["path"]:
        raise ValueError(f"{where} has an empty path")
    return CaptionRecord(root / row["path"], row["caption"], where)


def check_caption_records(index: Path, records: list[CaptionRecord]) -> None:
    """Refuse at start what would stop or spoil a run later: media files that do not exist (found mid-run, they would
    lose the steps since the last checkpoint) and captions that are all empty (the model would learn no text)."""
    missing = [record for record in records if not record.path.is_file()]
    if missing:
        listed = "; ".join(f"{record.where}: {record.path}" for record in missing[:SHOWN])
        more = f"; and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise FileNotFoundError(f"the caption index {str(index)!r} lists {len(missing)} of {len(records)} media "
                                f"file(s) that do not exist: {listed}{more}")
    if not any(record.caption.strip() for record in records):
        raise ValueError(f"every caption in {str(index)!r} is empty ({len(records)} rows): a text-conditioned model "
                         "would learn no text from them (it would train unconditionally); fill in the captions")


# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------

def read_image(path: Path) -> torch.Tensor:
    """An RGB image file as a (3, H, W) float tensor in [-1, 1]; `BadItem` if it cannot be decoded."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} listed in the caption index does not exist")
    return torch.from_numpy(read_rgb("caption", path)).permute(2, 0, 1).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------

@gin.configurable
class CaptionDataset(torch.utils.data.Dataset):
    """Captioned images or videos: items {"x": (3, H, W) or (C, T, H, W) in [-1, 1], "caption": str}.

    With `cache_dir` and `encoder_identity` (TextEncoder.identity), items whose caption is cached also carry
    "text_tokens" (L, Dt) and "text_mask" (L,), so the trainer can skip the encoder. Videos are read by the
    injected `video_reader(path) -> (C, T, H, W)` float tensor in [-1, 1]; frames are then resized and
    centre-cropped to `resolution` like images.

    A row whose image PIL cannot decode, or whose video the reader fails on (any exception but ImportError) or
    returns as anything but a finite float (C, T, H, W) tensor, raises `BadItem("caption", media path, reason)`
    (`SkippingDataset` replaces it by the next good row); so does a cached text embedding that cannot be read. A
    media file that does not exist is an error of the index: the dataset refuses it when it is built, naming the
    index lines (`check_caption_records`), as it refuses an index whose captions are all empty.

    Buckets: `item_size` reads an image's header, or a video's container metadata with `video_size(path) ->
    (frames, height, width)` (default: PyAV's stream info, `sprint_mm.data.video.video_size`); `load(i, shape)`
    takes shape[0] consecutive frames from the middle of a video and resizes to cover shape[1:], then crops.
    """

    def __init__(
        self,
        index: str,
        resolution: int,
        media: str = "image",
        cache_dir: str | None = None,
        encoder_identity: str | None = None,
        video_reader: Callable[[str], torch.Tensor] | None = None,
        video_size: Callable[[str], Shape] = video_size,
    ) -> None:
        if media not in MEDIA:
            raise ValueError(f"media {media!r} is not one of {MEDIA}")
        if media == "video" and video_reader is None:
            raise ValueError("media 'video' needs a video_reader(path) -> (C, T, H, W) tensor")
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if (cache_dir is None) != (encoder_identity is None):
            raise ValueError(
                "cache_dir and encoder_identity go together (the cache key depends on the encoder); "
                f"got cache_dir={cache_dir!r}, encoder_identity={encoder_identity!r}"
            )
        self.index = Path(index)
        self.records = read_caption_index(index)
        check_caption_records(self.index, self.records)
        self.resolution = resolution
        self.media = media
        self.video_reader = video_reader
        self.video_size = video_size
        self.cache = None if cache_dir is None else EmbeddingCache(cache_dir, encoder_identity)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self._item(i, None, (self.resolution, self.resolution))

    def load(self, i: int, shape: Shape) -> dict:
        """Row `i` at bucket shape (frames, height, width): an image needs 1 frame; a video gives (C, frames, H, W)."""
        if self.media == "image" and shape[0] != 1:
            raise ValueError(f"an image has 1 frame, not {shape[0]}: CaptionDataset of images loads shape (1, H, W)")
        return self._item(i, None if self.media == "image" else shape[0], tuple(shape[1:]))

    def _item(self, i: int, frames: int | None, size: tuple[int, int]) -> dict:
        """Row `i` resized to cover `size` and centre-cropped; a video cut to its middle `frames` frames (None:
        all)."""
        path, caption = self.records[i].path, self.records[i].caption
        x = read_image(path) if self.media == "image" else self.read_video(path)
        if frames is not None:
            x = x[:, clip_frame_indices(x.shape[1], frames, 1, random_start=False)]
        item = {"x": resize_center_crop(x, size, "bicubic", clamp=(-1.0, 1.0)), "caption": caption}
        cached = self.cached_text(caption)
        if cached is not None:
            item.update(cached)
        return item

    def cached_text(self, caption: str) -> dict[str, torch.Tensor] | None:
        """The caption's cached text condition, None when there is none; `BadItem` for a cache file that cannot be
        read, lacks a key or holds non-finite embeddings."""
        if self.cache is None:
            return None
        where = self.cache.path(caption)
        try:
            cached = self.cache.get(caption)
        except (SafetensorError, OSError) as error:
            raise BadItem("caption", where, f"cannot read the cached text embedding: {error}") from error
        if cached is None:
            return None
        if not set(TEXT_KEYS) <= set(cached):
            problem = f"holds {sorted(cached)}, not {list(TEXT_KEYS)}"
        elif not torch.isfinite(cached[TEXT_KEYS[0]]).all():
            problem = "has non-finite values"
        else:
            return cached
        raise BadItem("caption", where, f"the cached text embedding {problem}")

    def item_size(self, i: int) -> Shape:
        """(frames, height, width) of row `i`'s media from its header (an image has 1 frame)."""
        path = self.records[i].path
        if not path.is_file():
            raise FileNotFoundError(f"{self.media} file {str(path)!r} listed in the caption index does not exist")
        if self.media == "image":
            return image_size("caption", path)
        try:
            return tuple(self.video_size(str(path)))
        except ImportError:
            raise
        except Exception as error:  # a file the size reader fails on is a bad row, as when reading it
            raise BadItem("caption", path, f"cannot read the video size: {type(error).__name__}: {error}") from error

    def cache_key(self) -> tuple[Path, str]:
        """The index file and the fingerprint of the media it lists (and of how their sizes are read)."""
        entries = file_entries([record.path for record in self.records], self.index.parent)
        return self.index, fingerprint([self.media, *entries])

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """The trainer's DataLoader batches this dataset with `collate_captions`."""
        return collate_captions(items)

    def read_video(self, path: Path) -> torch.Tensor:
        if not path.is_file():
            raise FileNotFoundError(f"video file {str(path)!r} listed in the caption index does not exist")
        try:
            video = self.video_reader(str(path))
        except ImportError:
            raise
        except Exception as error:  # readers raise many types; a file they fail on is a bad row, not a stop
            raise BadItem("caption", path, f"video_reader failed: {type(error).__name__}: {error}") from error
        if not isinstance(video, torch.Tensor) or video.dim() != 4 or not video.is_floating_point():
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise BadItem("caption", path, f"video_reader must return a float (C, T, H, W) tensor, got {got}")
        if not torch.isfinite(video).all():
            raise BadItem("caption", path, "video_reader returned non-finite values")
        return video


def collate_captions(items: list[dict]) -> dict:
    """Stack a list of CaptionDataset items; captions stay a list.

    The text condition is stacked only when every item carries one; otherwise the batch has none and the
    trainer encodes its captions.
    """
    if not items:
        raise ValueError("collate_captions needs at least one item")
    batch = {"x": torch.stack([item["x"] for item in items]), "caption": [item["caption"] for item in items]}
    if all(TEXT_KEYS[0] in item for item in items):
        batch.update({key: torch.stack([item[key] for item in items]) for key in condition_keys(items[0])})
    return batch
