"""Tests for sprint_mm.data.captions: caption indices, image and video items, cached text, collation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from sprint_mm.data.captions import CaptionDataset, collate_captions, read_caption_index
from sprint_mm.text import EmbeddingCache

RESOLUTION = 16
# (file name, width, height, caption): a square image at the target size, a wide one, a tall one.
IMAGES = [
    ("square.png", 16, 16, "a red square"),
    ("wide.png", 48, 32, 'a wide photo, with "quotes" and a comma'),
    ("sub/tall.png", 20, 40, "a tall photo"),
]


@pytest.fixture
def image_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name, width, height, _ in IMAGES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def jsonl_index(image_root) -> Path:
    return write_jsonl(image_root / "index.jsonl", [{"path": n, "caption": c} for n, _, _, c in IMAGES])


@pytest.fixture
def csv_index(image_root) -> Path:
    return write_csv(image_root / "index.csv", ["path", "caption"], [[n, c] for n, _, _, c in IMAGES])


def reference_pixels(path: Path) -> torch.Tensor:
    """torchvision's resize of the shorter side and centre crop, on [-1, 1] values."""
    x = TF.pil_to_tensor(Image.open(path).convert("RGB")).float() / 127.5 - 1.0
    x = TF.resize(x, RESOLUTION, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(-1.0, 1.0)
    return TF.center_crop(x, RESOLUTION)


# ----------------------------------------------------------------------------------------------
# Image items from JSONL and CSV
# ----------------------------------------------------------------------------------------------


def test_image_items_from_jsonl_match_a_direct_resize_and_crop(jsonl_index, image_root):
    dataset = CaptionDataset(str(jsonl_index), RESOLUTION)
    assert len(dataset) == len(IMAGES)
    for item, (name, _, _, caption) in zip(dataset, IMAGES):
        assert item["caption"] == caption
        assert item["x"].shape == (3, RESOLUTION, RESOLUTION)
        assert set(item) == {"x", "caption"}
        torch.testing.assert_close(item["x"], reference_pixels(image_root / name), atol=1e-4, rtol=0)
    # An image already at the resolution comes back exactly, scaled to [-1, 1].
    square = np.asarray(Image.open(image_root / "square.png"))
    assert torch.equal(dataset[0]["x"], torch.tensor(square).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_csv_index_gives_the_same_items_as_jsonl(jsonl_index, csv_index):
    from_jsonl, from_csv = CaptionDataset(str(jsonl_index), RESOLUTION), CaptionDataset(str(csv_index), RESOLUTION)
    assert [r.caption for r in read_caption_index(csv_index)] == [c for _, _, _, c in IMAGES]
    for a, b in zip(from_jsonl, from_csv):
        assert a["caption"] == b["caption"] and torch.equal(a["x"], b["x"])


def test_relative_paths_resolve_against_the_index_folder(image_root, tmp_path, monkeypatch):
    index = write_jsonl(image_root / "index.jsonl", [{"path": "sub/tall.png", "caption": "x"}])
    monkeypatch.chdir(tmp_path.parent)  # somewhere else than the index folder
    assert read_caption_index(index)[0].path == image_root / "sub" / "tall.png"
    assert CaptionDataset(str(index), RESOLUTION)[0]["x"].shape == (3, RESOLUTION, RESOLUTION)


# ----------------------------------------------------------------------------------------------
# Cached text embeddings and collation
# ----------------------------------------------------------------------------------------------


def test_cached_captions_carry_their_embeddings_and_collate(jsonl_index, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", "tiny-encoder")
    g = torch.Generator().manual_seed(0)
    stored = {}
    for _, _, _, caption in IMAGES[:2]:
        stored[caption] = {"text_tokens": torch.randn(6, 4, generator=g), "text_mask": torch.rand(6, generator=g) > 0.5}
        cache.put(caption, stored[caption])
    dataset = CaptionDataset(str(jsonl_index), RESOLUTION, cache_dir=str(tmp_path / "cache"),
                             encoder_identity="tiny-encoder")

    items = [dataset[i] for i in range(len(dataset))]

    for item in items[:2]:
        for key in ("text_tokens", "text_mask"):
            assert torch.equal(item[key], stored[item["caption"]][key])
    assert "text_tokens" not in items[2]
    batch = collate_captions(items[:2])
    assert batch["x"].shape == (2, 3, RESOLUTION, RESOLUTION) and batch["text_tokens"].shape == (2, 6, 4)
    assert batch["caption"] == [c for _, _, _, c in IMAGES[:2]]
    assert torch.equal(batch["text_mask"][1], stored[IMAGES[1][3]]["text_mask"])
    mixed = collate_captions(items)  # one item is not cached: the trainer encodes the whole batch
    assert set(mixed) == {"x", "caption"} and mixed["caption"] == [c for _, _, _, c in IMAGES]
    # Another encoder's identity finds nothing.
    other = CaptionDataset(str(jsonl_index), RESOLUTION, cache_dir=str(tmp_path / "cache"), encoder_identity="other")
    assert "text_tokens" not in other[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_captions)
    assert next(iter(loader))["x"].shape == (3, 3, RESOLUTION, RESOLUTION)


# ----------------------------------------------------------------------------------------------
# Video items through an injected reader
# ----------------------------------------------------------------------------------------------


def test_video_items_come_from_the_injected_reader(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"not decoded by the dataset")
    index = write_jsonl(tmp_path / "videos.jsonl", [{"path": "clip.mp4", "caption": "a moving digit"}])
    calls = []

    def fake_reader(path: str) -> torch.Tensor:
        calls.append(path)
        return torch.linspace(-1, 1, 3 * 5 * 24 * 32).reshape(3, 5, 24, 32)

    item = CaptionDataset(str(index), RESOLUTION, media="video", video_reader=fake_reader)[0]

    assert calls == [str(tmp_path / "clip.mp4")]
    assert item["caption"] == "a moving digit" and item["x"].shape == (3, 5, RESOLUTION, RESOLUTION)
    frames = fake_reader("")  # every frame is resized and cropped like an image
    for t in (0, 4):
        expected = TF.center_crop(TF.resize(frames[:, t], RESOLUTION, InterpolationMode.BICUBIC, antialias=True)
                                  .clamp(-1, 1), RESOLUTION)
        torch.testing.assert_close(item["x"][:, t], expected, atol=1e-4, rtol=0)
    bad = CaptionDataset(str(index), RESOLUTION, media="video", video_reader=lambda path: torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"clip.mp4.*\(3, 16, 16\)"):
        bad[0]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_bad_indices_and_settings_get_one_clear_error(tmp_path, image_root, jsonl_index):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CaptionDataset(str(tmp_path / "missing.jsonl"), RESOLUTION)
    no_caption = write_jsonl(tmp_path / "no_caption.jsonl", [{"path": "square.png", "text": "a cat"}])
    with pytest.raises(KeyError, match="no_caption.jsonl:1 lacks key 'caption'"):
        CaptionDataset(str(no_caption), RESOLUTION)
    bad_header = write_csv(tmp_path / "bad.csv", ["path", "text"], [["square.png", "a cat"]])
    with pytest.raises(KeyError, match="lacks column 'caption'"):
        CaptionDataset(str(bad_header), RESOLUTION)
    wrong_format = tmp_path / "index.txt"
    wrong_format.write_text("square.png a cat\n")
    with pytest.raises(ValueError, match=r"index.txt.*\.jsonl"):
        CaptionDataset(str(wrong_format), RESOLUTION)
    with pytest.raises(ValueError, match="media 'audio'"):
        CaptionDataset(str(jsonl_index), RESOLUTION, media="audio")
    with pytest.raises(ValueError, match="video_reader"):
        CaptionDataset(str(jsonl_index), RESOLUTION, media="video")
    with pytest.raises(ValueError, match="encoder_identity"):
        CaptionDataset(str(jsonl_index), RESOLUTION, cache_dir=str(tmp_path))



def test_an_index_is_checked_when_the_dataset_is_built(image_root):
    # A listed file that does not exist is found at start, with its line, not at the step that reads it.
    rows = [{"path": n, "caption": c} for n, _, _, c in IMAGES]
    gone = write_jsonl(image_root / "gone.jsonl", rows[:1] + [{"path": "gone.png", "caption": "a ghost"}] + rows[1:])
    with pytest.raises(FileNotFoundError, match=r"lists 1 of 4 media file\(s\) that do not exist: .*gone.jsonl:2: "
                                                r".*gone.png\n"):
        CaptionDataset(str(gone), RESOLUTION)
    # All captions empty: the model would train unconditionally.
    empty = write_jsonl(image_root / "empty.jsonl", [{"path": n, "caption": " "} for n, _, _, _ in IMAGES])
    with pytest.raises(ValueError, match=r"every caption in .*empty.jsonl.* is empty \(3 rows\)"):
        CaptionDataset(str(empty), RESOLUTION)
    one_caption = write_jsonl(image_root / "one.jsonl", [{"path": n, "caption": ""} for n, _, _, _ in IMAGES[:2]]
                              + [{"path": IMAGES[2][0], "caption": "a tall photo"}])
    assert [item["caption"] for item in CaptionDataset(str(one_caption), RESOLUTION)] == ["", "", "a tall photo"]


def test_csv_rows_with_more_or_fewer_cells_than_the_header_are_refused_at_their_line(image_root):
    # An unquoted comma splits a caption into two cells: the second would be dropped without a word.
    unquoted = image_root / "unquoted.csv"
    unquoted.write_text('path,caption\nsquare.png,a red square\nwide.png,a wide photo, with a comma\n')
    with pytest.raises(ValueError, match=r"unquoted.csv:3 has 3 cells but the header names 2 columns"):
        CaptionDataset(str(unquoted), RESOLUTION)
    short = image_root / "short.csv"
    short.write_text("path,caption\nsquare.png,a red square\nwide.png\n")
    with pytest.raises(ValueError, match=r"short.csv:3 has 1 cells but the header names 2 columns"):
        CaptionDataset(str(short), RESOLUTION)
    quoted = write_csv(image_root / "quoted.csv", ["path", "caption"], [["square.png", "red, with a\nline break"]])
    assert [r.caption for r in read_caption_index(quoted)] == ["red, with a\nline break"]
