"""DINOv2 from a local transformers folder (REPA's alignment targets, FDD's features) and the ImageNet normalisation
its inputs, like those of torchvision's ImageNet networks, take."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# config.json model_type -> transformers class
MODEL_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}


def load_dinov2(path: str | os.PathLike) -> nn.Module:
    """A frozen DINOv2 (with or without registers) in eval mode from a local folder; nothing is downloaded.

    The folder's weights must cover the whole model: a partly random encoder would give meaningless features.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no DINOv2 model at {str(folder)!r}: the folder must hold a transformers config.json and its weights "
            "(e.g. a local copy of facebook/dinov2-base)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{str(config_file)!r} describes model_type {model_type!r}; a DINOv2 folder holds one of "
            f"{', '.join(MODEL_CLASSES)}"
        )
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[model_type])
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except OSError as error:
        raise FileNotFoundError(f"cannot load the DINOv2 weights in {str(folder)!r}: {error}") from error
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"the weights in {str(folder)!r} do not cover the model: missing {sorted(info['missing_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    return model.eval().requires_grad_(False)
