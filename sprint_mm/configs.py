"""gin set-up: every configurable registered, the repo's gin/ folder searchable, bindings parsed with clear errors."""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Sequence

import gin

GIN_FOLDER = Path(__file__).resolve().parents[1] / "gin"

# Modules whose import registers gin configurables (optional packages inside them are imported lazily).
CONFIGURABLE_MODULES = (
    "registry",
    "sprint_mm.sprint",
    "sprint_mm.masking",
    "sprint_mm.flow",
    "sprint_mm.sampling",
    "sprint_mm.conditioning",
    "sprint_mm.text",
    "sprint_mm.latents",
    "sprint_mm.generation",
    "sprint_mm.training",
    "sprint_mm.data.digits",
    "sprint_mm.data.captioned_digits",
    "sprint_mm.data.images",
    "sprint_mm.data.video",
    "sprint_mm.data.captions",
    "sprint_mm.data.latents",
)


class ConfigError(ValueError):
    """A .gin file or binding that cannot be applied."""


def register_configurables() -> None:
    for name in CONFIGURABLE_MODULES:
        importlib.import_module(name)


def resolve_gin_file(path: str) -> str:
    """A path as given, else relative to the repo root, else inside gin/."""
    for candidate in (Path(path), GIN_FOLDER.parent / path, GIN_FOLDER / path):
        if candidate.is_file():
            return str(candidate)
    known = sorted(str(p.relative_to(GIN_FOLDER.parent)) for p in GIN_FOLDER.rglob("*.gin"))
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(known)}"
    raise ConfigError(f"gin file {path!r} not found.{hint}")


def configurable_names() -> list[str]:
    """Every configurable gin knows, for suggestions."""
    return sorted({selector.rsplit(".", 1)[-1] for selector in gin.config._REGISTRY._selector_map})  # noqa: SLF001


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Clear gin, then apply files and bindings in order; an unknown or malformed binding is one clear error."""
    register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_FOLDER.parent))
    gin.add_config_file_search_path(str(GIN_FOLDER))
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], list(bindings), finalize_config=False)
    except ConfigError:
        raise
    except Exception as err:  # gin raises ValueError/KeyError/SyntaxError with its own context lines
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name = first_line.split("'")[1] if first_line.count("'") >= 2 else ""
        close = difflib.get_close_matches(name.split(".")[0], configurable_names(), n=3) if name else []
        hint = f" Close configurable names: {', '.join(close)}." if close else ""
        raise ConfigError(f"bad gin configuration: {first_line}.{hint}") from err
