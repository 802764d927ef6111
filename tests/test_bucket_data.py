"""Datasets in buckets: sizes from headers, loading at a bucket's shape, the size cache, bad items, joint sets."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from sprint_mm.data import buckets as buckets_module
from sprint_mm.data.bucket_sampler import BucketBatchSampler
from sprint_mm.data.buckets import CACHE_PREFIX, BucketedDataset, BucketTable, bucket_index, item_sizes
from sprint_mm.data.captioned_digits import CaptionedDigitsDataset
from sprint_mm.data.captions import CaptionDataset
from sprint_mm.data.digits import DigitsDataset
from sprint_mm.data.faults import BAD_ITEMS, BadDataError, BadItem, SkippingDataset
from sprint_mm.data.images import ImageFolderDataset
from sprint_mm.data.joint import JointDataset
from sprint_mm.data.latents import LatentDataset, VideoLatentDataset, image_member, latent_member
from sprint_mm.data.transforms import resize_center_crop
from sprint_mm.data.video import VideoFolderDataset
from sprint_mm.media import save_video

# (class, name, height, width) of the images written; sizes of several aspect ratios
IMAGES = [("a", "wide0", 30, 50), ("a", "tall0", 48, 26), ("b", "square0", 40, 40), ("b", "wide1", 20, 36),
          ("a", "square1", 18, 18), ("b", "tall1", 44, 22)]
IMAGE_TABLE = BucketTable([(1, 16, 16, 2), (1, 12, 20, 2), (1, 20, 12, 2)])
# (class, name, frames, height, width) of the videos written
VIDEOS = [("a", "long_wide", 9, 16, 24), ("a", "short", 3, 16, 16), ("b", "mid_tall", 6, 24, 16),
          ("b", "long_square", 8, 16, 16)]
VIDEO_TABLE = BucketTable([(4, 16, 16, 2), (4, 12, 16, 2), (8, 16, 16, 1), (8, 12, 16, 1)])


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for seed, (label, name, height, width) in enumerate(IMAGES):
        (root / label).mkdir(parents=True, exist_ok=True)
        _image(height, width, seed).save(root / label / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for seed, (label, name, frames, height, width) in enumerate(VIDEOS):
        video = torch.rand(3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        save_video(video, root / label / f"{name}.mp4")
    return root


def _expected_pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """PIL directly: scale to cover `size` keeping the aspect ratio, bicubic, crop the centre, map to [-1, 1]."""
    image = Image.open(path).convert("RGB")
    scale = max(size[0] / image.height, size[1] / image.width)
    covering = (max(size[1], round(image.width * scale)), max(size[0], round(image.height * scale)))
    resized = np.asarray(image.resize(covering, Image.Resampling.BICUBIC))
    top, left = (covering[1] - size[0]) // 2, (covering[0] - size[1]) // 2
    crop = resized[top:top + size[0], left:left + size[1]]
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ images
def test_image_items_go_to_the_bucket_of_their_header_size_and_load_at_it(image_root):
    dataset = ImageFolderDataset(image_root, resolution=16)
    sizes = {path.stem: (1, *Image.open(path).size[::-1]) for path, _ in dataset.samples}
    assert [dataset.item_size(i) for i in range(len(dataset))] == [sizes[path.stem] for path, _ in dataset.samples]
    bucketed = BucketedDataset(dataset, IMAGE_TABLE)
    expected = {"wide0": 1, "wide1": 1, "tall0": 2, "tall1": 2, "square0": 0, "square1": 0}
    assert [expected[path.stem] for path, _ in dataset.samples] == bucketed.bucket_of
    for index, (path, label) in enumerate(dataset.samples):
        item = bucketed[index]
        shape = IMAGE_TABLE[bucketed.bucket_of[index]].shape
        assert item["x"].shape == (3, *shape[1:]) and item["label"] == label
        torch.testing.assert_close(item["x"], _expected_pixels(path, shape[1:]), rtol=0, atol=0)
    assert bucketed.num_classes == 2 and len(bucketed) == len(dataset)
    assert not hasattr(bucketed, "collate")  # passes through only what the wrapped dataset has


def test_without_buckets_getitem_is_load_at_the_dataset_size(image_root):
    dataset = ImageFolderDataset(image_root, resolution=16)
    for index in range(len(dataset)):
        assert torch.equal(dataset[index]["x"], dataset.load(index, (1, 16, 16))["x"])
    with pytest.raises(ValueError, match="an image has 1 frame, not 4"):
        dataset.load(0, (4, 16, 16))


def test_size_cache_is_reused_while_the_files_are_unchanged_and_rebuilt_when_one_is_added(image_root, monkeypatch):
    reads = []
    original = ImageFolderDataset.item_size
    monkeypatch.setattr(ImageFolderDataset, "item_size", lambda self, i: reads.append(i) or original(self, i))
    first = bucket_index(ImageFolderDataset(image_root, resolution=16), IMAGE_TABLE)
    assert len(reads) == len(IMAGES)
    cache = list(image_root.glob(f"{CACHE_PREFIX}-ImageFolderDataset.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())["sizes"]) == len(IMAGES)
    assert not list(image_root.glob("*.tmp"))  # written through a temporary file renamed into place
    reads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hidden cache file at the root is not reported as a stray file
        dataset = ImageFolderDataset(image_root, resolution=16)
    assert bucket_index(dataset, IMAGE_TABLE) == first and reads == []
    _image(20, 60, 99).save(image_root / "b" / "wider.png")
    dataset = ImageFolderDataset(image_root, resolution=16)
    index = bucket_index(dataset, IMAGE_TABLE)
    assert len(reads) == len(IMAGES) + 1  # rebuilt
    assert index[[path.stem for path, _ in dataset.samples].index("wider")] == 1
    assert json.loads(cache[0].read_text())["sizes"] == [list(size) for size in item_sizes(dataset)]
    # A changed file (other size, other mtime) also rebuilds; a cache_dir keeps the cache elsewhere.
    reads.clear()
    _image(60, 20, 7).save(image_root / "b" / "wider.png")
    assert bucket_index(ImageFolderDataset(image_root, resolution=16), IMAGE_TABLE, cache_dir=image_root.parent)
    assert len(reads) == len(IMAGES) + 1 and list(image_root.parent.glob(f"{CACHE_PREFIX}-*.json"))
    # The cache beside the data moves with it.
    bucket_index(ImageFolderDataset(image_root, resolution=16), IMAGE_TABLE)
    moved = image_root.rename(image_root.parent / "moved")
    reads.clear()
    assert bucket_index(ImageFolderDataset(moved, resolution=16), IMAGE_TABLE) == index[:-1] + [2] and reads == []


def test_unreadable_headers_and_items_no_bucket_takes_are_left_out_and_reported_once(image_root):
    (image_root / "a" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(image_root, resolution=16)
    table = BucketTable([(1, 12, 20, 2)])
    with pytest.warns(UserWarning) as caught:
        bucketed = BucketedDataset(dataset, table, crop_only=True)  # crop-only: only images >= 12x20 fit
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2
    assert "1 of 7 items of ImageFolderDataset have no readable size" in messages[0] and "broken.png" in messages[0]
    names = [path.stem for path, _ in dataset.samples]
    assert messages[1].startswith(f"1 of 7 items of ImageFolderDataset fit no bucket and are left out, e.g. item "
                                  f"{names.index('square1')} (1x18x18)")  # 18 px is narrower than 20
    assert "no larger than itself" in messages[1]
    assert {names[i] for i, bucket in enumerate(bucketed.bucket_of) if bucket is None} == {"broken", "square1"}
    with pytest.raises(ValueError, match="is in no bucket"):
        bucketed[names.index("broken")]
    with pytest.warns(UserWarning) as again:  # from the cache: the same report, the bad file still named
        BucketedDataset(ImageFolderDataset(image_root, resolution=16), table, crop_only=True)
    assert [str(warning.message) for warning in again] == messages


# ------------------------------------------------------------------------------------------------ videos
def test_video_sizes_come_from_metadata_and_items_load_at_their_bucket(video_root, tmp_path):
    dataset = VideoFolderDataset(video_root, clip_length=2, reader="pyav", fallback_reader=None,
                                 random_crop_time=False)
    names = [path.stem for path, _ in dataset.samples]
    sizes = {name: (frames, height, width) for _, name, frames, height, width in VIDEOS}
    assert [dataset.item_size(i) for i in range(len(dataset))] == [sizes[name] for name in names]
    with pytest.warns(UserWarning, match=r"1 of 4 items .* left out, e.g. item 1 \(3x16x16\)"):
        bucketed = BucketedDataset(dataset, VIDEO_TABLE)
    expected = {"long_wide": 3, "short": None, "mid_tall": 0, "long_square": 2}
    assert bucketed.bucket_of == [expected[name] for name in names]
    for index, name in enumerate(names):
        if expected[name] is None:
            continue
        frames, height, width = VIDEO_TABLE[expected[name]].shape
        x = bucketed[index]["x"]
        assert x.shape == (3, frames, height, width)
        # The same frames, resized the same way, as a dataset of this video alone (its native size: without a
        # resolution, a dataset of mixed sizes refuses all but its own) built for that clip length and a direct crop.
        alone = tmp_path / f"{name}.csv"
        alone.write_text(f"path,label\n{dataset.samples[index][0]},0\n")
        plain = VideoFolderDataset(alone, clip_length=frames, reader="pyav", fallback_reader=None,
                                   random_crop_time=False)[0]["x"]
        torch.testing.assert_close(x, resize_center_crop(plain, (height, width), "bilinear"), rtol=0, atol=1e-6)


def test_decord_alone_reads_the_same_sizes(video_root):
    dataset = VideoFolderDataset(video_root, reader="decord", fallback_reader=None)
    assert [dataset.item_size(i) for i in range(len(dataset))] == \
        [VideoFolderDataset(video_root, reader="pyav").item_size(i) for i in range(len(dataset))]


def test_an_unreadable_video_header_is_a_bad_item(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.mp4").write_bytes(b"\x00" * 64)
    dataset = VideoFolderDataset(tmp_path, reader="pyav", fallback_reader=None)
    with pytest.raises(BadItem, match="broken.mp4: no reader reads its size: pyav"):
        dataset.item_size(0)


# ------------------------------------------------------------------------------------------------ digits and captions
def test_digits_load_at_bucket_sizes():
    digits = DigitsDataset(resolution=16, channels=3)
    bucketed = BucketedDataset(digits, BucketTable([(1, 12, 20, 4), (1, 16, 16, 4)]))
    assert set(bucketed.bucket_of) == {1}  # 8x8: the square bucket
    assert torch.equal(bucketed[5]["x"], digits[5]["x"])
    wide = digits.load(5, (1, 12, 20))["x"]
    torch.testing.assert_close(wide, resize_center_crop(digits.images[5], (12, 20), "bilinear").expand(3, -1, -1))
    assert bucketed.num_classes == 10
    videos = CaptionedDigitsDataset(resolution=8, frames=6)
    item = BucketedDataset(videos, BucketTable([(4, 8, 8, 2)]))[3]
    assert item["x"].shape == (1, 4, 8, 8) and torch.equal(item["x"], videos[3]["x"][:, :4])


def test_caption_dataset_sizes_and_loads_images_and_videos(image_root, tmp_path):
    paths = sorted(image_root.rglob("*.png"))
    index = tmp_path / "captions.jsonl"
    index.write_text("".join(json.dumps({"path": str(path), "caption": path.stem}) + "\n" for path in paths))
    images = CaptionDataset(str(index), resolution=16)
    bucketed = BucketedDataset(images, IMAGE_TABLE)
    for i, path in enumerate(paths):
        shape = IMAGE_TABLE[bucketed.bucket_of[i]].shape
        assert shape == IMAGE_TABLE[IMAGE_TABLE.assign(1, *Image.open(path).size[::-1])].shape
        item = bucketed[i]
        assert item["caption"] == path.stem and item["x"].shape == (3, *shape[1:])
        full = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 127.5 - 1
        expected = resize_center_crop(full, shape[1:], "bicubic", clamp=(-1.0, 1.0))
        torch.testing.assert_close(item["x"], expected, rtol=0, atol=1e-6)
    assert bucketed.collate is images.collate
    # Videos: sizes from the injected size reader, the middle frames of the clip at the bucket's size.
    clips = {str(path): torch.rand(3, 10, 24, 40, generator=torch.Generator().manual_seed(1)) for path in paths}
    videos = CaptionDataset(str(index), resolution=8, media="video", video_reader=clips.__getitem__,
                            video_size=lambda path: tuple(clips[path].shape[1:]))
    bucketed = BucketedDataset(videos, BucketTable([(8, 12, 20, 2), (4, 12, 20, 2), (4, 6, 10, 2)]))
    assert bucketed.bucket_of == [0] * len(paths)  # the most frames; same aspect, then the nearer area
    item = bucketed[1]
    torch.testing.assert_close(item["x"], resize_center_crop(clips[str(paths[1])][:, 1:9], (12, 20), "bicubic",
                                                             clamp=(-1.0, 1.0)))


# ------------------------------------------------------------------------------------------------ latents
def _write_latents(root: Path, sizes: list[tuple[int, int]], factor: int = 2) -> dict[int, np.ndarray]:
    """Image latents of the given (h, w) with std 0 (so an item is its scaled mean) and images `factor` times larger
    whose pixel (y, x) encodes (y // factor, x // factor)."""
    means = {}
    for index, (h, w) in enumerate(sizes):
        mean = np.random.default_rng(index).standard_normal((2, h, w)).astype(np.float32)
        means[index] = mean
        path = root / "vae-sd" / latent_member(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.concatenate([mean, np.zeros_like(mean)]))
        rows, cols = np.meshgrid(np.arange(h * factor) // factor, np.arange(w * factor) // factor, indexing="ij")
        pixels = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
        path = root / "images" / image_member(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": None}))
    return means


def test_latents_are_sized_from_headers_cropped_never_resized_and_never_grown(tmp_path):
    sizes = [(4, 4), (6, 4), (4, 8), (3, 3), (4, 4)]
    means = _write_latents(tmp_path, sizes)
    dataset = LatentDataset(str(tmp_path), with_images=True, scale=1.0)
    assert [dataset.item_size(i) for i in range(len(dataset))] == [(1, *size) for size in sizes]
    table = BucketTable([(1, 4, 4, 2), (1, 4, 8, 1), (1, 6, 4, 1)])
    with pytest.warns(UserWarning, match=r"1 of 5 items .* item 3 \(1x3x3\).*no larger than itself"):
        bucketed = BucketedDataset(dataset, table)
    assert bucketed.bucket_of == [0, 2, 1, None, 0]
    square = BucketTable([(1, 4, 4, 2)])
    with pytest.warns(UserWarning):
        cropped = BucketedDataset(dataset, square)
    assert cropped.bucket_of == [0, 0, 0, None, 0]
    for index in (1, 2):  # a (6, 4) and a (4, 8) latent, centre-cropped to 4x4 with their images
        item = cropped[index]
        h, w = sizes[index]
        top, left = (h - 4) // 2, (w - 4) // 2
        assert torch.equal(item["x"], torch.from_numpy(means[index][:, top:top + 4, left:left + 4]))
        image = item["image"]
        assert image.shape == (3, 8, 8)
        assert torch.equal(image[0, ::2, 0], torch.arange(top, top + 4, dtype=torch.uint8))
        assert torch.equal(image[1, 0, ::2], torch.arange(left, left + 4, dtype=torch.uint8))
    # The same sizes from a zipped tree, read from the member headers.
    archive = tmp_path / "zipped" / "vae-sd"
    shutil.make_archive(str(archive), "zip", tmp_path / "vae-sd")
    zipped = LatentDataset(str(tmp_path / "zipped"))
    assert zipped.latents.is_zip and bucket_index(zipped, table) == bucketed.bucket_of
    with pytest.raises(BadItem, match=r"cannot crop 4x4 from 3x3"):
        dataset.load(3, (1, 4, 4))
    with pytest.raises(BadItem, match="shape"):
        dataset[1]  # without buckets every item must have the dataset's one shape, as before


def test_video_latents_are_sized_from_the_safetensors_header_and_centre_cropped(tmp_path):
    shapes = [(4, 6, 4, 4), (4, 3, 4, 6), (4, 5, 6, 4)]  # (C, T, h, w)
    lines = []
    for index, shape in enumerate(shapes):
        mean = torch.randn(shape, generator=torch.Generator().manual_seed(index))
        save_file({"mean": mean, "std": torch.zeros(shape)}, tmp_path / f"v{index}.safetensors")
        lines.append(json.dumps({"path": f"v{index}.safetensors", "label": index}))
    (tmp_path / "index.jsonl").write_text("\n".join(lines))
    dataset = VideoLatentDataset(str(tmp_path), scale=1.0)
    assert [dataset.item_size(i) for i in range(len(dataset))] == [shape[1:] for shape in shapes]
    bucketed = BucketedDataset(dataset, BucketTable([(3, 4, 4, 1), (5, 4, 4, 1)]))
    assert bucketed.bucket_of == [1, 0, 1]
    item = bucketed[0]  # (6, 4, 4) cropped to (5, 4, 4): frames 0..4 (offset rounded down)
    assert torch.equal(item["x"], load_file(tmp_path / "v0.safetensors")["mean"][:, :5])
    item = bucketed[2]  # (5, 6, 4) cropped to (5, 4, 4): rows 1..4
    assert torch.equal(item["x"], load_file(tmp_path / "v2.safetensors")["mean"][:, :, 1:5, :])
    assert item["label"] == 2


# ------------------------------------------------------------------------------------------------ bad items
class Listed(torch.utils.data.Dataset):
    """Items of given sizes; the `bad` ones raise BadItem when loaded."""

    def __init__(self, sizes, bad=()):
        self.sizes, self.bad = sizes, set(bad)

    def __len__(self):
        return len(self.sizes)

    def item_size(self, index):
        return self.sizes[index]

    def load(self, index, shape):
        if index in self.bad:
            raise BadItem("image", f"item{index}", "broken")
        return {"x": torch.full((1, *shape[1:]), float(index)), "label": 0}

    def cache_key(self):
        return None


def test_a_bad_item_is_replaced_by_the_next_good_item_of_its_own_bucket():
    sizes = [(1, 8, 8), (1, 8, 16), (1, 8, 8), (1, 8, 16), (1, 8, 16), (1, 8, 8)]
    table = BucketTable([(1, 8, 8, 1), (1, 8, 16, 1)])
    wrapped = SkippingDataset(BucketedDataset(Listed(sizes, bad={1, 2}), table))
    item = wrapped[1]  # item 2 follows it in index order, but bucket 1's next item is 3
    assert item["x"].shape == (1, 8, 16) and item["x"][0, 0, 0] == 3
    assert [record.path for record in item[BAD_ITEMS]] == ["item1"]
    item = wrapped[2]  # bucket 0: 2 is bad, then 5
    assert item["x"][0, 0, 0] == 5 and item[BAD_ITEMS][0].offset == 0
    assert wrapped[5]["x"][0, 0, 0] == 5
    all_bad = SkippingDataset(BucketedDataset(Listed(sizes, bad={0, 2, 5}), table))
    with pytest.raises(BadDataError, match=r"no item of the 3 in BucketedDataset that may replace item 2"):
        all_bad[2]


def test_a_loader_over_bucketed_data_gives_batches_of_one_bucket_shape_each():
    sizes = [(1, 8, 8), (1, 8, 16), (4, 8, 8)] * 8
    table = BucketTable([(1, 8, 8, 4), (1, 8, 16, 2), (4, 8, 8, 2)])
    data = SkippingDataset(BucketedDataset(Listed(sizes, bad={4}), table))
    sampler = BucketBatchSampler(data.dataset.bucket_of, table, seed=1, world_size=2, rank=0)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=data.collate)
    for step, batch in zip(range(20), loader):
        bucket = table[sampler.bucket_at(step)]
        assert batch["x"].shape == (bucket.batch_size // 2, 1, *bucket.shape[1:])


# ------------------------------------------------------------------------------------------------ joint
def test_joint_images_and_videos_batch_by_kind_and_pass_everything_through(image_root, video_root):
    images = ImageFolderDataset(image_root, resolution=16)
    videos = VideoFolderDataset(video_root, clip_length=4, reader="pyav", fallback_reader=None,
                                random_crop_time=False)
    joint = JointDataset([images, videos])
    assert len(joint) == len(images) + len(videos) and joint.num_classes == 2
    assert joint.item_size(len(images) + 2) == videos.item_size(2)
    table = BucketTable([(1, 16, 16, 2), (4, 16, 16, 2)])
    bucketed = BucketedDataset(joint, table)
    assert bucketed.bucket_of == [0] * len(images) + [1, 0, 1, 1]  # the 3-frame clip gives a frame to the images
    assert bucketed[0]["x"].shape == (3, 16, 16)
    assert bucketed[len(images)]["x"].shape == (3, 4, 16, 16)
    frame = bucketed[len(images) + 1]["x"]  # the short clip's frame batches with the images: (C, H, W)
    assert frame.shape == (3, 16, 16)
    assert torch.equal(frame, videos.load(1, (1, 16, 16))["x"][:, 0])


def test_joint_parts_must_agree_on_channels_and_conditioning(image_root):
    with pytest.raises(ValueError, match=r"part 0 \(DigitsDataset\): 1 channels, labels; part 1 "
                                         r"\(ImageFolderDataset\): 3 channels, labels"):
        JointDataset([DigitsDataset(channels=1), ImageFolderDataset(image_root, resolution=16)])
    with pytest.raises(ValueError, match=r"3 channels, labels; part 1 \(CaptionedDigitsDataset\): 3 channels, "
                                         r"captions"):
        JointDataset([DigitsDataset(channels=3), CaptionedDigitsDataset(channels=3)])
    with pytest.raises(ValueError, match="non-empty list of datasets"):
        JointDataset([])


def test_a_dataset_without_sizes_cannot_be_bucketed():
    with pytest.raises(ValueError, match="list cannot be bucketed: it lacks item_size, load, cache_key"):
        BucketedDataset([1, 2, 3], BucketTable([(1, 8, 8, 1)]))


def test_the_size_cache_survives_an_unwritable_folder(image_root, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.warns(UserWarning, match="cannot write the item size cache"):
        index = bucket_index(ImageFolderDataset(image_root, resolution=16), IMAGE_TABLE)
    assert len(index) == len(IMAGES) and buckets_module.CACHE_PREFIX == CACHE_PREFIX
