"""Tests for sprint_mm.media: uint8 conversion, grids, ADM .npz packs, mp4 and previews."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sprint_mm.media import image_grid, save_image_grid, save_npz, save_video, save_video_preview, to_uint8


MP4_TOLERANCE = 4.0  # mean absolute error in uint8 levels after an H.264 round trip


def _hwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8, computed independently of media.py."""
    values = np.floor((images.double().numpy() + 1.0) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
    return np.broadcast_to(values, (values.shape[0], 3, *values.shape[2:])).transpose(0, 2, 3, 1)


def _read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _smooth_video(channels: int, frames: int, height: int, width: int) -> torch.Tensor:
    """(C, T, H, W) in [-0.8, 0.8]: half a sine period across the frame, drifting over time.

    Smooth in every channel, so yuv420p's half-resolution colour costs little.
    """
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None]
    x = torch.arange(width, dtype=torch.float32)[None, None, :]
    planes = [torch.sin(math.pi * (x / width + y / (2 * height) + 0.1 * t + 2 * c / 3)) for c in range(channels)]
    return 0.8 * torch.stack(planes)


# ---------------------------------------------------------------------------------------------- to_uint8


def test_to_uint8_maps_every_level_exactly_and_rounds_to_nearest():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    assert torch.equal(to_uint8(levels), torch.arange(256, dtype=torch.uint8))

    x = torch.empty(10_000).uniform_(-1.3, 1.3, generator=torch.Generator().manual_seed(0))
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    inside = (x > -1) & (x < 1)
    scaled = (x[inside].double() + 1.0) * 127.5
    assert ((out[inside].double() - scaled).abs() <= 0.5 + 1e-4).all()
    assert (out[x <= -1] == 0).all() and (out[x >= 1] == 255).all()
    np.testing.assert_array_equal(out.numpy(), _hwc(x.view(1, 1, 1, -1))[0, 0, :, 0])


def test_to_uint8_refuses_integers_and_non_finite_values():
    with pytest.raises(ValueError, match="floating"):
        to_uint8(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))


# ---------------------------------------------------------------------------------------------- grids


def test_image_grid_places_each_tile_and_leaves_black_padding():
    images = torch.rand(5, 3, 4, 6) * 2 - 1
    padding, nrow = 2, 3
    grid = image_grid(images, nrow=nrow, padding=padding)
    assert grid.shape == (2 * (4 + padding) + padding, 3 * (6 + padding) + padding, 3)
    assert grid.dtype == np.uint8
    expected = _hwc(images)
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for index in range(5):
        top = padding + (index // nrow) * (4 + padding)
        left = padding + (index % nrow) * (6 + padding)
        np.testing.assert_array_equal(grid[top : top + 4, left : left + 6], expected[index])
        covered[top : top + 4, left : left + 6] = True
    assert (grid[~covered] == 0).all()


def test_image_grid_default_is_square_and_gray_becomes_rgb():
    images = torch.rand(5, 1, 3, 3) * 2 - 1
    grid = image_grid(images, padding=0)
    assert grid.shape == (2 * 3, 3 * 3, 3)  # ceil(sqrt(5)) = 3 per row
    np.testing.assert_array_equal(grid[:3, 3:6], _hwc(images[1:2])[0])
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()


@pytest.mark.parametrize(
    "shape, message", [((3, 4, 4), r"\(B, C, H, W\)"), ((2, 2, 4, 4), "channels"), ((0, 3, 4, 4), "empty")]
)
def test_image_grid_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        image_grid(torch.zeros(shape))


def test_save_image_grid_writes_the_grid_as_png(tmp_path):
    images = torch.rand(3, 3, 5, 7) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=2)
    np.testing.assert_array_equal(_read_png(path), image_grid(images, nrow=2))
    with pytest.raises(ValueError, match=r"\.png"):
        save_image_grid(images, tmp_path / "grid.jpg")


# ---------------------------------------------------------------------------------------------- npz


def test_save_npz_writes_adm_layout_atomically(tmp_path):
    images = torch.rand(4, 3, 6, 5) * 2 - 1
    path = tmp_path / "samples.npz"
    path.write_bytes(b"an older pack")  # replaced whole
    assert save_npz(images, path) == path
    with np.load(path) as pack:
        assert list(pack.keys()) == ["arr_0"]
        array = pack["arr_0"]
    assert array.dtype == np.uint8 and array.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(array, _hwc(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left

    gray = torch.rand(2, 1, 3, 3) * 2 - 1
    with np.load(save_npz(gray, tmp_path / "gray.npz")) as pack:
        np.testing.assert_array_equal(pack["arr_0"], _hwc(gray))
    with pytest.raises(ValueError, match=r"\.npz"):
        save_npz(images, tmp_path / "samples.npy")


# ---------------------------------------------------------------------------------------------- video


def _decode_decord(path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _decode_pyav(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("decode", [_decode_decord, _decode_pyav], ids=["decord", "pyav"])
def test_mp4_round_trip_keeps_frames_size_and_content(tmp_path, decode):
    video = _smooth_video(3, 6, 32, 40)  # decord 0.6 cannot read some widths, e.g. 48
    path = save_video(video, tmp_path / "clip.mp4", fps=8)
    decoded = decode(path)
    assert decoded.shape == (6, 32, 40, 3)
    expected = _hwc(video.transpose(0, 1))  # (T, H, W, 3)
    assert np.abs(decoded.astype(float) - expected).mean() < MP4_TOLERANCE


def test_mp4_of_a_batch_tiles_each_frame_and_odd_sizes_are_padded(tmp_path):
    batch = torch.stack([_smooth_video(3, 4, 32, 32), -_smooth_video(3, 4, 32, 32)])
    decoded = _decode_pyav(save_video(batch, tmp_path / "batch.mp4"))
    grid = image_grid(batch[:, :, 2])
    assert decoded.shape == (4, *grid.shape)
    assert np.abs(decoded[2].astype(float) - grid).mean() < MP4_TOLERANCE

    odd = _smooth_video(1, 3, 15, 17)
    decoded = _decode_pyav(save_video(odd, tmp_path / "odd.mp4"))
    assert decoded.shape == (3, 16, 18, 3)  # one black row and column, no rescale
    expected = _hwc(odd.transpose(0, 1))
    assert np.abs(decoded[:, :15, :17].astype(float) - expected).mean() < MP4_TOLERANCE


@pytest.mark.parametrize(
    "shape, name, message",
    [((3, 4, 8), "v.mp4", "T, H, W"), ((2, 4, 8, 8), "v.mp4", "channels"), ((3, 4, 8, 8), "v.avi", r"\.mp4")],
)
def test_save_video_rejects_bad_input(tmp_path, shape, name, message):
    with pytest.raises(ValueError, match=message):
        save_video(torch.zeros(shape), tmp_path / name)


def test_preview_png_is_a_strip_of_frames_by_samples(tmp_path):
    video = torch.rand(2, 3, 4, 8, 6) * 2 - 1  # (B, C, T, H, W)
    strip = _read_png(save_video_preview(video, tmp_path / "strip.png"))
    padding = 2
    assert strip.shape == (2 * (8 + padding) + padding, 4 * (6 + padding) + padding, 3)
    for sample in range(2):
        for frame in range(4):
            top, left = padding + sample * (8 + padding), padding + frame * (6 + padding)
            expected = _hwc(video[sample : sample + 1, :, frame])[0]
            np.testing.assert_array_equal(strip[top : top + 8, left : left + 6], expected)

    single = _read_png(save_video_preview(video[0], tmp_path / "one.png"))
    np.testing.assert_array_equal(single, strip[: 8 + 2 * padding])


def test_preview_gif_animates_the_grid(tmp_path):
    video = torch.rand(4, 1, 5, 8, 8).round() * 2 - 1  # black/white noise: exact in a GIF palette
    with Image.open(save_video_preview(video, tmp_path / "anim.gif", fps=4)) as gif:
        assert gif.n_frames == 5
        for frame in range(5):
            gif.seek(frame)
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), image_grid(video[:, :, frame]))
            assert gif.info["duration"] == 250
    with pytest.raises(ValueError, match=r"\.png, \.gif"):
        save_video_preview(video, tmp_path / "anim.webp")
