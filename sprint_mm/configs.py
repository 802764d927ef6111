"""gin set-up: every configurable registered, the repo's gin/ folder searchable, bindings parsed with clear errors."""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import gin

import sprint_mm
from sprint_mm.models import load_backbone_plugins, model_factory

GIN_FOLDER = Path(__file__).resolve().parents[1] / "gin"


# what a gin `import` line that cannot be imported needs
IMPORT_HINT = (" A gin `import` line needs its module on the Python path: add the folder that holds it to PYTHONPATH or "
               "install its package; sample.py reads the same line from the run's config.gin and needs "
               "--import MODULE to trust it.")
# gin's message for a binding of a parameter the configurable does not have
PARAMETER_TYPO = re.compile(r"'([^']+)' doesn't have a parameter named '([^']+)'")


class ConfigError(ValueError):
    """A .gin file or binding that cannot be applied."""


def register_configurables() -> list[str]:
    """Import every sprint_mm module, the model factory's package and the installed backbone plugins, whose imports
    register their gin configurables; returns the names of the modules searched for configurables."""
    for module in pkgutil.walk_packages(sprint_mm.__path__, prefix="sprint_mm."):
        importlib.import_module(module.name)
    plugins = load_backbone_plugins()
    packages = {"sprint_mm", model_factory().__module__.split(".")[0], *(name.split(".")[0] for name in plugins)}
    return [name for name in list(sys.modules) if name.split(".")[0] in packages]


def resolve_gin_file(path: str) -> str:
    """A path as given, else relative to the repo root, else inside gin/."""
    for candidate in (Path(path), GIN_FOLDER.parent / path, GIN_FOLDER / path):
        if candidate.is_file():
            return str(candidate)
    known = sorted(str(p.relative_to(GIN_FOLDER.parent)) for p in GIN_FOLDER.rglob("*.gin"))
    close = difflib.get_close_matches(path, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(known)}"
    raise ConfigError(f"gin file {path!r} not found.{hint}")


def configurable_names(modules: Sequence[str]) -> dict[str, Any]:
    """Name -> configurable of everything gin can configure in `modules`, for suggestions."""
    found = {}
    for module in modules:
        for value in list(vars(sys.modules[module]).values()):
            if callable(value) and hasattr(value, "__name__"):
                try:
                    found[value.__name__] = gin.get_configurable(value)
                except (ValueError, TypeError):  # not registered with gin (or not even hashable)
                    continue
    return found


def suggestion(message: str, modules: Sequence[str]) -> str:
    """Close configurable (or parameter) names for the name gin's error message quotes."""
    quoted = message.split("'")[1] if message.count("'") >= 2 else ""
    known = configurable_names(modules)
    typo = PARAMETER_TYPO.search(message)
    if typo and typo.group(1) in known:
        configurable, wrong = typo.groups()
        options = list(inspect.signature(known[configurable]).parameters)
        close = difflib.get_close_matches(wrong, options, n=3)
        return f" Close parameter names of {configurable}: {', '.join(close)}." if close else f" Its parameters: {', '.join(options)}."
    close = difflib.get_close_matches(quoted.split(".")[0], known, n=3) if quoted else []
    return f" Close configurable names: {', '.join(close)}." if close else ""


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Clear gin, then apply files and bindings in order; an unknown or malformed binding is one clear error."""
    modules = register_configurables()
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_FOLDER.parent))
    gin.add_config_file_search_path(str(GIN_FOLDER))
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], list(bindings), finalize_config=False)
    except ConfigError:
        raise
    except Exception as err:  # gin raises ValueError/KeyError/SyntaxError with its own context lines
        first_line = gin_error_line(err)
        hint = IMPORT_HINT if isinstance(err, ModuleNotFoundError) else suggestion(first_line, modules)
        raise ConfigError(f"bad gin configuration: {first_line}.{hint}") from err


def gin_error_line(err: Exception) -> str:
    """The first line of gin's message; for a syntax error, its message and the text it could not parse."""
    if isinstance(err, SyntaxError) and err.text:
        where = f"{err.filename} line {err.lineno}" if err.filename else "the binding"
        return f"{err.msg.rstrip('.')} in {where}: `{err.text.strip()}`"
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
