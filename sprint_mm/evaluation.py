"""Frechet distances (FID, FDD, an FVD-style proxy) over pluggable feature extractors.

Protocol, so that a number can be reproduced and its evaluator named:

* Samples are the ADM evaluator layout: one ``.npz`` whose ``arr_0`` is uint8 ``(N, H, W, 3)`` (images) or
  ``(N, T, H, W, 3)`` (videos), or a folder of PNGs. They are read in batches, never whole.
* Features: ``InceptionExtractor`` (FID; torchvision's PyTorch Inception-v3, pool features, 2048-d),
  ``DinoV2Extractor`` (FDD; DINOv2 CLS token after the final layernorm) or ``VideoExtractor`` (FVD-style proxy
  over any frame extractor). Every extractor states its preprocessing and a sha256 of its weights in
  ``description``, which goes into every result and every reference-statistics file.
* Statistics: mean and covariance (ddof=1) accumulated in float64; the Frechet distance uses
  ``scipy.linalg.sqrtm`` with the usual ``eps * I`` retry, as ADM's evaluator does.

The PyTorch Inception is **not** the TensorFlow graph ADM's evaluator uses (different weights and resize code), so
our FID is not interchangeable with ADM's: report which evaluator produced a number, and compare numbers only
within one evaluator. The delta between the two has not been measured here.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SQRTM_OFFSET = 1e-6
MAX_IMAGINARY = 1e-3  # largest |imag| on the diagonal of sqrtm(sigma1 sigma2) accepted as round-off (as in ADM)

# --------------------------------------------------------------------------------------------------------------------
# Frechet distance and feature statistics
# --------------------------------------------------------------------------------------------------------------------


def _as_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (mean (F,), covariance (F, F)) pair and return it in float64."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or mu.shape[0] == 0 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: expected mu of shape (F,) and sigma of shape (F, F), got {mu.shape} and {sigma.shape}"
        )
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) between two Gaussians."""
    mu1, sigma1 = _as_gaussian(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (same extractor on both?)")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or np.abs(np.diagonal(np.imag(covmean))).max() > MAX_IMAGINARY:
        warnings.warn(
            f"sqrtm(sigma1 @ sigma2) is singular or inaccurate; retrying with {SQRTM_OFFSET} * I added to both "
            "covariances (too few samples for the feature dimension?)",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(mu1.shape[0]) * SQRTM_OFFSET
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    largest_imaginary = np.abs(np.diagonal(np.imag(covmean))).max()
    if not np.isfinite(covmean).all() or largest_imaginary > MAX_IMAGINARY:
        raise ValueError(
            f"sqrtm(sigma1 @ sigma2) failed: non-finite entries or imaginary diagonal up to {largest_imaginary:.3g} "
            f"(allowed {MAX_IMAGINARY}); the covariances are not valid or far too few samples were used"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(np.real(covmean)))


def _require_npz(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics are written to an .npz file, got {path}")
    return path


@dataclass
class FeatureStats:
    """Mean and covariance (ddof=1) of a set of features: what a Frechet distance compares.

    ``count``, ``extractor`` (the extractor's description) and ``sample_shape`` are None when unknown, e.g. for
    statistics read from ADM's reference batches, which carry only ``mu`` and ``sigma``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    extractor: str | None = None
    sample_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.mu, self.sigma = _as_gaussian(self.mu, self.sigma, "FeatureStats")

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        return FeatureAccumulator().add(features).stats()

    def save(self, path: str | Path) -> None:
        """Write ``mu``, ``sigma`` (the ADM reference keys) plus whatever provenance is known to a ``.npz``."""
        path = _require_npz(path)
        provenance = {
            "count": self.count,
            "extractor": self.extractor,
            "sample_shape": None if self.sample_shape is None else np.asarray(self.sample_shape, dtype=np.int64),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=self.mu, sigma=self.sigma, **{k: v for k, v in provenance.items() if v is not None})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a ``.npz`` with ``mu`` and ``sigma`` (ours or ADM's reference batch)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file not found: {path}")
        with np.load(path) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise KeyError(f"{path} has keys {data.files}; Frechet statistics need 'mu' and 'sigma'")
            return cls(
                mu=data["mu"],
                sigma=data["sigma"],
                count=int(data["count"]) if "count" in data.files else None,
                extractor=str(data["extractor"]) if "extractor" in data.files else None,
                sample_shape=tuple(int(v) for v in data["sample_shape"]) if "sample_shape" in data.files else None,
            )


class FeatureAccumulator:
    """Streams features in batches into float64 sums from which ``FeatureStats`` follow.

    Sums are taken about a pivot (the first batch's mean), which keeps the covariance accurate when the mean is
    large compared with the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self._pivot: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> FeatureAccumulator:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, F), got shape {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or inf; the feature network produced invalid values")
        if features.shape[0] == 0:
            return self
        if self._pivot is None:
            self._pivot = features.mean(axis=0)
            self._sum = np.zeros_like(self._pivot)
            self._outer = np.zeros((features.shape[1], features.shape[1]))
        elif features.shape[1] != self._pivot.shape[0]:
            raise ValueError(f"feature dimension changed from {self._pivot.shape[0]} to {features.shape[1]}")
        centred = features - self._pivot
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += features.shape[0]
        return self

    def stats(self, extractor: str | None = None, sample_shape: tuple[int, ...] | None = None) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mean_offset = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_offset, mean_offset)) / (self.count - 1)
        return FeatureStats(self._pivot + mean_offset, sigma, self.count, extractor, sample_shape)


# --------------------------------------------------------------------------------------------------------------------
# Samples on disk
# --------------------------------------------------------------------------------------------------------------------

_LAYOUTS = {4: "(N, H, W, 3)", 5: "(N, T, H, W, 3)"}


def _check_sample_layout(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    if len(shape) not in _LAYOUTS or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"{source}: shape {shape} is neither images (N, H, W, 3) nor videos (N, T, H, W, 3)")
    if dtype != np.uint8:
        raise ValueError(f"{source}: dtype {dtype}; samples must be uint8 RGB")


class _NpzSamples:
    """``arr_0`` of an ADM-style ``.npz``, read in batches straight from the (possibly compressed) archive."""

    member = "arr_0.npy"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if self.member not in names:
                    keys = [name.removesuffix(".npy") for name in names]
                    raise KeyError(f"{path} has keys {keys}; samples must be stored under 'arr_0' (ADM layout)")
                with archive.open(self.member) as stream:
                    self.shape, dtype = self._read_header(stream)
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not a valid .npz archive") from None
        _check_sample_layout(self.shape, dtype, f"{path} arr_0")

    def _read_header(self, stream) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{self.path}: unsupported .npy format version {version} for arr_0")
        shape, fortran_order, dtype = readers[version](stream)
        if fortran_order and len(shape) > 1:
            raise ValueError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous")
        return tuple(shape), dtype

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
            self._read_header(stream)
            for start in range(0, self.shape[0], batch_size):
                batch = np.empty((min(batch_size, self.shape[0] - start), *self.shape[1:]), dtype=np.uint8)
                if stream.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                    raise ValueError(f"{self.path}: arr_0 is truncated (ends before sample {start + len(batch)})")
                yield batch


class _PngFolderSamples:
    """A folder of equally sized PNG images, in file-name order."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.png"))
        if not self.files:
            raise FileNotFoundError(f"no .png files in sample folder {folder}")
        self.shape = (len(self.files), *self._read(self.files[0]).shape)

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            images = []
            for path in self.files[start : start + batch_size]:
                image = self._read(path)
                if image.shape != self.shape[1:]:
                    raise ValueError(f"{path} is {image.shape}, but the folder's first image is {self.shape[1:]}")
                images.append(image)
            yield np.stack(images)


def open_samples(path: str | Path) -> _NpzSamples | _PngFolderSamples:
    """Open samples for batched reading: ``.shape`` is the full array shape, ``.batches(n)`` yields uint8 arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.is_dir():
        return _PngFolderSamples(path)
    if path.suffix == ".npz":
        return _NpzSamples(path)
    raise ValueError(f"samples must be an .npz with 'arr_0' (ADM layout) or a folder of PNGs, got {path}")


def load_samples(path: str | Path) -> np.ndarray:
    """All samples of an ``.npz`` (``arr_0``, uint8 (N, H, W, 3) or (N, T, H, W, 3)) or a PNG folder, in memory."""
    samples = open_samples(path)
    [everything] = samples.batches(samples.shape[0])
    return everything


# --------------------------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """Maps a batch of samples (uint8, or float in [0, 1]) to float64 features (N, F)."""

    metric_name: str  # the key of the distance in results: "fid", "fdd", "fvd_proxy"
    description: str  # what produced the features: network, preprocessing, weights digest
    sample_ndim: int  # 4 for images (N, H, W, 3), 5 for videos (N, T, H, W, 3)

    def __call__(self, samples: np.ndarray) -> np.ndarray: ...


def _check_pixels(samples: np.ndarray, ndim: int) -> None:
    if not isinstance(samples, np.ndarray) or samples.ndim != ndim or samples.shape[-1] != 3:
        shape = getattr(samples, "shape", type(samples).__name__)
        raise ValueError(f"expected an RGB array {_LAYOUTS[ndim]}, got {shape}")
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path} (a local .pth/.pt or .safetensors state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
        return state
    raise ValueError(f"weights file {path} must end in .pth, .pt or .safetensors")


def _load_inception(path: Path) -> nn.Module:
    """torchvision's inception_v3 with local weights, strictly matched, classifier removed (pool features)."""
    from torchvision.models import inception_v3

    state = _read_state_dict(path)
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


def _load_dinov2(path: Path) -> nn.Module:
    """``Dinov2Model`` from a local Hugging Face folder; every weight must be in the folder."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"DINOv2 folder {path} not found or without config.json (a local Hugging Face folder)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "dinov2":
        raise ValueError(f"{config_file} describes model_type {model_type!r}, expected 'dinov2'")
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(path, local_files_only=True, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{path}: weights do not cover the model: missing {sorted(info['missing_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    return model


class DinoV2Extractor(ImageFeatureExtractor):
    """FDD features: DINOv2's CLS token of the last layer after its layernorm (``pooler_output``).

    Preprocessing: bicubic antialiased resize to ``image_size`` (224, as dgm-eval does), ImageNet mean/std.
    ``path`` is a local Hugging Face folder (e.g. a copy of facebook/dinov2-large), or an already-built
    ``Dinov2Model`` (any module whose output has ``pooler_output``).
    """

    metric_name = "fdd"

    def __init__(
        self, path: str | Path | nn.Module, image_size: int = 224, device: str | torch.device | None = None
    ) -> None:
        model = path if isinstance(path, nn.Module) else _load_dinov2(Path(path))
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


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def compute_feature_stats(samples_path: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> FeatureStats:
    """Stream the samples through the extractor (with a progress bar) into feature statistics."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = open_samples(samples_path)
    if len(samples.shape) != extractor.sample_ndim:
        raise ValueError(
            f"{samples_path} holds {_LAYOUTS[len(samples.shape)]} samples {samples.shape}, but the extractor "
            f"({extractor.metric_name}) takes {_LAYOUTS[extractor.sample_ndim]}"
        )
    accumulator = FeatureAccumulator()
    batches = tqdm(
        samples.batches(batch_size),
        total=math.ceil(samples.shape[0] / batch_size),
        desc=f"{extractor.metric_name} features of {Path(samples_path).name}",
        unit="batch",
    )
    for batch in batches:
        accumulator.add(extractor(batch))
    return accumulator.stats(extractor.description, samples.shape[1:])


def _is_stats_file(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data.files and "sigma" in data.files


def reference_stats(reference_path: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> FeatureStats:
    """Statistics of the reference: read from a ``mu``/``sigma`` ``.npz``, else computed from its samples."""
    path = Path(reference_path)
    if not _is_stats_file(path):
        return compute_feature_stats(path, extractor, batch_size)
    stats = FeatureStats.load(path)
    if stats.extractor is None:
        warnings.warn(
            f"reference statistics {path} do not say which extractor made them (ADM's reference batches come from "
            f"its TensorFlow Inception); the distance is only meaningful if they match: {extractor.description}",
            UserWarning,
            stacklevel=2,
        )
    elif stats.extractor != extractor.description:
        raise ValueError(
            f"reference statistics {path} were computed with [{stats.extractor}], "
            f"but the samples use [{extractor.description}]"
        )
    return stats


def evaluate(
    samples_path: str | Path, reference_path: str | Path, extractor: FeatureExtractor, batch_size: int = 50
) -> dict:
    """Frechet distance of the samples to the reference, with what is needed to reproduce and attribute it."""
    reference = reference_stats(reference_path, extractor, batch_size)
    samples = compute_feature_stats(samples_path, extractor, batch_size)
    return {
        "metric": extractor.metric_name,
        extractor.metric_name: frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
        "num_samples": samples.count,
        "sample_shape": list(samples.sample_shape),
        "num_reference": reference.count,
        "reference_shape": None if reference.sample_shape is None else list(reference.sample_shape),
        "extractor": extractor.description,
        "samples": str(samples_path),
        "reference": str(reference_path),
    }


def format_result(result: dict) -> str:
    """One line: metric, value, sample counts and shapes, extractor."""
    metric = result["metric"]
    reference_count = "unknown number of" if result["num_reference"] is None else result["num_reference"]
    return (
        f"{metric} = {result[metric]:.4f} | {result['num_samples']} samples {tuple(result['sample_shape'])} vs "
        f"{reference_count} reference samples ({result['reference']}) | extractor: {result['extractor']}"
    )


def write_reference_stats(
    samples_path: str | Path, extractor: FeatureExtractor, out_path: str | Path, batch_size: int = 50
) -> FeatureStats:
    """Compute the samples' feature statistics and save them (``mu``, ``sigma`` and provenance) to ``out_path``."""
    _require_npz(out_path)  # fail before the long feature pass, not after
    stats = compute_feature_stats(samples_path, extractor, batch_size)
    stats.save(out_path)
    return stats
