"""The backbone registry: every backbone registers itself here under a name that gin files use."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, TypeVar

import gin

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

# Importing the backbone modules registers them.
from registry import sit  # noqa: E402,F401
from registry import video_dit, text_dit  # noqa: E402,F401
