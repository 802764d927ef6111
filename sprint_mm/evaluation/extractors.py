"""Feature extractors: Inception-v3 pool features (FID), DINOv2's CLS token (FDD) and the FVD-style video proxy.

Every extractor states its preprocessing and a sha256 of its weights in ``description``, which goes into every
result and every reference-statistics file. Weights are local only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sprint_mm.checkpoints import read_state_dict
from sprint_mm.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from sprint_mm.evaluation.samples import SAMPLE_LAYOUTS

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


class FeatureExtractor(Protocol):
    """Maps a batch of samples (uint8, or float in [0, 1]) to float64 features (N, F)."""

    metric_name: str  # the key of the distance in results: "fid", "fdd", "fvd_proxy"
    description: str  # what produced the features: network, preprocessing, weights digest
    sample_ndim: int  # 4 for images (N, H, W, 3), 5 for videos (N, T, H, W, 3)

    def __call__(self, samples: np.ndarray) -> np.ndarray: ...


def _check_pixels(samples: np.ndarray, ndim: int) -> None:
    if not isinstance(samples, np.ndarray) or samples.ndim != ndim or samples.shape[-1] != 3:
        shape = getattr(samples, "shape", type(samples).__name__)
        raise ValueError(f"expected an RGB array {SAMPLE_LAYOUTS[ndim]}, got {shape}")
    if samples.dtype == np.uint8:
        return
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"samples must be uint8 or float in [0, 1], got dtype {samples.dtype}")
    if samples.size and (samples.min() < 0.0 or samples.max() > 1.0):
        raise ValueError(f"float samples must lie in [0, 1], got [{samples.min():.3g}, {samples.max():.3g}]")


def _weights_digest(module: nn.Module) -> str:
    """Short sha256 of a module's state (names and bytes): identifies the weights independently of file paths."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class Preprocessing:
    """Resize to a square ``image_size`` and normalise; applied to float RGB in [0, 1], (N, 3, H, W)."""

    image_size: int
    interpolation: str
    antialias: bool
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            images = F.interpolate(
                images, size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias
            ).clamp(0.0, 1.0)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def describe(self) -> str:
        antialias = " antialiased" if self.antialias else ""
        size = f"{self.image_size}x{self.image_size}"
        return f"resize {size} {self.interpolation}{antialias}, mean {self.mean} std {self.std}"


class ImageFeatureExtractor:
    """Images -> features: preprocess, run a network that returns (N, F), hand back float64 numpy."""

    metric_name = "frechet"
    sample_ndim = 4

    def __init__(
        self, network: nn.Module, preprocessing: Preprocessing, name: str, device: str | torch.device | None = None
    ) -> None:
        if not isinstance(network, nn.Module):
            raise ValueError(f"expected a torch.nn.Module feature network, got {type(network).__name__}")
        self.description = f"{name}; {preprocessing.describe()}; weights sha256:{_weights_digest(network)}"
        self.device = _default_device(device)
        self.network = network.eval().to(self.device)
        self.preprocessing = preprocessing

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_pixels(images, 4)
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        if images.dtype == np.uint8:
            pixels = pixels / 255.0
        features = self.network(self.preprocessing(pixels))
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f"feature network returned shape {tuple(features.shape)}, expected ({len(images)}, F)")
        return features.double().cpu().numpy()


def _load_inception(path: Path) -> nn.Module:
    """torchvision's inception_v3 with local weights, strictly matched, classifier removed (pool features)."""
    from torchvision.models import inception_v3

    if path.is_dir():
        raise ValueError(f"--weights {path} is a folder, but Inception (--metric fid, or fvd with inception frame "
                         "features) loads a state dict file (.pth, .pt or .safetensors); a folder is for DINOv2 "
                         "(--metric fdd, or --frame-features dinov2)")
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path} (a local .pth/.pt or .safetensors state dict)")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights file {path} must end in .pth, .pt or .safetensors")
    state = read_state_dict(path)
    has_aux = any(key.startswith("AuxLogits.") for key in state)
    model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, transform_input=True)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} is not a torchvision inception_v3 state dict: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(reshaped)} with other shapes {reshaped[:5]}"
        )
    model.load_state_dict(state)
    model.fc = nn.Identity()
    return model


INCEPTION_PREPROCESSING = Preprocessing(image_size=299, interpolation="bilinear", antialias=False)


class InceptionExtractor(ImageFeatureExtractor):
    """FID features: torchvision Inception-v3 pool features (2048-d) from a local state dict.

    Preprocessing follows torchvision's IMAGENET1K_V1 Inception weights: bilinear resize to 299x299 (no
    antialiasing, as in the TF graph ADM uses), ImageNet mean/std, then the model's ``transform_input`` re-maps to
    the [-1, 1] scaling those weights were trained with. This is a PyTorch network, not ADM's TensorFlow graph:
    its FID is not interchangeable with numbers from ADM's evaluator.

    ``weights`` is a ``.pth``/``.pt``/``.safetensors`` state dict of ``torchvision.models.inception_v3`` (with or
    without ``AuxLogits``), or an already-built module returning (N, F) features (tests use tiny ones).
    """

    metric_name = "fid"

    def __init__(self, weights: str | Path | nn.Module, device: str | torch.device | None = None) -> None:
        network = weights if isinstance(weights, nn.Module) else _load_inception(Path(weights))
        name = "inception-v3 pool features, transform_input (torchvision PyTorch, not ADM's TensorFlow graph)"
        super().__init__(network, INCEPTION_PREPROCESSING, name, device)

    @classmethod
    def from_module(cls, module: nn.Module, device: str | torch.device | None = None) -> InceptionExtractor:
        return cls(module, device)


class _PooledOutput(nn.Module):
    """Returns ``pooler_output`` of a transformers vision model (for DINOv2: the CLS token after layernorm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


class DinoV2Extractor(ImageFeatureExtractor):
    """FDD features: DINOv2's CLS token of the last layer after its layernorm (``pooler_output``).

    Preprocessing: bicubic antialiased resize to ``image_size`` (224, as dgm-eval does), ImageNet mean/std.
    ``path`` is a local Hugging Face DINOv2 folder, with or without registers (e.g. a copy of
    facebook/dinov2-large), or an already-built ``Dinov2Model`` (any module whose output has ``pooler_output``).
    """

    metric_name = "fdd"

    def __init__(
        self, path: str | Path | nn.Module, image_size: int = 224, device: str | torch.device | None = None
    ) -> None:
        model = path if isinstance(path, nn.Module) else load_dinov2(path)
        preprocessing = Preprocessing(image_size=image_size, interpolation="bicubic", antialias=True)
        super().__init__(_PooledOutput(model), preprocessing, "dinov2 CLS token after final layernorm", device)

    @classmethod
    def from_module(
        cls, module: nn.Module, image_size: int = 224, device: str | torch.device | None = None
    ) -> DinoV2Extractor:
        return cls(module, image_size, device)


class VideoExtractor:
    """FVD-style proxy features: a frame extractor on every frame, then [mean over time, std over time].

    This is a proxy, not FVD: FVD uses an I3D video network, which sees motion; this one sees motion only through
    how frame features vary (their std over time). Input is (N, T, H, W, 3); a batch holds N * T frames, so the
    batch size counts clips. Compare scores only at equal frame count and resolution.
    """

    metric_name = "fvd_proxy"
    sample_ndim = 5

    def __init__(self, frame_extractor: ImageFeatureExtractor) -> None:
        self.frame_extractor = frame_extractor
        self.description = f"video proxy [mean, std over frames] of per-frame {frame_extractor.description}"

    def __call__(self, videos: np.ndarray) -> np.ndarray:
        _check_pixels(videos, 5)
        clips, frames = videos.shape[:2]
        features = self.frame_extractor(videos.reshape(clips * frames, *videos.shape[2:]))
        features = features.reshape(clips, frames, -1)  # (N, T, F)
        return np.concatenate([features.mean(axis=1), features.std(axis=1)], axis=1)  # (N, 2F)


_FRAME_EXTRACTORS = {"inception": InceptionExtractor, "dinov2": DinoV2Extractor}
FRAME_KINDS = tuple(_FRAME_EXTRACTORS)
EXTRACTOR_KINDS = (*FRAME_KINDS, *(f"video-{kind}" for kind in FRAME_KINDS))
METRIC_EXTRACTORS = {"fid": "inception", "fdd": "dinov2", "fvd": "video-{frames}"}


def extractor_kind(metric: str, frame_features: str = "inception") -> str:
    """The extractor kind behind a metric name; ``frame_features`` picks the frame network of the video proxy."""
    if metric not in METRIC_EXTRACTORS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRIC_EXTRACTORS)}")
    if frame_features not in _FRAME_EXTRACTORS:
        raise ValueError(f"unknown frame features {frame_features!r}; choose one of {list(FRAME_KINDS)}")
    return METRIC_EXTRACTORS[metric].format(frames=frame_features)


def build_extractor(
    kind: str, path: str | Path, device: str | torch.device | None = None
) -> ImageFeatureExtractor | VideoExtractor:
    """An extractor of one of ``EXTRACTOR_KINDS`` with weights from the local ``path`` (file or folder)."""
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown extractor kind {kind!r}; choose one of {list(EXTRACTOR_KINDS)}")
    frame_kind = kind.removeprefix("video-")
    frame_extractor = _FRAME_EXTRACTORS[frame_kind](path, device=device)
    return VideoExtractor(frame_extractor) if kind != frame_kind else frame_extractor
