"""Resize so the shorter side is the resolution, then cut the centre square: the one crop every dataset uses."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TORCH_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_center_crop(
    x: torch.Tensor,
    resolution: int,
    interpolation: str | Image.Resampling,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Resize (..., H, W) so its shorter side is `resolution`, then crop the centre square (offsets rounded down).

    `interpolation` is a torch mode of TORCH_INTERPOLATIONS (antialiased; the result is float32) or a PIL filter
    such as `Image.Resampling.BICUBIC`, which resizes uint8 RGB (3, H, W). `clamp` bounds the resized values
    (bicubic overshoots). A square input already at `resolution` comes back untouched.
    """
    height, width = x.shape[-2:]
    if (height, width) != (resolution, resolution):
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
        resize = _resize_torch if isinstance(interpolation, str) else _resize_pil
        x = resize(x, size, interpolation)
        if clamp is not None:
            x = x.clamp(*clamp)
        height, width = size
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return x[..., top : top + resolution, left : left + resolution]


def _resize_torch(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode not in TORCH_INTERPOLATIONS:
        raise ValueError(f"interpolation {mode!r} is not one of {TORCH_INTERPOLATIONS} or a PIL resampling filter")
    planes = x.reshape(1, -1, *x.shape[-2:]).float()  # every leading index is one plane
    resized = F.interpolate(planes, size=size, mode=mode, antialias=True, align_corners=False)
    return resized.reshape(*x.shape[:-2], *size)


def _resize_pil(x: torch.Tensor, size: tuple[int, int], resample: Image.Resampling) -> torch.Tensor:
    if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"a PIL filter resizes uint8 RGB (3, H, W) pixels, got {x.dtype} {tuple(x.shape)}")
    image = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())
    resized = np.asarray(image.resize((size[1], size[0]), resample))  # PIL sizes are (width, height)
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)
