"""Where models come from: the model factory an installed package provides.

sprint_mm is the engine and names no backbone; a package that has backbones (this repository's `registry`) declares
its gin-configurable `build_model` under the `sprint_mm.models` entry point in its pyproject.toml:

    [project.entry-points."sprint_mm.models"]
    build_model = "registry:build_model"

Loading the entry point imports that package, which registers its backbones with gin.
"""
from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Callable

from torch import nn

ENTRY_POINT_GROUP = "sprint_mm.models"

ModelFactory = Callable[[], nn.Module]


@cache
def model_factory() -> ModelFactory:
    """The installed model factory; one clear error when there is none or more than one."""
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if len(found) != 1:
        names = ", ".join(f"{ep.name} = {ep.value}" for ep in found) or "none"
        raise RuntimeError(
            f"sprint_mm needs exactly one model factory under the {ENTRY_POINT_GROUP!r} entry point, found {names}; "
            "install the project (`pip install -e .`), whose pyproject.toml declares registry:build_model"
        )
    return found[0].load()


def build_model() -> nn.Module:
    """The model the gin configuration describes (backbone, SPRINT or dense, gradient checkpointing)."""
    return model_factory()()
