"""Resize to cover the target size, then cut its centre: the one crop every dataset uses."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TORCH_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_center_crop(
    x: torch.Tensor,
    size: int | tuple[int, int],
    interpolation: str | Image.Resampling,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Resize (..., H, W) to the smallest size that covers `size` (an int n: (n, n); else (height, width)) keeping
    its aspect ratio, then crop the centre (offsets rounded down). For a square `size` that is: the shorter side
    becomes n, then the centre square.

    `interpolation` is a torch mode of TORCH_INTERPOLATIONS (antialiased; the result is float32) or a PIL filter
    such as `Image.Resampling.BICUBIC`, which resizes uint8 RGB (3, H, W). `clamp` bounds the resized values
    (bicubic overshoots). An input already of `size` comes back untouched.
    """
    target_height, target_width = (size, size) if isinstance(size, int) else size
    height, width = x.shape[-2:]
    if (height, width) != (target_height, target_width):
        scale = max(target_height / height, target_width / width)
        covering = (max(target_height, round(height * scale)), max(target_width, round(width * scale)))
        resize = _resize_torch if isinstance(interpolation, str) else _resize_pil
        x = resize(x, covering, interpolation)
        if clamp is not None:
            x = x.clamp(*clamp)
    return center_crop(x, (target_height, target_width))


def center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """The centre `size` of the trailing len(size) dimensions of x (e.g. (height, width)), offsets rounded down;
    x must be at least that large."""
    have = tuple(x.shape[x.dim() - len(size):])
    if any(got < want for got, want in zip(have, size)):
        raise ValueError(f"cannot crop {'x'.join(map(str, size))} from {'x'.join(map(str, have))}: the input is "
                         "smaller")
    for dim, (got, want) in enumerate(zip(have, size), start=x.dim() - len(size)):
        x = x.narrow(dim, (got - want) // 2, want)
    return x


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
