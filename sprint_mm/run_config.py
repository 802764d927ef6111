"""A run's `config.gin` read as data: what it may import, and how it differs from the configuration of a resume.

A run folder can come from anyone (a teammate's run, a downloaded checkpoint, a shared disk), and gin executes what a
file asks for: an `include` reads another file, an `import` runs a module's code, and `from __gin__ import
dynamic_registration` lets bindings call any function of an imported module. Training writes `config.gin` fully
resolved (gin's `config_str()`: every binding, no `include`); reading a run's configuration back (`sample.py`,
`load_run`, the benchmarks) first walks its statements with gin's own parser, without executing any, and refuses an
`include`, a `from __gin__` import, and the import of a module nobody trusted. Trusted are this project's packages
(`sprint_mm`, the model factory's package: `registry`), the installed backbone plugins (the `sprint_mm.backbones`
entry point) and the modules the user names (`sample.py --import my_backbones`).

Resume compares the configuration a run was trained with (its `config.gin`) with the one it resumes with, binding by
binding (`config_changes`); only the bindings of `FREE_ON_RESUME` may change without the user saying so.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from gin import config_parser

from sprint_mm.configs import IMPORT_HINT, ConfigError, parse_gin
from sprint_mm.models import load_backbone_plugins, model_factory

# Bindings that change how long a run trains, how it reports or how it spreads over devices, not what a step computes
# (beyond reduction order): a resume may change them.
FREE_ON_RESUME = frozenset({
    "Trainer.max_steps", "Trainer.time_budget_minutes", "Trainer.clock", "Trainer.checkpoint_every",
    "Trainer.keep_checkpoints", "Trainer.log_every", "Trainer.preview_every", "Trainer.progress",
    "Trainer.num_threads", "Trainer.num_workers", "Trainer.max_bad_steps", "Trainer.stop_signals", "Trainer.run_dir",
    "Trainer.context_parallel", "Trainer.activation_checkpointing", "Trainer.fsdp_cpu_offload", "Trainer.compile",
    "Trainer.trackers",
})
FREE_CONFIGURABLES = frozenset({"Previewer"})  # previews only
DYNAMIC_REGISTRATION = "__gin__"
UNSET = "(not bound)"


class UnsafeRunConfig(ConfigError):
    """A run's config.gin that asks for something other than bindings of trusted configurables."""


class ConfigChanged(ConfigError):
    """A resume (or a stage 2 into another run's folder) whose configuration differs from the run's."""


@dataclass(frozen=True)
class Reference:
    """`@name` or `@name()` in a binding, kept as text: reading a value never looks a configurable up."""

    name: str
    evaluate: bool

    def __repr__(self) -> str:
        return f"@{self.name}{'()' if self.evaluate else ''}"


@dataclass(frozen=True)
class Macro:
    """`%name` in a binding, kept as text."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


class AsText(config_parser.ParserDelegate):
    """gin's parser delegate that turns references and macros into text instead of resolving them."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> Reference:
        return Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> Macro:
        return Macro(macro_name)


def statements(text: str, source: str) -> list[Any]:
    """The statements of a gin text (bindings, imports, includes), parsed by gin without executing any; a syntax
    error is one ConfigError naming `source`."""
    try:
        return list(config_parser.ConfigParser(text, AsText()))
    except SyntaxError as err:
        raise ConfigError(f"{source} line {err.lineno}: {err.msg.strip()}: `{(err.text or '').strip()}`") from err


def trusted_packages(imports: Sequence[str] = ()) -> set[str]:
    """The modules a run's config.gin may import: this project's packages, the installed backbone plugins' and the
    user's `imports` (each also trusts its submodules)."""
    return {"sprint_mm", model_factory().__module__.split(".")[0], *load_backbone_plugins(), *imports}


def is_trusted(module: str, trusted: Iterable[str]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in trusted)


def refusal(path: Path, statement: Any, trusted: set[str]) -> str | None:
    """Why a statement of a run's config.gin is refused, or None when it is a binding or a trusted import."""
    where = f"{path} line {statement.location.line_num}"
    if isinstance(statement, config_parser.IncludeStatement):
        return (f"{where}: `include {statement.filename!r}`: a run's config.gin is read as data and may not include "
                "other files (training writes it fully resolved); refusing to read it")
    if not isinstance(statement, config_parser.ImportStatement):
        return None
    if statement.module.split(".")[0] == DYNAMIC_REGISTRATION:
        return (f"{where}: `{statement.format()}`: dynamic registration lets a config call any function of a module; "
                "sprint_mm reads run configurations without it; refusing to read it")
    if not is_trusted(statement.module, trusted):
        module = statement.module.rsplit(".", 1)[0] if statement.is_from else statement.module
        return (f"{where}: `{statement.format()}` would run the code of a module that is neither sprint_mm's, an "
                f"installed backbone plugin's nor one you named; if you trust it, pass --import {module}")
    return None


def check_run_config(path: str | Path, imports: Sequence[str] = ()) -> None:
    """Refuse a run's config.gin that includes files, registers dynamically or imports an untrusted module, with one
    line naming the file, the line and the statement; nothing of it executes."""
    path = Path(path)
    trusted = trusted_packages(imports)
    for statement in statements(path.read_text(), str(path)):
        reason = refusal(path, statement, trusted)
        if reason is not None:
            raise UnsafeRunConfig(reason)


def import_trusted(imports: Sequence[str]) -> None:
    """Import the modules the user named (their imports register backbones and configurables)."""
    for name in imports:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ConfigError(f"--import {name}: {err}.{IMPORT_HINT}") from err


def parse_run_config(path: str | Path, bindings: Sequence[str] = (), imports: Sequence[str] = ()) -> None:
    """Apply a run's config.gin (checked first, see `check_run_config`) and then `bindings`, as `parse_gin` does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run folder {str(path.parent)!r} has no config.gin")
    import_trusted(imports)
    check_run_config(path, imports)
    parse_gin([str(path)], bindings)


def refuse_dynamic_registration(text: str, source: str) -> None:
    """Training refuses a configuration with dynamic registration: its run could never be read back."""
    for statement in statements(text, source):
        if isinstance(statement, config_parser.ImportStatement) and statement.module.startswith(DYNAMIC_REGISTRATION):
            raise ConfigError(f"`{statement.format()}` in the configuration: sprint_mm reads a run's config.gin "
                              "without dynamic registration, so such a run could not be sampled or resumed; register "
                              "configurables with @gin.configurable in a module and `import` it instead")


def binding_values(text: str, source: str) -> dict[str, str]:
    """Every binding of a gin text as 'scope/Configurable.parameter' -> the value as text."""
    values = {}
    for statement in statements(text, source):
        if isinstance(statement, config_parser.BindingStatement):
            scope = f"{statement.scope}/" if statement.scope else ""
            values[f"{scope}{statement.selector}.{statement.arg_name}"] = repr(statement.value)
    return values


def is_free(binding: str) -> bool:
    """A binding a resume may change without --allow-config-change (`FREE_ON_RESUME`, previews)."""
    name = binding.split("/")[-1]
    return name in FREE_ON_RESUME or name.split(".")[0] in FREE_CONFIGURABLES


def config_changes(before: str, after: str, source: str) -> list[str]:
    """'name: old -> new' for every binding that differs between two configurations (free ones included)."""
    old, new = binding_values(before, source), binding_values(after, "the configuration of this command")
    return [f"{name}: {old.get(name, UNSET)} -> {new.get(name, UNSET)}" for name in sorted({*old, *new})
            if old.get(name) != new.get(name)]


def check_resume_config(saved: Path, current: str, allow_change: bool) -> list[str]:
    """The changes of a resume against the run's saved config.gin; a change outside `FREE_ON_RESUME` is refused with
    one line that lists them, unless `allow_change`. Returns every change (for the log)."""
    changes = config_changes(saved.read_text(), current, str(saved))
    fixed = [change for change in changes if not is_free(change.split(":")[0])]
    if fixed and not allow_change:
        raise ConfigChanged(
            f"run folder {str(saved.parent)!r} was trained with another configuration ({saved}); these bindings "
            f"differ: {'; '.join(fixed)}. Resume with the run's configuration, give another Trainer.run_dir (--run-dir) "
            "for a new run, or pass --allow-config-change if you mean to change them")
    return changes
