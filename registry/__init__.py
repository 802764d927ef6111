"""The backbone registry: every backbone registers itself here under a name that gin files use, and `build_model`
builds the one a configuration names (wrapped in SPRINT, or alone: the dense baseline).

`sprint_mm` never imports this package; it finds `build_model` and `build_backbone` through the `sprint_mm.models`
entry points that pyproject.toml declares (see sprint_mm/models.py). Backbones of other installed packages register
here too, from the modules those packages name under the `sprint_mm.backbones` entry point.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Iterable, Optional, TypeVar

import gin
from torch import nn

from sprint_mm.lora import LoRA
from sprint_mm.sprint import Sprint

T = TypeVar("T")


class Registry:
    """A name -> factory table with errors that list the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a class or factory under `name` and make it gin-configurable as `name`."""

        def add(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            configurable = gin.configurable(name, module=None)(factory)
            self._entries[name] = configurable
            return configurable

        return add

    def specialise(self, name: str, cls: Callable[..., T], doc: str, fixed: Iterable[str] = (), **defaults: Any) -> Callable[..., T]:
        """Register `cls` under `name` with other defaults: a factory whose signature is cls's keyword-only one with
        `defaults` applied and the `fixed` options (held at those defaults) left out, so gin checks every binding."""
        fixed = set(fixed)
        unknown = (fixed | set(defaults)) - set(inspect.signature(cls).parameters)
        if unknown:
            raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
        signature = inspect.signature(cls)
        parameters = [parameter.replace(default=defaults.get(parameter.name, parameter.default))
                      for parameter in signature.parameters.values() if parameter.name not in fixed]

        def factory(**options: Any) -> T:
            return cls(**{**defaults, **options})

        factory.__name__ = factory.__qualname__ = name
        factory.__doc__ = doc
        factory.__signature__ = signature.replace(parameters=parameters, return_annotation=cls)
        return self.register(name)(factory)

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under `name`; an unknown name lists the known ones."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries)) or '(none)'}"
            )
        return self._entries[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style pattern, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def build(self, name: str, **overrides: Any) -> Any:
        """Instantiate `name`; keyword overrides win over gin bindings."""
        return self.get(name)(**overrides)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


BACKBONES = Registry("backbone")


@gin.configurable
def build_model(backbone: str = "sit", sprint: bool = True, gradient_checkpointing: bool = False,
                lora: Optional[LoRA] = None) -> nn.Module:
    """The backbone named in the registry, wrapped in `Sprint` (or alone: the dense baseline).

    `gradient_checkpointing` recomputes each block's activations in the backward pass instead of keeping them;
    `lora` (e.g. `@LoRA()`) adapts the backbone's linear layers with low-rank adapters and freezes the rest of it.
    """
    model = BACKBONES.build(backbone)
    model.gradient_checkpointing = gradient_checkpointing
    model = Sprint(model) if sprint else model
    return model if lora is None else lora.apply(model)


def build_backbone(name: str, **options: Any) -> nn.Module:
    """The backbone registered as `name`, built with `options` over its gin bindings (`sprint_mm.testing` builds
    backbones by name through this, as the `sprint_mm.models` entry point `build_backbone`)."""
    return BACKBONES.build(name, **options)


# Importing the backbone modules registers them.
from registry import diffusers_families, sit, text_dit, uvit, video_dit  # noqa: E402,F401
