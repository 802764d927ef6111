"""Tiny models shared by the tests, and the benchmark scripts loaded as modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import benchmarks/<name>.py by path under its own name: the scripts import each other as siblings, as they do
    when run, and must share one module object per script."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
