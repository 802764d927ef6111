"""Latent codecs: the map between pixels in [-1, 1] and the space a diffusion model is trained in.

Images are `(B, C, H, W)`, videos `(B, C, T, H, W)`. `VAECodec` (an image AutoencoderKL) takes videos frame by frame;
`VideoVAECodec` (a causal video VAE: Wan, CogVideoX, LTX-Video) also compresses time, 1 + r*k frames to 1 + k.
A VAE's `path` is its own folder or a diffusers pipeline folder (its `vae/`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gin
import torch
from torch import nn

from sprint_mm.dtypes import parse_dtype
from sprint_mm.pipeline_folders import pipeline_component

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


def _check_vae_folder(path: str, what: str, example: str) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"no diffusers {what} at {str(folder)!r}: the folder must hold config.json and "
            f"{' or '.join(WEIGHT_FILES)} (e.g. {example})"
        )


class FrozenVAECodec(LatentCodec):
    """A frozen diffusers VAE from a local folder, always in eval mode; `latent = (z - shift) * scale`.

    Subclasses set `self.vae` through `_load` and give `moments`, `_shift_scale` and `_decode_raw`. `sample=True`
    encodes a posterior draw instead of the posterior mean. Work runs in chunks of `batch_size` on the VAE's device
    and dtype; results come back on the input's device and dtype.
    """

    def __init__(self, name: str, batch_size: int, dtype: str, sample: bool) -> None:
        super().__init__()
        self.torch_dtype = parse_dtype(dtype, f"{name} dtype")
        if batch_size < 1:
            raise ValueError(f"{name} batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.sample = sample

    def _load(self, vae_class: Any, path: str) -> None:
        self.vae = vae_class.from_pretrained(path, local_files_only=True, torch_dtype=self.torch_dtype)
        self.vae.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenVAECodec:
        """The VAE stays in eval mode whatever its parent does."""
        return super().train(False)

    @torch.no_grad()
    def _chunked(self, fn: Callable[[torch.Tensor], Tensors], x: torch.Tensor) -> Tensors:
        """`fn` over chunks of `batch_size` rows of `x` on the VAE, concatenated back on `x`'s device and dtype."""
        param = next(self.vae.parameters())
        chunks = [fn(chunk.to(param.device, param.dtype)) for chunk in x.split(self.batch_size)]
        return tuple(torch.cat(parts).to(x.device, x.dtype) for parts in zip(*chunks))

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the unnormalised latent z."""
        raise NotImplementedError

    def _shift_scale(self, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """`shift` and `scale` broadcastable against `z` (floats, or per-channel tensors)."""
        raise NotImplementedError

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """The latent a diffusion model sees, from the VAE's z."""
        shift, scale = self._shift_scale(z)
        return (z - shift) * scale

    def denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's z, from a latent."""
        shift, scale = self._shift_scale(latent)
        return latent / scale + shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.moments(x)
        z = mean + std * torch.randn_like(std) if self.sample else mean
        return self.normalise(z)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._decode_raw(self.denormalise(latent))


@gin.configurable
class VAECodec(FrozenVAECodec):
    """A frozen diffusers AutoencoderKL (an image VAE); videos go through it frame by frame.

    `scale` and `shift` default to the VAE config (`scaling_factor`, `shift_factor`); explicit values win.
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
        super().__init__("VAECodec", batch_size, dtype, sample)
        path = str(pipeline_component(path, "vae", "VAE"))
        _check_vae_folder(path, "AutoencoderKL", "a local copy of stabilityai/sd-vae-ft-mse")
        from diffusers import AutoencoderKL  # optional dependency: the "latent" extra

        self._load(AutoencoderKL, path)
        config = self.vae.config
        self.scale = float(config.scaling_factor if scale is None else scale)
        self.shift = float((config.shift_factor or 0.0) if shift is None else shift)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def _map(self, fn: Callable[[torch.Tensor], Tensors], x: torch.Tensor) -> Tensors:
        """Apply an image-batch function in chunks; a 5-D video input is folded into frames and back."""
        video = x.dim() == 5
        if video:
            batch, _, frames = x.shape[:3]
            x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        elif x.dim() != 4:
            raise ValueError(f"VAECodec expects (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
        outputs = self._chunked(fn, x)
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

    def _shift_scale(self, z: torch.Tensor) -> tuple[float, float]:
        return self.shift, self.scale

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        (pixels,) = self._map(lambda chunk: (self.vae.decode(chunk).sample,), z)
        return pixels


# ----------------------------------------------------------------------------------------------
# Causal video VAEs
# ----------------------------------------------------------------------------------------------


class VideoVAEFacts(NamedTuple):
    """What a codec needs to know of a video VAE: latent = (z - shift) * scale, per channel."""

    latent_channels: int
    spatial: int  # pixels per latent cell along H and W
    temporal: int  # r: 1 + r*k frames -> 1 + k latent frames
    shift: torch.Tensor  # (C,)
    scale: torch.Tensor  # (C,)


def _wan_facts(vae: Any) -> VideoVAEFacts:
    """Wan 2.1/2.2: per-channel `latents_mean` / `latents_std` lists in the config, latent = (z - mean) / std."""
    config = vae.config
    steps = len(config.dim_mult) - 1  # one 2x spatial downsample between consecutive stages
    return VideoVAEFacts(
        latent_channels=int(config.z_dim),
        spatial=2**steps * (config.patch_size or 1),  # Wan 2.2 patchifies 2x2 first: 16
        temporal=2 ** sum(config.temperal_downsample[:steps]),
        shift=torch.tensor(config.latents_mean, dtype=torch.float32),
        scale=1 / torch.tensor(config.latents_std, dtype=torch.float32),
    )


def _cogvideox_facts(vae: Any) -> VideoVAEFacts:
    """CogVideoX: one `scaling_factor` (1.15258426 for 2B, 0.7 for 5B), latent = (z - shift_factor) * scaling_factor."""
    config = vae.config
    channels = int(config.latent_channels)
    return VideoVAEFacts(
        latent_channels=channels,
        spatial=2 ** (len(config.block_out_channels) - 1),
        temporal=int(config.temporal_compression_ratio),
        shift=torch.full((channels,), float(config.shift_factor or 0.0)),
        scale=torch.full((channels,), float(config.scaling_factor)),
    )


def _ltx_facts(vae: Any) -> VideoVAEFacts:
    """LTX-Video: `latents_mean` / `latents_std` buffers in the weights and `scaling_factor` in the config,
    latent = (z - mean) * scaling_factor / std (the LTX pipeline's `_normalize_latents`)."""
    return VideoVAEFacts(
        latent_channels=int(vae.config.latent_channels),
        spatial=int(vae.spatial_compression_ratio),
        temporal=int(vae.temporal_compression_ratio),
        shift=vae.latents_mean.detach().float().clone(),
        scale=float(vae.config.scaling_factor) / vae.latents_std.detach().float(),
    )


def _hunyuan_video_facts(vae: Any) -> VideoVAEFacts:
    """HunyuanVideo: one `scaling_factor` (0.476986), no shift, latent = z * scaling_factor (HunyuanVideoPipeline
    decodes latents / scaling_factor); 4x temporal and 8x spatial compression in the released VAE."""
    channels = int(vae.config.latent_channels)
    return VideoVAEFacts(
        latent_channels=channels,
        spatial=int(vae.spatial_compression_ratio),
        temporal=int(vae.temporal_compression_ratio),
        shift=torch.zeros(channels),
        scale=torch.full((channels,), float(vae.config.scaling_factor)),
    )


VIDEO_VAES: dict[str, Callable[[Any], VideoVAEFacts]] = {
    "AutoencoderKLWan": _wan_facts,
    "AutoencoderKLCogVideoX": _cogvideox_facts,
    "AutoencoderKLLTXVideo": _ltx_facts,
    "AutoencoderKLHunyuanVideo": _hunyuan_video_facts,
}


def _video_vae_class(path: str, vae_class: str | None) -> str:
    """The diffusers class to load: `vae_class` when given, else config.json's `_class_name`; one of VIDEO_VAES."""
    known = ", ".join(VIDEO_VAES)
    if vae_class is not None:
        if vae_class not in VIDEO_VAES:
            raise ValueError(f"VideoVAECodec vae_class {vae_class!r} is not one of {known}")
        return vae_class
    named = json.loads((Path(path) / "config.json").read_text()).get("_class_name")
    if named not in VIDEO_VAES:
        raise ValueError(
            f"{str(Path(path) / 'config.json')!r} names _class_name {named!r}; VideoVAECodec loads {known} "
            "(set vae_class to one of them if the folder holds such a VAE)"
        )
    return named


@gin.configurable
class VideoVAECodec(FrozenVAECodec):
    """A frozen diffusers causal video VAE: `AutoencoderKLWan`, `AutoencoderKLCogVideoX`, `AutoencoderKLLTXVideo` or
    `AutoencoderKLHunyuanVideo`.

    The first frame is encoded alone and every further r frames become one latent frame: a clip of 1 + r*k frames
    gives 1 + k latent frames (r = `temporal_downsample`: 4 for Wan, CogVideoX and HunyuanVideo, 8 for LTX-Video); a
    still image `(B, C, H, W)` is a one-frame clip and comes back 4-D. The latent is normalised as each family's
    pipelines do (see `VIDEO_VAES`). `batch_size` is clips per VAE call; `decode_timestep` is the decoder's timestep
    for LTX VAEs with `timestep_conditioning` (0.9.1 and later) and unused otherwise.
    """

    def __init__(
        self,
        path: str,
        vae_class: str | None = None,
        batch_size: int = 1,
        dtype: str = "float32",
        sample: bool = False,
        decode_timestep: float = 0.0,
    ) -> None:
        super().__init__("VideoVAECodec", batch_size, dtype, sample)
        path = str(pipeline_component(path, "vae", "video VAE"))
        _check_vae_folder(
            path, f"causal video VAE ({', '.join(VIDEO_VAES)})", "the vae/ folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
        self.vae_class = _video_vae_class(path, vae_class)
        import diffusers  # optional dependency: the "latent" extra

        self._load(getattr(diffusers, self.vae_class), path)
        facts = VIDEO_VAES[self.vae_class](self.vae)
        self.latent_channels = facts.latent_channels
        self.downsample = facts.spatial
        self.temporal_downsample = facts.temporal
        self.register_buffer("shift", facts.shift, persistent=False)
        self.register_buffer("scale", facts.scale, persistent=False)
        self.decode_timestep = decode_timestep

    def allowed_frames(self) -> str:
        """The clip lengths this VAE encodes, in words: '1 + 4k: allowed 1, 5, 9, 13, 17, ...'."""
        r = self.temporal_downsample
        return f"1 + {r}k: allowed {', '.join(str(1 + r * k) for k in range(5))}, ..."

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames; a ValueError names the allowed counts otherwise."""
        if frames < 1 or (frames - 1) % self.temporal_downsample:
            raise ValueError(f"{frames} frames: {self.vae_class} encodes clips of {self.allowed_frames()}")
        return 1 + (frames - 1) // self.temporal_downsample

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames of the clip that `latent_frames` latent frames decode to."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + self.temporal_downsample * (latent_frames - 1)

    def _as_clip(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        if x.dim() not in (4, 5) or x.shape[1] != channels:
            raise ValueError(f"VideoVAECodec expects {what} (B, {channels}, [T,] H, W), got shape {tuple(x.shape)}")
        return x.unsqueeze(2) if x.dim() == 4 else x

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the unnormalised latent, `(B, C, 1 + k, h, w)` for `(B, 3, 1 + r*k, H, W)`."""
        clip = self._as_clip(x, 3, "pixels")
        height, width = clip.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"{height}x{width} pixels: {self.vae_class} needs height and width divisible by {self.downsample}"
            )
        expected = (self.latent_channels, self.latent_frames(clip.shape[2]),
                    height // self.downsample, width // self.downsample)

        def posterior(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = self.vae.encode(chunk).latent_dist
            return dist.mean, dist.std

        mean, std = self._chunked(posterior, clip)
        if tuple(mean.shape[1:]) != expected:
            raise RuntimeError(f"{self.vae_class} gave latents {tuple(mean.shape)}, its config implies {expected}")
        return (mean.squeeze(2), std.squeeze(2)) if x.dim() == 4 else (mean, std)

    def normalised_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the normalised latent (what `encode` returns a draw of)."""
        mean, std = self.moments(x)
        return self.normalise(mean), std * self._shift_scale(std)[1].abs()

    def _shift_scale(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._as_clip(z, self.latent_channels, "latents")
        view = (-1,) + (1,) * (z.dim() - 2)
        return self.shift.view(view).to(z.dtype), self.scale.view(view).to(z.dtype)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        clip = self._as_clip(z, self.latent_channels, "latents")
        conditioned = getattr(self.vae.config, "timestep_conditioning", False)

        def decode(chunk: torch.Tensor) -> tuple[torch.Tensor]:
            if conditioned:
                timestep = torch.full((len(chunk),), self.decode_timestep, device=chunk.device, dtype=chunk.dtype)
                return (self.vae.decode(chunk, timestep).sample,)
            return (self.vae.decode(chunk).sample,)

        (pixels,) = self._chunked(decode, clip)
        return pixels.squeeze(2) if z.dim() == 4 else pixels


CODECS: dict[str, type[LatentCodec]] = {"identity": IdentityCodec, "vae": VAECodec, "video_vae": VideoVAECodec}


@gin.configurable
def build_codec(kind: str = "identity", **kwargs: Any) -> LatentCodec:
    """The codec named `kind` (a key of CODECS); keyword arguments go to its constructor."""
    if kind not in CODECS:
        raise KeyError(f"unknown latent codec {kind!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[kind](**kwargs)


def codec_is_identity() -> bool:
    """Whether the configured codec is pixel space (the default when `build_codec.kind` is not bound)."""
    try:
        return gin.query_parameter("build_codec.kind") == "identity"
    except ValueError:
        return True
