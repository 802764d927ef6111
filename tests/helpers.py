"""Tiny models shared by the tests, and the data preparation scripts loaded as modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from registry import BACKBONES
from sprint_mm.sprint import Sprint
from sprint_mm.testing import randomize


def tiny_sit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = dict(hidden_size=32, depth=5, num_heads=2, input_size=8, patch_size=2, in_channels=3, num_classes=4)
    options.update(overrides)
    return BACKBONES.build("sit", **options)


def tiny_sprint(seed: int = 0, encoder_depth: int = 1, decoder_depth: int = 1, **overrides) -> Sprint:
    model = Sprint(tiny_sit(seed, **overrides), encoder_depth=encoder_depth, decoder_depth=decoder_depth)
    return randomize(model, seed + 1).eval()


REPO = Path(__file__).resolve().parents[1]


def script_module(path: str, name: str) -> ModuleType:
    """A command-line script of the repository (`evaluate.py`, `datasets/encode_images.py`) loaded from its path as the
    module `name`, registered in sys.modules as running the script registers it: a script that imports a sibling
    (encode_videos imports encode_images) then finds the sibling once that is loaded. `name` must not be an installed
    package's (`evaluate` is one)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dataset_script(name: str) -> ModuleType:
    """datasets/<name>.py as the module `name` (datasets/ is no package: one named `datasets` would shadow Hugging Face
    datasets)."""
    return script_module(f"datasets/{name}.py", name)
