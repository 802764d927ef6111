"""Writing samples a person can look at: image grids, ADM-style .npz packs, mp4 videos, previews.

Every function takes float tensors in [-1, 1] laid out channels-first: images (B, C, H, W),
videos (C, T, H, W) or a batch of videos (B, C, T, H, W). C is 1 (shown as gray) or 3 (RGB).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GRID_PADDING = 2
# x264 constant rate factor: low enough that small white-on-black shapes stay crisp, above 0
# because crf 0 switches x264 to a lossless profile that many players cannot open.
_MP4_CRF = 10
_ALLOWED_CHANNELS = (1, 3)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] to uint8 [0, 255], rounding to nearest; the layout is left unchanged."""
    if not torch.is_floating_point(x):
        raise ValueError(f"to_uint8 expects a floating tensor in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("to_uint8 got NaN or infinite values; the samples are broken, not just out of range")
    return ((x.detach().float() + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


def _check_rank(x: torch.Tensor, ranks: tuple[int, ...], layout: str) -> None:
    if x.ndim not in ranks:
        raise ValueError(f"expected a tensor of layout {layout}, got shape {tuple(x.shape)}")


def _check_channels(channels: int) -> None:
    if channels not in _ALLOWED_CHANNELS:
        raise ValueError(f"expected 1 (gray) or 3 (RGB) channels, got {channels}")


def _check_suffix(path: Path, allowed: tuple[str, ...]) -> None:
    if path.suffix.lower() not in allowed:
        raise ValueError(f"cannot write {path}: the suffix must be one of {', '.join(allowed)}")


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = GRID_PADDING) -> np.ndarray:
    """Tile (B, C, H, W) images into one (H', W', 3) uint8 array, `nrow` images per row.

    Tiles are separated and surrounded by `padding` black pixels; the default `nrow` makes the grid
    as square as possible.
    """
    _check_rank(images, (4,), "(B, C, H, W)")
    batch, channels, height, width = images.shape
    _check_channels(channels)
    if batch == 0:
        raise ValueError("image_grid got an empty batch")
    nrow = math.ceil(math.sqrt(batch)) if nrow is None else nrow
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = min(nrow, batch)
    nrows = math.ceil(batch / nrow)
    tiles = to_uint8(images).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    grid = np.zeros(
        (nrows * (height + padding) + padding, ncol * (width + padding) + padding, 3), dtype=np.uint8
    )
    for index, tile in enumerate(tiles):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write `image_grid(images, nrow)` as a PNG; parent folders are created."""
    path = Path(path)
    _check_suffix(path, (".png",))
    grid = image_grid(images, nrow)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path


def pack_uint8(samples: torch.Tensor) -> torch.Tensor:
    """(N, C, [T,] H, W) in [-1, 1] -> uint8 RGB channels-last (N, [T,] H, W, 3), the ADM/FVD array layout."""
    _check_rank(samples, (4, 5), "(N, C, H, W) or (N, C, T, H, W)")
    _check_channels(samples.shape[1])
    packed = to_uint8(samples).expand(-1, 3, *samples.shape[2:])
    return packed.movedim(1, -1).contiguous()


def unpack_uint8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_uint8` (as RGB): uint8 (N, [T,] H, W, 3) -> float (N, 3, [T,] H, W) in [-1, 1]."""
    return packed.movedim(-1, 1).float() / 127.5 - 1.0


def save_npz(samples: torch.Tensor, path: str | os.PathLike) -> Path:
    """Pack samples for the ADM evaluator: key `arr_0`, uint8 (N, H, W, 3) (videos: (N, T, H, W, 3)).

    Takes float samples (N, C, [T,] H, W) in [-1, 1] or an already packed uint8 array. Written to a temporary file
    beside `path` and renamed into place, so an interrupted run never leaves a truncated pack.
    """
    path = Path(path)
    _check_suffix(path, (".npz",))
    if samples.dtype == torch.uint8:
        _check_rank(samples, (4, 5), "(N, H, W, 3) or (N, T, H, W, 3)")
        array = samples.cpu().numpy()
    else:
        array = pack_uint8(samples).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, arr_0=array)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _video_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) or (B, C, T, H, W) -> (T, H', W', 3) uint8; a batch is tiled as a grid per frame."""
    _check_rank(video, (4, 5), "(C, T, H, W) or (B, C, T, H, W)")
    if video.ndim == 4:
        batch, padding = video[None], 0
    else:
        batch, padding = video, GRID_PADDING
    _check_channels(batch.shape[1])
    if batch.shape[2] == 0:
        raise ValueError(f"the video has no frames: shape {tuple(video.shape)}")
    return np.stack([image_grid(batch[:, :, t], padding=padding) for t in range(batch.shape[2])])


def save_video(video: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write a video, or a batch of videos tiled as a grid, as an H.264 (yuv420p) .mp4.

    yuv420p needs even frame sizes: an odd height or width gets one black row or column at the
    bottom or right, never a rescale.
    """
    import imageio.v2 as imageio

    path = Path(path)
    _check_suffix(path, (".mp4",))
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = _video_frames(video)
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=None,
        output_params=["-crf", str(_MP4_CRF)],
        macro_block_size=2,
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()
    return path


def save_video_preview(video: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write a still or animated preview of (C, T, H, W) or (B, C, T, H, W) videos.

    `.png`: a strip, frames left to right and samples top to bottom. `.gif`: the grid of samples,
    animated at `fps` (frames identical to the previous one are merged by the GIF encoder).
    """
    path = Path(path)
    _check_suffix(path, (".png", ".gif"))
    if path.suffix.lower() == ".png":
        _check_rank(video, (4, 5), "(C, T, H, W) or (B, C, T, H, W)")
        batch = video[None] if video.ndim == 4 else video
        samples, channels, frames, height, width = batch.shape
        strip = batch.transpose(1, 2).reshape(samples * frames, channels, height, width)
        return save_image_grid(strip, path, nrow=frames)
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = [Image.fromarray(frame) for frame in _video_frames(video)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=1000 / fps, loop=0)
    return path
