"""Latent codecs: the map between pixels in [-1, 1] and the space a diffusion model is trained in.

Images are `(B, C, H, W)`; videos `(B, C, T, H, W)` go through an image codec frame by frame.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import torch
from torch import nn

from sprint_mm.dtypes import parse_dtype

Tensors = tuple[torch.Tensor, ...]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class LatentCodec(nn.Module):
    """Base: `encode` pixels in [-1, 1] to scaled latents, `decode` them back.

    `latent_channels` is C of the latent, `downsample` the spatial factor from pixels to latent.
    """

    latent_channels: int
    downsample: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@gin.configurable
class IdentityCodec(LatentCodec):
    """Pixel space: the latent is the image itself."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels
        self.downsample = 1

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (4, 5) or x.shape[1] != self.latent_channels:
            raise ValueError(
                f"IdentityCodec expects (B, {self.latent_channels}, [T,] H, W), got shape {tuple(x.shape)}"
            )
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._check(x)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._check(latent)


def _check_vae_folder(path: str) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"no diffusers AutoencoderKL at {str(folder)!r}: the folder must hold config.json and "
            f"{' or '.join(WEIGHT_FILES)} (e.g. a local copy of stabilityai/sd-vae-ft-mse)"
        )


@gin.configurable
class VAECodec(LatentCodec):
    """A frozen diffusers AutoencoderKL loaded from a local folder; `latent = (z - shift) * scale`.

    `scale` and `shift` default to the VAE config (`scaling_factor`, `shift_factor`); explicit values win.
    `sample=True` encodes a posterior draw instead of the posterior mean. Work runs in chunks of
    `batch_size` on the VAE's device; results come back on the input's device and dtype.
    """

    def __init__(
        self,
        path: str,
        scale: float | None = None,
        shift: float | None = None,
        batch_size: int = 16,
        dtype: str = "float32",
        sample: bool = False,
    ) -> None:
        super().__init__()
        torch_dtype = parse_dtype(dtype, "VAECodec dtype")
        if batch_size < 1:
            raise ValueError(f"VAECodec batch_size must be >= 1, got {batch_size}")
        _check_vae_folder(path)
        from diffusers import AutoencoderKL  # optional dependency: the "latent" extra

        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype)
        self.vae.requires_grad_(False)
        config = self.vae.config
        self.scale = float(config.scaling_factor if scale is None else scale)
        self.shift = float((config.shift_factor or 0.0) if shift is None else shift)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.batch_size = batch_size
        self.sample = sample
        self.eval()

    def train(self, mode: bool = True) -> VAECodec:
        """The VAE stays in eval mode whatever its parent does."""
        return super().train(False)

    @torch.no_grad()
    def _map(self, fn: Callable[[torch.Tensor], Tensors], x: torch.Tensor) -> Tensors:
        """Apply an image-batch function in chunks; a 5-D video input is folded into frames and back."""
        video = x.dim() == 5
        if video:
            batch, _, frames = x.shape[:3]
            x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        elif x.dim() != 4:
            raise ValueError(f"VAECodec expects (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
        param = next(self.vae.parameters())
        chunks = [fn(chunk.to(param.device, param.dtype)) for chunk in x.split(self.batch_size)]
        outputs = tuple(torch.cat(parts).to(x.device, x.dtype) for parts in zip(*chunks))
        if video:
            outputs = tuple(out.unflatten(0, (batch, frames)).transpose(1, 2) for out in outputs)
        return outputs

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the unscaled latent (what the REPA/EDM2 layout stores)."""

        def posterior(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = self.vae.encode(chunk).latent_dist
            return dist.mean, dist.std

        mean, std = self._map(posterior, x)
        return mean, std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.moments(x)
        z = mean + std * torch.randn_like(std) if self.sample else mean
        return (z - self.shift) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        (pixels,) = self._map(lambda chunk: (self.vae.decode(chunk / self.scale + self.shift).sample,), latent)
        return pixels


CODECS: dict[str, type[LatentCodec]] = {"identity": IdentityCodec, "vae": VAECodec}


@gin.configurable
def build_codec(kind: str = "identity", **kwargs: Any) -> LatentCodec:
    """The codec named `kind` ('identity' or 'vae'); keyword arguments go to its constructor."""
    if kind not in CODECS:
        raise KeyError(f"unknown latent codec {kind!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[kind](**kwargs)


def codec_is_identity() -> bool:
    """Whether the configured codec is pixel space (the default when `build_codec.kind` is not bound)."""
    try:
        return gin.query_parameter("build_codec.kind") == "identity"
    except ValueError:
        return True
