"""Where models come from: the model factories and the backbone plugins that installed packages declare.

sprint_mm is the engine and names no backbone. A package that has the backbone registry (this repository's
`registry`) declares its gin-configurable `build_model` and its `build_backbone(name, **options)` under the
`sprint_mm.models` entry point in its pyproject.toml:

    [project.entry-points."sprint_mm.models"]
    build_model = "registry:build_model"
    build_backbone = "registry:build_backbone"

Any number of other installed packages add backbones: each names, under the `sprint_mm.backbones` entry point, a
module whose import registers them (`@BACKBONES.register(...)`):

    [project.entry-points."sprint_mm.backbones"]
    my_backbones = "my_package.backbones"

Building a model, building a backbone and setting up gin (`configs.register_configurables`) import all of them.
"""
from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from torch import nn

ENTRY_POINT_GROUP = "sprint_mm.models"
PLUGIN_GROUP = "sprint_mm.backbones"
FACTORIES = ("build_model", "build_backbone")

ModelFactory = Callable[..., nn.Module]


@cache
def factory(name: str = "build_model") -> ModelFactory:
    """The installed factory `name` (one of FACTORIES); one clear error when there is none or more than one."""
    if name not in FACTORIES:
        raise ValueError(f"unknown model factory {name!r}; allowed: {', '.join(FACTORIES)}")
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if len(found) != 1:
        names = ", ".join(f"{ep.name} = {ep.value} ({distribution(ep)})" for ep in found) or "none"
        raise RuntimeError(
            f"sprint_mm needs exactly one {name!r} under the {ENTRY_POINT_GROUP!r} entry point, found {names}; "
            f"install the project (`pip install -e .`), whose pyproject.toml declares registry:{name}"
        )
    return found[0].load()


def model_factory() -> ModelFactory:
    """The installed `build_model`."""
    return factory("build_model")


@cache
def load_backbone_plugins() -> tuple[str, ...]:
    """Import every module that an installed package names under the `sprint_mm.backbones` entry point (importing it
    registers its backbones); returns the module names. A plugin that fails to import is one error naming it."""
    modules = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as err:
            raise RuntimeError(f"backbone plugin {ep.name} = {ep.value!r} of {distribution(ep)} failed to import: "
                               f"{type(err).__name__}: {err}") from err
        modules.append(ep.module)
    return tuple(modules)


def distribution(ep: EntryPoint) -> str:
    """The installed distribution that declares an entry point, for messages."""
    return f"package {ep.dist.name!r}" if ep.dist is not None else "an unknown package"


def build_model() -> nn.Module:
    """The model the gin configuration describes (backbone, SPRINT or dense, gradient checkpointing)."""
    load_backbone_plugins()
    return model_factory()()


def build_backbone(name: str, **options: Any) -> nn.Module:
    """The backbone registered as `name` (by the registry or a plugin), built with `options` over its gin bindings."""
    load_backbone_plugins()
    return factory("build_backbone")(name, **options)
