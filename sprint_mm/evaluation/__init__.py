"""Frechet distances (FID, FDD, an FVD-style proxy) over pluggable feature extractors.

Protocol, so that a number can be reproduced and its evaluator named:

* Samples are the ADM evaluator layout: one ``.npz`` whose ``arr_0`` is uint8 ``(N, H, W, 3)`` (images) or
  ``(N, T, H, W, 3)`` (videos), or a folder of PNGs. They are read in batches, never whole (``samples``).
* Features: ``InceptionExtractor`` (FID; torchvision's PyTorch Inception-v3, pool features, 2048-d),
  ``DinoV2Extractor`` (FDD; DINOv2 CLS token after the final layernorm) or ``VideoExtractor`` (FVD-style proxy
  over any frame extractor). Every extractor states its preprocessing and a sha256 of its weights in
  ``description``, which goes into every result and every reference-statistics file (``extractors``).
* Statistics: mean and covariance (ddof=1) accumulated in float64; the Frechet distance uses
  ``scipy.linalg.sqrtm`` with the usual ``eps * I`` retry, as ADM's evaluator does (``frechet``).
* ``commands`` puts them together for evaluate.py.

The PyTorch Inception is **not** the TensorFlow graph ADM's evaluator uses (different weights and resize code), so
our FID is not interchangeable with ADM's: report which evaluator produced a number, and compare numbers only
within one evaluator. The delta between the two has not been measured here.
"""

from sprint_mm.evaluation.commands import (
    compute_feature_stats,
    evaluate,
    format_result,
    is_stats_file,
    reference_stats,
    write_reference_stats,
)
from sprint_mm.evaluation.extractors import (
    EXTRACTOR_KINDS,
    FRAME_KINDS,
    INCEPTION_PREPROCESSING,
    METRIC_EXTRACTORS,
    WEIGHT_SUFFIXES,
    DinoV2Extractor,
    FeatureExtractor,
    ImageFeatureExtractor,
    InceptionExtractor,
    Preprocessing,
    VideoExtractor,
    build_extractor,
    extractor_kind,
)
from sprint_mm.evaluation.frechet import (
    MAX_IMAGINARY,
    SQRTM_OFFSET,
    FeatureAccumulator,
    FeatureStats,
    frechet_distance,
    require_npz,
)
from sprint_mm.evaluation.samples import SAMPLE_LAYOUTS, load_samples, open_samples

__all__ = [
    "EXTRACTOR_KINDS",
    "FRAME_KINDS",
    "INCEPTION_PREPROCESSING",
    "MAX_IMAGINARY",
    "METRIC_EXTRACTORS",
    "SAMPLE_LAYOUTS",
    "SQRTM_OFFSET",
    "WEIGHT_SUFFIXES",
    "DinoV2Extractor",
    "FeatureAccumulator",
    "FeatureExtractor",
    "FeatureStats",
    "ImageFeatureExtractor",
    "InceptionExtractor",
    "Preprocessing",
    "VideoExtractor",
    "build_extractor",
    "compute_feature_stats",
    "evaluate",
    "extractor_kind",
    "format_result",
    "is_stats_file",
    "frechet_distance",
    "load_samples",
    "open_samples",
    "reference_stats",
    "require_npz",
    "write_reference_stats",
]
