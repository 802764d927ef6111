"""Tests for sprint_mm.data.images (image folders) and sprint_mm.data.digits (sklearn digits)."""

from __future__ import annotations

from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import v2

from sprint_mm.data.digits import DigitsDataset
from sprint_mm.data.faults import BadItem
from sprint_mm.data.images import ImageFolderDataset

# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def _gradient_image(width: int, height: int) -> Image.Image:
    """An RGB image that differs from its mirror image and from its transpose."""
    rows, columns = np.meshgrid(np.linspace(0, 255, height), np.linspace(0, 255, width), indexing="ij")
    pixels = np.stack([columns, rows, np.full_like(rows, 40.0)], axis=-1)  # (H, W, 3)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """root/{bird/nested, cat, dog}: wide, tall, grey and solid-colour images, PNG and JPEG."""
    root = tmp_path / "images"
    for folder in ("bird/nested", "cat", "dog"):
        (root / folder).mkdir(parents=True)
    _gradient_image(48, 32).save(root / "cat" / "wide.png")
    _gradient_image(20, 30).save(root / "cat" / "tall.jpg")
    Image.new("RGB", (24, 24), (255, 0, 0)).save(root / "dog" / "red.png")
    Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20), mode="L").save(
        root / "bird" / "nested" / "grey.PNG"
    )
    return root


def _item_for(dataset: ImageFolderDataset, name: str) -> dict:
    (index,) = [i for i, (path, _) in enumerate(dataset.samples) if path.name == name]
    return dataset[index]


def test_class_ids_follow_sorted_sub_folders(image_root):
    dataset = ImageFolderDataset(image_root, resolution=16)
    assert dataset.classes == ["bird", "cat", "dog"]
    assert dataset.num_classes == 3
    assert len(dataset) == 4
    for index, (path, _) in enumerate(dataset.samples):
        class_name = path.relative_to(image_root).parts[0]
        assert dataset[index]["label"] == dataset.classes.index(class_name)


@pytest.mark.parametrize("resolution", [8, 16, 24])
def test_items_are_square_rgb_crops_in_range(image_root, resolution):
    dataset = ImageFolderDataset(image_root, resolution=resolution)
    for index in range(len(dataset)):
        x = dataset[index]["x"]
        assert x.shape == (3, resolution, resolution)
        assert x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_crop_matches_torchvision_resize_and_centre_crop(image_root):
    reference = v2.Compose(
        [
            v2.Resize(16, interpolation=v2.InterpolationMode.BICUBIC),  # shorter side: 32 -> 16
            v2.CenterCrop(16),
            v2.PILToTensor(),
        ]
    )
    with Image.open(image_root / "cat" / "wide.png") as image:
        expected = reference(image.convert("RGB")).float() / 127.5 - 1.0
    x = _item_for(ImageFolderDataset(image_root, resolution=16), "wide.png")["x"]
    torch.testing.assert_close(x, expected)


def test_pixel_values_map_0_255_to_minus_one_one(image_root):
    dataset = ImageFolderDataset(image_root, resolution=16)
    red = _item_for(dataset, "red.png")["x"]
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16))
    grey = _item_for(dataset, "grey.PNG")["x"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_flip_mirrors_left_right(image_root):
    plain = _item_for(ImageFolderDataset(image_root, resolution=16), "wide.png")["x"]
    mirrored = torch.flip(plain, dims=[-1])
    assert not torch.equal(plain, mirrored)
    flipping = ImageFolderDataset(image_root, resolution=16, flip=True)
    torch.manual_seed(0)
    seen_flipped = []
    for _ in range(20):
        x = _item_for(flipping, "wide.png")["x"]
        assert torch.equal(x, plain) or torch.equal(x, mirrored)
        seen_flipped.append(torch.equal(x, mirrored))
    assert any(seen_flipped) and not all(seen_flipped)


def test_non_image_files_are_skipped_and_named(image_root):
    (image_root / "cat" / "notes.txt").write_text("not a picture")
    (image_root / "dataset.json").write_text("{}")
    with pytest.warns(UserWarning, match="skipped 2 file") as record:
        dataset = ImageFolderDataset(image_root, resolution=8)
    message = str(record[0].message)
    assert "notes.txt" in message and "dataset.json" in message
    assert len(dataset) == 4
    assert all(path.suffix != ".txt" for path, _ in dataset.samples)


def test_extensions_restrict_which_files_are_images(image_root):
    with pytest.warns(UserWarning, match="tall.jpg"):
        dataset = ImageFolderDataset(image_root, resolution=8, extensions=("png",))
    assert sorted(path.name for path, _ in dataset.samples) == ["grey.PNG", "red.png", "wide.png"]


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_corrupt_image_is_a_bad_item_naming_the_file(image_root, corruption):
    broken = image_root / "dog" / "broken.png"
    data = (image_root / "cat" / "wide.png").read_bytes()
    broken.write_bytes({"garbage": b"this is not a png", "truncated": data[: len(data) // 2], "empty": b""}[corruption])
    dataset = ImageFolderDataset(image_root, resolution=8)
    (index,) = [i for i, (path, _) in enumerate(dataset.samples) if path == broken]
    with pytest.raises(BadItem, match="broken.png: cannot decode image") as info:
        dataset[index]
    assert (info.value.kind, info.value.path) == ("image", str(broken))


def test_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*root/<class>/<image>"):
        ImageFolderDataset(missing, resolution=8)


def test_root_without_images_names_path_and_layout(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty.*root/<class>/<image>"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)


@pytest.mark.parametrize("resolution", [0, -16, 8.0])
def test_bad_resolution_is_rejected(image_root, resolution):
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(image_root, resolution=resolution)


def test_image_folder_is_gin_configurable(image_root):
    gin.clear_config()
    try:
        gin.parse_config(["ImageFolderDataset.resolution = 12", "ImageFolderDataset.flip = True"])
        dataset = ImageFolderDataset(image_root)
    finally:
        gin.clear_config()
    assert dataset.resolution == 12 and dataset.flip
    assert dataset[0]["x"].shape == (3, 12, 12)


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, channels", [(16, 1), (12, 3), (32, 1)])
def test_digits_shapes_and_value_range(resolution, channels):
    dataset = DigitsDataset(resolution=resolution, channels=channels)
    xs = torch.stack([dataset[i]["x"] for i in range(0, len(dataset), 7)])
    assert xs.shape[1:] == (channels, resolution, resolution)
    assert xs.min() >= -1.0 and xs.max() <= 1.0
    assert xs.min() == -1.0  # blank background
    if channels == 3:
        assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 1], xs[:, 2])


def test_digits_at_native_size_are_sklearn_pixels_rescaled():
    digits = load_digits()
    dataset = DigitsDataset(resolution=8)
    for index in (0, 1, 500, len(dataset) - 1):
        expected = torch.as_tensor(digits.images[index], dtype=torch.float32) / 8.0 - 1.0
        torch.testing.assert_close(dataset[index]["x"][0], expected)
        assert dataset[index]["label"] == digits.target[index]


def test_digits_labels_cover_zero_to_nine():
    dataset = DigitsDataset(split="train")
    labels = {dataset[i]["label"] for i in range(len(dataset))}
    assert labels == set(range(DigitsDataset.num_classes))
    assert all(isinstance(label, int) for label in labels)


def test_digits_splits_are_disjoint_and_cover_everything():
    everything = DigitsDataset(resolution=8)
    train, test = DigitsDataset(resolution=8, split="train"), DigitsDataset(resolution=8, split="test")
    assert len(train) + len(test) == len(everything)
    assert len(test) == round(0.2 * len(everything))
    joined = [train[i] for i in range(len(train))] + [test[i] for i in range(len(test))]
    for index, item in enumerate(joined):
        assert torch.equal(item["x"], everything[index]["x"])
        assert item["label"] == everything[index]["label"]
    assert {test[i]["label"] for i in range(len(test))} == set(range(10))


@pytest.mark.parametrize(
    "arguments, message",
    [({"split": "valid"}, "valid"), ({"channels": 2}, "channels"), ({"resolution": 0}, "resolution")],
)
def test_digits_bad_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataset(**arguments)
