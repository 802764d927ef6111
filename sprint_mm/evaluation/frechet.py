"""Frechet distance between two Gaussians, and the feature statistics (mean, covariance) it compares."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

SQRTM_OFFSET = 1e-6
MAX_IMAGINARY = 1e-3  # largest |imag| on the diagonal of sqrtm(sigma1 sigma2) accepted as round-off (as in ADM)


def _as_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (mean (F,), covariance (F, F)) pair and return it in float64."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or mu.shape[0] == 0 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: expected mu of shape (F,) and sigma of shape (F, F), got {mu.shape} and {sigma.shape}"
        )
    bad = int((~np.isfinite(mu)).sum() + (~np.isfinite(sigma)).sum())
    if bad:  # scipy's sqrtm does not return on them (it was killed after 11 minutes)
        raise ValueError(f"{name}: mu and sigma hold {bad} NaN or infinite value(s): these statistics come from "
                         "failed features and cannot be compared; compute them again")
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


def require_npz(path: str | Path) -> Path:
    """`path` as a Path; a ValueError unless it names an ``.npz`` file, the format statistics are written in."""
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
        path = require_npz(path)
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
            _as_gaussian(data["mu"], data["sigma"], f"statistics file {path}")  # named by its file
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
