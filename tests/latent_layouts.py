"""REPA/EDM2 latent layouts written by hand, for the latent dataset tests and the bad-data tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from sprint_mm.data.latents import image_member, latent_member


def write_latent_layout(
    root: Path, means: dict[int, np.ndarray], stds: dict[int, np.ndarray], labels: dict[int, int]
) -> None:
    """Write a layout by hand, in shuffled creation order; image `i` is filled with the value `i % 256`."""
    order = list(means)
    random.Random(0).shuffle(order)
    for index in order:
        path = root / "vae-sd" / latent_member(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.concatenate([means[index], stds[index]]).astype(np.float32))
        path = root / "images" / image_member(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (index % 256,) * 3).save(path)
    content = {"labels": [[latent_member(i), labels[i]] for i in order]}
    (root / "vae-sd" / "dataset.json").write_text(json.dumps(content))
