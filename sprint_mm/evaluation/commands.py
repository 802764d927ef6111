"""What evaluate.py runs: stream samples through an extractor into statistics, compare them with a reference."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sprint_mm.evaluation.extractors import FeatureExtractor
from sprint_mm.evaluation.frechet import FeatureAccumulator, FeatureStats, frechet_distance, require_npz
from sprint_mm.evaluation.samples import SAMPLE_LAYOUTS, open_samples


def compute_feature_stats(samples_path: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> FeatureStats:
    """Stream the samples through the extractor (with a progress bar) into feature statistics."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = open_samples(samples_path)
    if len(samples.shape) != extractor.sample_ndim:
        raise ValueError(
            f"{samples_path} holds {SAMPLE_LAYOUTS[len(samples.shape)]} samples {samples.shape}, but the extractor "
            f"({extractor.metric_name}) takes {SAMPLE_LAYOUTS[extractor.sample_ndim]}"
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


def is_stats_file(path: str | Path) -> bool:
    """Whether `path` is a statistics ``.npz`` (``mu`` and ``sigma``) rather than samples."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data.files and "sigma" in data.files


def reference_stats(reference_path: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> FeatureStats:
    """Statistics of the reference: read from a ``mu``/``sigma`` ``.npz``, else computed from its samples."""
    path = Path(reference_path)
    if not is_stats_file(path):
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
    require_npz(out_path)  # fail before the long feature pass, not after
    stats = compute_feature_stats(samples_path, extractor, batch_size)
    stats.save(out_path)
    return stats
